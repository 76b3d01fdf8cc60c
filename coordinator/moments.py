"""Sampling variances beyond normal theory, from what the bands release.

The textbook standard errors of an SD, value / sqrt(2 (n - 1)), and of a regression's
coefficients, residual SD * sqrt((X'X)^-1), hold for normal data with one spread. Outcome
data are neither: change near the floor of a scale has heavy tails (kurtosis near 5),
intake over a whole scale is flat (near 2), and the spread of change grows with intake.
Measured over repeated studies (tests/statistical/test_coverage.py) the textbook SEs gave
85% coverage for the SD of change in a mild band and 99.6% for the reference SD of intake.

This module holds the first-order (delta-method) sampling variances that use the fourth
moments instead:

- the SD of n draws with kurtosis k: Var(s) = sigma^2 (k - 1 + 2 / (n - 1)) / (4 n), which
  is sigma^2 / (2 (n - 1)) at k = 3;
- the kurtosis of change in a band from the band's change histogram, where the study
  releases it (its noisy counts, unclipped, so the noise adds no bias to the sums);
- the kurtosis of intake over all bands from the bands' counts, means and variances, with
  each band's within-band shape taken as the maximum-entropy distribution on its integer
  scores with that mean and variance (a discretised normal truncated to the band: no
  assumption beyond the two moments the band releases);
- the regression's heteroscedasticity-consistent (sandwich) covariance, assembled from each
  band's first and second moments of intake and change (the within-band third moments,
  which are not released, taken as zero; the fourth by Isserlis' rule).

Every function is a function of released values only: they post-process the noisy sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["BandMoments", "maxent_moments", "pooled_kurtosis", "regression_sampling",
           "sample_moments", "sd_se"]

NORMAL_KURTOSIS = 3.0


def sd_se(sd: float, n: float, kurtosis: float = NORMAL_KURTOSIS) -> float:
    """Sampling SE of the SD of ``n`` independent draws of this kurtosis: Var(s^2) =
    sigma^4 ((k - 1) / n + 2 / (n (n - 1))), and Var(s) = Var(s^2) / (4 sigma^2)."""
    k = max(kurtosis, 1.0)  # no distribution has less
    return sd * math.sqrt((k - 1 + 2 / max(n - 1, 1.0)) / (4 * max(n, 1.0)))


@dataclass(frozen=True, slots=True)
class Shape:
    """Standardised third and fourth moments (skewness and kurtosis)."""

    skewness: float = 0.0
    kurtosis: float = NORMAL_KURTOSIS


def sample_moments(values: npt.NDArray[np.float64], counts: npt.NDArray[np.float64]
                   ) -> Shape | None:
    """The shape of a histogram (``counts`` of ``values``), or None where the counts give
    no positive spread. Noisy counts are used as released, negative ones included: each
    moment is then a linear function of the counts, unbiased for the true one."""
    total = float(counts.sum())
    if total <= 0:
        return None
    mean = float(values @ counts) / total
    dev = values - mean
    m2 = float((dev**2) @ counts) / total
    if m2 <= 0:
        return None
    with np.errstate(all="ignore"):
        m2_ = np.float64(m2)  # a tiny spread gives inf here, not ZeroDivisionError
        skew = float(np.float64((dev**3) @ counts) / total / m2_**1.5)
        kurt = float(np.float64((dev**4) @ counts) / total / m2_ / m2_)
    if not (math.isfinite(skew) and math.isfinite(kurt)):
        return None
    return Shape(skewness=skew, kurtosis=max(kurt, 1.0))


def maxent_moments(lo: int, hi: int, mean: float, var: float) -> tuple[float, float]:
    """Third and fourth central moments of the maximum-entropy distribution on the integers
    lo..hi with this mean and variance (p_k proportional to exp(a t_k + b t_k^2), found by
    Newton's method on the convex dual). Values outside what lo..hi allow (noisy sums) are
    moved just inside."""
    if hi <= lo:
        return 0.0, 0.0
    half = (hi - lo) / 2
    grid = np.arange(lo, hi + 1, dtype=np.float64)
    t = (grid - (lo + hi) / 2) / half  # in [-1, 1]
    m = min(max((mean - (lo + hi) / 2) / half, -0.98), 0.98)
    # The largest variance with mean m on [-1, 1] is (1 - m)(1 + m) (all mass at the ends).
    cap = (1 - m) * (1 + m)
    v = min(max(var, 0.01) / half**2, 0.98 * cap)
    target = np.array([m, v + m * m])
    feats = np.stack([t, t * t])
    lam = np.zeros(2)
    for _ in range(100):
        z = lam @ feats
        w = np.exp(z - z.max())
        p = w / w.sum()
        mom = feats @ p
        grad = mom - target
        if float(np.abs(grad).max()) < 1e-12:
            break
        cov = (feats * p) @ feats.T - np.outer(mom, mom)
        try:
            step = np.linalg.solve(cov + 1e-12 * np.eye(2), grad)
        except np.linalg.LinAlgError:
            break
        # Damped: the dual is convex, a shorter step never increases it past the optimum.
        scale = min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-12))
        lam -= scale * step
    z = lam @ feats
    w = np.exp(z - z.max())
    p = w / w.sum()
    mu = float(grid @ p)
    dev = grid - mu
    return float((dev**3) @ p), float((dev**4) @ p)


def pooled_kurtosis(bands: Sequence[tuple[float, float, float, float, float]]) -> float:
    """Kurtosis of a mixture of bands given as (n, mean, variance, m3, m4), the last two
    the bands' central moments: the mixture's fourth central moment is
    sum_b w_b (m4_b + 4 d_b m3_b + 6 d_b^2 v_b + d_b^4), d_b = mean_b - the overall mean."""
    n = sum(b[0] for b in bands)
    if n <= 0:
        return NORMAL_KURTOSIS
    mu = sum(b[0] * b[1] for b in bands) / n
    m2 = m4 = 0.0
    for nb, mean, var, m3b, m4b in bands:
        w, d = nb / n, mean - mu
        m2 += w * (var + d * d)
        m4 += w * (m4b + 4 * d * m3b + 6 * d * d * var + d**4)
    return m4 / (m2 * m2) if m2 > 0 else NORMAL_KURTOSIS


@dataclass(frozen=True, slots=True)
class BandMoments:
    """One band's first and second moments of intake x and change c (per episode), and
    the shape of its change where the study releases the change histogram."""

    n: float
    mean_x: float
    var_x: float
    mean_c: float
    var_c: float
    cov_xc: float
    change: Shape = Shape()


def regression_sampling(bands: Sequence[BandMoments], intercept: float, slope: float
                        ) -> tuple[float, float, float]:
    """Sampling SEs of (intercept, slope, residual SD) of change on intake: the sandwich
    (X'X)^-1 M (X'X)^-1 N / (N - 2), M = sum_i e_i^2 (1, x_i)'(1, x_i), with each band's
    contribution to M from its moments; and the residual SD's from the residuals' fourth
    moment (each band's residual e = d + eta, d its mean, eta with the change's shape).

    Within a band: E e^2 = d^2 + Ve, E x e^2 = x (d^2 + Ve) + 2 d C and E x^2 e^2 =
    x^2 (d^2 + Ve) + 4 x d C + d^2 Vx + Ve Vx + 2 C^2 (Isserlis; third moments 0), with x the
    band's mean intake, Vx its variance, Ve = Var(c - slope x) and C = Cov(x, e)."""
    with np.errstate(all="ignore"):  # noisy sums far from any data: NaN, not an error
        return _sandwich(bands, np.float64(intercept), np.float64(slope))


def _sandwich(bands: Sequence[BandMoments], intercept: np.float64, slope: np.float64
              ) -> tuple[float, float, float]:
    n = sum(b.n for b in bands)
    bread = np.zeros((2, 2))
    meat = np.zeros((2, 2))
    e2 = e4 = 0.0
    for b in bands:
        x, vx = b.mean_x, max(b.var_x, 0.0)
        d = b.mean_c - intercept - slope * x
        ve = max(b.var_c - 2 * slope * b.cov_xc + slope * slope * vx, 0.0)
        c = b.cov_xc - slope * vx
        a = d * d + ve
        bread += b.n * np.array([[1.0, x], [x, x * x + vx]])
        cross = x * a + 2 * d * c
        meat += b.n * np.array(
            [[a, cross], [cross, x * x * a + 4 * x * d * c + d * d * vx + ve * vx + 2 * c * c]])
        e2 += b.n * a
        e4 += b.n * (d**4 + 6 * d * d * ve + 4 * d * b.change.skewness * ve**1.5
                     + b.change.kurtosis * ve * ve)
    nan = (math.nan, math.nan, math.nan)
    if n <= 2 or not (np.isfinite(bread).all() and np.isfinite(meat).all()):
        return nan
    try:
        inv = np.linalg.inv(bread)
    except np.linalg.LinAlgError:
        return nan
    cov = inv @ meat @ inv * n / (n - 2)
    sigma2, mu4 = float(e2 / n), float(e4 / n)
    if not (math.isfinite(sigma2) and math.isfinite(mu4)) or sigma2 <= 0:
        return nan
    return (math.sqrt(max(float(cov[0, 0]), 0.0)), math.sqrt(max(float(cov[1, 1]), 0.0)),
            sd_se(math.sqrt(sigma2), n - 1, mu4 / (sigma2 * sigma2)))

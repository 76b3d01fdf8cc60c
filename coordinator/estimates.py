"""Benchmarks from pooled blocks, each with a 95% interval that includes both the DP
noise (known scales) and sampling error.

Every estimate is a smooth function f of summed statistics. Its variance is

    sampling variance (first order, from the pooled data; coordinator.moments where the
                       data are not normal)
  + noise variance    (sum over the statistics s of (df/ds)^2 * var(noise of s)),

where the noise variances are known exactly from the sites' published scales and the
derivatives are taken numerically (the delta method). The interval is the estimate
+/- 1.96 standard errors. Ratios are suppressed, with the reason, when they rest on
fewer than MIN_EPISODES (noisy) episodes or when the noise is more than
MAX_DENOMINATOR_NOISE of the denominator, where the delta method stops being honest.

Sign convention: change is positive for improvement, whatever the instrument's direction.
Intervals are conditional on the participating services: variation between services
that did not take part is not in them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.moments import (
    BandMoments,
    Shape,
    maxent_moments,
    pooled_kurtosis,
    regression_sampling,
    sample_moments,
    sd_se,
)
from coordinator.pooling import Pooled
from protocols.effect import effect_size
from protocols.instruments import Better
from protocols.layout import COUNT_BLOCK, TOLERANCES, category_possible, trajectory_groups
from protocols.study import Family

__all__ = ["MAX_DENOMINATOR_NOISE", "MIN_EPISODES", "Estimate", "Tables", "estimate_all"]

MIN_EPISODES = 20
MAX_DENOMINATOR_NOISE = 0.15
Z95 = 1.959963984540054
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)

Stats = Mapping[str, tuple[float, float]]  # name -> (value, noise variance)


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float | None
    se_sampling: float = math.nan
    se_noise: float = math.nan
    suppressed: str | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the parameter's natural range
    note: str | None = None  # known by definition, or clipped to its range, and why

    @property
    def se(self) -> float:
        return math.hypot(self.se_sampling, self.se_noise)

    @property
    def ci(self) -> tuple[float, float] | None:
        if self.value is None or not math.isfinite(self.se):
            return None
        b0, b1 = self.bounds
        lo, hi = self.value - Z95 * self.se, self.value + Z95 * self.se
        return min(max(lo, b0), b1), max(min(hi, b1), b0)

    def as_json(self) -> dict[str, Any]:
        ci = self.ci
        return {
            "value": None if self.value is None else _round(self.value),
            "ci95": None if ci is None else [_round(ci[0]), _round(ci[1])],
            "se": None if self.value is None else _round(self.se),
            "se_sampling": None if self.value is None else _round(self.se_sampling),
            "se_noise": None if self.value is None else _round(self.se_noise),
            "suppressed": self.suppressed,
            "note": self.note,
        }


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def suppressed(reason: str) -> Estimate:
    return Estimate(value=None, suppressed=reason)


def _noise_se(f: Callable[[Mapping[str, float]], float], stats: Stats) -> float:
    """Delta method for the DP noise: numeric gradient times the known noise variances."""
    x = {k: v for k, (v, _) in stats.items()}
    total = 0.0
    for name, (value, var) in stats.items():
        if var <= 0:
            continue
        h = 1e-4 * max(1.0, abs(value))
        up, down = dict(x), dict(x)
        up[name], down[name] = value + h, value - h
        grad = (f(up) - f(down)) / (2 * h)
        total += grad * grad * var
    return math.sqrt(total)


def _denominator_problem(n: float, var: float, what: str = "episodes") -> str | None:
    if n < MIN_EPISODES:
        return f"fewer than {MIN_EPISODES} {what} (noisy count {n:.0f})"
    if math.sqrt(var) > MAX_DENOMINATOR_NOISE * n:
        return (
            f"the DP noise on the number of {what} (SD {math.sqrt(var):.0f}) is more than "
            f"{MAX_DENOMINATOR_NOISE:.0%} of it ({n:.0f})"
        )
    return None


def mean(
    total: tuple[float, float],
    squares: tuple[float, float],
    n: tuple[float, float],
    sign: float = 1.0,
) -> Estimate:
    problem = _denominator_problem(*n)
    if problem:
        return suppressed(problem)
    stats = {"s": total, "q": squares, "n": n}

    def f(x: Mapping[str, float]) -> float:
        return sign * x["s"] / x["n"]

    var = max((squares[0] - total[0] ** 2 / n[0]) / (n[0] - 1), 0.0)
    return Estimate(f({"s": total[0], "n": n[0]}), math.sqrt(var / n[0]), _noise_se(f, stats))


def sd(
    total: tuple[float, float], squares: tuple[float, float], n: tuple[float, float]
) -> Estimate:
    problem = _denominator_problem(*n)
    if problem:
        return suppressed(problem)
    stats = {"s": total, "q": squares, "n": n}

    def f(x: Mapping[str, float]) -> float:
        return math.sqrt(max((x["q"] - x["s"] ** 2 / x["n"]) / (x["n"] - 1), 0.0))

    value = f({"s": total[0], "q": squares[0], "n": n[0]})
    if value <= 0:
        return suppressed("the noisy sums give no positive spread")
    return Estimate(value, sd_se(value, n[0]), _noise_se(f, stats), bounds=(0.0, math.inf))


def rate(k: tuple[float, float], n: tuple[float, float], what: str = "episodes") -> Estimate:
    problem = _denominator_problem(*n, what=what)
    if problem:
        return suppressed(problem)
    p = min(max(k[0] / n[0], 0.0), 1.0)

    def f(x: Mapping[str, float]) -> float:
        return x["k"] / x["n"]

    return Estimate(
        p, math.sqrt(p * (1 - p) / n[0]), _noise_se(f, {"k": k, "n": n}), bounds=(0.0, 1.0)
    )


@dataclass(frozen=True, slots=True)
class Tables:
    bands: list[dict[str, Any]]
    quantiles: list[dict[str, Any]]
    trajectory: list[dict[str, Any]]
    trajectory_fit: list[dict[str, Any]]
    regression: dict[str, Any]
    reference_sd: Estimate


RATES = (
    ("reliably_improved", "reliable_improvement_rate"),
    ("reliably_deteriorated", "reliable_deterioration_rate"),
    ("case_at_intake", "case_at_intake_rate"),
    ("response", "response_rate"),
    ("remission", "remission_rate"),
    ("recovered", "recovery_rate"),
    ("reliably_recovered", "reliable_recovery_rate"),
)
RELIABLE_CATEGORIES = frozenset({"reliably_improved", "reliably_deteriorated",
                                 "reliably_recovered"})
NOT_ESTIMABLE_FACTOR = 2.0
"""A figure whose DP noise alone has an SD over this many times its clinical tolerance is
published as not estimable at this budget instead of being headlined."""


def _precise(est: Estimate, kind: str, scale: float = 1.0) -> Estimate:
    """``est``, or "not estimable at this budget" (with why and what would help) when the
    DP noise alone makes it too imprecise to act on. ``scale`` turns a relative
    tolerance into the figure's units (the episode count)."""
    if est.value is None or not math.isfinite(est.se_noise):
        return est
    tol = TOLERANCES[kind] * scale
    if est.se_noise > NOT_ESTIMABLE_FACTOR * tol:
        return suppressed(
            f"not estimable at this budget: the DP noise alone is +/-{Z95 * est.se_noise:.3g} "
            f"(95%), over {NOT_ESTIMABLE_FACTOR:g} times the clinical tolerance "
            f"{tol:.3g}; more sites, fewer families or a larger epsilon would narrow it"
        )
    return est


def _clip(est: Estimate, lo: float, hi: float, what: str) -> Estimate:
    """A value outside its parameter's range is shown at the nearest end, and says so."""
    if est.value is None or lo <= est.value <= hi:
        return est
    value = min(max(est.value, lo), hi)
    return dataclasses.replace(
        est, value=value, bounds=(lo, hi),
        note=f"the noisy estimate {est.value:.3g} lies outside {what}; shown at {value:g}",
    )


class _Band:
    """One band's released sums as independent (value, noise variance) pairs, and the
    decoding of protocols/layout.py: sum v = (R / m_b + n (lo_b + hi_b)) / 2."""

    def __init__(self, p: Pooled, band: int, col: int = 0) -> None:
        self.p, self.band, self.col = p, band, col

    def has(self, name: str) -> bool:
        b = self.p.blocks.get(name)
        return b is not None and b.spec.released(self.band)

    def stat(self, name: str) -> tuple[float, float]:
        b = self.p.blocks.get(name)
        if b is None:  # fixed in every band (see decode)
            return 0.0, 0.0
        return float(b.values[self.band, self.col]), float(b.noise_var[self.band, self.col])

    def decode(self, name: str, released: float, n: float) -> float:
        b = self.p.blocks.get(name)
        if b is None:
            # Only the intake's centred sums vanish from a layout, when every band is a
            # single score: u = 0 for every episode.
            return 0.0
        lo, hi = b.spec.raw[self.band]
        if not b.spec.mult[self.band]:  # fixed by definition in this band: v = lo = hi
            return n * lo
        return (released / b.spec.mult[self.band] + n * (lo + hi)) / 2


def _moments(band: _Band, x: Mapping[str, float], key: str = "") -> dict[str, float]:
    """Means, variances and covariance of the centred intake u and final g of a band
    (from ``x``, the released sums under the names ``n``, ``U``, ``G``, ``UU``, ``GG``,
    ``UG`` suffixed by ``key``)."""
    n = x["n" + key]
    mu = band.decode("sum_intake", x["U" + key], n) / n
    mg = band.decode("sum_final", x["G" + key], n) / n
    return {
        "n": n,
        "mu": mu,
        "mg": mg,
        "vu": band.decode("sum_intake_sq", x["UU" + key], n) / n - mu * mu,
        "vg": band.decode("sum_final_sq", x["GG" + key], n) / n - mg * mg,
        "cug": band.decode("sum_intake_final", x["UG" + key], n) / n - mu * mg,
    }


_CHANGE_STATS = (("U", "sum_intake"), ("G", "sum_final"), ("UU", "sum_intake_sq"),
                 ("GG", "sum_final_sq"), ("UG", "sum_intake_final"))


def _change_stats(band: _Band, key: str = "") -> dict[str, tuple[float, float]]:
    out = {"n" + key: band.stat(COUNT_BLOCK)}
    for short, name in _CHANGE_STATS:
        out[short + key] = band.stat(name)
    return out


def estimate_all(p: Pooled) -> Tables:
    study = p.study
    ins = study.instrument
    has = set(p.blocks)
    sign = 1.0 if ins.better is Better.HIGHER else -1.0  # change = sign * (final - intake)
    centre_g = (ins.lo + ins.hi) / 2
    ref = _Reference(p) if "sum_final" in has else None
    bands: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(study.bands):
        band = _Band(p, i)
        w = hi - lo
        est: dict[str, Estimate] = {}
        n, vn = band.stat(COUNT_BLOCK) if COUNT_BLOCK in has else (0.0, 0.0)
        if COUNT_BLOCK in has:
            # A noisy count may dip below zero; clipping is post-processing.
            est["episodes"] = _precise(
                Estimate(max(n, 0.0), 0.0, math.sqrt(vn), bounds=(0.0, math.inf)),
                "episodes", max(n, 1.0))
        problem = _denominator_problem(n, vn)
        if "sum_final" in has:
            stats = _change_stats(band)

            def intake_of(
                x: Mapping[str, float], band: _Band = band, lo: int = lo, w: int = w
            ) -> float:
                return float(lo + (w + _moments(band, x)["mu"]) / 2)

            def change_of(
                x: Mapping[str, float], band: _Band = band, lo: int = lo, w: int = w
            ) -> float:
                m = _moments(band, x)
                return float(sign * ((centre_g + m["mg"] / 2) - (lo + (w + m["mu"]) / 2)))

            def var_change(x: Mapping[str, float], band: _Band = band) -> float:
                m = _moments(band, x)
                v = (m["vu"] + m["vg"] - 2 * m["cug"]) / 4
                return float(v * m["n"] / max(m["n"] - 1, 1.0))

            if problem:
                for k in ("mean_intake", "mean_change", "sd_change", "effect_size"):
                    est[k] = suppressed(problem)
            else:
                x0 = {k: v for k, (v, _) in stats.items()}
                v_intake = max(_moments(band, x0)["vu"] / 4, 0.0)
                v_change = var_change(x0)
                mi = Estimate(intake_of(x0), math.sqrt(v_intake / n), _noise_se(intake_of, stats))
                est["mean_intake"] = _precise(
                    _clip(mi, lo, hi, f"the band {lo}-{hi}"), "mean_intake")
                mc = Estimate(change_of(x0), math.sqrt(max(v_change, 0.0) / n),
                              _noise_se(change_of, stats))
                est["mean_change"] = _precise(
                    _clip(mc, -(ins.hi - ins.lo), ins.hi - ins.lo, "the instrument's range"),
                    "mean_change")
                if v_change <= 0:
                    est["sd_change"] = suppressed("the noisy sums give no positive spread")
                else:

                    def sd_of(x: Mapping[str, float]) -> float:
                        return math.sqrt(max(var_change(x), 1e-12))

                    value = math.sqrt(v_change)
                    shape = _change_shape(p, i)
                    est["sd_change"] = _precise(
                        Estimate(value, sd_se(value, n, shape.kurtosis), _noise_se(sd_of, stats),
                                 bounds=(0.0, math.inf)), "sd_change")
                est["effect_size"] = _precise(_effect_size(p, i, mc, change_of, ref),
                                              "effect_size")
        if Family.CATEGORIES in study.families:
            for name, label in RATES:
                est[label] = _category_rate(p, band, name, problem)
        bands.append({"band": f"{lo}-{hi}", "lo": lo, "hi": hi, "estimates": est})
    return Tables(
        bands=bands,
        quantiles=_quantiles(p) if "change_hist" in has else [],
        trajectory=_trajectory(p) if "traj_n" in has else [],
        trajectory_fit=_trajectory_fit(p) if "traj_n" in has else [],
        regression=_regression(p) if "sum_final" in has else {},
        reference_sd=ref.estimate if ref else suppressed("the study has no change family"),
    )


def _category_rate(p: Pooled, band: _Band, name: str, problem: str | None) -> Estimate:
    """A category's rate over its denominator: known by definition where the band fixes
    it, else decoded from the centred sum (protocols/layout.py)."""
    study, i = p.study, band.band
    lo, hi = study.bands[i]
    ins = study.instrument
    possible = category_possible(ins, lo, hi, name)
    cases = category_possible(ins, lo, hi, "case_at_intake")
    over_cases = name in ("recovered", "reliably_recovered")
    if name in RELIABLE_CATEGORIES and ins.reliable_change is None:
        return suppressed(f"{ins.id} has no reliable-change value: no reliable categories")
    if over_cases and cases is False:
        return suppressed(f"no intake in {lo}-{hi} is at caseness (by definition): no rate")
    if possible is None:
        return Estimate(1.0, 0.0, 0.0, bounds=(0.0, 1.0),
                        note=f"1 by definition: every intake in {lo}-{hi} is at caseness")
    if possible is False:
        why = (f"no intake in {lo}-{hi} is at caseness" if name == "case_at_intake"
               else f"impossible from an intake in {lo}-{hi}")
        return Estimate(0.0, 0.0, 0.0, bounds=(0.0, 1.0), note=f"0 by definition: {why}")
    if problem:
        return suppressed(problem)
    stats = {"n": band.stat(COUNT_BLOCK), "k": band.stat(name)}
    if over_cases and cases is True:
        stats["c"] = band.stat("case_at_intake")

    def denominator(x: Mapping[str, float]) -> float:
        if "c" in x:
            return band.decode("case_at_intake", x["c"], x["n"])
        return x["n"]

    def rate_of(x: Mapping[str, float]) -> float:
        d = denominator(x)
        return band.decode(name, x["k"], d) / d if d > 0 else math.nan

    x0 = {k: v for k, (v, _) in stats.items()}
    d0 = denominator(x0)
    if over_cases:
        var_d = _noise_se(denominator, stats) ** 2
        thin = _denominator_problem(d0, var_d, "episodes at caseness")
        if thin:
            return suppressed(thin)
    raw = rate_of(x0)
    value = min(max(raw, 0.0), 1.0)
    est = Estimate(value, math.sqrt(value * (1 - value) / d0), _noise_se(rate_of, stats),
                   bounds=(0.0, 1.0),
                   note=None if value == raw else
                   f"the noisy rate {raw:.3g} lies outside 0-1; shown at {value:g}")
    return _precise(est, "rate")


def _change_shape(p: Pooled, i: int) -> Shape:
    """The shape of change in band ``i`` from its released histogram; without one, the
    normal shape (the textbook SEs)."""
    block = p.blocks.get("change_hist")
    if block is None:
        return Shape()
    c_lo, c_hi = block.spec.raw[i]
    bins = c_hi - c_lo + 1
    shape = sample_moments(np.arange(c_lo, c_hi + 1, dtype=np.float64),
                           np.asarray(block.values[i, :bins], dtype=np.float64))
    return shape or Shape()


def _band_moments(p: Pooled, i: int, x: Mapping[str, float], key: str = "") -> BandMoments:
    """Band ``i``'s moments of intake x = c_b + u / 2 and change c = sign (f - x), f = C +
    g / 2, from its released sums in ``x``, each moved into the range the band allows
    (noisy sums may imply a mean outside the band or a negative variance)."""
    ins = p.study.instrument
    sign = 1.0 if ins.better is Better.HIGHER else -1.0
    lo, hi = p.study.bands[i]
    if x["n" + key] <= 0:
        return BandMoments(n=0.0, mean_x=(lo + hi) / 2, var_x=0.0, mean_c=0.0, var_c=0.0,
                           cov_xc=0.0)
    m = _moments(_Band(p, i), x, key)
    span = ins.hi - ins.lo
    mean_x = min(max((lo + hi) / 2 + m["mu"] / 2, lo), hi)
    var_x = min(max(m["vu"] / 4, 0.0), ((hi - lo) / 2) ** 2)
    mean_f = (ins.lo + ins.hi) / 2 + m["mg"] / 2
    var_f, cov_xf = m["vg"] / 4, m["cug"] / 4
    var_c = min(max(var_f + var_x - 2 * cov_xf, 0.0), float(span * span))
    bound = math.sqrt(var_x * var_c)
    return BandMoments(
        n=m["n"], mean_x=mean_x, var_x=var_x,
        mean_c=min(max(sign * (mean_f - mean_x), -span), span), var_c=var_c,
        cov_xc=min(max(sign * (cov_xf - var_x), -bound), bound), change=_change_shape(p, i))


class _Reference:
    """The SD of intake over all bands, from the bands' centred sums by the parallel-axis
    rule: sum x = sum_b (n c_b + sum u / 2), sum x^2 = sum_b (n c_b^2 + c_b sum u + sum u^2 / 4)
    with c_b the band's centre (u = 2 (x - c_b)). Its sampling SE uses the kurtosis of
    intake (coordinator.moments): intake spread over a whole scale is flatter than normal,
    and the textbook SE was 1.45 times too wide."""

    def __init__(self, p: Pooled) -> None:
        self.p = p
        self.bands = [_Band(p, i) for i in range(len(p.study.bands))]
        self.stats: dict[str, tuple[float, float]] = {}
        for i, b in enumerate(self.bands):
            self.stats |= _change_stats(b, str(i))
        self.x0 = {k: v for k, (v, _) in self.stats.items()}
        self.estimate = self._estimate()

    def parts(self, x: Mapping[str, float]) -> tuple[float, float, float]:
        n = sx = sxx = 0.0
        for i, b in enumerate(self.bands):
            k = str(i)
            lo, hi = self.p.study.bands[i]
            c = (lo + hi) / 2
            nb = x["n" + k]
            su = b.decode("sum_intake", x["U" + k], nb)
            suu = b.decode("sum_intake_sq", x["UU" + k], nb)
            n += nb
            sx += nb * c + su / 2
            sxx += nb * c * c + c * su + suu / 4
        return n, sx, sxx

    def sd_of(self, x: Mapping[str, float]) -> float:
        n, sx, sxx = self.parts(x)
        return math.sqrt(max((sxx - sx * sx / n) / (n - 1), 1e-12))

    def band(self, i: int) -> BandMoments:
        return _band_moments(self.p, i, self.x0, str(i))

    def kurtosis(self) -> float:
        """Of intake over all bands: each band's own shape the maximum-entropy one on its
        scores with its released mean and variance."""
        parts = []
        for i, (lo, hi) in enumerate(self.p.study.bands):
            b = self.band(i)
            if b.n <= 0:
                continue
            m3, m4 = maxent_moments(lo, hi, b.mean_x, b.var_x)
            parts.append((b.n, b.mean_x, max(b.var_x, 0.0), m3, m4))
        return pooled_kurtosis(parts)

    def _estimate(self) -> Estimate:
        n, sx, sxx = self.parts(self.x0)
        problem = _denominator_problem(
            n, sum(v for k, (_, v) in self.stats.items() if k[0] == "n"))
        if problem:
            return suppressed(problem)
        var = (sxx - sx * sx / n) / (n - 1)
        if var <= 0:
            return suppressed("the noisy sums give no positive spread")
        value = math.sqrt(var)
        return _precise(Estimate(value, sd_se(value, n, self.kurtosis()),
                                 _noise_se(self.sd_of, self.stats), bounds=(0.0, math.inf)),
                        "reference_sd")


def _effect_size(
    p: Pooled,
    i: int,
    mc: Estimate,
    change_of: Callable[[Mapping[str, float]], float],
    ref: _Reference | None,
) -> Estimate:
    """Mean change in band ``i`` / SD of intake over all bands (one reference SD for every
    band, so that bands compare; a within-band SD would inflate narrow bands).

    Both rest on the band's sums, so neither error is added as independent: the noise term
    is the delta method on the ratio as one function of every band's sums, and the sampling
    term carries Cov(mean change, S) = Cov(mean change, S^2) / (2 S), with Cov(mean change,
    S^2) = 2 (mean intake_b - mean intake) Cov_b(change, intake) / N to first order (the
    band's third moments, not released, taken as zero)."""
    if mc.value is None:
        return mc
    if ref is None:
        return suppressed("no reference SD: the study has no change family")
    if ref.estimate.value is None:
        return suppressed(f"no reference SD: {ref.estimate.suppressed}")
    s = ref.estimate.value
    value = effect_size(mc.value, s)
    keys = ("n", *(short for short, _ in _CHANGE_STATS))
    suffix = str(i)

    def ratio(x: Mapping[str, float]) -> float:
        return change_of({k: x[k + suffix] for k in keys}) / ref.sd_of(x)

    n, sx, _ = ref.parts(ref.x0)
    b = ref.band(i)
    cov = (b.mean_x - sx / n) * b.cov_xc / (n * s)  # Cov(mean change, S)
    var = ((mc.se_sampling / s) ** 2 + (value * ref.estimate.se_sampling / s) ** 2
           - 2 * mc.value * cov / s**3)
    return Estimate(value, math.sqrt(max(var, 0.0)), _noise_se(ratio, ref.stats))


def _quantiles(p: Pooled) -> list[dict[str, Any]]:
    """Change quantiles from the noisy band-local histogram; the interval inverts the
    CDF's interval."""
    block = p.blocks["change_hist"]
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        c_lo, c_hi = block.spec.raw[i]
        bins = c_hi - c_lo + 1
        changes = np.arange(c_lo, c_hi + 1)
        counts = np.clip(block.values[i, :bins], 0, None)
        var = block.noise_var[i, :bins]
        total = float(counts.sum())
        problem = _denominator_problem(total, float(var.sum()))
        cum = np.cumsum(counts)

        def at(q: float, cum: np.ndarray = cum, total: float = total,
               changes: np.ndarray = changes) -> float:
            return float(changes[min(int(np.searchsorted(cum, q * total)), changes.size - 1)])

        for q in QUANTILES:
            if problem:
                rows.append({"band": f"{lo}-{hi}", "quantile": q, **suppressed(problem).as_json()})
                continue
            j = int(np.searchsorted(cum, q * total))
            below, above = float(var[: j + 1].sum()), float(var[j + 1 :].sum())
            noise_var = ((1 - q) ** 2 * below + q * q * above) / total**2
            f_var = q * (1 - q) / total + noise_var
            half = Z95 * math.sqrt(f_var)
            lo_q, hi_q = at(max(q - half, 0.0)), at(min(q + half, 1.0))
            half_noise = Z95 * math.sqrt(noise_var)
            lo_n, hi_n = at(max(q - half_noise, 0.0)), at(min(q + half_noise, 1.0))
            est = _precise(
                Estimate(at(q), (hi_q - lo_q) / (2 * Z95), (hi_n - lo_n) / (2 * Z95)), "quantile")
            doc = {"band": f"{lo}-{hi}", "quantile": q, **est.as_json()}
            if est.value is not None:
                doc["ci95"] = [lo_q, hi_q]
            rows.append(doc)
    return rows


def _group_x(first: int, last: int) -> float:
    """A review group's position on the ln(session) axis: the mean of its sessions'."""
    return sum(math.log(s) for s in range(first, last + 1)) / (last - first + 1)


def _trajectory_means(p: Pooled, i: int) -> list[tuple[tuple[int, int], Estimate, Estimate]]:
    """Per review group of band ``i``: (group, mean change, SD of change)."""
    out = []
    for k, group in enumerate(trajectory_groups(p.study.max_session)):
        band = _Band(p, i, k)
        stats = {"n": band.stat("traj_n"), "s": band.stat("traj_sum"),
                 "q": band.stat("traj_sum_sq")}
        c_lo, c_hi = p.blocks["traj_sum"].spec.raw[i]
        mid = c_lo + c_hi

        def mean_of(x: Mapping[str, float], band: _Band = band) -> float:
            return band.decode("traj_sum", x["s"], x["n"]) / x["n"]

        def var_of(x: Mapping[str, float], band: _Band = band, mid: int = mid) -> float:
            m2 = band.decode("traj_sum_sq", x["q"], x["n"]) / x["n"]  # mean of (2c - mid)^2
            m1 = 2 * mean_of(x) - mid
            return (m2 - m1 * m1) / 4 * x["n"] / max(x["n"] - 1, 1.0)

        n, vn = stats["n"]
        problem = _denominator_problem(n, vn, "clients")
        if problem:
            out.append((group, suppressed(problem), suppressed(problem)))
            continue
        x0 = {k_: v for k_, (v, _) in stats.items()}
        var = var_of(x0)
        m = Estimate(mean_of(x0), math.sqrt(max(var, 0.0) / n), _noise_se(mean_of, stats))
        m = _precise(_clip(m, c_lo, c_hi, "the change the band allows"), "trajectory_mean")
        if var <= 0:
            spread = suppressed("the noisy sums give no positive spread")
        else:

            def sd_of(x: Mapping[str, float]) -> float:
                return math.sqrt(max(var_of(x), 1e-12))

            value = math.sqrt(var)
            # Normal theory: the change histogram is of the final change, not of this
            # review group's.
            spread = _precise(Estimate(value, sd_se(value, n), _noise_se(sd_of, stats),
                                       bounds=(0.0, math.inf)), "trajectory_sd")
        out.append((group, m, spread))
    return out


def _trajectory(p: Pooled) -> list[dict[str, Any]]:
    """Mean change from intake at each review group, with the interval of the mean and a
    tolerance band (mean +/- 1.96 SD) for individual clients. Session 1 is the intake:
    its change is 0 by definition and is not listed."""
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        for k, ((first, last), m, spread) in enumerate(_trajectory_means(p, i)):
            tol = None
            if m.value is not None and spread.value is not None:
                tol = [_round(m.value - Z95 * spread.value), _round(m.value + Z95 * spread.value)]
            rows.append(
                {
                    "band": f"{lo}-{hi}",
                    "session": last,
                    "first": first,
                    "last": last,
                    "sessions": str(first) if first == last else f"{first}-{last}",
                    "clients": _round(float(p.blocks["traj_n"].values[i, k])),
                    "mean_change": m.as_json(),
                    "sd_change": spread.as_json(),
                    "tolerance95": tol,
                }
            )
    return rows


def _trajectory_fit(p: Pooled) -> list[dict[str, Any]]:
    """Weighted least squares of mean change on ln(session) per band (each review group at
    the mean ln of its sessions), weights 1/variance, with intervals that hold whatever
    the (nonnegative) correlation of the group means: see :func:`_fit_log_curve`."""
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        xs: list[float] = []
        means: list[Estimate] = []
        for (first, last), m, _ in _trajectory_means(p, i):
            if m.value is not None and m.se > 0:
                xs.append(_group_x(first, last))
                means.append(m)
        a_est, b_est = _fit_log_curve(xs, means)
        rows.append(
            {
                "band": f"{lo}-{hi}",
                "sessions_used": len(xs),
                "a": _precise(a_est, "fit").as_json(),
                "b": _precise(b_est, "fit").as_json(),
            }
        )
    return rows


def _fit_log_curve(xs: list[float], means: list[Estimate]) -> tuple[Estimate, Estimate]:
    """Weighted least squares of the session means on x = ln(session): (a, b), or both
    suppressed.

    Each coefficient is a linear combination sum_k L_k * mean_k. The DP noise of different
    sessions is independent, so its variance is sum_k L_k^2 * se_noise_k^2. The sampling
    errors are not: the same clients are measured at many sessions. Their covariances are
    not released, but a client's change from intake at two sessions is not negatively
    correlated, and different clients are independent, so every covariance is >= 0. Then
    Var(A - B) <= Var(A) + Var(B) <= (sum_{L>0} L_k se_k)^2 + (sum_{L<0} |L_k| se_k)^2,
    where A and B gather the positive and negative terms: a bound that holds for any such
    correlation (treating the means as independent was too narrow)."""
    if len(xs) < 3:
        reason = "fewer than 3 sessions with enough clients"
        return suppressed(reason), suppressed(reason)
    x = np.array(xs)
    y = np.array([m.value for m in means], dtype=np.float64)
    se_s = np.array([m.se_sampling for m in means])
    se_n = np.array([m.se_noise for m in means])
    design = np.column_stack([np.ones_like(x), x])
    # A variance near zero (or subnormal) overflows 1/variance: that is a curve the sums
    # do not determine, not an error.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        wt = 1 / (se_s**2 + se_n**2)
        try:
            lin = np.linalg.solve(design.T @ (design * wt[:, None]), design.T * wt)  # 2 x K
        except np.linalg.LinAlgError:
            lin = np.full((2, len(xs)), np.nan)
        beta = lin @ y
    if not np.isfinite(beta).all() or not np.isfinite(lin).all():
        reason = "the noisy session means do not determine a curve"
        return suppressed(reason), suppressed(reason)
    out = []
    for j in range(2):
        row = lin[j]
        pos = float(np.sum(np.where(row > 0, row, 0.0) * se_s))
        neg = float(np.sum(np.where(row < 0, -row, 0.0) * se_s))
        out.append(
            Estimate(float(beta[j]), math.hypot(pos, neg), float(np.sqrt(np.sum(row**2 * se_n**2))))
        )
    return out[0], out[1]


def _regression(p: Pooled) -> dict[str, Any]:
    """Change on intake over all bands: expected change = intercept + slope * intake, from
    the bands' centred sums by the parallel-axis rule (x = c_b + u / 2, f = C + g / 2);
    sampling SEs from coordinator.moments.regression_sampling (sandwich, residual kurtosis)."""
    study = p.study
    ins = study.instrument
    sign = 1.0 if ins.better is Better.HIGHER else -1.0
    big_c = (ins.lo + ins.hi) / 2
    bands = [_Band(p, i) for i in range(len(study.bands))]
    centres = [(lo + hi) / 2 for lo, hi in study.bands]
    stats: dict[str, tuple[float, float]] = {}
    for i, b in enumerate(bands):
        stats |= _change_stats(b, str(i))

    def sums(v: Mapping[str, float]) -> dict[str, float]:
        t = dict.fromkeys(("n", "x", "f", "xx", "ff", "xf"), 0.0)
        for i, b in enumerate(bands):
            k = str(i)
            n = v["n" + k]
            su = b.decode("sum_intake", v["U" + k], n)
            sg = b.decode("sum_final", v["G" + k], n)
            suu = b.decode("sum_intake_sq", v["UU" + k], n)
            sgg = b.decode("sum_final_sq", v["GG" + k], n)
            sug = b.decode("sum_intake_final", v["UG" + k], n)
            c = centres[i]
            t["n"] += n
            t["x"] += n * c + su / 2
            t["f"] += n * big_c + sg / 2
            t["xx"] += n * c * c + c * su + suu / 4
            t["ff"] += n * big_c * big_c + big_c * sg + sgg / 4
            t["xf"] += n * c * big_c + c * sg / 2 + big_c * su / 2 + sug / 4
        # y = change = sign * (f - x)
        t["y"] = sign * (t["f"] - t["x"])
        t["xy"] = sign * (t["xf"] - t["xx"])
        t["yy"] = t["ff"] - 2 * t["xf"] + t["xx"]
        return t

    def parts(v: Mapping[str, float]) -> tuple[float, float, float]:
        t = sums(v)
        n = t["n"]
        sxx = t["xx"] - t["x"] ** 2 / n
        sxy = t["xy"] - t["x"] * t["y"] / n
        syy = t["yy"] - t["y"] ** 2 / n
        slope = sxy / sxx
        intercept = (t["y"] - slope * t["x"]) / n
        resid = math.sqrt(max((syy - slope * sxy) / (n - 2), 1e-12))
        return intercept, slope, resid

    names = ("intercept", "slope", "residual_sd")
    x0 = {k: v for k, (v, _) in stats.items()}
    t0 = sums(x0)
    n = t0["n"]
    problem = _denominator_problem(n, sum(v for k, (_, v) in stats.items() if k[0] == "n"))
    if problem:
        return {k: suppressed(problem).as_json() for k in names}
    sxx = t0["xx"] - t0["x"] ** 2 / n
    if sxx <= 0 or n <= 2:
        reason = "the noisy sums show no spread in intake"
        return {k: suppressed(reason).as_json() for k in names}
    sxy = t0["xy"] - t0["x"] * t0["y"] / n
    syy = t0["yy"] - t0["y"] ** 2 / n
    values = parts(x0)
    resid_var = (syy - values[1] * sxy) / (n - 2)
    mean_x = t0["x"] / n
    out: dict[str, Any] = {"episodes": _round(n), "mean_intake": _round(mean_x)}
    if resid_var <= 0:
        out["residual_sd"] = suppressed("the noisy sums give no positive residual spread"
                                        ).as_json()
    # Heteroscedasticity-consistent: the spread of change grows with intake, and the
    # intercept extrapolates to intake 0 (the textbook SE overstated it by 1.2x).
    sampling = regression_sampling(
        [_band_moments(p, i, x0, str(i)) for i in range(len(study.bands))], values[0], values[1])
    for j, name in enumerate(names):
        if name in out:
            continue
        if not math.isfinite(sampling[j]):
            out[name] = suppressed("the noisy sums do not determine its sampling error"
                                   ).as_json()
            continue

        def component(v: Mapping[str, float], j: int = j) -> float:
            return parts(v)[j]

        est = Estimate(values[j], sampling[j], _noise_se(component, stats),
                       bounds=(0.0, math.inf) if name == "residual_sd" else (-math.inf, math.inf))
        out[name] = _precise(est, name).as_json()
    return out

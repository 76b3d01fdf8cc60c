"""zCDP arithmetic the coordinator can do without OpenDP, to check what a release claims
about its noise (noise itself only ever comes from OpenDP, at the site).

- :func:`gaussian_scale`: the scale a block is compiled at first, ``d_in / sqrt(2 rho)``
  (the Gaussian mechanism's zCDP cost is ``(d_in / scale)^2 / 2``). The site starts from
  exactly this float and only widens it, by a few ulps, until OpenDP's privacy map fits.
- :func:`rho_cap`: the largest rho a site can derive from a study's ``(epsilon, delta)``.
  OpenDP converts zCDP to (epsilon, delta) with Canonne, Kamath and Steinke (2020),
  Corollary 13: ``delta = inf_{a > 1} exp((a - 1)(a rho - epsilon)) / (a - 1) * (1 - 1/a)^a``.
  This module evaluates the same bound independently and rounds the result up by
  :data:`CAP_SLACK`; tests/unit/protocols/test_zcdp.py pins that it is never below the
  site's ``rho_for_epsilon`` and at most ``CAP_SLACK`` above it.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

__all__ = ["CAP_SLACK", "gaussian_scale", "rho_cap"]

CAP_SLACK = Fraction(1_000_001, 1_000_000)
"""The cap's margin over the exact conversion: float error of two nested searches."""

_GOLDEN = (math.sqrt(5) - 1) / 2


def gaussian_scale(d_in: float, rho: Fraction) -> float:
    """The Gaussian scale whose zCDP cost at sensitivity ``d_in`` is ``rho``, computed as
    the site's compiler starts from it."""
    return d_in / math.sqrt(2 * float(rho))


def _log_delta(epsilon: float, rho: float) -> float:
    """log delta of CKS20 Corollary 13, minimised over the Renyi order a (golden section
    over log(a - 1), where the bound is unimodal)."""

    def f(t: float) -> float:
        a = 1 + math.exp(t)
        return (a - 1) * (a * rho - epsilon) + a * math.log1p(-1 / a) - t

    lo, hi = -30.0, 30.0
    for _ in range(120):
        m1, m2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        if f(m1) < f(m2):
            hi = m2
        else:
            lo = m1
    return f((lo + hi) / 2)


@functools.lru_cache(maxsize=64)
def rho_cap(epsilon: Fraction, delta: Fraction) -> Fraction:
    """The largest rho whose zCDP-to-(epsilon, delta) conversion fits, rounded up by
    :data:`CAP_SLACK`: no site following the study can spend more."""
    eps, target = float(epsilon), math.log(float(delta)) if delta > 0 else -math.inf
    if not (0 < eps < 1e6 and math.isfinite(target) and delta < 1):
        raise ValueError(f"need 0 < epsilon < 1e6 and delta in (0, 1), got {epsilon}, {delta}")
    lo, hi = 0.0, eps
    while _log_delta(eps, hi) <= target:  # rho = epsilon never fits a delta < 1 ...
        lo, hi = hi, 2 * hi  # ... but do not rely on it
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _log_delta(eps, mid) <= target:
            lo = mid
        else:
            hi = mid
    return Fraction(hi) * CAP_SLACK

"""The only place that touches OpenDP: compiling block measurements, their privacy maps,
and converting between zCDP and (epsilon, delta).

Only the ``contrib`` feature is enabled; ``honest-but-curious`` and
``floating-point``/``idealized-numerics`` weaken the guarantee and are refused. Every
block is released by OpenDP's Gaussian mechanism on an integer vector domain, which
samples *discrete* Gaussian noise (integers in, integers out, no floating-point
attack surface). The cost of a block is OpenDP's own privacy map at the block's L2
sensitivity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import version
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import opendp.prelude as dp
from opendp.mod import GLOBAL_FEATURES

from protocols.layout import BlockSpec

__all__ = [
    "EXACT_CI_MAX_SCALE",
    "MECHANISM",
    "OPENDP_VERSION",
    "CompiledBlock",
    "assert_only_contrib",
    "compile_block",
    "discrete_gaussian_ci",
    "rho_for_epsilon",
    "total_rho",
    "zcdp_to_epsilon",
]

dp.enable_features("contrib")
OPENDP_VERSION = version("opendp")
MECHANISM = "discrete Gaussian (OpenDP make_gaussian on vector_domain(atom_domain(i64)), L2)"


def assert_only_contrib() -> None:
    """Refuse to run if any feature beyond ``contrib`` has been enabled in this process."""
    if set(GLOBAL_FEATURES) != {"contrib"}:
        raise RuntimeError(f"OpenDP features must be exactly {{'contrib'}}, got {GLOBAL_FEATURES}")


@dataclass(frozen=True, slots=True)
class CompiledBlock:
    spec: BlockSpec
    scale: float  # the discrete Gaussian's scale (its SD, up to discreteness)
    d_in: float  # L2 sensitivity for one client
    rho: Fraction  # OpenDP's privacy map at d_in, exact value of the float it returned
    measurement: Any

    def release(self, values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        assert_only_contrib()
        if values.shape != (self.spec.size,):
            raise ValueError(f"block {self.spec.name}: expected {self.spec.size} values")
        noisy = self.measurement(values.astype(np.int64).tolist())
        return np.asarray(noisy, dtype=np.int64)


def _space() -> tuple[Any, Any]:
    # Integer data, real-valued L2 distance: exact sensitivities like sqrt(K) * W.
    return dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l2_distance(T=dp.f64)


def compile_block(spec: BlockSpec, rho: Fraction, max_episodes: int) -> CompiledBlock:
    """The block's measurement with the smallest scale whose OpenDP cost is <= ``rho``."""
    assert_only_contrib()
    d_in = spec.sensitivity(max_episodes)
    scale = d_in / math.sqrt(2 * float(rho))
    for _ in range(64):
        meas: Any = dp.m.make_gaussian(*_space(), scale=scale)
        cost = Fraction(meas.map(d_in))
        if cost <= rho:
            return CompiledBlock(spec=spec, scale=scale, d_in=d_in, rho=cost, measurement=meas)
        scale = math.nextafter(scale * (1 + 1e-12), math.inf)  # float rounding: widen
    raise RuntimeError(f"could not fit block {spec.name} into rho={rho}")  # a bug


def _reference(rho: float) -> Any:
    """A measurement whose privacy map at 1 is exactly ``rho``, for conversions."""
    meas = dp.m.make_gaussian(
        dp.atom_domain(T=dp.f64, nan=False),
        dp.absolute_distance(T=dp.f64),
        scale=1 / math.sqrt(2 * rho),
    )
    return meas


def zcdp_to_epsilon(rho: Fraction, delta: Fraction) -> float:
    """OpenDP's conversion of rho-zCDP to epsilon at ``delta`` (tighter than the textbook).

    For a very large rho (above 1e4; OpenDP's conversion overflows from about 1e5) the
    textbook bound rho + 2 sqrt(rho ln(1/delta)) (Bun & Steinke 2016, Prop. 1.3), an
    upper bound on the same epsilon, is returned instead, so a display or a conversion
    never understates the loss and never fails.
    """
    if rho <= 0:
        return 0.0
    r = float(rho)
    if r > _OPENDP_MAX_RHO:  # OpenDP overflows about here; its error costs 80 ms to build
        return _textbook_epsilon(r, delta)
    try:
        m: Any = dp.c.make_fix_delta(
            dp.c.make_zCDP_to_approxDP(_reference(float(rho))), float(delta)
        )
        eps, _ = m.map(1.0)
        return float(eps)
    except dp.OpenDPException as exc:
        if exc.variant != "Overflow":
            raise
        return _textbook_epsilon(r, delta)


_OPENDP_MAX_RHO = 1e4


def _textbook_epsilon(rho: float, delta: Fraction) -> float:
    return rho + 2 * math.sqrt(rho * math.log(1 / float(delta)))


def rho_for_epsilon(epsilon: Fraction, delta: Fraction) -> Fraction:
    """The largest rho (a dyadic fraction, rounded down) whose conversion fits (eps, delta)."""
    # The answer is below eps^2 (for eps < 1) and below eps (the conversion never gives
    # less than rho): the tighter bracket keeps 60 halvings precise for any epsilon.
    lo, hi = 0.0, min(float(epsilon), float(epsilon) ** 2)
    for _ in range(60):
        mid = (lo + hi) / 2
        if zcdp_to_epsilon(Fraction(mid), delta) <= float(epsilon):
            lo = mid
        else:
            hi = mid
    return Fraction(lo)  # exact value of the float that fits


EXACT_CI_MAX_SCALE = 1e5
"""OpenDP's accuracy of a discrete Gaussian sums over its support, in time linear in the
scale (2.5 s at 1e7, hours for a study asking rho 1e-30); above this scale the continuous
Gaussian's interval, rounded up and widened by 1, is shown instead (at 1e5 and beyond
the two differ by less than 1 point, so it never understates the noise)."""


def discrete_gaussian_ci(scale: float, alpha: float = 0.05) -> float:
    """Half-width of the (1 - alpha) noise interval of a discrete Gaussian with ``scale``."""
    if scale > EXACT_CI_MAX_SCALE:
        return float(math.ceil(scale * NormalDist().inv_cdf(1 - alpha / 2)) + 1)
    return float(dp.discrete_gaussian_scale_to_accuracy(scale, alpha))


def total_rho(blocks: Sequence[CompiledBlock]) -> Fraction:
    return sum((b.rho for b in blocks), Fraction(0))

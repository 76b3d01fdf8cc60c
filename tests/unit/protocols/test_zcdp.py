"""The coordinator's OpenDP-free zCDP arithmetic agrees with what the site computes with
OpenDP (tests may import both sides; the packages never import each other)."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.layout import block_layout, budget_weights
from protocols.study import parse_study
from protocols.zcdp import CAP_SLACK, gaussian_scale, rho_cap
from site_agent.privacy.accounting import compile_block, rho_for_epsilon
from tests.system.offline import study_doc


@settings(max_examples=12, deadline=None)
@given(
    st.floats(1e-3, 200.0).map(lambda e: Fraction(repr(e))),
    st.integers(3, 15).map(lambda k: Fraction(1, 10**k)),
)
def test_rho_cap_bounds_opendp_tightly(epsilon: Fraction, delta: Fraction) -> None:
    site = rho_for_epsilon(epsilon, delta)
    cap = rho_cap(epsilon, delta)
    assert site <= cap
    if site < epsilon**2 * Fraction(99, 100):
        # (The site searches rho in [0, epsilon^2], which can be below the true rho for a
        # tiny epsilon at a large delta: it then spends less than it may.)
        assert cap <= site * CAP_SLACK * (1 + Fraction(1, 10**9))


def test_site_compiles_at_the_recomputed_scale() -> None:
    study = parse_study(study_doc())
    layout = block_layout(study)
    for spec, share in zip(layout, budget_weights(layout), strict=True):
        for m in (1, 4):
            compiled = compile_block(spec, Fraction(1, 2) * share, m)
            want = gaussian_scale(spec.sensitivity(m), Fraction(1, 2) * share)
            assert compiled.d_in == spec.sensitivity(m)
            assert want <= compiled.scale <= want * (1 + 1e-9)
            assert math.isclose(
                float(compiled.rho), (compiled.d_in / compiled.scale) ** 2 / 2, rel_tol=1e-9
            )

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from protocols.instruments import builtin_instruments
from protocols.layout import (
    COUNT_BLOCK,
    COUNT_SHARE,
    LAYOUT_VERSION,
    block_layout,
    budget_weights,
    category_possible,
    change_bounds,
    trajectory_groups,
)
from protocols.study import Study, parse_study

ALL = ["counts", "change", "categories", "trajectory", "histogram"]


def _study(families: list[str], k: int = 20, bands: list[list[int]] | None = None,
           instrument: str = "PHQ-9") -> Study:
    doc = {"id": "s", "instrument": instrument,
           "window": {"start": "2026-01-01", "end": "2026-12-31"},
           "families": families, "max_session": k, "privacy": {"rho": 0.1}}
    if bands is not None:
        doc["bands"] = bands
    return parse_study(doc)


def test_the_layout_has_a_version() -> None:
    assert LAYOUT_VERSION == 2


def test_centred_blocks_share_one_encoded_bound_across_bands() -> None:
    """m_b (hi_b - lo_b) is the same M in every band where the value is released, so one
    Gaussian noises each band in proportion to its own width; the block's sensitivity is
    M (times sqrt(width) for the review groups), never the sum over bands."""
    s = _study(ALL, bands=[[0, 4], [5, 9], [10, 14], [15, 19], [20, 27]])
    for b in block_layout(s):
        if not b.centred:
            assert (b.lo, b.hi) == (0, 1)
            continue
        encoded = {m * (hi - lo) for m, (lo, hi) in zip(b.mult, b.raw, strict=True) if m}
        # Exactly M when the widths' least common multiple is small, else within 2^-10.
        assert max(encoded) == b.hi and min(encoded) > b.hi * (1 - 2**-10), b.name
        assert b.lo == -b.hi and b.sensitivity_sq == b.width * b.hi * b.hi


def test_band_local_bounds_are_the_bands_own() -> None:
    s = _study(ALL, bands=[[0, 9], [10, 14], [15, 19], [20, 27]])
    blocks = {b.name: b for b in block_layout(s)}
    assert blocks["sum_intake"].raw == ((-9, 9), (-4, 4), (-4, 4), (-7, 7))
    assert blocks["sum_final"].raw == ((-27, 27),) * 4
    # PHQ-9 is better when lower: change = intake - final within [lo - 27, hi - 0].
    assert blocks["traj_sum"].raw == ((-27, 9), (-17, 14), (-12, 19), (-7, 27))
    assert [lo for lo, _ in blocks["change_hist"].raw] == [-27, -17, -12, -7]
    assert blocks["change_hist"].width == max(hi - lo + 1 for lo, hi in
                                              blocks["change_hist"].raw) == 37
    # Against the uncentred layout (|change| <= 27, intake^2 <= 729), per band:
    assert blocks["sum_intake"].noise_unit(1) == pytest.approx(4.0 / 2 * 2)


@pytest.mark.parametrize(
    ("instrument", "lo", "hi", "name", "expected"),
    [
        ("PHQ-9", 0, 4, "reliably_improved", False),  # 4 - 0 < 6
        ("PHQ-9", 0, 5, "reliably_improved", False),
        ("PHQ-9", 0, 6, "reliably_improved", True),
        ("PHQ-9", 22, 27, "reliably_deteriorated", False),  # 27 - 22 < 6
        ("PHQ-9", 21, 27, "reliably_deteriorated", True),
        ("PHQ-9", 0, 9, "case_at_intake", False),
        ("PHQ-9", 10, 14, "case_at_intake", None),  # every intake is at caseness
        ("PHQ-9", 5, 14, "case_at_intake", True),
        ("PHQ-9", 0, 9, "recovered", False),
        ("PHQ-9", 0, 9, "reliably_recovered", False),
        ("PHQ-9", 5, 14, "recovered", True),
        ("PHQ-9", 0, 0, "response", False),  # no room to improve
        ("PHQ-9", 0, 4, "remission", True),
        ("ORS", 0, 24, "case_at_intake", None),  # better when higher: case below 25
        ("ORS", 25, 40, "case_at_intake", False),
        ("ORS", 36, 40, "reliably_improved", False),  # 40 - 36 < 5
    ],
)
def test_what_a_band_fixes_by_definition(
    instrument: str, lo: int, hi: int, name: str, expected: bool | None
) -> None:
    assert category_possible(builtin_instruments()[instrument], lo, hi, name) is expected


def test_fixed_values_are_not_released() -> None:
    s = _study(ALL, bands=[[0, 4], [5, 9], [10, 14], [15, 19], [20, 27]])
    blocks = {b.name: b for b in block_layout(s)}
    assert "case_at_intake" not in blocks  # no band straddles the cut-off 10
    assert blocks["reliably_improved"].mult[0] == 0 and blocks["reliably_improved"].mult[1]
    assert blocks["recovered"].mult[:2] == (0, 0) and all(blocks["recovered"].mult[2:])
    straddle = {b.name: b for b in block_layout(_study(ALL, bands=[[0, 7], [8, 12],
                                                                    [13, 27]]))}
    assert straddle["case_at_intake"].mult[0] == 0 and straddle["case_at_intake"].mult[1]
    assert straddle["recovered"].over == "cases"


def test_change_bounds_follow_the_direction() -> None:
    assert change_bounds(builtin_instruments()["PHQ-9"], 10, 14) == (-17, 14)
    assert change_bounds(builtin_instruments()["ORS"], 10, 14) == (-14, 30)


@pytest.mark.parametrize("k", [1, 2, 6, 7, 8, 9, 20, 50, 200])
def test_review_groups_cover_sessions_2_to_k_once(k: int) -> None:
    groups = trajectory_groups(k)
    covered = [s for a, b in groups for s in range(a, b + 1)]
    assert covered == list(range(2, k + 1))
    assert all(a <= b for a, b in groups)
    # They widen about geometrically, so sqrt(G) grows like sqrt(log K), not sqrt(K).
    assert len(groups) <= 5 + 2 * math.log2(max(k, 2))


def test_trajectory_sensitivity_grows_with_the_groups_not_the_sessions() -> None:
    for k in (20, 100):
        t = {b.name: b for b in block_layout(_study(["trajectory"], k=k))}
        g = len(trajectory_groups(k))
        assert t["traj_n"].sensitivity_sq == g == t["traj_n"].width
        assert t["traj_sum"].sensitivity_sq == g * t["traj_sum"].hi ** 2


def test_budget_weights_sum_to_one_and_minimise_the_figures_noise() -> None:
    """s_j proportional to sqrt(D_j) minimises sum_j D_j / s_j: moving any share between
    two blocks makes it worse (blocks at the floor share, which no figure needs, aside)."""
    layout = block_layout(_study(ALL))
    w = budget_weights(layout)
    assert sum(w) == 1 and all(x > 0 for x in w)

    def objective(shares: list[float]) -> float:
        return sum(b.demand / s for b, s in zip(layout, shares, strict=True))

    best = objective([float(x) for x in w])
    floored = {i for i, x in enumerate(w) if x == min(w)}
    names = [b.name for b in layout]
    assert w[names.index(COUNT_BLOCK)] >= COUNT_SHARE
    if w[names.index(COUNT_BLOCK)] == COUNT_SHARE:  # the count's floor binds
        floored.add(names.index(COUNT_BLOCK))
    assert len(floored) < len(w)
    for i in range(len(w)):
        for j in range(len(w)):
            if i != j and i not in floored and j not in floored:
                moved = [float(x) for x in w]
                d = moved[i] * 0.05
                moved[i] -= d
                moved[j] += d
                assert objective(moved) > best * (1 - 1e-9), (layout[i].name, layout[j].name)


def test_the_count_alone_takes_the_whole_budget() -> None:
    assert budget_weights(block_layout(_study(["counts"]))) == (Fraction(1),)


def test_only_requested_families() -> None:
    names = [b.name for b in block_layout(_study(["counts"]))]
    assert names == [COUNT_BLOCK]

from __future__ import annotations

import math
from fractions import Fraction

from protocols.layout import block_layout, budget_weights
from protocols.study import Study, parse_study


def _study(families: list[str], k: int = 20) -> Study:
    return parse_study({"id": "s", "instrument": "PHQ-9",
                        "window": {"start": "2026-01-01", "end": "2026-12-31"},
                        "families": families, "max_session": k, "privacy": {"rho": 0.1}})


def test_layout_sizes_and_sensitivities() -> None:
    s = _study(["counts", "change", "categories", "trajectory", "histogram"], k=20)
    blocks = {b.name: b for b in block_layout(s)}
    nb = 5  # PHQ-9 registry bands
    assert blocks["episodes"].size == nb and blocks["episodes"].sensitivity() == 1.0
    assert blocks["sum_change_sq"].sensitivity() == 27 * 27
    assert blocks["traj_n"].size == nb * 20
    assert blocks["traj_sum"].sensitivity() >= math.sqrt(20) * 27
    assert blocks["change_hist"].width == 55
    assert blocks["sum_intake"].sensitivity(max_episodes=3) == 3 * 27


def test_budget_weights_are_exact_and_balance_relative_error() -> None:
    s = _study(["counts", "change", "categories", "trajectory", "histogram"])
    layout = block_layout(s)
    w = budget_weights(layout)
    assert sum(w) == Fraction(1)
    # relative error ~ 1 / (typical * sqrt(share)): equal for every block
    rel = {b.name: 1 / (float(b.typical) * math.sqrt(float(x))) for b, x in zip(layout, w,
                                                                                 strict=True)}
    values = list(rel.values())
    assert max(values) / min(values) < 1 + 1e-9


def test_only_requested_families() -> None:
    names = [b.name for b in block_layout(_study(["counts"]))]
    assert names == ["episodes"]

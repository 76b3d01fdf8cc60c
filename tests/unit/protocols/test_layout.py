from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from protocols.layout import (
    COUNT_BLOCK,
    DENOMINATORS,
    BlockSpec,
    block_layout,
    budget_weights,
)
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


def _relative_errors(layout: tuple[BlockSpec, ...], w: tuple[Fraction, ...]) -> dict[str, float]:
    # A block's relative error ~ 1 / (typical * sqrt(share)) under Gaussian noise.
    return {b.name: 1 / (float(b.typical) * math.sqrt(float(x))) for b, x in zip(layout, w,
                                                                                  strict=True)}


@pytest.mark.parametrize(
    "families",
    [["counts", "change", "categories"], ["counts", "categories"]],
)
def test_budget_weights_balance_the_relative_error_of_the_ratios(families: list[str]) -> None:
    layout = block_layout(_study(families))
    w = budget_weights(layout)
    assert sum(w) == Fraction(1)
    rel = _relative_errors(layout, w)
    numerators = [v for name, v in rel.items() if name != COUNT_BLOCK]
    assert max(numerators) / min(numerators) < 1 + 1e-9  # every numerator alike

    # Every published ratio's squared relative error is numerator^2 + count^2; the count's
    # share minimises it for the fixed total (a coarse scan finds nothing better).
    def ratio_error(count_share: float) -> float:
        rest = 1 - count_share
        scale = {b.name: float(x) / (1 - float(w[0])) * rest for b, x in zip(layout, w,
                                                                            strict=True)}
        scale[COUNT_BLOCK] = count_share
        e = {b.name: 1 / (float(b.typical) ** 2 * scale[b.name]) for b in layout}
        return max(v for n, v in e.items() if n != COUNT_BLOCK) + e[COUNT_BLOCK]

    assert layout[0].name == COUNT_BLOCK
    chosen = ratio_error(float(w[0]))
    for other in np.linspace(0.001, 0.5, 500):
        assert chosen <= ratio_error(float(other)) * (1 + 1e-6)


@pytest.mark.parametrize(
    "families",
    [["counts", "change", "categories", "trajectory", "histogram"], ["counts", "trajectory"]],
)
def test_each_denominator_gets_sqrt_of_its_numerators_weight(families: list[str]) -> None:
    layout = block_layout(_study(families))
    w = dict(zip((b.name for b in layout), budget_weights(layout), strict=True))
    own = {b.name: 1 / float(b.typical) ** 2 for b in layout}
    assert sum(w.values()) == Fraction(1)
    for denominator, numerators in DENOMINATORS.items():
        present = [n for n in numerators if n in w]
        if denominator not in w or not present:
            continue
        group = sum(own[n] for n in present)
        ratio = float(w[denominator]) / sum(float(w[n]) for n in present)
        assert ratio == pytest.approx(math.sqrt(own[denominator] / group), rel=1e-6)
    # every block that divides by nothing keeps 1 / typical^2, like the numerators
    plain = [n for n in w if n not in DENOMINATORS]
    per_weight = {n: float(w[n]) / own[n] for n in plain}
    assert max(per_weight.values()) / min(per_weight.values()) < 1 + 1e-9


def test_the_count_alone_takes_the_whole_budget() -> None:
    assert budget_weights(block_layout(_study(["counts"]))) == (Fraction(1),)


def test_only_requested_families() -> None:
    names = [b.name for b in block_layout(_study(["counts"]))]
    assert names == ["episodes"]

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from protocols import builtin_instruments
from protocols.effect import LABEL_Z, acorn_label, effect_size
from site_agent.report import _severity_adjusted


def test_effect_size_is_mean_change_over_the_reference_sd() -> None:
    assert effect_size(6.0, 5.0) == 1.2
    assert math.isnan(effect_size(6.0, 0.0)) and math.isnan(effect_size(6.0, math.nan))


@pytest.mark.parametrize(
    ("value", "se", "label"),
    [
        (0.9, 0.0, "highly effective"),
        (0.9, 0.05, "highly effective"),  # 0.9 - 1.645 * 0.05 = 0.818
        (0.9, 0.1, "effective"),  # lower end 0.736
        (0.6, 0.1, "not shown to be effective"),  # a point above 0.5 is not enough
        (0.6, math.nan, "not shown to be effective"),
    ],
)
def test_the_label_is_decided_with_the_interval(value: float, se: float, label: str) -> None:
    assert acorn_label(value, se) == label
    assert pytest.approx(1.6448536, rel=1e-6) == LABEL_Z


def _doc(se: float) -> dict[str, object]:
    def est(v: float, s: float) -> dict[str, float]:
        return {"value": v, "se": s}

    return {
        "regression": {"intercept": est(-3.0, se), "slope": est(0.6, se / 10)},
        "bands": [{"lo": 10, "hi": 27, "estimates": {"episodes": est(5000, 0.0),
                                                     "mean_change": est(7.0, 0.1)}}],
    }


def test_the_benchmarks_noise_widens_the_clinics_label() -> None:
    """The same clinic is 'highly effective' against a precise benchmark and only 'not
    shown' against one whose regression carries a lot of (DP) noise."""
    rng = np.random.default_rng(4)
    intake = rng.integers(10, 28, 400)
    change = np.rint(-3.0 + 0.6 * intake + 2.5 + rng.normal(0, 4, 400)).astype(int)
    t = pd.DataFrame({"intake": intake, "change": change, "case_start": intake >= 10})
    ins = builtin_instruments()["PHQ-9"]
    ref = {"value": 5.0, "se": 0.02}
    precise = _severity_adjusted(_doc(0.05), t, ins, ref, [])
    noisy = _severity_adjusted(_doc(2.0), t, ins, ref, [])
    assert precise["value"] == noisy["value"] > 0.8 + 0.5  # same point estimate
    assert precise["acorn_label_90pct"] == "highly effective"
    assert noisy["acorn_label_90pct"] == "not shown to be effective"
    assert noisy["ci95"][0] < precise["ci95"][0]

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from protocols import (
    Better,
    CutoffCriterion,
    SpecError,
    builtin_instruments,
    jacobson_truax_cutoff,
    jacobson_truax_threshold,
    parse_instrument,
)

REPO = Path(__file__).resolve().parents[3]


def test_registry_has_the_domain_instruments() -> None:
    reg = builtin_instruments()
    assert set(reg) == {"PHQ-9", "GAD-7", "CORE-10", "CORE-OM", "ORS", "OQ-45", "WSAS", "K10"}
    phq = reg["PHQ-9"]
    assert (phq.lo, phq.hi, phq.better, phq.cutoff, phq.reliable_change) == (
        0, 27, Better.LOWER, 10, 6,
    )
    assert [b.name for b in phq.bands] == ["0-4", "5-9", "10-14", "15-19", "20-27"]
    assert (reg["GAD-7"].cutoff, reg["GAD-7"].reliable_change) == (8, 4)
    assert (reg["CORE-10"].cutoff, reg["CORE-10"].reliable_change) == (11, 6)
    assert reg["ORS"].better is Better.HIGHER and reg["ORS"].cutoff == 25
    assert (reg["OQ-45"].hi, reg["OQ-45"].cutoff, reg["OQ-45"].reliable_change) == (180, 64, 14)
    assert (reg["K10"].lo, reg["K10"].hi) == (10, 50)


def test_unverified_flags_follow_domain_markers() -> None:
    reg = builtin_instruments()
    # DOMAIN.md marks [U]: CORE-OM and ORS reliable change, WSAS and K10 reliable change.
    for ins_id in ("CORE-OM", "ORS", "WSAS", "K10"):
        assert "reliable_change" in reg[ins_id].unverified, ins_id
    for ins_id in ("PHQ-9", "GAD-7"):
        assert reg[ins_id].unverified == ()
    # No value invented where none is known.
    assert reg["WSAS"].reliable_change is None and reg["K10"].reliable_change is None


def test_packaged_registry_is_configs_registry() -> None:
    packaged = (REPO / "protocols" / "data" / "instruments.yaml").read_bytes()
    assert packaged == (REPO / "configs" / "instruments.yaml").read_bytes()


def test_instruments_are_frozen() -> None:
    phq = builtin_instruments()["PHQ-9"]
    with pytest.raises(AttributeError):
        phq.cutoff = 5  # type: ignore[misc]


def test_jacobson_truax_worked_check_core10() -> None:
    # DOMAIN.md: SD 7.7, r .90 at 90% confidence gives 5.67, which CORE-10 publishes as 6.
    assert jacobson_truax_threshold(7.7, 0.90, confidence=0.90) == pytest.approx(5.67, abs=0.01)
    assert round(jacobson_truax_threshold(7.7, 0.90, confidence=0.90)) == 6


def test_jacobson_truax_bdi_ii() -> None:
    # 1.96 * sqrt(2) * 8.16 * sqrt(1 - .801)
    expected = 1.959964 * math.sqrt(2) * 8.16 * math.sqrt(0.199)
    ins = parse_instrument(
        "BDI-II", {"range": [0, 63], "better": "lower", "reliability": 0.801, "sd": 8.16,
                   "cutoff": 20},
    )
    assert ins.reliable_change == pytest.approx(expected, rel=1e-5)
    assert ins.reliable_change == pytest.approx(10.09, abs=0.01)


def test_cutoff_criteria_lower_is_better() -> None:
    clin, func = (30.0, 8.0), (8.0, 6.0)
    assert jacobson_truax_cutoff(CutoffCriterion.A, Better.LOWER, clin, func) == 14.0
    assert jacobson_truax_cutoff(CutoffCriterion.B, Better.LOWER, clin, func) == 20.0
    c = (8.0 * 8.0 + 6.0 * 30.0) / 14.0
    assert jacobson_truax_cutoff(CutoffCriterion.C, Better.LOWER, clin, func) == pytest.approx(c)


def test_cutoff_criteria_higher_is_better() -> None:
    clin, func = (18.0, 6.0), (32.0, 5.0)
    assert jacobson_truax_cutoff(CutoffCriterion.A, Better.HIGHER, clin, func) == 30.0
    assert jacobson_truax_cutoff(CutoffCriterion.B, Better.HIGHER, clin, func) == 22.0


def test_custom_instrument_with_norms_defaults_to_criterion_c() -> None:
    ins = parse_instrument("X", {
        "range": [0, 40], "better": "lower", "reliable_change": 5,
        "clinical": {"mean": 30, "sd": 8}, "functional": {"mean": 8, "sd": 6},
    })
    assert ins.cutoff_criterion is CutoffCriterion.C
    assert ins.cutoff == pytest.approx((8 * 8 + 6 * 30) / 14)
    # Default bands split at the cut-off.
    assert [b.name for b in ins.bands] == ["0-17", "18-40"]


def test_custom_instrument_reports_every_problem() -> None:
    with pytest.raises(SpecError) as err:
        parse_instrument("X", {"range": [10, 0], "better": "down", "reliable_chnage": 3})
    text = str(err.value)
    assert "did you mean 'reliable_change'" in text
    assert "better" in text and "'lower' or 'higher'" in text
    assert "missing cut-off" in text
    assert len(err.value.problems) >= 4


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 10,
          "reliability": 0.8, "sd": 5}, "not both"),
        ({"range": [0, 27], "better": "lower", "reliability": 1.2, "sd": 5, "cutoff": 10},
         "reliability"),
        ({"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 99}, "outside"),
        ({"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 10,
          "bands": [[0, 9], [11, 27]]}, "does not follow"),
        ({"range": [0, 27], "better": "lower", "reliable_change": 6, "cutoff": 10,
          "cutoff_criterion": "c"}, "only applies"),
    ],
)
def test_custom_instrument_refusals(spec: dict[str, object], needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        parse_instrument("X", spec)


def test_registry_yaml_lists_sources() -> None:
    doc = yaml.safe_load((REPO / "configs" / "instruments.yaml").read_text())
    for ins_id, spec in doc["instruments"].items():
        assert spec.get("source"), f"{ins_id} has no source"

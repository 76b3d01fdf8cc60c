from __future__ import annotations

import copy
from fractions import Fraction
from typing import Any

import pytest
import yaml

from protocols import SpecError
from protocols.study import Family, parse_study, study_from_canonical

EXAMPLE = """
study:
  id: phq9-2026
  title: PHQ-9 expected change in adult outpatient services
  instrument: PHQ-9
  window: {start: 2026-01-01, end: 2026-12-31}
  bands: [[0, 9], [10, 14], [15, 19], [20, 27]]
  families: [counts, change, categories, trajectory, histogram]
  max_session: 20
  privacy: {rho: 0.05}            # per site; or {epsilon: 1.0, delta: 1.0e-6}
  min_sites: 3
"""


def _doc() -> dict[str, Any]:
    return dict(yaml.safe_load(EXAMPLE)["study"])


def test_issue_example() -> None:
    s = parse_study(yaml.safe_load(EXAMPLE))
    assert s.id == "phq9-2026" and s.instrument.id == "PHQ-9"
    assert s.privacy.rho == Fraction(1, 20)  # exact, not the float 0.05
    assert s.families == tuple(Family)
    assert s.bands == ((0, 9), (10, 14), (15, 19), (20, 27))
    assert s.min_scores == 2 and s.max_session == 20 and s.min_sites == 3


def test_hash_is_stable_and_content_addressed() -> None:
    a = parse_study(_doc())
    reordered = dict(reversed(list(_doc().items())))
    reordered["families"] = ["histogram", "trajectory", "categories", "change", "counts"]
    assert parse_study(reordered).hash == a.hash
    for key, value in [("title", "other"), ("max_session", 19), ("min_sites", 4),
                       ("privacy", {"rho": 0.051}), ("bands", [[0, 14], [15, 27]])]:
        changed = _doc() | {key: value}
        assert parse_study(changed).hash != a.hash, key


def test_epsilon_delta_request() -> None:
    s = parse_study(_doc() | {"privacy": {"epsilon": 1.0, "delta": 1.0e-6}})
    assert s.privacy.epsilon == 1 and s.privacy.delta == Fraction(1, 10**6)
    assert s.canonical()["privacy"] == {"epsilon": "1", "delta": "0.000001"}


def test_canonical_round_trip() -> None:
    s = parse_study(_doc())
    assert study_from_canonical(s.canonical_bytes()) == s
    with pytest.raises(SpecError):
        study_from_canonical(s.canonical_bytes().replace(b'"min_sites":3', b'"min_sites": 3'))


def test_inline_custom_instrument_round_trip() -> None:
    doc = _doc() | {
        "instrument": {"id": "BDI-II", "definition": {
            "range": [0, 63], "better": "lower", "reliability": 0.801, "sd": 8.16, "cutoff": 20}},
        "bands": [[0, 19], [20, 28], [29, 63]],
    }
    s = parse_study(doc)
    assert s.instrument_inline and s.instrument.reliable_change == pytest.approx(10.09, abs=0.01)
    again = study_from_canonical(s.canonical_bytes())
    assert again.hash == s.hash and again.instrument.reliable_change == pytest.approx(
        s.instrument.reliable_change or 0)


@pytest.mark.parametrize("change, needle", [
    ({"families": ["counts", "trajectorie"]}, "did you mean 'trajectory'"),
    ({"instrument": "PHQ9"}, "did you mean 'PHQ-9'"),
    ({"bands": [[0, 9], [11, 27]]}, "does not follow"),
    ({"bands": [[0, 9], [10, 20]]}, "cover the whole"),
    ({"privacy": {"rho": 0.05, "epsilon": 1}}, "not both"),
    ({"privacy": {"epsilon": 1}}, "delta"),
    ({"privacy": {"rho": -1}}, "must be > 0"),
    ({"window": {"start": "2026-12-31", "end": "2026-01-01"}}, "after end"),
    ({"max_session": 0}, "max_session"),
    ({"inclusion": {"min_scores": 1}}, "min_scores"),
    ({"approval": "auto"}, "unknown key 'approval'"),  # a study cannot set site policy
    ({"budget": {"rho": 9}}, "unknown key 'budget'"),
])
def test_malformed_studies(change: dict[str, Any], needle: str) -> None:
    doc = copy.deepcopy(_doc()) | change
    with pytest.raises(SpecError) as err:
        parse_study(doc)
    assert needle in str(err.value)

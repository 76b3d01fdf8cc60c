from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml

from site_agent.errors import ConfigError
from site_agent.privacy import Approval, load_policy

from .privacy_helpers import POLICY

REPO = Path(__file__).resolve().parents[3]


def _load(tmp: Path, doc: dict[str, Any]) -> Any:
    (tmp / "privacy.yaml").write_text(yaml.safe_dump(doc))
    return load_policy(tmp / "privacy.yaml")


def test_example_policy_loads_with_its_warnings() -> None:
    pol = load_policy(REPO / "configs" / "privacy.example.yaml")
    assert pol.unit == "client_id" and pol.max_episodes_per_client == 1
    assert pol.per_study_rho == Fraction(1, 10) and pol.budget_rho == Fraction(1, 2)
    assert pol.period_days == 365 and pol.approval is Approval.AUTO
    # rho 0.5 is epsilon 5.2 at delta 1e-6: both warnings fire
    assert any("(> 5)" in w for w in pol.warnings)
    assert any("(> 1)" in w for w in pol.warnings)


def test_unit_is_required(tmp_path: Path) -> None:
    doc = {k: v for k, v in POLICY.items() if k != "unit"}
    with pytest.raises(ConfigError, match=r"privacy\.unit: required"):
        _load(tmp_path, doc)


def test_unit_must_be_the_client(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be the client"):
        _load(tmp_path, POLICY | {"unit": "therapist_id"})


def test_epsilon_budget_converted_exactly_below(tmp_path: Path) -> None:
    pol = _load(tmp_path, POLICY | {"budget": {"epsilon": 1.0, "delta": 1e-6,
                                               "period_days": 30},
                                    "per_study": {"epsilon": 0.5, "delta": 1e-6}})
    assert pol.epsilon(pol.budget_rho) <= 1.0
    assert pol.epsilon(pol.budget_rho) > 0.999  # the largest rho that fits, not a loose one
    assert pol.period_days == 30 and pol.delta == Fraction(1, 10**6)
    assert pol.warnings == ()


def test_every_problem_at_once(tmp_path: Path) -> None:
    doc = POLICY | {"aproval": "auto", "max_episodes_per_client": 0,
                    "allow": {"instruments": ["PHQ-9"], "families": ["count"]}}
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, doc)
    text = str(err.value)
    assert "did you mean 'approval'" in text
    assert "max_episodes_per_client" in text
    assert "did you mean 'counts'" in text


def test_cap_larger_than_budget(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than the whole budget"):
        _load(tmp_path, POLICY | {"per_study": {"rho": 1}, "budget": {"rho": 0.5}})


def test_policy_is_frozen(tmp_path: Path) -> None:
    pol = _load(tmp_path, POLICY)
    with pytest.raises(AttributeError):
        pol.budget_rho = Fraction(100)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file; the site's privacy_policy must name"),
        (b"unit: client_id\nbudget: {rho: 0.5\n", "not valid YAML at line 3, column 1"),
        (b"unit: \xff\xfe\n", "cannot read the file (UnicodeDecodeError)"),
        (b"- just\n- a list\n", "expected a mapping; see configs/privacy.example.yaml"),
    ],
)
def test_an_unreadable_policy_names_the_file_and_the_fix(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "privacy.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: ") and expected in problem, problem

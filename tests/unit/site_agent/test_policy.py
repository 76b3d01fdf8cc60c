from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import opendp.prelude as dp
import pytest
import yaml

from site_agent.errors import ConfigError
from site_agent.privacy import Approval, load_policy
from site_agent.privacy.accounting import (
    EXACT_CI_MAX_SCALE,
    discrete_gaussian_ci,
    rho_for_epsilon,
    zcdp_to_epsilon,
)

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


@pytest.mark.parametrize("rho", [1e3, 1e6, 1e12])
def test_a_very_large_budget_loads_and_shows_its_epsilon(
    tmp_path: Path, rho: float, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenDP's conversion overflows from rho ~1,000 on; the display falls back to the
    textbook bound (an upper bound on epsilon) instead of failing to load (was exit 70)."""
    from site_agent.cli import main  # noqa: PLC0415

    from .privacy_helpers import make_site  # noqa: PLC0415

    doc = POLICY | {"per_study": {"rho": rho}, "budget": {"rho": rho, "period_days": 365}}
    pol = _load(tmp_path, doc)
    eps = pol.epsilon(pol.budget_rho)
    # at least rho, at most the textbook bound (what is shown once OpenDP overflows)
    assert rho <= eps <= rho + 2 * math.sqrt(rho * math.log(1e6)) * (1 + 1e-12)
    assert any(f"epsilon {eps:.2f} (> 5)" in w for w in pol.warnings)
    config = make_site(tmp_path / "clinic", doc)
    assert main(["budget", "--config", str(config), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)
    assert budget["budget"]["epsilon"] == pytest.approx(eps)


def test_epsilon_and_rho_convert_over_the_whole_accepted_range() -> None:
    delta = Fraction(1, 10**6)
    for eps in (Fraction(1, 10**6), Fraction(1), Fraction(10**6), Fraction(10**30)):
        rho = rho_for_epsilon(eps, delta)
        assert rho > 0 and zcdp_to_epsilon(rho, delta) <= float(eps)
        if eps >= 1:  # and it is the largest that fits (was 0 for epsilon 1e30)
            assert zcdp_to_epsilon(rho, delta) >= float(eps) * (1 - 1e-9)
    eps = zcdp_to_epsilon(Fraction(10**30), delta)
    assert 1e30 < eps < 1.0001e30


def test_the_noise_interval_is_quick_and_never_understated_for_huge_scales() -> None:
    """OpenDP's accuracy sums over the support (time linear in the scale): a study asking
    rho 1e-30 hung preview. Above EXACT_CI_MAX_SCALE the Gaussian bound is used."""
    for scale in (EXACT_CI_MAX_SCALE * 1.0001, 1e6):
        exact = float(dp.discrete_gaussian_scale_to_accuracy(scale, 0.05))
        assert exact <= discrete_gaussian_ci(scale, 0.05) <= exact + 2
    assert discrete_gaussian_ci(1e30, 0.05) >= 1.95e30

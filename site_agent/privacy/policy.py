"""The privacy officer's policy (``privacy.yaml``), validated once into a frozen value.

Nothing a coordinator sends can change it: a study is checked against the policy, never
the other way round. Budgets are exact (Fractions) and accounted in zCDP (rho); a budget
or cap given as (epsilon, delta) is converted with OpenDP to the largest rho that fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any

from protocols.spec import read_yaml, unknown_keys
from protocols.study import Family, PrivacyRequest, parse_families, parse_loss
from site_agent.errors import ConfigError
from site_agent.privacy.accounting import rho_for_epsilon, zcdp_to_epsilon

__all__ = ["DISPLAY_DELTA", "Approval", "PrivacyPolicy", "load_policy", "to_rho"]

DISPLAY_DELTA = Fraction(1, 10**6)  # delta for showing rho as epsilon when none is set
_KEYS = (
    "unit",
    "max_episodes_per_client",
    "per_study",
    "budget",
    "allow",
    "approval",
    "trusted_coordinator_keys",
    "state_dir",
    "anchor",
)


class Approval(StrEnum):
    AUTO = "auto"
    MANUAL = "manual"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyPolicy:
    unit: str
    max_episodes_per_client: int
    per_study_rho: Fraction
    budget_rho: Fraction
    period_days: int
    delta: Fraction  # for showing rho as (epsilon, delta)
    instruments: frozenset[str]
    families: frozenset[Family]
    approval: Approval
    trusted_keys: tuple[Path, ...]
    state_dir: Path
    source: Path
    anchor: Path | None = None  # the ledger's signed checkpoints; None: beside state_dir
    warnings: tuple[str, ...] = ()  # epsilon > 1 and > 5 notes, shown by every command

    def epsilon(self, rho: Fraction) -> float:
        return zcdp_to_epsilon(rho, self.delta)


def to_rho(req: PrivacyRequest) -> Fraction:
    """A privacy request as zCDP rho (exact, or the largest rho fitting (epsilon, delta))."""
    if req.rho is not None:
        return req.rho
    if req.epsilon is None or req.delta is None:
        raise ValueError("privacy request without rho or epsilon and delta")
    return rho_for_epsilon(req.epsilon, req.delta)


def load_policy(path: Path | str, *, site_unit_column: str = "client_id") -> PrivacyPolicy:
    """Read ``privacy.yaml``; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    where = str(path)
    _, doc = read_yaml(
        path,
        missing="the site's privacy_policy must name the privacy officer's policy file",
        error=ConfigError,
    )
    if not isinstance(doc, Mapping):
        raise ConfigError(where, [f"{where}: expected a mapping; see configs/privacy.example.yaml"])
    problems = unknown_keys(doc, _KEYS, "privacy")
    base = path.resolve().parent

    unit = doc.get("unit")
    if unit is None:
        problems.append(
            "privacy.unit: required; the privacy unit is the person protected, "
            "write `unit: client_id`"
        )
    elif unit not in ("client_id", site_unit_column):
        problems.append(
            f"privacy.unit: {unit!r} is not the client column; the privacy unit "
            "must be the client (`unit: client_id`)"
        )

    m = doc.get("max_episodes_per_client", 1)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 10:
        problems.append(f"privacy.max_episodes_per_client: expected 1..10, got {m!r}")
        m = 1

    per_study = parse_loss(doc.get("per_study"), "privacy.per_study", problems)
    budget_spec = doc.get("budget")
    budget: PrivacyRequest | None = None
    period = 365
    if not isinstance(budget_spec, Mapping):
        problems.append("privacy.budget: required, e.g. {rho: 0.5, period_days: 365}")
    else:
        period = budget_spec.get("period_days", 365)
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            problems.append(f"privacy.budget.period_days: expected days >= 1, got {period!r}")
            period = 365
        budget = parse_loss(
            {k: v for k, v in budget_spec.items() if k != "period_days"}, "privacy.budget", problems
        )
    delta = next(
        (r.delta for r in (budget, per_study) if r is not None and r.delta is not None),
        DISPLAY_DELTA,
    )

    allow = doc.get("allow")
    instruments: frozenset[str] = frozenset()
    families: frozenset[Family] = frozenset()
    if not isinstance(allow, Mapping):
        problems.append("privacy.allow: required, e.g. {instruments: [PHQ-9], families: [counts]}")
    else:
        problems += unknown_keys(allow, ("instruments", "families"), "privacy.allow")
        ins = allow.get("instruments")
        if not isinstance(ins, list) or not all(isinstance(i, str) for i in ins):
            problems.append("privacy.allow.instruments: expected a list of instrument ids")
        else:
            instruments = frozenset(ins)
        families = frozenset(
            parse_families(allow.get("families"), "privacy.allow.families", problems)
        )

    approval_raw = doc.get("approval", "manual")
    try:
        approval = Approval(approval_raw)
    except ValueError:
        problems.append(f"privacy.approval: expected auto or manual, got {approval_raw!r}")
        approval = Approval.MANUAL

    keys: list[Path] = []
    raw_keys = doc.get("trusted_coordinator_keys", [])
    if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
        problems.append("privacy.trusted_coordinator_keys: expected a list of public key files")
    else:
        for k in raw_keys:
            kp = (base / k).resolve()
            if not kp.is_file():
                problems.append(f"privacy.trusted_coordinator_keys: {k!r} not found at {kp}")
            keys.append(kp)

    state = doc.get("state_dir")
    if not isinstance(state, str) or not state:
        problems.append("privacy.state_dir: required; where the ledger and audit log live")
        state = "state"

    anchor = doc.get("anchor")
    if anchor is not None and (not isinstance(anchor, str) or not anchor):
        problems.append(
            "privacy.anchor: expected a file path (the ledger's signed checkpoints), "
            f"got {anchor!r}"
        )
        anchor = None

    if problems or per_study is None or budget is None:
        raise ConfigError(where, problems)

    per_study_rho, budget_rho = to_rho(per_study), to_rho(budget)
    if per_study_rho > budget_rho:
        raise ConfigError(where, ["privacy.per_study: larger than the whole budget; lower it"])
    notes: list[str] = []
    for label, rho in (("per_study", per_study_rho), ("budget", budget_rho)):
        eps = zcdp_to_epsilon(rho, delta)
        if eps > 5:
            notes.append(
                f"privacy.{label} allows epsilon {eps:.2f} (> 5) at delta {float(delta):g}: "
                "weak protection for any one client"
            )
        elif eps > 1:
            notes.append(
                f"privacy.{label} allows epsilon {eps:.2f} (> 1) at delta {float(delta):g}"
            )

    return PrivacyPolicy(
        unit="client_id",
        max_episodes_per_client=int(m),
        per_study_rho=per_study_rho,
        budget_rho=budget_rho,
        period_days=int(period),
        delta=delta,
        instruments=instruments,
        families=families,
        approval=approval,
        trusted_keys=tuple(keys),
        state_dir=(base / state).resolve(),
        source=path.resolve(),
        anchor=None if anchor is None else (base / anchor).resolve(),
        warnings=tuple(notes),
    )


def describe(policy: PrivacyPolicy) -> dict[str, Any]:
    """The policy in plain values, for `budget` and previews."""
    return {
        "unit": policy.unit,
        "max_episodes_per_client": policy.max_episodes_per_client,
        "per_study_rho": str(policy.per_study_rho),
        "budget_rho": str(policy.budget_rho),
        "period_days": policy.period_days,
        "delta": float(policy.delta),
        "approval": str(policy.approval),
        "instruments": sorted(policy.instruments),
        "families": sorted(policy.families),
    }

"""The one release path: policy check -> reserve budget (durably) -> compute -> OpenDP
noise -> cache -> audit -> return. Nothing else computes on client data for export.

:class:`ReleaseEngine` refuses with :class:`Refused`, which carries a protocol error code;
its ``detail`` is for the site's own operators and never leaves the site.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.codes import MESSAGES, ErrorCode
from protocols.errors import SpecError
from protocols.layout import block_layout, budget_weights
from protocols.release import Envelope, NoisyBlock, SiteRelease
from protocols.study import Study, read_study_file
from site_agent import crypto
from site_agent.config import SiteConfig, load_site_config
from site_agent.data import read_intake
from site_agent.errors import ConfigError, DataError
from site_agent.outcomes import derive_episodes
from site_agent.privacy.accounting import (
    MECHANISM,
    OPENDP_VERSION,
    CompiledBlock,
    assert_only_contrib,
    compile_block,
    discrete_gaussian_ci,
    total_rho,
    zcdp_to_epsilon,
)
from site_agent.privacy.ledger import Ledger, LedgerRefusal
from site_agent.privacy.policy import Approval, PrivacyPolicy, load_policy, to_rho
from site_agent.privacy.statistics import exact_blocks, select_episodes

__all__ = [
    "Plan",
    "Refused",
    "ReleaseEngine",
    "StudyRequest",
    "load_engine",
    "load_study_request",
]


class Refused(Exception):
    """A request the site will not answer. Only ``code`` and its fixed message may leave."""

    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {MESSAGES[code]}" + (f" ({detail})" if detail else ""))

    @property
    def message(self) -> str:
        return MESSAGES[self.code]


@dataclass(frozen=True, slots=True)
class StudyRequest:
    """A releasable study, with the coordinator's signature when it came signed."""

    study: Study
    envelope: Envelope | None = None


def load_study_request(path: Path) -> StudyRequest:
    """A study file: the YAML draft, or a signed study (JSON envelope), read within the
    document bounds; anything wrong with it is ``Refused(MALFORMED_STUDY)``."""
    try:
        study, envelope = read_study_file(path)
    except SpecError as exc:
        raise Refused(ErrorCode.MALFORMED_STUDY, str(exc)) from None
    return StudyRequest(study, envelope)


@dataclass(frozen=True, slots=True)
class Plan:
    study: Study
    request_id: str
    requested_rho: Fraction
    blocks: tuple[CompiledBlock, ...]
    cost: Fraction  # OpenDP's privacy maps, summed exactly (zCDP composition)


def _versions() -> dict[str, str]:
    return {"outcomebench": version("outcomebench"), "opendp": OPENDP_VERSION}


class ReleaseEngine:
    def __init__(
        self,
        site: SiteConfig,
        policy: PrivacyPolicy,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.site = site
        self.policy = policy
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))

    def ledger(self) -> Ledger:
        return Ledger(
            self.policy.state_dir,
            budget=self.policy.budget_rho,
            period_days=self.policy.period_days,
            clock=self.clock,
        )

    def request_id(self, study: Study) -> str:
        return hashlib.sha256(f"{self.site.site_id}\n{study.hash}".encode()).hexdigest()[:16]

    # -- checks that need no data and spend nothing ---------------------------------

    def plan(self, req: StudyRequest) -> Plan:
        """Check the request against the policy and compile its measurements."""
        assert_only_contrib()
        study, pol = req.study, self.policy
        if req.envelope is not None and req.envelope.payload != study.canonical_bytes():
            raise Refused(ErrorCode.UNTRUSTED_STUDY, "the signature covers another study")
        if pol.trusted_keys and (
            req.envelope is None or not crypto.trusted(req.envelope, pol.trusted_keys)
        ):
            raise Refused(
                ErrorCode.UNTRUSTED_STUDY,
                "unsigned" if req.envelope is None else "signed by an untrusted key",
            )
        if study.instrument.id not in pol.instruments:
            raise Refused(ErrorCode.NOT_ALLOWED, f"instrument {study.instrument.id}")
        banned = [str(f) for f in study.families if f not in pol.families]
        if banned:
            raise Refused(ErrorCode.NOT_ALLOWED, f"families {', '.join(banned)}")
        requested = to_rho(study.privacy)
        if requested > pol.per_study_rho:
            raise Refused(
                ErrorCode.OVER_STUDY_CAP,
                f"asks rho {float(requested):.6g} > cap {float(pol.per_study_rho):.6g}",
            )
        try:
            layout = block_layout(study)  # refuses, unallocated, a release too large to send
        except SpecError as exc:
            raise Refused(ErrorCode.MALFORMED_STUDY, str(exc)) from None
        shares = budget_weights(layout)
        blocks = tuple(
            compile_block(spec, requested * share, pol.max_episodes_per_client)
            for spec, share in zip(layout, shares, strict=True)
        )
        cost = total_rho(blocks)
        if cost > requested or cost <= 0:
            # The compiled mechanism must never cost more than was asked: a bug, not input.
            raise Refused(ErrorCode.INTERNAL_ERROR, f"compiled cost {cost} != request {requested}")
        return Plan(
            study=study,
            request_id=self.request_id(study),
            requested_rho=requested,
            blocks=blocks,
            cost=cost,
        )

    def preview(self, req: StudyRequest) -> dict[str, Any]:
        """Exactly what would leave and what it would cost. Spends nothing, reads no data."""
        with self.ledger() as led:
            status = led.status()
            cached = led.cached(req.study.id)
            state = led.request_state(self.request_id(req.study))
        doc: dict[str, Any] = {
            "site_id": self.site.site_id,
            "study_id": req.study.id,
            "study_hash": req.study.hash,
            "title": req.study.title,
            "instrument": req.study.instrument.id,
            "bands": [list(b) for b in req.study.bands],
            "budget": {
                "period_start": status.period_start.isoformat(),
                "period_end": status.period_end.isoformat(),
                "budget_rho": float(status.budget),
                "spent_rho": float(status.spent),
                "remaining_rho": float(status.remaining),
            },
            "warnings": list(self.policy.warnings),
        }
        try:
            plan = self.plan(req)
        except Refused as r:
            return doc | {
                "outcome": "refuse",
                "code": str(r.code),
                "reason": r.message,
                "detail": r.detail,
            }
        delta = self.policy.delta
        doc["what_leaves"] = [
            {
                "block": b.spec.name,
                "family": str(b.spec.family),
                "values": b.spec.size,
                "shape": f"{b.spec.n_bands} bands x {b.spec.width}",
                "per_value_bounds": [b.spec.lo, b.spec.hi],
                "client_sensitivity_l2": round(b.d_in, 6),
                "noise_scale": round(b.scale, 4),
                "plus_minus_95": round(discrete_gaussian_ci(b.scale, 0.05), 2),
                "rho": float(b.rho),
            }
            for b in plan.blocks
        ]
        doc["cost"] = {
            "rho": float(plan.cost),
            "epsilon": zcdp_to_epsilon(plan.cost, delta),
            "delta": float(delta),
            "requested": req.study.privacy.describe(),
        }
        doc["privacy_unit"] = {
            "unit": "client",
            "max_episodes_per_client": self.policy.max_episodes_per_client,
        }
        if cached is not None and cached[0] == req.study.hash:
            outcome, after = "cached: the earlier release is returned at no cost", status.remaining
        elif cached is not None:
            outcome, after = "refuse: study_conflict", status.remaining
        elif status.spent + plan.cost > status.budget:
            outcome, after = "refuse: budget_exhausted", status.remaining
        elif self.policy.approval is Approval.MANUAL and state != "approved":
            outcome = "await approval" if state != "denied" else "refuse: denied"
            after = status.remaining - plan.cost
        else:
            outcome, after = "release", status.remaining - plan.cost
        doc["outcome"] = outcome
        doc["budget"]["remaining_after_rho"] = float(after)
        doc["budget"]["remaining_after_epsilon"] = zcdp_to_epsilon(after, delta)
        return doc

    # -- the release path -----------------------------------------------------------

    def release(self, req: StudyRequest) -> bytes:
        """Answer a study: the signed release envelope (JSON bytes), or raise Refused."""
        study = req.study
        with self.ledger() as led:
            try:
                return self._release(req, led)
            except Refused as r:
                led.audit(
                    "refused",
                    {
                        "request_id": self.request_id(study),
                        "study_id": study.id,
                        "study_hash": study.hash,
                        "code": str(r.code),
                    },
                )
                raise

    def _release(self, req: StudyRequest, led: Ledger) -> bytes:
        study = req.study
        plan = self.plan(req)
        cached = led.cached(study.id)
        if cached is not None:
            if cached[0] != study.hash:
                raise Refused(
                    ErrorCode.STUDY_CONFLICT,
                    f"study id {study.id} was answered with another content",
                )
            led.audit(
                "cached",
                {
                    "request_id": plan.request_id,
                    "study_id": study.id,
                    "study_hash": study.hash,
                    "sha256": hashlib.sha256(cached[1]).hexdigest(),
                },
            )
            return cached[1]
        if self.policy.approval is Approval.MANUAL:
            state = led.request_state(plan.request_id)
            if state == "denied":
                raise Refused(ErrorCode.DENIED)
            if state != "approved":
                led.add_pending(
                    request_id=plan.request_id,
                    study_id=study.id,
                    study_hash=study.hash,
                    title=study.title,
                    rho=plan.cost,
                    study=study.canonical_bytes(),
                )
                raise Refused(ErrorCode.PENDING_APPROVAL, f"request {plan.request_id}")
        # Everything that could fail without the data is done before budget is reserved.
        try:
            key = crypto.load_or_create_key(self.policy.state_dir)
        except (OSError, ValueError) as exc:
            raise Refused(
                ErrorCode.INTERNAL_ERROR,
                f"the site's signing key in "
                f"{self.policy.state_dir} cannot be read ({exc.__class__.__name__}); "
                "restore it from a backup",
            ) from None
        try:
            reservation = led.reserve(
                request_id=plan.request_id,
                study_id=study.id,
                study_hash=study.hash,
                rho=plan.cost,
                cap=self.policy.per_study_rho,
            )
        except LedgerRefusal as r:
            raise Refused(r.code, r.detail) from None
        # Budget is reserved and durable: from here on the data may be touched.
        try:
            body = self._compute(plan, key)
        except Refused:
            raise
        except DataError as exc:
            raise Refused(ErrorCode.INVALID_DATA, str(exc)) from None
        except Exception as exc:  # the budget stays spent; nothing leaves
            raise Refused(ErrorCode.INTERNAL_ERROR, exc.__class__.__name__) from None
        try:
            return led.complete(reservation, study_id=study.id, study_hash=study.hash, body=body)
        except LedgerRefusal as r:
            raise Refused(r.code, r.detail) from None

    def _compute(self, plan: Plan, key: Ed25519PrivateKey) -> bytes:
        study, pol, site = plan.study, self.policy, self.site
        intake = read_intake(site.data, site.instruments)
        instruments: Mapping[str, Any] = {**site.instruments, study.instrument.id: study.instrument}
        episodes = derive_episodes(intake.records, instruments, study.max_session)
        ep = episodes.get(study.instrument.id)
        if ep is None:
            raise Refused(ErrorCode.INVALID_DATA, f"no {study.instrument.id} episodes")
        sel = select_episodes(ep, study, pol.max_episodes_per_client)
        exact = exact_blocks(sel, study)
        noisy = tuple(
            NoisyBlock(
                name=b.spec.name,
                family=str(b.spec.family),
                n_bands=b.spec.n_bands,
                width=b.spec.width,
                values=tuple(int(v) for v in b.release(exact[b.spec.name])),
                lo=b.spec.lo,
                hi=b.spec.hi,
                sensitivity=b.d_in,
                scale=b.scale,
                rho=b.rho,
            )
            for b in plan.blocks
        )
        window_applied = sel.window_applied
        del exact, sel  # nothing exact outlives this function
        release = SiteRelease(
            study_id=study.id,
            study_hash=study.hash,
            site_id=site.site_id,
            created=self.clock().replace(microsecond=0).isoformat(),
            blocks=noisy,
            rho=plan.cost,
            epsilon=zcdp_to_epsilon(plan.cost, pol.delta),
            delta=float(pol.delta),
            unit="client",
            max_episodes_per_client=pol.max_episodes_per_client,
            mechanism=MECHANISM,
            window_applied=window_applied,
            versions=_versions(),
        )
        return crypto.sign(key, "release", release.canonical_bytes()).dumps().encode()


def load_engine(config: Path) -> ReleaseEngine:
    """The site's release engine from ``site.yaml`` and the privacy policy it names;
    ConfigError if either is invalid. The policy's warnings are the caller's to show."""
    cfg = load_site_config(config)
    if cfg.privacy_policy is None:
        raise ConfigError(
            str(cfg.source),
            [
                "privacy_policy: missing; add `privacy_policy: privacy.yaml` naming the privacy "
                "officer's policy (see configs/privacy.example.yaml)"
            ],
        )
    return ReleaseEngine(cfg, load_policy(cfg.privacy_policy))

"""The one release path: policy check -> reserve budget (durably) -> compute -> OpenDP
noise -> cache -> audit -> return. Nothing else computes on client data for export.

:class:`ReleaseEngine` refuses with :class:`Refused`, which carries a protocol error code;
its ``detail`` is for the site's own operators and never leaves the site.

What may decide the kind of answer (a release, or which refusal): only the study, the
policy, the ledger and the site's configuration, including the *structure* of the export
(the file is there and readable in its format, its columns exist and, in Parquet, have
usable types; :func:`site_agent.data.check_export`). These are the same for two data sets
that differ in one client, and are all checked before budget is reserved, so a refusal
costs nothing. Nothing that depends on the client records may: once budget is reserved
the computation is total. Rows that cannot be used are quarantined, episodes outside the
study's range or bands are not counted, values are clipped, an instrument without
episodes contributes zeros; and if computing the exact blocks fails all the same, the
noised empty contribution is released and the failure is recorded in the audit log
(``compute_failed``), never shown to the coordinator.

A ledger that cannot be used (missing, corrupt, not writable, not matching its anchor) is
:class:`LedgerUnusable`: a ``Refused(INTERNAL_ERROR)`` for the wire that carries the
ledger's own :class:`LedgerError` for the site's operators.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.codes import MESSAGES, ErrorCode
from protocols.errors import SpecError
from protocols.instruments import Instrument
from protocols.layout import block_layout, budget_weights
from protocols.release import Envelope, NoisyBlock, SiteRelease
from protocols.study import Study, read_study_file
from site_agent import crypto
from site_agent.config import SiteConfig, load_site_config
from site_agent.data import IntakeCounts, check_export, read_intake
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
from site_agent.privacy.ledger import Ledger, LedgerError, LedgerRefusal, Reservation
from site_agent.privacy.policy import Approval, PrivacyPolicy, load_policy, to_rho
from site_agent.privacy.statistics import empty_blocks, exact_blocks, select_episodes

__all__ = [
    "Action",
    "Decision",
    "LedgerUnusable",
    "Plan",
    "Refused",
    "ReleaseEngine",
    "StudyRequest",
    "load_engine",
    "load_study_request",
]


class Refused(Exception):
    """A request the site will not answer. Only ``code`` and its fixed message may leave."""

    def __init__(
        self, code: ErrorCode, detail: str = "", *, reservation: Reservation | None = None
    ) -> None:
        self.code = code
        self.detail = detail
        self.reservation = reservation  # the charge this attempt made, if any (local only)
        super().__init__(f"{code}: {MESSAGES[code]}" + (f" ({detail})" if detail else ""))

    @property
    def message(self) -> str:
        return MESSAGES[self.code]


class LedgerUnusable(Refused):
    """The ledger, its anchor or the signing key cannot be used: nothing is answered.
    Over the wire it is ``internal_error``; locally ``error`` says what and the fix."""

    def __init__(self, error: LedgerError) -> None:
        self.error = error
        super().__init__(ErrorCode.INTERNAL_ERROR, str(error))


OnIntake = Callable[[IntakeCounts], None]


class _Queued(Refused):
    """Pending approval, already recorded by :meth:`Ledger.add_pending`."""


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


class Action(StrEnum):
    RELEASE = "release"
    CACHED = "cached"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the site does with a request, decided by :meth:`ReleaseEngine.decide` for
    both preview (which reports it) and release (which acts on it)."""

    action: Action
    code: ErrorCode | None = None  # for REFUSE (PENDING_APPROVAL: queued for the officer)
    detail: str = ""  # local only
    plan: Plan | None = None  # when the policy checks passed
    cached: bytes | None = None  # for CACHED
    charge: Fraction = Fraction(0)  # what releasing would add to the spending now


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

    def ledger(self, *, check: bool = True) -> Ledger:
        """The site's ledger; LedgerError (naming the file and the fix) if it, its anchor
        or the signing key is missing or does not match."""
        return Ledger(
            self.policy.state_dir,
            budget=self.policy.budget_rho,
            period_days=self.policy.period_days,
            anchor=self.policy.anchor,
            clock=self.clock,
            check=check,
        )

    def signing_key(self) -> Ed25519PrivateKey:
        """The site's release-signing key, through its ledger: a fresh site creates its
        ledger, anchor and key together; an existing one must match its anchor
        (LedgerError otherwise). This is what ``outcomebench-site pubkey`` prints."""
        with self.ledger() as led:
            return led.signing_key()

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
        redefined = _redefines(study, self.site.instruments)
        if redefined:
            raise Refused(ErrorCode.NOT_ALLOWED, redefined)
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

    def decide(self, req: StudyRequest, led: Ledger) -> Decision:
        """The one decision, in this order: trust, allow-lists, per-study cap (in
        :meth:`plan`), cached release or conflicting study id, budget, approval.

        Budget comes before approval so a request that could never be paid is refused
        rather than queued for the privacy officer."""
        try:
            plan = self.plan(req)
        except Refused as r:
            return Decision(Action.REFUSE, r.code, r.detail)
        study = req.study
        cached = led.cached(study.id)
        if cached is not None:
            if cached[0] == study.hash:
                return Decision(Action.CACHED, plan=plan, cached=cached[1])
            return Decision(
                Action.REFUSE,
                ErrorCode.STUDY_CONFLICT,
                f"study id {study.id} was answered with another content",
                plan=plan,
            )
        # The export's structure (not its records): what release refuses before the
        # reservation, so preview must say the same.
        try:
            check_export(self.site.data)
        except DataError as exc:
            return Decision(Action.REFUSE, ErrorCode.INVALID_DATA, str(exc), plan=plan)
        charge = led.charge_for(plan.request_id, plan.cost)
        status = led.status()
        if status.spent + charge > status.budget:
            return Decision(
                Action.REFUSE,
                ErrorCode.BUDGET_EXHAUSTED,
                f"spent {status.spent} + {charge} > budget {status.budget}",
                plan=plan,
                charge=charge,
            )
        if self.policy.approval is Approval.MANUAL:
            state = led.request_state(plan.request_id)
            if state == "denied":
                return Decision(Action.REFUSE, ErrorCode.DENIED, plan=plan, charge=charge)
            if state != "approved":
                return Decision(
                    Action.REFUSE,
                    ErrorCode.PENDING_APPROVAL,
                    f"request {plan.request_id}",
                    plan=plan,
                    charge=charge,
                )
        return Decision(Action.RELEASE, plan=plan, charge=charge)

    def _open(self) -> Ledger:
        try:
            return self.ledger()
        except LedgerError as exc:
            raise LedgerUnusable(exc) from None

    def preview(self, req: StudyRequest) -> dict[str, Any]:
        """Exactly what would leave and what it would cost. Spends nothing, reads no data.
        LedgerUnusable when the ledger cannot be used or trusted (as release would)."""
        try:
            with self._open() as led:
                status = led.status()
                decision = self.decide(req, led)
        except LedgerError as exc:
            raise LedgerUnusable(exc) from None
        delta = self.policy.delta
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
        if decision.action is Action.REFUSE:
            doc |= {
                "outcome": "await approval"
                if decision.code is ErrorCode.PENDING_APPROVAL
                else "refuse",
                "code": str(decision.code),
                "reason": MESSAGES[decision.code or ErrorCode.INTERNAL_ERROR],
                "detail": decision.detail,
            }
        else:
            doc["outcome"] = str(decision.action)
        plan = decision.plan
        if plan is None:
            return doc
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
            # 0 when the cache answers or an earlier, incomplete reservation is reused
            "charged_now_rho": float(decision.charge),
        }
        doc["privacy_unit"] = {
            "unit": "client",
            "max_episodes_per_client": self.policy.max_episodes_per_client,
        }
        pending = decision.code is ErrorCode.PENDING_APPROVAL
        refused = decision.action is Action.REFUSE and not pending
        after = status.remaining - (Fraction(0) if refused else decision.charge)
        doc["budget"]["remaining_after_rho"] = float(after)
        doc["budget"]["remaining_after_epsilon"] = zcdp_to_epsilon(after, delta)
        return doc

    # -- the release path -----------------------------------------------------------

    def release(self, req: StudyRequest, *, on_intake: OnIntake | None = None) -> bytes:
        """Answer a study: the signed release envelope (JSON bytes), or raise Refused
        (LedgerUnusable when the ledger cannot be used).

        All work on one study id is serialised (:meth:`Ledger.study_lock`), so concurrent
        identical requests are charged once and the later ones get the cached release.
        ``on_intake`` is told the export's row counts when this release reads the export
        (a cached answer reads nothing), for a local warning; it cannot change the answer."""
        study = req.study
        try:
            with self._open() as led, led.study_lock(study.id):
                try:
                    return self._release(req, led, on_intake)
                except _Queued:
                    raise
                except Refused as r:
                    led.record(
                        "refused",
                        request_id=self.request_id(study),
                        study_id=study.id,
                        study_hash=study.hash,
                        title=study.title,
                        rho=r.reservation.rho if r.reservation else Fraction(0),
                        code=str(r.code),
                        reservation=r.reservation,
                    )
                    raise
        except LedgerError as exc:  # fail closed; nothing is written to a broken ledger
            raise LedgerUnusable(exc) from None

    def record_malformed(self, *, channel: str, raw: bytes | None, detail: str) -> None:
        """Audit a release request whose study failed to parse (size, SHA-256 and the
        fields at fault; never its text). LedgerUnusable if the ledger is broken."""
        raw = raw or b""
        with self._open() as led:
            try:
                led.record_malformed(
                    channel=channel,
                    size=len(raw),
                    sha256=hashlib.sha256(raw).hexdigest(),
                    detail=detail,
                )
            except LedgerError as exc:
                raise LedgerUnusable(exc) from None

    def _release(self, req: StudyRequest, led: Ledger, on_intake: OnIntake | None) -> bytes:
        study = req.study
        decision = self.decide(req, led)
        if decision.action is Action.CACHED and decision.cached is not None:
            led.record(
                "cached",
                request_id=self.request_id(study),
                study_id=study.id,
                study_hash=study.hash,
                sha256=hashlib.sha256(decision.cached).hexdigest(),
            )
            return decision.cached
        plan = decision.plan
        if decision.action is Action.REFUSE or plan is None:
            code = decision.code or ErrorCode.INTERNAL_ERROR
            if code is ErrorCode.PENDING_APPROVAL and plan is not None:
                led.add_pending(
                    request_id=plan.request_id,
                    study_id=study.id,
                    study_hash=study.hash,
                    title=study.title,
                    rho=plan.cost,
                    study=study.canonical_bytes(),
                )
                raise _Queued(code, decision.detail)
            raise Refused(code, decision.detail)
        # Everything that could fail without the data is done before budget is reserved.
        key = led.signing_key()
        # The export's structure is the same for neighbouring data sets: a file that
        # cannot be used at all is refused here, before budget is reserved, at no cost.
        try:
            check_export(self.site.data)
        except DataError as exc:
            raise Refused(ErrorCode.INVALID_DATA, str(exc)) from None
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
        # Budget is reserved and durable (and anchored): from here on the data may be
        # touched, and nothing that depends on them may change the kind of answer.
        # Nothing leaves until complete() has committed.
        try:
            body = self._compute(plan, key, led, on_intake)
        except Refused as r:  # only a bug independent of the data gets here
            raise Refused(r.code, r.detail, reservation=reservation) from None
        except Exception as exc:  # a bug: the budget stays reserved for a retry; nothing left
            raise Refused(
                ErrorCode.INTERNAL_ERROR, exc.__class__.__name__, reservation=reservation
            ) from None
        try:
            return led.complete(
                reservation, study_id=study.id, study_hash=study.hash, body=body, title=study.title
            )
        except LedgerRefusal as r:
            raise Refused(r.code, r.detail, reservation=reservation) from None

    def _exact(self, plan: Plan, on_intake: OnIntake | None) -> dict[str, npt.NDArray[np.int64]]:
        """The study's exact blocks from the export (raises only on a bug, or on a file
        that changed or vanished since :func:`check_export`)."""
        study, site = plan.study, self.site
        intake = read_intake(site.data, site.instruments)
        if on_intake is not None:
            # Local reporting only: whatever the hook does, the computation goes on.
            with contextlib.suppress(Exception):
                on_intake(intake.counts)
        instruments: Mapping[str, Any] = {**site.instruments, study.instrument.id: study.instrument}
        episodes = derive_episodes(intake.records, instruments, study.max_session)
        ep = episodes.get(study.instrument.id)
        if ep is None:  # no scores of the instrument: the empty contribution
            return empty_blocks(study)
        sel = select_episodes(ep, study, self.policy.max_episodes_per_client, dated=self._dated())
        return exact_blocks(sel, study)

    def _dated(self) -> bool:
        # From the configuration, not the data: window_applied leaves the site un-noised.
        return self.site.data.columns.date is not None

    def _noised(
        self, plan: Plan, exact: Mapping[str, npt.NDArray[np.int64]]
    ) -> tuple[NoisyBlock, ...]:
        return tuple(
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

    def _compute(
        self, plan: Plan, key: Ed25519PrivateKey, led: Ledger, on_intake: OnIntake | None
    ) -> bytes:
        """The signed release, after budget is reserved. Total: if the exact blocks
        cannot be computed or noised, the noised empty contribution is released instead
        and the failure recorded locally, so the answer's kind never depends on the data."""
        study, pol, site = plan.study, self.policy, self.site
        try:
            exact = self._exact(plan, on_intake)
            noisy = self._noised(plan, exact)
        except Exception as exc:
            led.audit(
                "compute_failed",
                {
                    "request_id": plan.request_id,
                    "study_id": study.id,
                    "study_hash": study.hash,
                    "error": exc.__class__.__name__,
                    "released": "the noised empty contribution",
                    "fix": "run `outcomebench-site check` on the export; if it passes, "
                    "report this as a bug",
                },
            )
            exact = empty_blocks(study)
            try:
                noisy = self._noised(plan, exact)
            except Exception as again:  # independent of the data: a bug
                raise Refused(ErrorCode.INTERNAL_ERROR, again.__class__.__name__) from None
        window_applied = self._dated()
        del exact  # nothing exact outlives this function
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


def _redefines(study: Study, site_instruments: Mapping[str, Instrument]) -> str:
    """Why the study's inline instrument may not be used here ("" if it may).

    An inline definition of an instrument the site defines (registry or site.yaml) must
    equal the site's, field for field of what the study can define: the site's data were
    validated against the site's definition, and a study must not re-scale them (a
    narrower range would leave some clients' episodes out, a different cut-off or reliable
    change would recount them). The refusal is not_allowed rather than malformed_study:
    the study is well formed and other sites may answer it; it is this site's
    configuration, which nothing a coordinator sends can override, that forbids it.
    """
    ins = study.instrument
    own = site_instruments.get(ins.id)
    if not study.instrument_inline or own is None:
        return ""
    theirs = (ins.lo, ins.hi, str(ins.better), ins.cutoff, ins.reliable_change)
    ours = (own.lo, own.hi, str(own.better), own.cutoff, own.reliable_change)
    if theirs == ours:
        return ""
    names = ("range lo", "range hi", "better", "cutoff", "reliable_change")
    diff = ", ".join(
        f"{n} {t} (site: {o})" for n, t, o in zip(names, theirs, ours, strict=True) if t != o
    )
    return (
        f"instrument {ins.id}: the study's inline definition differs from this site's "
        f"({diff}); the study must use the site's definition or another instrument id"
    )


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

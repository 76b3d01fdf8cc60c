from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.codes import MESSAGES, ErrorCode
from protocols.instruments import parse_instrument
from protocols.release import SiteRelease, parse_envelope
from protocols.study import parse_study
from site_agent import crypto
from site_agent.data import IntakeCounts, Records, read_intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy import Approval, Refused, ReleaseEngine, StudyRequest, load_study_request
from site_agent.privacy import engine as engine_mod
from site_agent.privacy.statistics import exact_blocks, select_episodes

from .privacy_helpers import POLICY, STUDY, engine, make_site, request

ALL_FAMILIES = ["counts", "change", "categories", "trajectory", "histogram"]


def _refusal(eng: object, req: StudyRequest) -> ErrorCode:
    with pytest.raises(Refused) as err:
        eng.release(req)  # type: ignore[attr-defined]
    assert str(err.value.message) == MESSAGES[err.value.code]
    return err.value.code


def test_preview_spends_nothing_and_lists_every_block(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path))
    doc = eng.preview(request())
    assert doc["outcome"] == "release"
    names = [b["block"] for b in doc["what_leaves"]]
    assert names[:2] == ["episodes", "sum_intake"] and "change_hist" in names
    assert all(b["plus_minus_95"] > 0 for b in doc["what_leaves"])
    assert doc["cost"]["rho"] <= 0.05 and doc["cost"]["epsilon"] > 0
    assert doc["budget"]["remaining_after_rho"] == pytest.approx(0.25 - doc["cost"]["rho"])
    with eng.ledger() as led:
        assert led.status().spent == 0
        assert [e["kind"] for e in led.audit_entries()] == ["genesis"]


def test_release_is_signed_charged_cached_and_provenanced(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path))
    req = request()
    body = eng.release(req)
    env = parse_envelope(body, "release")
    assert crypto.verify(env)
    rel = SiteRelease.from_json(json.loads(env.payload))
    assert rel.study_hash == req.study.hash and rel.site_id == "clinic-01"
    assert rel.unit == "client" and rel.max_episodes_per_client == 1
    assert "discrete Gaussian" in rel.mechanism
    assert rel.versions["opendp"] == "0.16.0"
    assert rel.window_applied
    assert all(b.scale > 0 and b.rho > 0 for b in rel.blocks)
    assert sum((b.rho for b in rel.blocks), Fraction(0)) == rel.rho <= Fraction(1, 20)
    with eng.ledger() as led:
        spent = led.status().spent
        assert spent == rel.rho
    # Same study again: the very same bytes, at no cost.
    assert eng.release(req) == body
    with eng.ledger() as led:
        assert led.status().spent == spent
        kinds = [e["kind"] for e in led.audit_entries()]
        assert kinds == ["genesis", "reserved", "released", "cached"]
        assert led.verify_audit() == []


def test_same_id_other_content_is_refused(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path))
    eng.release(request())
    assert _refusal(eng, request(title="changed")) is ErrorCode.STUDY_CONFLICT


def test_policy_refusals(tmp_path: Path) -> None:
    policy = POLICY | {"allow": {"instruments": ["PHQ-9"], "families": ["counts", "change"]}}
    eng = engine(make_site(tmp_path, policy))
    assert _refusal(eng, request(instrument="GAD-7",
                                 bands=[[0, 9], [10, 21]])) is ErrorCode.NOT_ALLOWED
    assert _refusal(eng, request()) is ErrorCode.NOT_ALLOWED  # families beyond the policy
    assert _refusal(eng, request(families=["counts"], privacy={"rho": 0.2})
                    ) is ErrorCode.OVER_STUDY_CAP
    with eng.ledger() as led:
        assert led.status().spent == 0
        assert [e["body"]["code"] for e in led.audit_entries()[1:]] == [
            "not_allowed", "not_allowed", "over_study_cap"]


def test_budget_is_never_exceeded(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path))
    for i in range(2):
        eng.release(request(id=f"s{i}", privacy={"rho": 0.1}))
    assert _refusal(eng, request(id="s2", privacy={"rho": 0.1})) is ErrorCode.BUDGET_EXHAUSTED
    eng.release(request(id="s3", privacy={"rho": 0.04}))
    with eng.ledger() as led:
        assert led.status().spent <= Fraction(1, 4)


def test_manual_approval(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path, POLICY | {"approval": "manual"}))
    req = request()
    assert _refusal(eng, req) is ErrorCode.PENDING_APPROVAL
    assert _refusal(eng, req) is ErrorCode.PENDING_APPROVAL
    with eng.ledger() as led:
        [pending] = led.requests()
        assert pending["state"] == "pending" and led.status().spent == 0
        led.decide(pending["request_id"], approve=True)
    assert eng.preview(req)["outcome"] == "release"
    eng.release(req)
    other = request(id="other")
    assert _refusal(eng, other) is ErrorCode.PENDING_APPROVAL
    with eng.ledger() as led:
        led.decide(eng.request_id(other.study), approve=False)
    assert _refusal(eng, other) is ErrorCode.DENIED


def _write_pub(path: Path, key: Ed25519PrivateKey) -> None:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def test_trusted_coordinator_keys(tmp_path: Path) -> None:
    network, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    site = make_site(tmp_path / "site", POLICY | {"trusted_coordinator_keys": ["network.pem"]})
    _write_pub(site.parent / "network.pem", network)
    eng = engine(site)
    req = request()
    assert _refusal(eng, req) is ErrorCode.UNTRUSTED_STUDY
    bad = crypto.sign(stranger, "study", req.study.canonical_bytes())
    assert _refusal(eng, StudyRequest(req.study, bad)) is ErrorCode.UNTRUSTED_STUDY
    good = crypto.sign(network, "study", req.study.canonical_bytes())
    forged = type(good)(kind="study", payload=good.payload.replace(b"PHQ-9 expected",
                                                                    b"PHQ-9 Expected"),
                        public_key=good.public_key, signature=good.signature)
    assert _refusal(eng, StudyRequest(req.study, forged)) is ErrorCode.UNTRUSTED_STUDY
    assert eng.release(StudyRequest(req.study, good))


def test_large_budget_release_matches_exact_statistics(tmp_path: Path) -> None:
    # Allowed only by an explicit policy in this test: a huge budget means tiny noise.
    huge = POLICY | {"per_study": {"rho": 10**4}, "budget": {"rho": 10**4}}
    config = make_site(tmp_path, huge)
    eng = engine(config)
    assert any("(> 5)" in w for w in eng.policy.warnings)
    req = request(privacy={"rho": 10**4})
    rel = SiteRelease.from_json(json.loads(parse_envelope(eng.release(req), "release").payload))
    intake = read_intake(eng.site.data, eng.site.instruments)
    ep = derive_episodes(intake.records, eng.site.instruments, 20)["PHQ-9"]
    exact = exact_blocks(select_episodes(ep, req.study, 1), req.study)
    for block in rel.blocks:
        noisy = np.array(block.values)
        assert np.abs(noisy - exact[block.name]).max() <= 6 * block.scale + 1, block.name
    assert exact["episodes"].sum() > 20


def test_the_intake_hook_sees_the_counts_and_cannot_change_the_release(tmp_path: Path) -> None:
    """The local quarantine warning's hook: told the row counts once per release that
    reads the export; a hook that fails changes nothing about what is released."""
    huge = POLICY | {"per_study": {"rho": 10**4}, "budget": {"rho": 10**4}}
    eng = engine(make_site(tmp_path, huge))
    seen: list[IntakeCounts] = []

    def broken_terminal(counts: IntakeCounts) -> None:
        seen.append(counts)
        raise OSError("the terminal went away")

    req = request(privacy={"rho": 10**4})
    body = eng.release(req, on_intake=broken_terminal)
    intake = read_intake(eng.site.data, eng.site.instruments)
    assert seen == [intake.counts] and intake.counts.rows_read > 0
    with eng.ledger() as led:  # the real data were released, not the empty contribution
        assert [e["kind"] for e in led.audit_entries()] == ["genesis", "reserved", "released"]
    rel = SiteRelease.from_json(json.loads(parse_envelope(body, "release").payload))
    [episodes] = [b for b in rel.blocks if b.name == "episodes"]
    ep = derive_episodes(intake.records, eng.site.instruments, 20)["PHQ-9"]
    exact = exact_blocks(select_episodes(ep, req.study, 1), req.study)["episodes"]
    assert np.abs(np.array(episodes.values) - exact).max() <= 6 * episodes.scale + 1
    assert eng.release(req, on_intake=broken_terminal) == body and len(seen) == 1  # cached


def test_unusable_export_is_refused_before_reservation_at_no_cost(tmp_path: Path) -> None:
    # A missing file is the export's structure, the same for neighbouring data sets: it
    # is refused before budget is reserved, and costs nothing.
    config = make_site(tmp_path)
    eng = engine(config)
    (config.parent / "outcomes.csv").unlink()
    preview = eng.preview(request())  # preview decides as release does
    assert preview["outcome"].startswith("refuse") and preview["code"] == "invalid_data"
    assert _refusal(eng, request()) is ErrorCode.INVALID_DATA
    with eng.ledger() as led:
        assert led.status().spent == 0
        assert led.cached("phq9-2026") is None
        assert [e["kind"] for e in led.audit_entries()] == ["genesis", "refused"]
        assert led.verify_audit() == []


def test_compute_failure_after_reservation_releases_the_empty_contribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should computing the exact blocks fail despite everything (here: the file vanishes
    # between the structure check and the read), the coordinator still gets a release:
    # the noised zero vectors, charged once; the privacy officer sees why in the audit.
    config = make_site(tmp_path)
    eng = engine(config)

    def vanishing(*args: object, **kwargs: object) -> object:
        (config.parent / "outcomes.csv").unlink()
        return read_intake(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_mod, "read_intake", vanishing)
    req = request(privacy={"rho": 0.1})
    rel = SiteRelease.from_json(json.loads(parse_envelope(eng.release(req), "release").payload))
    with eng.ledger() as led:
        assert led.status().spent == rel.rho > 0
        entries = led.audit_entries()
        kinds = [e["kind"] for e in entries]
        assert kinds == ["genesis", "reserved", "compute_failed", "released"]
        assert entries[2]["body"]["error"] == "DataError"
        assert led.verify_audit() == []
    assert rel.window_applied  # from the configuration (it has dates), not from the data
    counts = next(b for b in rel.blocks if b.name == "episodes")
    assert abs(sum(counts.values)) <= 6 * counts.scale * len(counts.values) ** 0.5


_BDI_X = {"range": [0, 27], "better": "lower", "reliable_change": 5, "cutoff": 10}


def _bdi_site(tmp: Path, rows: list[tuple[str, int, int]]) -> Path:
    """A site whose export holds the custom instrument BDI-X (client, session, score)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "outcomes.csv").write_text(
        "client,session,date,score\n"
        + "".join(f"{c},{k},2026-01-{k:02d},{x}\n" for c, k, x in rows)
    )
    (tmp / "site.yaml").write_text(yaml.safe_dump({
        "site": {"id": "clinic-bdi"},
        "data": {"path": "outcomes.csv", "instrument": "BDI-X",
                 "columns": {"client_id": "client", "session": "session", "date": "date",
                             "score": "score"}},
        "instruments": {"BDI-X": _BDI_X},
        "privacy_policy": "privacy.yaml",
    }))
    policy = POLICY | {"allow": {"instruments": ["BDI-X", "PHQ-9", "GAD-7"],
                                 "families": POLICY["allow"]["families"]}}
    (tmp / "privacy.yaml").write_text(yaml.safe_dump(policy))
    return tmp / "site.yaml"


def _bdi_study(definition: dict[str, object], bands: list[list[int]]) -> StudyRequest:
    return request(id="bdi", instrument={"id": "BDI-X", "definition": definition},
                   bands=bands, families=["counts", "histogram"])


_BDI_ROWS = [(f"c{i}", k, 12 + i % 6 - 2 * k) for i in range(12) for k in (1, 2, 3)]


def test_h2_inline_redefinition_of_a_site_instrument_is_refused_at_no_cost(
    tmp_path: Path,
) -> None:
    narrower = _bdi_study(_BDI_X | {"range": [5, 27]}, [[5, 27]])
    for name, rows in [("d", _BDI_ROWS), ("d1", [*_BDI_ROWS, ("x", 1, 4), ("x", 2, 3)])]:
        eng = engine(_bdi_site(tmp_path / name, rows))
        assert eng.preview(narrower)["code"] == "not_allowed"
        with pytest.raises(Refused) as err:
            eng.release(narrower)
        assert err.value.code is ErrorCode.NOT_ALLOWED
        assert "range lo 5 (site: 0)" in err.value.detail
        with eng.ledger() as led:
            assert led.status().spent == 0
    # The site's own definition, written inline, is the same instrument: released.
    eng = engine(_bdi_site(tmp_path / "same", _BDI_ROWS))
    assert eng.release(_bdi_study(dict(_BDI_X), [[0, 9], [10, 27]]))


def test_h2_out_of_range_episodes_are_not_counted_never_an_error() -> None:
    # Defence in depth: had a narrower instrument reached the computation, an intake
    # below its range (band -1) made np.bincount raise in the histogram.
    narrow = parse_instrument("BDI-X", _BDI_X | {"range": [5, 27]})
    study = parse_study(STUDY | {"id": "bdi", "bands": [[5, 27]], "families": ALL_FAMILIES,
                                 "instrument": {"id": "BDI-X",
                                                "definition": _BDI_X | {"range": [5, 27]}}})
    rows = sorted([*_BDI_ROWS, ("x", 1, 4), ("x", 2, 3), ("y", 1, 27), ("y", 2, 2)])
    clients = sorted({c for c, _, _ in rows})
    client = np.array([clients.index(c) for c, _, _ in rows], np.int32)
    records = Records(
        instrument_ids=("BDI-X",), client_ids=tuple(clients),
        instrument=np.zeros(len(rows), np.int16), client=client,
        episode=client.astype(np.int64),  # one episode per client
        session=np.array([k for _, k, _ in rows], np.int32),
        score=np.array([x for _, _, x in rows], np.int32),
        date=np.array([20454 + k for _, k, _ in rows], np.int32),
        line=np.arange(len(rows), dtype=np.int64))
    ep = derive_episodes(records, {"BDI-X": narrow}, study.max_session)["BDI-X"]
    sel = select_episodes(ep, study, 1, dated=True)
    assert sel.counts["outside the study's range or bands"] == 2  # x (intake 4), y (final 2)
    blocks = exact_blocks(sel, study)
    assert int(blocks["episodes"].sum()) == 12 == int(blocks["change_hist"].sum())


def test_m1_an_instrument_without_scores_releases_the_empty_contribution(
    tmp_path: Path,
) -> None:
    # GAD-7 is allowed and the site has no GAD-7 scores: a release (noised zeros), as with
    # one client's single GAD-7 score (an episode too short to count).
    gad = request(id="gad", instrument="GAD-7", bands=[[0, 9], [10, 21]],
                  privacy={"rho": 0.1})
    eng = engine(make_site(tmp_path / "d"))
    rel = SiteRelease.from_json(json.loads(parse_envelope(eng.release(gad), "release").payload))
    assert rel.window_applied and rel.rho > 0
    with eng.ledger() as led:
        assert [e["kind"] for e in led.audit_entries()] == ["genesis", "reserved", "released"]
    assert eng.release(gad)  # cached


def test_study_request_cannot_override_policy(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": STUDY | {"max_episodes_per_client": 5}}))
    with pytest.raises(Refused) as err:
        load_study_request(path)
    assert err.value.code is ErrorCode.MALFORMED_STUDY


# -- one decision for preview and release ----------------------------------------------

_FAST_BODY = b"a release body (compute stubbed: this test is about the decision)"


def _expected(untrusted: bool, allowed: bool, cap_ok: bool, cache: str, budget_ok: bool,
              approval: str) -> str:
    """The order a privacy officer expects: trust, allow-lists, cap, cached/conflict,
    budget (a request that can never be paid is not queued), approval."""
    if untrusted:
        return "untrusted_study"
    if not allowed:
        return "not_allowed"
    if not cap_ok:
        return "over_study_cap"
    if cache != "none":
        return "cached" if cache == "same" else "study_conflict"
    if not budget_ok:
        return "budget_exhausted"
    if approval == "denied":
        return "denied"
    if approval in ("unasked", "pending"):
        return "pending_approval"
    return "release"


def test_preview_and_release_decide_alike_in_every_combination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = engine(make_site(tmp_path / "site"))
    monkeypatch.setattr(ReleaseEngine, "_compute", lambda self, plan, key, led, on: _FAST_BODY)
    network = Ed25519PrivateKey.generate()
    _write_pub(tmp_path / "network.pem", network)
    plain = request()
    signed = StudyRequest(plain.study, crypto.sign(network, "study", plain.study.canonical_bytes()))
    other = request(title="another study under the same id")
    combos = itertools.product(
        [False, True], [True, False], [True, False], ["none", "same", "conflict"],
        [True, False], ["auto", "unasked", "pending", "approved", "denied"],
    )
    seen = collections.Counter()
    for i, (untrusted, allowed, cap_ok, cache, budget_ok, approval) in enumerate(combos):
        pol = dataclasses.replace(
            base.policy,
            state_dir=tmp_path / f"state-{i}",
            trusted_keys=(tmp_path / "network.pem",),
            instruments=frozenset({"PHQ-9"} if allowed else {"GAD-7"}),
            per_study_rho=Fraction(1, 10) if cap_ok else Fraction(1, 100),
            approval=Approval.AUTO if approval == "auto" else Approval.MANUAL,
        )
        eng = ReleaseEngine(base.site, pol)
        req = plain if untrusted else signed
        rid = eng.request_id(req.study)
        with eng.ledger() as led:
            if cache != "none":
                hit = req.study if cache == "same" else other.study
                res = led.reserve(request_id="earlier", study_id=hit.id, study_hash=hit.hash,
                                  rho=Fraction(1, 100), cap=Fraction(1))
                led.complete(res, study_id=hit.id, study_hash=hit.hash, body=b"cached body")
            if not budget_ok:  # leave less than the study costs
                spent = led.status().spent
                led.reserve(request_id="filler", study_id="filler", study_hash="f",
                            rho=pol.budget_rho - spent - Fraction(1, 100), cap=Fraction(1))
            if approval in ("pending", "approved", "denied"):
                led.add_pending(request_id=rid, study_id=req.study.id, study_hash=req.study.hash,
                                title="t", rho=Fraction(1, 20), study=b"{}")
                if approval != "pending":
                    led.decide(rid, approve=approval == "approved")
            spent_before = led.status().spent
        want = _expected(untrusted, allowed, cap_ok, cache, budget_ok, approval)
        label = f"{(untrusted, allowed, cap_ok, cache, budget_ok, approval)}"
        doc = eng.preview(req)
        previewed = doc.get("code") or doc["outcome"]
        try:
            body = eng.release(req)
        except Refused as r:
            released = str(r.code)
        else:
            released = "cached" if body == b"cached body" else "release"
            assert released == "cached" or body == _FAST_BODY
        assert previewed == released == want, label
        with eng.ledger() as led:
            charged = led.status().spent - spent_before
            assert led.verify_audit() == [], label
            last = led.audit_entries()[-1]
        assert (charged > 0) == (want == "release"), label
        assert last["kind"] == {"release": "released", "cached": "cached",
                                "pending_approval": "pending"}.get(want, "refused"), label
        seen[want] += 1
    assert set(seen) == {"untrusted_study", "not_allowed", "over_study_cap", "cached",
                         "study_conflict", "budget_exhausted", "denied", "pending_approval",
                         "release"}


def test_manual_approval_without_budget_is_refused_not_queued(tmp_path: Path) -> None:
    """The finding: preview said budget_exhausted, release answered pending_approval."""
    eng = engine(make_site(tmp_path, POLICY | {"approval": "manual",
                                                "budget": {"rho": 0.1}, "per_study": {"rho": 0.1}}))
    with eng.ledger() as led:
        led.reserve(request_id="x", study_id="x", study_hash="x", rho=Fraction(9, 100),
                    cap=Fraction(1))
    req = request()
    assert eng.preview(req)["code"] == "budget_exhausted"
    assert _refusal(eng, req) is ErrorCode.BUDGET_EXHAUSTED
    with eng.ledger() as led:
        assert [r["state"] for r in led.requests()] == ["refused"]
        assert led.request_state(eng.request_id(req.study)) is None  # nothing queued


# -- a retried request is charged once --------------------------------------------------


def test_a_retry_after_a_failure_past_the_reservation_is_charged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = engine(make_site(tmp_path))
    real, calls = ReleaseEngine._compute, []

    def fails_once(self: ReleaseEngine, plan: Any, key: Any, led: Any, on: Any) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug past the reservation")
        return real(self, plan, key, led, on)

    monkeypatch.setattr(ReleaseEngine, "_compute", fails_once)
    req = request()
    assert _refusal(eng, req) is ErrorCode.INTERNAL_ERROR
    with eng.ledger() as led:
        cost = led.status().spent
        assert cost > 0  # the failed attempt stays charged (never refunded) ...
    assert eng.preview(req)["cost"]["charged_now_rho"] == 0
    body = eng.release(req)
    with eng.ledger() as led:
        assert led.status().spent == cost  # ... and the retry costs nothing more
        kinds = [e["kind"] for e in led.audit_entries()]
        assert kinds == ["genesis", "reserved", "refused", "reused", "released"]
        assert led.verify_audit() == []
        history = led.history()
    assert [(h.decision, h.code, h.cost) for h in history] == [
        ("refused", "internal_error", cost), ("released", None, 0)]
    assert history[1].sha256 == hashlib.sha256(body).hexdigest()
    assert eng.release(req) == body  # and then from the cache


def test_invalid_data_retried_is_charged_once(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    eng = engine(config)
    data = config.parent / "outcomes.csv"
    saved = data.read_bytes()
    data.unlink()
    assert _refusal(eng, request()) is ErrorCode.INVALID_DATA
    assert _refusal(eng, request()) is ErrorCode.INVALID_DATA
    with eng.ledger() as led:
        cost = led.status().spent
    # The export's structure is refused before the reservation: retries cost nothing.
    assert cost == 0
    data.write_bytes(saved)
    eng.release(request())
    eng.release(request())  # the cached release, at no cost
    with eng.ledger() as led:
        spent = led.status().spent
        assert 0 < spent <= Fraction(1, 20)  # charged once: one study's rho
        assert sum(h.cost for h in led.history()) == spent


_KILLED_IN_COMPUTE = """
import sys, time
from pathlib import Path
from site_agent.privacy import ReleaseEngine
from site_agent.privacy.engine import load_engine
from protocols.study import parse_study
from site_agent.privacy import StudyRequest
import yaml
config, marker = sys.argv[1:3]
def stuck(self, plan, key, led, on_intake):
    Path(marker).touch()
    time.sleep(600)
ReleaseEngine._compute = stuck
eng = load_engine(Path(config))
study = yaml.safe_load(Path(config).with_name("study.yaml").read_text())
eng.release(StudyRequest(parse_study(study)))
"""


def test_a_retry_after_sigkill_during_compute_is_charged_once(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    (config.parent / "study.yaml").write_text(yaml.safe_dump(STUDY))
    marker = tmp_path / "computing"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_COMPUTE, str(config), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the releasing process died before computing"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # holding the study lock, budget reserved
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    eng = engine(config)
    with eng.ledger() as led:
        cost = led.status().spent
        assert cost > 0
    body = eng.release(request())  # the kernel dropped the dead process's lock
    with eng.ledger() as led:
        assert led.status().spent == cost
        assert [(h.decision, h.cost) for h in led.history()] == [
            ("interrupted", cost), ("released", 0)]
        assert led.history()[1].sha256 == hashlib.sha256(body).hexdigest()


# -- concurrent identical requests are charged once -------------------------------------


def test_24_threads_asking_the_same_study_are_charged_once(tmp_path: Path) -> None:
    eng = engine(make_site(tmp_path))
    req = request()
    with ThreadPoolExecutor(max_workers=24) as pool:
        bodies = list(pool.map(lambda _: eng.release(req), range(24)))
    assert len(set(bodies)) == 1
    with eng.ledger() as led:
        kinds = collections.Counter(e["kind"] for e in led.audit_entries())
        assert (kinds["reserved"], kinds["released"], kinds["cached"]) == (1, 1, 23)
        assert led.status().spent == SiteRelease.from_json(
            json.loads(parse_envelope(bodies[0], "release").payload)).rho
        assert led.verify_audit() == []


# -- every request is recorded ----------------------------------------------------------


def test_every_request_is_recorded_under_auto_approval(tmp_path: Path) -> None:
    phq9_only = POLICY | {"allow": POLICY["allow"] | {"instruments": ["PHQ-9"]}}
    eng = engine(make_site(tmp_path, phq9_only))
    body = eng.release(request())
    eng.release(request())  # cached
    _refusal(eng, request(id="gad", instrument="GAD-7", bands=[[0, 9], [10, 21]]))
    _refusal(eng, request(id="big", privacy={"rho": 0.2}))
    with eng.ledger() as led:
        rows = {r["study_id"]: r for r in led.requests()}
        history = led.history()
    assert rows["phq9-2026"]["state"] == "released"
    assert rows["phq9-2026"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert rows["phq9-2026"]["title"] == "PHQ-9 expected change"
    assert (rows["big"]["state"], rows["big"]["code"]) == ("refused", "over_study_cap")
    assert [(h.study_id, h.decision, h.code) for h in history] == [
        ("phq9-2026", "released", None), ("phq9-2026", "cached", None),
        ("gad", "refused", "not_allowed"),
        ("big", "refused", "over_study_cap")]
    assert history[1].cost == 0 and history[1].sha256 == history[0].sha256
    assert all(h.when and h.title for h in history)


def test_malformed_release_requests_are_audited_without_their_text(tmp_path: Path) -> None:
    from protocols import site_agent_pb2 as pb  # noqa: PLC0415
    from site_agent.service import SiteAgentService  # noqa: PLC0415

    eng = engine(make_site(tmp_path))
    service = SiteAgentService(eng)
    secret = b'{"id": "SECRET-CLIENT-NAME", "families": 7}'
    assert service._answer("Release", pb.StudyMessage(study=secret), eng.release) \
        is ErrorCode.MALFORMED_STUDY
    assert service._answer("Preview", pb.StudyMessage(study=secret), eng.release) \
        is ErrorCode.MALFORMED_STUDY  # previews spend nothing and are not audited
    with eng.ledger() as led:
        [entry] = [e for e in led.audit_entries() if e["kind"] == "refused"]
        history = led.history()
    assert entry["body"]["code"] == "malformed_study" and entry["body"]["channel"] == "grpc"
    assert entry["body"]["bytes"] == len(secret)
    assert entry["body"]["sha256"] == hashlib.sha256(secret).hexdigest()
    assert b"SECRET" not in json.dumps(entry).encode()
    assert [(h.decision, h.code) for h in history] == [("refused", "malformed_study")]

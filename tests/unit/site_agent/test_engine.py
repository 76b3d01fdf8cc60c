from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.codes import MESSAGES, ErrorCode
from protocols.release import SiteRelease, parse_envelope
from site_agent import crypto
from site_agent.data import read_intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy import Refused, StudyRequest, load_study_request
from site_agent.privacy.statistics import exact_blocks, select_episodes

from .privacy_helpers import POLICY, STUDY, engine, make_site, request


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


def test_data_failure_after_reservation_keeps_the_charge(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    eng = engine(config)
    (config.parent / "outcomes.csv").unlink()
    assert _refusal(eng, request()) is ErrorCode.INVALID_DATA
    with eng.ledger() as led:
        assert led.status().spent > 0  # never refunded
        assert led.cached("phq9-2026") is None
        assert led.verify_audit() == []


def test_study_request_cannot_override_policy(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": STUDY | {"max_episodes_per_client": 5}}))
    with pytest.raises(Refused) as err:
        load_study_request(path)
    assert err.value.code is ErrorCode.MALFORMED_STUDY

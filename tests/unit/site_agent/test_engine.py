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
from protocols.instruments import parse_instrument
from protocols.release import SiteRelease, parse_envelope
from protocols.study import parse_study
from site_agent import crypto
from site_agent.data import Records, read_intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy import Refused, StudyRequest, load_study_request
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
        assert led.audit_entries() == []


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
        assert kinds == ["reserved", "released", "cached"]
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
        assert [e["body"]["code"] for e in led.audit_entries()] == [
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


def test_unusable_export_is_refused_before_reservation_at_no_cost(tmp_path: Path) -> None:
    # A missing file is the export's structure, the same for neighbouring data sets: it
    # is refused before budget is reserved, and costs nothing.
    config = make_site(tmp_path)
    eng = engine(config)
    (config.parent / "outcomes.csv").unlink()
    assert _refusal(eng, request()) is ErrorCode.INVALID_DATA
    with eng.ledger() as led:
        assert led.status().spent == 0
        assert led.cached("phq9-2026") is None
        assert [e["kind"] for e in led.audit_entries()] == ["refused"]
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
        assert [e["kind"] for e in entries] == ["reserved", "compute_failed", "released"]
        assert entries[1]["body"]["error"] == "DataError"
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
        assert [e["kind"] for e in led.audit_entries()] == ["reserved", "released"]
    assert eng.release(gad)  # cached


def test_study_request_cannot_override_policy(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"study": STUDY | {"max_episodes_per_client": 5}}))
    with pytest.raises(Refused) as err:
        load_study_request(path)
    assert err.value.code is ErrorCode.MALFORMED_STUDY

"""The site agent service: a real gRPC server on a Unix socket, spoken to by AgentClient."""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols import site_agent_pb2 as pb
from protocols import site_agent_pb2_grpc as pb_grpc
from protocols.codes import MESSAGES, ErrorCode
from protocols.limits import MAX_ENVELOPE_BYTES, MAX_REQUEST_BYTES, MAX_STUDY_WIRE_BYTES
from protocols.release import SiteRelease, parse_envelope
from protocols.study import parse_study
from site_agent import crypto
from site_agent.agent_client import CHANNEL_OPTIONS, AgentClient, AgentUnavailable, Refusal
from site_agent.cli import main
from site_agent.errors import ConfigError, ExitCode
from site_agent.service import LOG_DETAIL_CHARS, AgentServer, load_engine

from .privacy_helpers import POLICY, STUDY, engine, make_site, request

LOGGER = "outcomebench.site.service"


def _study(**change: Any) -> bytes:
    return parse_study(STUDY | change).canonical_bytes()


def _refused(code: ErrorCode) -> Refusal:
    return Refusal(str(code), MESSAGES[code])


def _start(config: Path, sock: Path) -> AgentServer:
    server = AgentServer(load_engine(config), sock)
    server.start()
    return server


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentServer, AgentClient, Path]]:
    config = make_site(tmp_path / "clinic")
    server = _start(config, tmp_path / "run" / "agent.sock")
    try:
        yield server, AgentClient(server.socket_path), config
    finally:
        server.stop(grace=1.0)


def test_describe_preview_release_status_round_trip(
    agent: tuple[AgentServer, AgentClient, Path],
) -> None:
    _, client, config = agent
    assert client.health()

    d = client.describe()
    assert d.site_id == "clinic-01"
    assert list(d.instruments) == ["GAD-7", "PHQ-9"]
    assert list(d.families) == ["counts", "change", "categories", "trajectory", "histogram"]
    assert d.approval == "auto" and not d.signed_studies_required
    assert Fraction(d.per_study_rho) == Fraction(1, 10)
    assert Fraction(d.budget_rho) == Fraction(1, 4)
    assert d.period_days == 365 and d.unit == "client" and d.max_episodes_per_client == 1
    assert Fraction(d.delta) == Fraction(1, 10**6) and d.study_schema == 1

    before = client.status()
    assert Fraction(before.spent_rho) == 0 and Fraction(before.remaining_rho) == Fraction(1, 4)
    assert before.pending_requests == 0 and before.site_id == "clinic-01"

    preview = client.preview(_study())
    assert isinstance(preview, bytes)
    doc = json.loads(preview)
    assert doc["outcome"] == "release" and doc["study_hash"] == parse_study(STUDY).hash
    assert "detail" not in doc
    assert Fraction(client.status().spent_rho) == 0  # a preview spends nothing

    body = client.release(_study())
    assert isinstance(body, bytes)
    env = parse_envelope(body, "release")
    assert crypto.verify(env)
    rel = SiteRelease.from_json(json.loads(env.payload))
    assert rel.study_hash == parse_study(STUDY).hash and rel.site_id == "clinic-01"

    after = client.status()
    assert Fraction(after.spent_rho) == rel.rho > 0
    assert Fraction(after.remaining_rho) == Fraction(1, 4) - rel.rho

    # The one release path: the engine itself returns the very bytes the service sent,
    # and asking again returns the cached release at no further cost.
    assert engine(config).release(request()) == body
    assert client.release(_study()) == body
    assert client.status().spent_rho == after.spent_rho


def test_refusal_sends_the_code_and_fixed_message_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    policy = POLICY | {"allow": {"instruments": ["PHQ-9"], "families": ["counts"]}}
    server = _start(make_site(tmp_path / "clinic", policy), tmp_path / "agent.sock")
    try:
        client = AgentClient(server.socket_path)
        assert client.release(_study()) == _refused(ErrorCode.NOT_ALLOWED)
        with grpc.insecure_channel(f"unix:{server.socket_path}") as channel:
            stub = pb_grpc.SiteAgentStub(channel)  # type: ignore[no-untyped-call]
            raw: pb.ReleaseReply = stub.Release(pb.StudyMessage(study=_study()), timeout=10)
        assert raw.WhichOneof("result") == "error"
        fields = {f.name: v for f, v in raw.error.ListFields()}
        assert fields == {"code": "not_allowed", "message": MESSAGES[ErrorCode.NOT_ALLOWED]}
        assert b"families" not in raw.SerializeToString()

        preview = client.preview(_study())
        assert isinstance(preview, bytes)
        doc = json.loads(preview)
        assert doc["outcome"] == "refuse" and doc["code"] == "not_allowed"
        assert "detail" not in doc and b"families change" not in preview
        assert Fraction(client.status().spent_rho) == 0
    finally:
        server.stop(grace=1.0)
    # The detail stays local: in the site's own log.
    assert "refused not_allowed: families change" in caplog.text


def test_malformed_requests(agent: tuple[AgentServer, AgentClient, Path]) -> None:
    _, client, _ = agent
    malformed = _refused(ErrorCode.MALFORMED_STUDY)
    assert client.release(b"") == malformed
    assert client.release(b"not json \xff") == malformed
    assert client.preview(b"[1, 2]") == malformed
    not_canonical = json.dumps(json.loads(_study()), indent=1).encode()
    assert client.release(not_canonical) == malformed
    assert client.release(_study(), b"not an envelope") == malformed
    # a signature over one study cannot vouch for another
    other = crypto.sign(Ed25519PrivateKey.generate(), "study", _study(id="other"))
    assert client.release(_study(), other.dumps().encode()) == malformed
    assert client.release(b"{" * 100_000) == malformed
    assert Fraction(client.status().spent_rho) == 0


def test_request_sizes_are_bounded_at_the_agent(
    agent: tuple[AgentServer, AgentClient, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A study larger than any valid one is malformed; a request over the agent's gRPC
    receive limit never reaches our code; the logged detail of a refusal is clipped."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    server, client, _ = agent
    malformed = _refused(ErrorCode.MALFORMED_STUDY)
    big = b"[" * (MAX_STUDY_WIRE_BYTES + 1)
    assert client.release(big) == malformed  # refused by the client, before sending
    assert client.preview(_study(), b" " * (MAX_ENVELOPE_BYTES + 1)) == malformed
    with grpc.insecure_channel(f"unix:{server.socket_path}", options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.SiteAgentStub(ch)  # type: ignore[no-untyped-call]
        for msg in (pb.StudyMessage(study=big),
                    pb.StudyMessage(study=_study(), envelope=b"{" * (MAX_ENVELOPE_BYTES + 1)),
                    pb.StudyMessage(study=b"[" * 60_000)):  # deep, but small enough to parse
            raw: pb.ReleaseReply = stub.Release(msg, timeout=10)
            assert raw.error.code == "malformed_study"
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Release(pb.StudyMessage(study=b"x" * (MAX_REQUEST_BYTES + 1)), timeout=10)
        assert rpc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # A wire study with 300 problems: its log line stays short.
        doc = parse_study(STUDY).canonical() | {f"unknown_{i}": i for i in range(300)}
        wire = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        assert stub.Release(pb.StudyMessage(study=wire), timeout=10).error.code == (
            "malformed_study")
    assert client.health() and Fraction(client.status().spent_rho) == 0
    lines = [r.getMessage() for r in caplog.records if "refused malformed_study" in r.getMessage()]
    assert len(lines) == 4 and max(len(line) for line in lines) < LOG_DETAIL_CHARS + 200


def test_signed_studies_from_trusted_coordinators_only(tmp_path: Path) -> None:
    network, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    config = make_site(tmp_path / "clinic", POLICY | {"trusted_coordinator_keys": ["net.pem"]})
    (config.parent / "net.pem").write_bytes(
        network.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    server = _start(config, tmp_path / "agent.sock")
    try:
        client = AgentClient(server.socket_path)
        assert client.describe().signed_studies_required
        untrusted = _refused(ErrorCode.UNTRUSTED_STUDY)
        assert client.release(_study()) == untrusted
        bad = crypto.sign(stranger, "study", _study()).dumps().encode()
        assert client.release(_study(), bad) == untrusted
        good = crypto.sign(network, "study", _study()).dumps().encode()
        assert isinstance(client.release(_study(), good), bytes)
    finally:
        server.stop(grace=1.0)


def test_unexpected_errors_are_internal_error_without_text(
    agent: tuple[AgentServer, AgentClient, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, client, _ = agent
    caplog.set_level(logging.INFO, logger=LOGGER)

    def boom(*_: Any) -> Any:
        raise RuntimeError("secret-detail-42")

    monkeypatch.setattr(server.engine, "release", boom)
    monkeypatch.setattr(server.engine, "ledger", boom)
    assert client.release(_study()) == _refused(ErrorCode.INTERNAL_ERROR)
    with pytest.raises(AgentUnavailable) as err:
        client.status()
    assert err.value.status == "INTERNAL" and "secret" not in str(err.value)
    with grpc.insecure_channel(f"unix:{server.socket_path}") as channel:
        stub = pb_grpc.SiteAgentStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Status(pb.StatusRequest(), timeout=10)
    assert rpc.value.details() == MESSAGES[ErrorCode.INTERNAL_ERROR]
    assert "internal error (RuntimeError)" in caplog.text


def _fire(calls: list[Callable[[], bytes | Refusal]]) -> list[bytes | Refusal]:
    """Run the calls from as many threads, released together; their answers in order."""
    answers: list[bytes | Refusal | None] = [None] * len(calls)
    go = threading.Barrier(len(calls))

    def ask(i: int) -> None:
        go.wait()
        answers[i] = calls[i]()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def _rho(body: bytes) -> Fraction:
    return SiteRelease.from_json(json.loads(parse_envelope(body, "release").payload)).rho


def test_24_concurrent_identical_releases_are_charged_once(
    agent: tuple[AgentServer, AgentClient, Path],
) -> None:
    """The hardening finding: 24 concurrent identical gRPC calls made 4 spends."""
    server, client, _ = agent
    answers = _fire([lambda: client.release(_study())] * 24)
    bodies = {a for a in answers if isinstance(a, bytes)}
    assert len(bodies) == 1 and all(isinstance(a, bytes) for a in answers)
    [body] = bodies
    with server.engine.ledger() as led:
        assert led.status().spent == _rho(body) > 0  # one study's rho, once
        assert led.cached(STUDY["id"]) == (parse_study(STUDY).hash, body)  # the cached bytes
        decisions = collections.Counter(h.decision for h in led.history())
        kinds = collections.Counter(e["kind"] for e in led.audit_entries())
        assert led.verify_audit() == []
    assert decisions == {"released": 1, "cached": 23}
    assert kinds["reserved"] == 1 and kinds["released"] == 1 and kinds["cached"] == 23
    assert kinds["reused"] == kinds["discarded"] == 0
    assert Fraction(client.status().spent_rho) == _rho(body)


def test_24_concurrent_studies_never_spend_more_than_the_budget(
    agent: tuple[AgentServer, AgentClient, Path],
) -> None:
    server, client, _ = agent
    answers = _fire([
        (lambda i=i: client.release(_study(id=f"study-{i}"))) for i in range(24)
    ])
    released = [a for a in answers if isinstance(a, bytes)]
    refused = [a for a in answers if not isinstance(a, bytes)]
    [cost] = {_rho(b) for b in released}  # the same privacy request for every study
    budget = server.engine.policy.budget_rho
    assert 24 * cost > budget  # together they ask for more than the budget
    assert len(released) == budget // cost == 5  # each costs just under 0.05 of 0.25
    assert set(refused) == {_refused(ErrorCode.BUDGET_EXHAUSTED)}
    with server.engine.ledger() as led:
        assert led.status().spent == len(released) * cost <= budget
        assert led.verify_audit() == []
    assert Fraction(client.status().spent_rho) == len(released) * cost


def _wait_health(client: AgentClient, serving: bool, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while client.health() != serving:
        assert time.monotonic() < deadline, f"health never became serving={serving}"
        time.sleep(0.05)


def _replace(path: Path, body: bytes) -> None:
    """Swap the file's content in one step, as a restore from backup would."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(body)
    os.replace(tmp, path)


def test_health_is_not_serving_while_the_ledger_is_unusable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = make_site(tmp_path / "clinic")
    server = AgentServer(load_engine(config), tmp_path / "agent.sock", health_probe=0.2)
    server.start()
    ledger = server.engine.policy.state_dir / "ledger.sqlite"
    try:
        client = AgentClient(server.socket_path)
        assert isinstance(client.release(_study()), bytes) and client.health()
        good = ledger.read_bytes()
        # Found by a call: NOT_SERVING at once (the call itself gets internal_error).
        _replace(ledger, b"garbage, not a SQLite database" * 100)
        assert client.release(_study(id="second")) == _refused(ErrorCode.INTERNAL_ERROR)
        assert not client.health()
        with pytest.raises(AgentUnavailable):
            client.status()
        # Restored from backup: the probe finds it usable again, no restart needed.
        _replace(ledger, good)
        _wait_health(client, serving=True)
        assert client.release(_study()) != _refused(ErrorCode.INTERNAL_ERROR)
        good = ledger.read_bytes()  # the copy that matches the anchor now
        # Found by the probe alone, with no call at all.
        _replace(ledger, b"")
        _wait_health(client, serving=False)
        _replace(ledger, good)
        _wait_health(client, serving=True)
    finally:
        server.stop(grace=1.0)
    text = caplog.text
    assert "ledger unusable: " in text and "not a SQLite database" in text
    assert text.count("health NOT_SERVING until it is fixed") == 2  # once per change
    assert text.count("the ledger can be used again: health SERVING") == 2


def _mostly_quarantined(config: Path) -> int:
    """Add twice as many out-of-range rows as the export has (67% quarantined)."""
    data = config.parent / "outcomes.csv"
    lines = data.read_text().splitlines()
    bad = [f"Q-{i:05d},1,2026-01-05,PHQ-9,99,T-001,Room 1" for i in range(2 * (len(lines) - 1))]
    data.write_text("\n".join([*lines, *bad]) + "\n")
    return len(bad)


def test_a_release_of_a_mostly_quarantined_export_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = make_site(tmp_path / "clinic")
    bad = _mostly_quarantined(config)
    server = _start(config, tmp_path / "agent.sock")
    try:
        client = AgentClient(server.socket_path)
        preview = client.preview(_study())
        assert isinstance(preview, bytes) and b"quarantin" not in preview
        body = client.release(_study())
        assert isinstance(body, bytes) and b"quarantin" not in body
        assert client.release(_study()) == body  # cached: nothing read, nothing to warn of
    finally:
        server.stop(grace=1.0)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "quarantined" in r.getMessage()]
    assert len(warnings) == 1, warnings
    [note] = warnings
    assert note.startswith("Release study 'phq9-2026': ") and f"{bad:,} of " in note
    assert "(67%)" in note and f"outcomebench-site check --config {config}" in note


def test_socket_is_owner_only_and_removed_on_stop(tmp_path: Path) -> None:
    config = make_site(tmp_path / "clinic")
    sock = tmp_path / "fresh" / "agent.sock"
    server = _start(config, sock)
    try:
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.lstat().st_mode) == 0o700
        assert AgentClient(sock).health()
    finally:
        server.stop(grace=1.0)
    assert not sock.exists()
    assert not AgentClient(sock).health()
    with pytest.raises(AgentUnavailable) as err:
        AgentClient(sock, timeout=2).describe()
    assert err.value.status == "UNAVAILABLE"
    with pytest.raises(ValueError, match="agent-socket"):
        AgentClient("")


def test_stale_live_and_foreign_socket_paths(tmp_path: Path) -> None:
    config = make_site(tmp_path / "clinic")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # left behind, as by a crashed agent
    server = _start(config, stale)
    try:
        assert AgentClient(stale).health()
        with pytest.raises(ConfigError, match="another site agent is serving"):
            _start(config, stale)
        assert AgentClient(stale).health()  # the live agent was left alone
    finally:
        server.stop(grace=1.0)
    regular = tmp_path / "file.sock"
    regular.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        _start(config, regular)
    assert regular.read_text() == "keep me"
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        _start(config, tmp_path / ("x" * 120) / "agent.sock")
    # through the CLI: a configuration problem, exit code 3
    assert main(["serve", "--config", str(config), "--socket", str(regular)]) == ExitCode.CONFIG


def _wait_healthy(proc: subprocess.Popen[bytes], sock: Path, limit: float = 60.0) -> None:
    client = AgentClient(sock, timeout=2)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early with {proc.returncode}")
        if sock.exists() and client.health():
            return
        time.sleep(0.1)
    raise AssertionError("serve did not become healthy")


def test_serve_subprocess_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = make_site(tmp_path / "clinic")
    sock = load_engine(config).policy.state_dir / "agent.sock"  # the default socket
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "site_agent", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        _wait_healthy(proc, sock)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        body = AgentClient(sock).release(_study())
        assert isinstance(body, bytes)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log = err.decode()
    assert proc.returncode == 0, log
    assert not sock.exists()
    assert "SIGTERM received" in log and "stopped" in log
    assert "Release study 'phq9-2026'" in log


def test_the_client_imports_no_data_code() -> None:
    # The Flower bridge imports the client: it must stay thin (grpc + protocols only).
    probe = (
        "import sys, site_agent.agent_client; "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pandas', 'numpy', 'pyarrow', 'opendp', 'cryptography', 'site_agent'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["site_agent", "site_agent.agent_client"]

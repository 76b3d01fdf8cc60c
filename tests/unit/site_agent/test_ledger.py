"""The privacy ledger: a tamper-evident audit log, exact budget arithmetic, and spending
that stays within the budget when releases race each other or are killed mid-way."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.synth import synthesize
from protocols.codes import ErrorCode
from protocols.release import parse_envelope
from site_agent import crypto
from site_agent.cli import main
from site_agent.config import load_site_config
from site_agent.errors import ExitCode
from site_agent.privacy.engine import Refused, ReleaseEngine, load_study_request
from site_agent.privacy.ledger import Ledger, LedgerError, LedgerRefusal
from site_agent.privacy.policy import load_policy

from .helpers import HEADER, write_site

ALL_FAMILIES = ["counts", "change", "categories", "trajectory", "histogram"]
T0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)


# -- helpers ---------------------------------------------------------------------------


def _policy_doc(*, budget: str, per_study: str, approval: str = "auto") -> dict[str, Any]:
    return {
        "unit": "client_id",
        "max_episodes_per_client": 1,
        "per_study": {"rho": per_study},
        "budget": {"rho": budget, "period_days": 365},
        "allow": {"instruments": ["PHQ-9"], "families": ALL_FAMILIES},
        "approval": approval,
        "state_dir": "state",
    }


def _write_study(path: Path, study_id: str, rho: str, families: list[str] | None = None) -> Path:
    doc = {
        "id": study_id,
        "title": f"study {study_id}",
        "instrument": "PHQ-9",
        "window": {"start": "2000-01-01", "end": "2099-12-31"},
        "families": families or ALL_FAMILIES,
        "max_session": 20,
        "privacy": {"rho": rho},
        "min_sites": 1,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _small_site(tmp: Path, *, budget: str = "1", per_study: str = "1") -> Path:
    """A tiny site with a privacy policy (state in ``tmp/state``); returns site.yaml."""
    rows = HEADER + "a,1,2026-01-01,20\na,2,2026-01-08,13\nb,1,2026-01-01,12\nb,2,2026-01-08,11\n"
    write_site(tmp, rows, extra={"privacy_policy": "privacy.yaml"})
    (tmp / "privacy.yaml").write_text(
        yaml.safe_dump(_policy_doc(budget=budget, per_study=per_study)), encoding="utf-8"
    )
    return tmp / "site.yaml"


def _synthetic_site(tmp: Path, *, seed: int, budget: str, per_study: str) -> Path:
    """One synthetic clinic (60-80 clients) answering automatically; returns site.yaml."""
    [site] = synthesize(1, tmp, seed=seed, clients_range=(60, 80))
    (site.directory / "privacy.yaml").write_text(
        yaml.safe_dump(_policy_doc(budget=budget, per_study=per_study)), encoding="utf-8"
    )
    with site.config_path.open("a", encoding="utf-8") as fh:
        fh.write("privacy_policy: privacy.yaml\n")
    return site.config_path


def _open(state: Path, budget: Fraction = Fraction(1), **kw: Any) -> Ledger:
    """The ledger in ``state`` (its anchor beside it, as by default); ``check=False``
    opens a damaged one for verification."""
    return Ledger(state, budget=budget, period_days=kw.pop("period_days", 365), **kw)


def _reserve(led: Ledger, rho: Fraction, cap: Fraction | None = None, sid: str = "s") -> Any:
    return led.reserve(
        request_id=f"r-{sid}",
        study_id=sid,
        study_hash=f"h-{sid}",
        rho=rho,
        cap=led.budget if cap is None else cap,
    )


def _populate(led: Ledger) -> None:
    """Two released studies, a reserved leftover, an approval and a free-form entry."""
    for sid in ("a", "b"):
        res = _reserve(led, Fraction(1, 10), sid=sid)
        led.complete(res, study_id=sid, study_hash=f"h-{sid}", body=f"release {sid}".encode())
    _reserve(led, Fraction(1, 10), sid="c")  # crashed before completing: stays reserved
    led.add_pending(
        request_id="r-d",
        study_id="d",
        study_hash="h-d",
        title="d",
        rho=Fraction(1, 10),
        study=b"{}",
    )
    led.decide("r-d", approve=False)
    led.audit("note", {"text": "operator looked at the log"})


@contextmanager
def _raw(state: Path) -> Iterator[sqlite3.Connection]:
    """The ledger's database as an attacker with file access sees it (autocommit)."""
    with closing(sqlite3.connect(state / "ledger.sqlite", isolation_level=None)) as db:
        yield db


def _rows(state: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with _raw(state) as db:
        return list(db.execute(sql, args))


def _max_seq(state: Path) -> int:
    return int(_rows(state, "SELECT max(seq) FROM audit")[0][0])


def _cli_verify(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["audit", "--config", str(cfg), "--verify", "--json"])
    return code, json.loads(capsys.readouterr().out)


# -- the audit log is tamper-evident ---------------------------------------------------


def _edit_body(state: Path) -> None:
    with _raw(state) as db:
        db.execute(
            'UPDATE audit SET body = replace(body, \'"rho":"1/10"\', \'"rho":"1/1000"\') '
            "WHERE seq = 2"
        )
        assert db.total_changes == 1


def _edit_body_and_hash(state: Path) -> None:
    # Edit an entry and recompute *its* hash: the next entry no longer follows it.
    with _raw(state) as db:
        seq, ts, kind, body, prev = db.execute(
            "SELECT seq, ts, kind, body, prev FROM audit WHERE seq = 2"
        ).fetchone()
        edited = body.replace('"study_id":"a"', '"study_id":"z"')
        assert edited != body
        body = edited
        material = json.dumps([prev, seq, ts, kind, body], separators=(",", ":"))
        digest = hashlib.sha256(material.encode()).hexdigest()
        db.execute("UPDATE audit SET body = ?, hash = ? WHERE seq = 2", (body, digest))


def _delete_middle(state: Path) -> None:
    with _raw(state) as db:
        db.execute("DELETE FROM audit WHERE seq = 3")


def _swap_rows(state: Path) -> None:
    # Move entries 2 and 3 into each other's place (seq is the rowid: the order).
    with _raw(state) as db:
        db.executescript(
            "BEGIN; UPDATE audit SET seq = -1 WHERE seq = 2; "
            "UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = -1; "
            "COMMIT;"
        )


def _swap_bodies(state: Path) -> None:
    # Keep the sequence numbers and hashes, exchange what entries 3 and 4 say.
    with _raw(state) as db:
        (k3, b3), (k4, b4) = db.execute(
            "SELECT kind, body FROM audit WHERE seq IN (3, 4) ORDER BY seq"
        ).fetchall()
        db.execute("BEGIN")
        db.execute("UPDATE audit SET kind = ?, body = ? WHERE seq = 3", (k4, b4))
        db.execute("UPDATE audit SET kind = ?, body = ? WHERE seq = 4", (k3, b3))
        db.execute("COMMIT")


def _truncate_tail(state: Path) -> None:
    last = _max_seq(state)
    with _raw(state) as db:
        db.execute("DELETE FROM audit WHERE seq > ?", (last - 2,))


def _truncate_tail_and_head(state: Path) -> None:
    # A careful attacker also rewinds the recorded head: the chain is then consistent,
    # but the cached release whose 'released' entry went missing still gives it away.
    with _raw(state) as db:
        (seq,) = db.execute("SELECT max(seq) FROM audit WHERE kind = 'released'").fetchone()
        (head,) = db.execute("SELECT hash FROM audit WHERE seq = ?", (seq - 1,)).fetchone()
        db.execute("BEGIN")
        db.execute("DELETE FROM audit WHERE seq >= ?", (seq,))
        db.execute("UPDATE meta SET value = ? WHERE key = 'audit_seq'", (str(seq - 1),))
        db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (head,))
        db.execute("COMMIT")


TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "edit-body": (_edit_body, "content does not match its hash (edited)"),
    "edit-body-and-hash": (_edit_body_and_hash, "does not follow the previous entry's hash"),
    "delete-middle": (_delete_middle, "an entry was deleted or moved"),
    "swap-rows": (_swap_rows, "does not follow the previous entry's hash"),
    "swap-bodies": (_swap_bodies, "content does not match its hash (edited)"),
    "truncate-tail": (_truncate_tail, "entries were removed from the end"),
    "truncate-tail-and-head": (_truncate_tail_and_head, "has no audit entry"),
}


def test_clean_log_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _small_site(tmp_path)
    with _open(tmp_path / "state") as led:
        assert led.verify_audit() == []  # an empty log is intact too
        _populate(led)
        assert led.verify_audit() == []
        kinds = [e["kind"] for e in led.audit_entries()]
        seqs = [e["seq"] for e in led.audit_entries()]
    assert kinds == [
        "genesis",
        "reserved",
        "released",
        "reserved",
        "released",
        "reserved",
        "pending",
        "denied",
        "note",
    ]
    assert seqs == list(range(1, len(kinds) + 1))
    code, doc = _cli_verify(cfg, capsys)
    assert code == ExitCode.OK
    assert doc["verified"] is True and doc["problems"] == []
    assert len(doc["entries"]) == len(kinds)


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampering_is_detected(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tamper, expected = TAMPERS[name]
    cfg = _small_site(tmp_path)
    state = tmp_path / "state"
    with _open(state) as led:
        _populate(led)
    tamper(state)
    with pytest.raises(LedgerError, match="does not match its audit chain"):
        _open(state)  # fail closed: a damaged ledger is not used
    with _open(state, check=False) as led:
        problems = led.verify_audit()
    assert problems, f"{name} went unnoticed"
    assert any(expected in p for p in problems), problems
    code, doc = _cli_verify(cfg, capsys)
    assert code == ExitCode.AUDIT == 5
    assert doc["verified"] is False and doc["problems"] == problems
    # Text mode says so in words, with the same problems.
    assert main(["audit", "--config", str(cfg), "--verify"]) == ExitCode.AUDIT
    out = capsys.readouterr().out
    assert "audit chain: BROKEN" in out and problems[0] in out


def test_tampering_inside_a_real_release_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same, on a log written by the release engine (refusal included)."""
    cfg = _small_site(tmp_path, budget="0.25", per_study="0.1")
    for sid in ("one", "two", "three"):
        _write_study(tmp_path / f"{sid}.yaml", sid, "0.1", ["counts", "change"])
        main(
            [
                "release",
                "--config",
                str(cfg),
                "--study",
                str(tmp_path / f"{sid}.yaml"),
                "--out",
                str(tmp_path / f"{sid}.json"),
            ]
        )
    code, doc = _cli_verify(cfg, capsys)
    assert code == ExitCode.OK, doc["problems"]
    kinds = [e["kind"] for e in doc["entries"]]
    assert kinds[:5] == ["genesis", "reserved", "released", "reserved", "released"]
    assert kinds[5:] and set(kinds[5:]) == {"refused"}
    last = len(kinds)
    with _raw(tmp_path / "state") as db:
        db.execute("UPDATE audit SET body = replace(body, 'three', 'other') WHERE seq = ?", (last,))
    code, doc = _cli_verify(cfg, capsys)
    assert code == ExitCode.AUDIT
    assert doc["problems"] == [f"entry {last}: content does not match its hash (edited)"]


def test_garbled_body_is_reported_not_crashed_on(tmp_path: Path) -> None:
    cfg = _small_site(tmp_path)
    state = tmp_path / "state"
    with _open(state) as led:
        _populate(led)
    with _raw(state) as db:
        db.execute("UPDATE audit SET body = 'not json' WHERE seq = 2")
    assert main(["audit", "--config", str(cfg), "--verify"]) == ExitCode.AUDIT
    with _open(state, check=False) as led:
        assert any("edited" in p for p in led.verify_audit())


def test_a_refund_by_editing_the_spends_table_is_detected(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with _open(state) as led:
        _populate(led)
    with _raw(state) as db:
        db.execute("DELETE FROM spends WHERE study_id = 'c'")
        db.execute("UPDATE spends SET rho = '1/1000000' WHERE study_id = 'a'")
    with _open(state, check=False) as led:
        assert led.status().spent == Fraction(3, 10)  # spending is summed from the chain
        problems = led.verify_audit()
    assert "spend 3 was audited but is missing from the ledger" in problems
    assert "spend 1 differs from its audited reservation" in problems
    with pytest.raises(LedgerError):
        _open(state)


# -- budget arithmetic -----------------------------------------------------------------


def test_reserving_exactly_the_budget_then_nothing_more(tmp_path: Path) -> None:
    # 3/10 as three tenths: in floats 0.1 + 0.1 + 0.1 > 0.3 and the last would be refused.
    with _open(tmp_path, budget=Fraction(3, 10)) as led:
        for sid in "abc":
            _reserve(led, Fraction(1, 10), sid=sid)
        status = led.status()
        assert status.spent == Fraction(3, 10) == status.budget and status.remaining == 0
        tiny = Fraction(1, 10**40)
        with pytest.raises(LedgerRefusal) as exc:
            _reserve(led, tiny, sid="d")
        assert exc.value.code is ErrorCode.BUDGET_EXHAUSTED
        assert led.status().spent == Fraction(3, 10)
        kinds = [e["kind"] for e in led.audit_entries()]
        # The ledger refuses without writing; the engine audits refusals (test_engine).
        assert kinds == ["genesis"] + ["reserved"] * 3
        assert led.verify_audit() == []
    with _open(tmp_path, budget=Fraction(3, 10) + Fraction(1, 10**40)) as led:
        _reserve(led, Fraction(1, 10**40), sid="d")  # exactly fits once the budget allows
        assert led.status().remaining == 0


def test_amounts_are_stored_exactly(tmp_path: Path) -> None:
    odd = Fraction(3689348814736397173, 36893488147419103232)  # a float's exact value
    with _open(tmp_path) as led:
        _reserve(led, odd)
        _reserve(led, Fraction(1, 3), sid="t")
    with _open(tmp_path) as led:
        assert led.status().spent == odd + Fraction(1, 3)
    assert _rows(tmp_path, "SELECT rho FROM spends ORDER BY id") == [(str(odd),), ("1/3",)]


def test_per_study_cap(tmp_path: Path) -> None:
    cap = Fraction(1, 10)
    with _open(tmp_path) as led:
        with pytest.raises(LedgerRefusal) as exc:
            _reserve(led, cap + Fraction(1, 10**30), cap=cap, sid="big")
        assert exc.value.code is ErrorCode.OVER_STUDY_CAP
        assert led.status().spent == 0
        _reserve(led, cap, cap=cap, sid="at-cap")
        assert led.status().spent == cap


def test_spends_are_never_refunded(tmp_path: Path) -> None:
    with _open(tmp_path) as led:
        done = _reserve(led, Fraction(1, 10), sid="a")
        led.complete(done, study_id="a", study_hash="h-a", body=b"x")
        _reserve(led, Fraction(1, 10), sid="b")  # the release failed: no complete()
        # A second process answering "a" again loses the race: its spend stays too.
        again = _reserve(led, Fraction(1, 10), sid="a")
        assert led.complete(again, study_id="a", study_hash="h-a", body=b"y") == b"x"
        # A conflicting study id is refused at completion; its spend stays.
        other = _reserve(led, Fraction(1, 10), sid="a")
        with pytest.raises(LedgerRefusal) as exc:
            led.complete(other, study_id="a", study_hash="h-other", body=b"z")
        assert exc.value.code is ErrorCode.STUDY_CONFLICT
        assert led.status().spent == Fraction(4, 10)
        assert not any(n for n in dir(led) if "refund" in n or "unreserve" in n or "cancel" in n)
    with _open(tmp_path) as led:  # and after a restart
        assert led.status().spent == Fraction(4, 10)
        assert led.verify_audit() == []
    states = _rows(tmp_path, "SELECT study_id, state FROM spends ORDER BY id")
    assert states == [("a", "released"), ("b", "reserved"), ("a", "released"), ("a", "reserved")]


def test_a_new_period_starts_afresh(tmp_path: Path) -> None:
    now = [T0]
    with _open(tmp_path, budget=Fraction(1, 2), period_days=30, clock=lambda: now[0]) as led:
        _reserve(led, Fraction(1, 2), sid="a")
        first = led.status()
        assert (first.period, first.period_start, first.period_end) == (
            0,
            dt.date(2026, 1, 1),
            dt.date(2026, 1, 30),
        )
        now[0] = T0 + dt.timedelta(days=29, hours=11)  # last day of period 0
        with pytest.raises(LedgerRefusal):
            _reserve(led, Fraction(1, 100), sid="b")
        now[0] = T0 + dt.timedelta(days=30)
        fresh = led.status()
        assert (fresh.period, fresh.spent, fresh.remaining) == (1, 0, Fraction(1, 2))
        assert fresh.period_start == dt.date(2026, 1, 31)
        _reserve(led, Fraction(1, 2), sid="b")
        now[0] = T0 + dt.timedelta(days=95)  # skipped a period entirely
        assert led.status().period == 3 and led.status().spent == 0
        now[0] = T0 - dt.timedelta(days=5)  # a clock set back counts against period 0
        assert led.status().period == 0 and led.status().spent == Fraction(1, 2)
    assert _rows(tmp_path, "SELECT period FROM spends ORDER BY id") == [(0,), (1,)]


def test_history_and_status_by_period(tmp_path: Path) -> None:
    now = [T0]
    with _open(tmp_path, budget=Fraction(1, 2), period_days=30, clock=lambda: now[0]) as led:
        res = _reserve(led, Fraction(1, 5), sid="a")
        now[0] = T0 + dt.timedelta(days=30)  # the outcome lands in the next period...
        led.complete(res, study_id="a", study_hash="h-a", body=b"a")
        _reserve(led, Fraction(1, 10), sid="b")  # ...and this reservation is period 1's
        rows = led.history()
        # ...but its cost stays with the period of its reservation.
        assert [(r.decision, r.period, r.cost) for r in rows] == [
            ("released", 0, Fraction(1, 5)), ("interrupted", 1, Fraction(1, 10))]
        past, current = led.status(0), led.status()
        assert (past.period, past.period_start, past.spent) == (0, dt.date(2026, 1, 1),
                                                                Fraction(1, 5))
        assert (current.period, current.period_start, current.spent) == (
            1, dt.date(2026, 1, 31), Fraction(1, 10))
        assert led.status(1) == current
        assert sum(r.cost for r in rows if r.period == 0) == past.spent


AMOUNTS = st.one_of(
    st.fractions(min_value=Fraction(1, 10**6), max_value=1, max_denominator=10**6),
    st.sampled_from([Fraction(1, 10), Fraction(1, 3), Fraction(1, 2), Fraction(1, 10**30)]),
)


@settings(max_examples=60, deadline=None)
@given(
    budget=st.fractions(min_value=Fraction(1, 100), max_value=1, max_denominator=1000),
    cap_fraction=st.sampled_from([Fraction(1), Fraction(1, 2), Fraction(1, 5)]),
    amounts=st.lists(AMOUNTS, max_size=25),
)
def test_reservations_never_exceed_the_budget(
    budget: Fraction, cap_fraction: Fraction, amounts: list[Fraction]
) -> None:
    cap = budget * cap_fraction
    with tempfile.TemporaryDirectory() as tmp, _open(Path(tmp) / "s", budget=budget) as led:
        expected = Fraction(0)
        for i, rho in enumerate(amounts):
            before = led.status().spent
            try:
                res = _reserve(led, rho, cap=cap, sid=str(i))
            except LedgerRefusal as r:
                assert led.status().spent == before  # a refusal changes nothing
                want = ErrorCode.OVER_STUDY_CAP if rho > cap else ErrorCode.BUDGET_EXHAUSTED
                assert r.code is want
                assert rho > cap or before + rho > budget
            else:
                assert rho <= cap and before + rho <= budget
                assert res.rho == rho
                expected += rho
                assert led.status().spent == before + rho
            assert led.status().spent == expected <= budget
        assert led.verify_audit() == []


# -- concurrency and crashes (slow) ----------------------------------------------------

_RELEASE_ON_GO = """
import sys, time
from pathlib import Path
from site_agent.cli import main
cfg, study, out, ready, go = sys.argv[1:6]
Path(ready).touch()
deadline = time.monotonic() + 120
while not Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit(99)
    time.sleep(0.001)
sys.exit(main(["release", "--config", cfg, "--study", study, "--out", out, "--json"]))
"""


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()


def _check_ledger(state: Path) -> dict[str, Any]:
    """Invariants every ledger must satisfy after any mix of races and crashes."""
    pol = load_policy(state.parent / "privacy.yaml")
    with _open(state, budget=pol.budget_rho) as led:
        status = led.status()
        assert status.spent <= status.budget
        assert led.verify_audit() == []
        audit = led.audit_entries()
    spends = {r[0]: r[1:] for r in _rows(state, "SELECT id, study_id, rho, state FROM spends")}
    assert sum((Fraction(s[1]) for s in spends.values()), Fraction(0)) == status.spent
    releases = _rows(state, "SELECT study_id, spend_id, body, sha256 FROM releases")
    released_audit = {e["body"]["spend_id"]: e["body"] for e in audit if e["kind"] == "released"}
    for study_id, spend_id, body, digest in releases:
        assert hashlib.sha256(body).hexdigest() == digest
        assert spends[spend_id][0] == study_id and spends[spend_id][2] == "released"
        assert released_audit[spend_id]["sha256"] == digest
        assert released_audit[spend_id]["study_id"] == study_id
    with_release = {r[1] for r in releases}
    released_spends = {i for i, s in spends.items() if s[2] == "released"}
    # Every study id is fresh: a released spend is always the one that was cached.
    assert released_spends == with_release
    reserved = {e["body"]["spend_id"] for e in audit if e["kind"] == "reserved"}
    assert reserved == set(spends)  # every spend was audited when it was reserved
    return {
        "status": status,
        "audit": audit,
        "releases": {r[0]: bytes(r[2]) for r in releases},
        "spends": spends,
    }


def _answer(tmp: Path) -> tuple[ReleaseEngine, Any]:
    cfg = _small_site(tmp, budget="0.5", per_study="0.2")
    _write_study(tmp / "s.yaml", "s", "0.2", ["counts"])
    engine = ReleaseEngine(load_site_config(cfg), load_policy(tmp / "privacy.yaml"))
    return engine, load_study_request(tmp / "s.yaml")


def test_losing_the_race_to_create_the_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process creates the key while this one generates its own: both sign with
    the winner's key and nothing is lost (a FileExistsError used to burn the budget)."""
    engine, req = _answer(tmp_path)
    state = tmp_path / "state"
    real = crypto.Ed25519PrivateKey.generate

    def another_process_wins() -> Any:
        winner = crypto.load_or_create_key  # as another racer does right now
        monkeypatch.setattr(crypto.Ed25519PrivateKey, "generate", real)
        winner(state)
        return real()

    monkeypatch.setattr(crypto.Ed25519PrivateKey, "generate", another_process_wins)
    body = engine.release(req)
    env = parse_envelope(body.decode(), "release")
    assert env.public_key == crypto.raw_public(crypto.load_or_create_key(state))


def test_an_unreadable_signing_key_costs_no_budget(tmp_path: Path) -> None:
    """The key is checked when the ledger opens, before budget is reserved."""
    engine, req = _answer(tmp_path)
    state = tmp_path / "state"
    engine.ledger().close()  # a site that has started once
    (state / crypto.KEY_FILE).write_bytes(b"")  # e.g. damaged, or a pre-fix partial write
    with pytest.raises(Refused) as exc:
        engine.release(req)
    assert exc.value.code is ErrorCode.INTERNAL_ERROR
    assert crypto.KEY_FILE in exc.value.detail and "restore it from backup" in exc.value.detail
    assert _rows(state, "SELECT count(*) FROM spends") == [(0,)]
    assert [k for (k,) in _rows(state, "SELECT kind FROM audit")] == ["genesis"]


@pytest.mark.slow
def test_racing_releases_stay_within_budget(tmp_path: Path) -> None:
    cfg = _synthetic_site(tmp_path, seed=11, budget="0.35", per_study="0.1")
    state = cfg.parent / "state"
    assert not state.exists()  # the racers create the ledger and the signing key
    n = 8
    procs: list[subprocess.Popen[bytes]] = []
    go = tmp_path / "go"
    try:
        for i in range(n):
            study = _write_study(tmp_path / f"s{i}.yaml", f"race-{i}", "0.1")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        _RELEASE_ON_GO,
                        str(cfg),
                        str(study),
                        str(tmp_path / f"out{i}.json"),
                        str(tmp_path / f"ready{i}"),
                        str(go),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline, "racers did not start"
            assert all(p.poll() is None for p in procs), "a racer died before the start"
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        _stop(procs)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0] * 3 + [ExitCode.BUDGET_EXHAUSTED] * 5, [
        (c, err.decode()[-500:]) for c, (_, err) in zip(codes, results, strict=True)
    ]
    facts = _check_ledger(state)
    winners = {f"race-{i}" for i, c in enumerate(codes) if c == 0}
    assert set(facts["releases"]) == winners
    assert len(facts["spends"]) == len(winners)  # no leftovers: nothing crashed
    for i, (c, (out, _)) in enumerate(zip(codes, results, strict=True)):
        if c == 0:
            body = (tmp_path / f"out{i}.json").read_bytes()
            assert body == facts["releases"][f"race-{i}"]
            assert json.loads(out)["sha256"] == hashlib.sha256(body).hexdigest()
        else:
            assert not (tmp_path / f"out{i}.json").exists()
    refused = [e["body"] for e in facts["audit"] if e["kind"] == "refused"]
    assert {b["study_id"] for b in refused} == {f"race-{i}" for i in range(n)} - winners
    assert {b["code"] for b in refused} == {"budget_exhausted"}
    # One signing key, no temporary files left behind, every release signed with it.
    assert [p.name for p in state.iterdir() if "signing" in p.name] == [crypto.KEY_FILE]
    public = crypto.raw_public(crypto.load_or_create_key(state))
    for body in facts["releases"].values():
        assert parse_envelope(body.decode(), "release").public_key == public


def _waiting_release(cfg: Path, study: Path, out: Path) -> subprocess.Popen[bytes]:
    """``outcomebench-site release`` (the CLI's main) in a process that first imports
    everything and then waits for ``<out>.go``, so a kill timer can start at the release."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _RELEASE_ON_GO,
            str(cfg),
            str(study),
            str(out),
            f"{out}.ready",
            f"{out}.go",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(proc: subprocess.Popen[bytes], out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not Path(f"{out}.ready").exists():
        assert proc.poll() is None, f"{out}: the release process died while starting"
        assert time.monotonic() < deadline, f"{out}: the release process did not start"
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_never_leaks_a_release_or_overspends(tmp_path: Path) -> None:
    """Releases killed at random points. The first runs to the end and times the release
    path; the others are killed after a seeded delay within that time (at most 1.5 s), so
    the kills land between planning, reserving, computing, caching and writing."""
    cfg = _synthetic_site(tmp_path, seed=12, budget="0.15", per_study="0.02")
    state = cfg.parent / "state"
    rng = random.Random(20260101)
    n, started, full = 20, time.monotonic(), 1.5
    outcomes: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(i: int) -> tuple[str, subprocess.Popen[bytes], Path]:
        sid = f"kill-{i}"
        study = _write_study(tmp_path / f"{sid}.yaml", sid, "0.02", ["counts", "change"])
        out = tmp_path / f"{sid}.json"
        procs.append(_waiting_release(cfg, study, out))
        return sid, procs[-1], out

    try:
        nxt = spawn(0)
        for i in range(n):
            sid, proc, out = nxt
            _wait_ready(proc, out)
            if i + 1 < n and time.monotonic() - started < 120:
                nxt = spawn(i + 1)  # imports while this one runs
            Path(f"{out}.go").touch()
            go = time.monotonic()
            if i == 0:
                outcomes[sid] = proc.wait(timeout=120)
                full = min(1.5, time.monotonic() - go)
            else:
                time.sleep(rng.uniform(0.0, full))
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                outcomes[sid] = proc.wait(timeout=120)
            if nxt[1] is proc:  # out of time: no next process was started
                break
    finally:
        _stop(procs)
    assert outcomes["kill-0"] == ExitCode.OK
    assert len(outcomes) >= 10 and -signal.SIGKILL in outcomes.values()
    assert set(outcomes.values()) <= {0, ExitCode.BUDGET_EXHAUSTED, -signal.SIGKILL}, outcomes
    facts = _check_ledger(state)
    # A finished process released (and its release is cached), or was refused for budget.
    for sid, code in outcomes.items():
        assert (sid in facts["releases"]) == (code == 0) or code == -signal.SIGKILL
    released_or_cached = {
        e["body"]["sha256"] for e in facts["audit"] if e["kind"] in ("released", "cached")
    }
    for sid in outcomes:
        out = tmp_path / f"{sid}.json"
        if not out.exists():
            continue
        body = out.read_bytes()
        cached = facts["releases"].get(sid)
        assert cached is not None, f"{out} exists but {sid} was never released"
        # A kill while writing may truncate the file; it never holds anything else.
        assert cached.startswith(body)
        if body == cached:
            assert hashlib.sha256(body).hexdigest() in released_or_cached

    # A release whose process was killed is still answered, from the cache, at no cost.
    def release(sid: str) -> tuple[int, Path]:
        out = tmp_path / f"{sid}.again.json"
        args = ["release", "--config", str(cfg), "--study", str(tmp_path / f"{sid}.yaml")]
        return main([*args, "--out", str(out)]), out

    spent = facts["status"].spent
    for sid in facts["releases"]:
        code, out = release(sid)
        assert code == ExitCode.OK and out.read_bytes() == facts["releases"][sid]
    assert _check_ledger(state)["status"].spent == spent
    # And the site still answers new studies (or refuses them for budget).
    _write_study(tmp_path / "after.yaml", "after", "0.02", ["counts", "change"])
    assert release("after")[0] in (ExitCode.OK, ExitCode.BUDGET_EXHAUSTED)
    _check_ledger(state)
    assert main(["audit", "--config", str(cfg), "--verify"]) == ExitCode.OK


# -- M4: spends are bound to their period in the chain ---------------------------------


def _two_periods(state: Path, now: list[dt.datetime]) -> None:
    """Period 0 spends the whole budget; period 1 spends it again."""
    with _open(state, budget=Fraction(1, 2), period_days=30, clock=lambda: now[0]) as led:
        _reserve(led, Fraction(1, 2), sid="p0")
        now[0] = T0 + dt.timedelta(days=31)
        _reserve(led, Fraction(1, 2), sid="p1")
        assert led.status().remaining == 0


def test_the_chain_entry_of_a_spend_carries_its_period(tmp_path: Path) -> None:
    now = [T0]
    _two_periods(tmp_path / "state", now)
    with _open(tmp_path / "state", period_days=30, clock=lambda: now[0]) as led:
        entries = led.audit_entries()
    assert entries[0]["kind"] == "genesis"
    assert entries[0]["body"]["period_start"] == "2026-01-01"
    spends = [e["body"] for e in entries if e["kind"] == "reserved"]
    assert [(b["period"], b["period_start"], b["rho"], b["request_id"]) for b in spends] == [
        (0, "2026-01-01", "1/2", "r-p0"),
        (1, "2026-01-31", "1/2", "r-p1"),
    ]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("UPDATE spends SET period = period - 1", "spend 2 differs from its audited reservation"),
        ("UPDATE spends SET period = period - 1, period_start = '2026-01-01'", "spend 2 differs"),
        ("DELETE FROM spends WHERE period = 1", "spend 2 was audited but is missing"),
        (
            "UPDATE meta SET value = '2026-01-31' WHERE key = 'period_start'",
            "meta.period_start '2026-01-31' differs from the genesis entry's '2026-01-01'",
        ),
    ],
)
def test_editing_spends_or_the_period_start_refunds_nothing(
    sql: str, expected: str, tmp_path: Path
) -> None:
    """M4: moving a spend to an earlier period, or the period start, used to restore the
    whole budget with `audit --verify` saying OK."""
    state, now = tmp_path / "state", [T0]
    _two_periods(state, now)
    with _raw(state) as db:
        db.execute(sql)
    clock = lambda: now[0]  # noqa: E731
    with _open(state, budget=Fraction(1, 2), period_days=30, clock=clock, check=False) as led:
        status = led.status()
        assert (status.period, status.spent, status.remaining) == (1, Fraction(1, 2), 0)
        with pytest.raises(LedgerError):
            _reserve(led, Fraction(1, 100), sid="free")  # nothing is written to it either
        problems = led.verify_audit()
    assert any(expected in p for p in problems), problems
    with pytest.raises(LedgerError, match="restored from the backup that matches the anchor"):
        _open(state, budget=Fraction(1, 2), period_days=30, clock=lambda: now[0])


# -- the anchor: a ledger that is deleted, replaced or rolled back is refused ------------


def _site_with_history(tmp: Path) -> tuple[Path, Path, Path]:
    """A site that released two studies and refused one; returns (site.yaml, state, anchor)."""
    cfg = _small_site(tmp, budget="0.25", per_study="0.1")
    for sid in ("one", "two", "three"):
        _write_study(tmp / f"{sid}.yaml", sid, "0.1", ["counts"])
        main(["release", "--config", str(cfg), "--study", str(tmp / f"{sid}.yaml"),
              "--out", str(tmp / f"{sid}.json")])
    return cfg, tmp / "state", tmp / "state.anchor.json"


def _delete_ledger(state: Path) -> None:
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        (state / name).unlink(missing_ok=True)


def _truncate_ledger(state: Path) -> None:
    _delete_ledger(state)
    (state / "ledger.sqlite").write_bytes(b"")


def _wipe_tables(state: Path) -> None:
    with _raw(state) as db:
        db.executescript(
            "BEGIN; DELETE FROM audit WHERE seq > 1; DELETE FROM spends; DELETE FROM releases;"
            "DELETE FROM requests; UPDATE meta SET value = '1' WHERE key = 'audit_seq';"
            "UPDATE meta SET value = (SELECT hash FROM audit WHERE seq = 1) "
            "WHERE key = 'audit_head'; COMMIT;"
        )


def _drop_trailing_entries(state: Path) -> None:
    # Drop the trailing entries and rewind the recorded head: the chain is consistent.
    with _raw(state) as db:
        (last,) = db.execute("SELECT max(seq) FROM audit").fetchone()
        (head,) = db.execute("SELECT hash FROM audit WHERE seq = ?", (last - 1,)).fetchone()
        db.executescript(
            f"BEGIN; DELETE FROM audit WHERE seq = {last}; "
            f"UPDATE meta SET value = '{last - 1}' WHERE key = 'audit_seq'; "
            f"UPDATE meta SET value = '{head}' WHERE key = 'audit_head'; COMMIT;"
        )


def _delete_anchor(state: Path) -> None:
    (state.parent / "state.anchor.json").unlink()


def _forge_anchor(state: Path) -> None:
    path = state.parent / "state.anchor.json"
    doc = json.loads(path.read_text())
    doc["checkpoint"]["spent"] = "0"
    path.write_text(json.dumps(doc))


def _delete_key(state: Path) -> None:
    (state / crypto.KEY_FILE).unlink()


def _replace_key(state: Path) -> None:
    (state / crypto.KEY_FILE).unlink()
    crypto.create_key(state)


ANCHOR_TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "delete-ledger": (_delete_ledger, "restore ledger.sqlite (with its -wal file) from backup"),
    "truncate-ledger": (_truncate_ledger, "ledger.sqlite: missing or empty"),
    "wipe-tables": (_wipe_tables, "entries were removed from the end, or the ledger is an older"),
    "drop-trailing": (_drop_trailing_entries, "entries were removed from the end"),
    "delete-anchor": (_delete_anchor, "the ledger's anchor is missing"),
    "forge-anchor": (_forge_anchor, "its signature does not verify (edited)"),
    "delete-key": (_delete_key, "the site's signing key is missing. Restore it from backup"),
    "replace-key": (_replace_key, "was signed by another key"),
}


@pytest.mark.parametrize("name", list(ANCHOR_TAMPERS))
def test_a_ledger_that_does_not_match_its_anchor_refuses_to_release(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these passed `audit --verify` and let the site start afresh before."""
    tamper, expected = ANCHOR_TAMPERS[name]
    cfg, state, anchor = _site_with_history(tmp_path)
    assert anchor.exists() and main(["audit", "--config", str(cfg), "--verify"]) == ExitCode.OK
    key_before = (state / crypto.KEY_FILE).read_bytes()
    tamper(state)
    capsys.readouterr()
    _write_study(tmp_path / "new.yaml", "new", "0.01", ["counts"])
    out = tmp_path / "new.json"
    code = main(["release", "--config", str(cfg), "--study", str(tmp_path / "new.yaml"),
                 "--out", str(out), "--json"])
    # The ledger's own error and exit code, as for every command (over the wire the
    # service answers internal_error: test_service.py).
    assert code == ExitCode.AUDIT
    err = capsys.readouterr().err
    assert "ledger unusable" in err and expected in err, err
    assert not out.exists()
    # Other commands fail closed too, naming the problem; --verify reports it (exit 5).
    assert main(["budget", "--config", str(cfg)]) == ExitCode.AUDIT
    assert "ledger unusable" in capsys.readouterr().err
    assert main(["audit", "--config", str(cfg), "--verify"]) == ExitCode.AUDIT
    captured = capsys.readouterr()
    assert "audit chain: BROKEN" in captured.out or "ledger unusable" in captured.err
    # Nothing was started afresh: no new key, no new ledger over the old one.
    if name == "delete-key":
        assert not (state / crypto.KEY_FILE).exists()
    elif name != "replace-key":
        assert (state / crypto.KEY_FILE).read_bytes() == key_before
    if name in ("delete-ledger", "truncate-ledger"):
        db = state / "ledger.sqlite"
        assert not db.exists() or db.stat().st_size == 0


def test_a_ledger_rolled_back_to_an_older_copy_is_refused(tmp_path: Path) -> None:
    cfg, state, _ = _site_with_history(tmp_path)
    with _raw(state) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    old = (state / "ledger.sqlite").read_bytes()
    _write_study(tmp_path / "four.yaml", "four", "0.01", ["counts"])
    assert main(["release", "--config", str(cfg), "--study", str(tmp_path / "four.yaml"),
                 "--out", str(tmp_path / "four.json")]) == ExitCode.OK
    _delete_ledger(state)
    (state / "ledger.sqlite").write_bytes(old)  # the budget of "four" would come back
    engine = ReleaseEngine(load_site_config(cfg), load_policy(tmp_path / "privacy.yaml"))
    with pytest.raises(LedgerError, match=r"entries were removed from the end, or the ledger is"):
        engine.ledger()
    with engine.ledger(check=False) as led:
        assert any("older copy" in p for p in led.verify_audit())


def test_a_swapped_cached_release_is_detected_and_never_served(tmp_path: Path) -> None:
    cfg, state, _ = _site_with_history(tmp_path)
    original = (tmp_path / "one.json").read_bytes()
    forged = original.replace(b'"values"', b'"values" ')
    with _raw(state) as db:
        db.execute("UPDATE releases SET body = ? WHERE study_id = 'one'", (forged,))
    engine = ReleaseEngine(load_site_config(cfg), load_policy(tmp_path / "privacy.yaml"))
    with pytest.raises(Refused) as exc:
        engine.release(load_study_request(tmp_path / "one.yaml"))
    assert exc.value.code is ErrorCode.INTERNAL_ERROR and "(swapped)" in exc.value.detail
    with engine.ledger(check=False) as led:
        assert "cached release of study 'one': its body does not match the SHA-256 in the " \
            "audit log (swapped)" in led.verify_audit()
    with _raw(state) as db:  # and with its recorded digest changed to match
        db.execute("UPDATE releases SET sha256 = ? WHERE study_id = 'one'",
                   (hashlib.sha256(forged).hexdigest(),))
    with engine.ledger(check=False) as led:
        assert any("differs from its audit entry (swapped)" in p for p in led.verify_audit())


def test_only_a_truly_fresh_site_is_initialised(tmp_path: Path) -> None:
    state, anchor = tmp_path / "state", tmp_path / "state.anchor.json"
    with _open(state) as led:  # fresh: ledger, key and anchor together
        key = crypto.raw_public(led.signing_key())
    assert (state / "ledger.sqlite").exists() and (state / crypto.KEY_FILE).exists()
    doc = json.loads(anchor.read_text())
    assert doc["public_key"] == key.hex() and doc["checkpoint"]["seq"] == 1
    assert anchor.stat().st_mode & 0o077 == 0
    # The key alone (ledger and anchor deleted) is not a fresh site.
    _delete_ledger(state)
    anchor.unlink()
    with pytest.raises(LedgerError, match=r"the ledger was deleted\. Restore both from backup"):
        _open(state)
    assert not (state / "ledger.sqlite").exists()


def test_an_interrupted_first_start_is_finished(tmp_path: Path) -> None:
    """The anchor is written last: a genesis-only ledger without one is a first start
    that was cut short (nothing can have been spent), not a deletion."""
    state, anchor = tmp_path / "state", tmp_path / "state.anchor.json"
    _open(state).close()
    anchor.unlink()
    _delete_key(state)
    with _open(state) as led:
        assert [e["kind"] for e in led.audit_entries()] == ["genesis"]
    assert anchor.exists() and (state / crypto.KEY_FILE).exists()


def test_a_crash_between_commit_and_checkpoint_is_re_anchored(tmp_path: Path) -> None:
    state, anchor = tmp_path / "state", tmp_path / "state.anchor.json"
    with _open(state) as led:
        before = anchor.read_bytes()
        _reserve(led, Fraction(1, 10))
    anchor.write_bytes(before)  # as if killed after the commit, before the anchor
    with _open(state) as led:
        assert led.status().spent == Fraction(1, 10)
    assert json.loads(anchor.read_text())["checkpoint"]["seq"] == 2
    assert json.loads(anchor.read_text())["checkpoint"]["spent"] == "1/10"


def test_an_old_schema_ledger_is_refused_with_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with closing(sqlite3.connect(state / "ledger.sqlite")) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('period_start', '2025-01-01')")
        db.commit()
    crypto.create_key(state)
    with pytest.raises(LedgerError, match=
        r"ledger schema 1, this outcomebench needs schema 2",
    ) as e:
        _open(state)
    assert "move it aside" in str(e.value)


def test_the_service_does_not_start_on_a_broken_ledger(tmp_path: Path) -> None:
    from site_agent.service import AgentServer  # noqa: PLC0415

    cfg, state, _ = _site_with_history(tmp_path)
    _delete_ledger(state)
    engine = ReleaseEngine(load_site_config(cfg), load_policy(tmp_path / "privacy.yaml"))
    with pytest.raises(LedgerError, match=r"restore ledger\.sqlite"):
        AgentServer(engine, tmp_path / "agent.sock").start()
    assert not (tmp_path / "agent.sock").exists()


# -- retries reuse a reservation that never completed -----------------------------------


def test_a_reservation_that_did_not_complete_is_reused_once(tmp_path: Path) -> None:
    now = [T0]
    with _open(tmp_path / "s", period_days=30, clock=lambda: now[0]) as led:
        first = _reserve(led, Fraction(1, 10), sid="a")  # then the attempt failed
        again = _reserve(led, Fraction(1, 10), sid="a")
        assert (again.spend_id, again.reused, again.charged) == (first.spend_id, True, 0)
        assert led.status().spent == Fraction(1, 10)
        led.complete(again, study_id="a", study_hash="h-a", body=b"x")
        # Completed: a later reservation of the same request is a new charge.
        third = _reserve(led, Fraction(1, 10), sid="a")
        assert not third.reused and led.status().spent == Fraction(2, 10)
        # Another request (or amount) never takes it over.
        assert not _reserve(led, Fraction(1, 10), sid="b").reused
        assert not _reserve(led, Fraction(1, 20), sid="a").reused
        # A reservation of an earlier period is not carried into the next one.
        now[0] = T0 + dt.timedelta(days=30)
        fresh = _reserve(led, Fraction(1, 10), sid="a")
        assert not fresh.reused and led.status().spent == Fraction(1, 10)
        assert led.verify_audit() == []
    kinds = [k for (k,) in _rows(tmp_path / "s", "SELECT kind FROM audit ORDER BY seq")]
    assert kinds.count("reused") == 1

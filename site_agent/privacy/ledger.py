"""The site's privacy ledger and audit log: one SQLite database (WAL) in the state dir.

Spending is checked and reserved in one ``BEGIN IMMEDIATE`` transaction before any data
is touched, and never refunded. A release leaves only after the transaction that caches
it, marks its spend released and appends its audit entry has committed. So a crash
(SIGKILL anywhere) can leave a reserved spend with no release (budget lost, nothing
out), never a release without a charge, and spending never exceeds the budget.
Amounts are exact fractions stored as text. Many processes may use one ledger: SQLite
serialises the writers.

The audit log is append-only and hash-chained: entry n stores SHA-256(hash of n-1 ||
canonical JSON of entry n). The head (sequence number and hash) is kept in ``meta`` and
updated in the same transaction, so an edit, deletion or reordering of entries breaks
:meth:`Ledger.verify_audit`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from protocols.codes import ErrorCode

__all__ = ["Budget", "Ledger", "LedgerRefusal", "Reservation"]

_GENESIS = "0" * 64
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, study_id TEXT NOT NULL, study_hash TEXT NOT NULL,
    rho TEXT NOT NULL, period INTEGER NOT NULL, created TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'released')));
CREATE TABLE IF NOT EXISTS releases (
    study_id TEXT PRIMARY KEY, study_hash TEXT NOT NULL, spend_id INTEGER NOT NULL,
    body BLOB NOT NULL, sha256 TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, study_id TEXT NOT NULL, study_hash TEXT NOT NULL,
    title TEXT NOT NULL, rho TEXT NOT NULL, study BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied')),
    created TEXT NOT NULL, decided TEXT);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL);
"""


class LedgerRefusal(Exception):
    """The ledger refuses a request; ``code`` is the protocol error code."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


@dataclass(frozen=True, slots=True)
class Reservation:
    spend_id: int
    rho: Fraction


@dataclass(frozen=True, slots=True)
class Budget:
    period: int
    period_start: dt.date
    period_end: dt.date
    budget: Fraction
    spent: Fraction

    @property
    def remaining(self) -> Fraction:
        return max(self.budget - self.spent, Fraction(0))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Ledger:
    def __init__(
        self,
        state_dir: Path,
        *,
        budget: Fraction,
        period_days: int,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "ledger.sqlite"
        self.budget = budget
        self.period_days = period_days
        self.clock = clock
        self.db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout = 120000")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('period_start', ?)",
                (self.clock().date().isoformat(),),
            )
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('audit_seq', '0')")
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('audit_head', ?)", (_GENESIS,))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- budget ---------------------------------------------------------------------

    def _meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0])

    def _period(self) -> tuple[int, dt.date, dt.date]:
        start = dt.date.fromisoformat(self._meta("period_start"))
        n = max(0, (self.clock().date() - start).days // self.period_days)
        begin = start + dt.timedelta(days=n * self.period_days)
        return n, begin, begin + dt.timedelta(days=self.period_days - 1)

    def _spent(self, period: int) -> Fraction:
        rows = self.db.execute("SELECT rho FROM spends WHERE period = ?", (period,))
        return sum((Fraction(r[0]) for r in rows), Fraction(0))

    def status(self) -> Budget:
        n, begin, end = self._period()
        return Budget(
            period=n, period_start=begin, period_end=end, budget=self.budget, spent=self._spent(n)
        )

    def cached(self, study_id: str) -> tuple[str, bytes] | None:
        row = self.db.execute(
            "SELECT study_hash, body FROM releases WHERE study_id = ?", (study_id,)
        ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def reserve(
        self, *, request_id: str, study_id: str, study_hash: str, rho: Fraction, cap: Fraction
    ) -> Reservation:
        """Check the cap and the period budget and reserve ``rho``, atomically."""
        if rho <= 0:
            raise ValueError(f"a reservation must be positive, got {rho}")
        if rho > cap:
            raise LedgerRefusal(ErrorCode.OVER_STUDY_CAP, f"rho {rho} > per-study cap {cap}")
        with self._tx():
            n, _, _ = self._period()
            spent = self._spent(n)
            if spent + rho > self.budget:
                raise LedgerRefusal(
                    ErrorCode.BUDGET_EXHAUSTED, f"spent {spent} + {rho} > budget {self.budget}"
                )
            cur = self.db.execute(
                "INSERT INTO spends (request_id, study_id, study_hash, rho, period, created, "
                "state) VALUES (?, ?, ?, ?, ?, ?, 'reserved')",
                (request_id, study_id, study_hash, str(rho), n, self.clock().isoformat()),
            )
            spend_id = int(cur.lastrowid or 0)
            self._append(
                "reserved",
                {
                    "request_id": request_id,
                    "study_id": study_id,
                    "study_hash": study_hash,
                    "spend_id": spend_id,
                    "rho": str(rho),
                    "period": n,
                },
            )
        return Reservation(spend_id=spend_id, rho=rho)

    def complete(self, res: Reservation, *, study_id: str, study_hash: str, body: bytes) -> bytes:
        """Cache the release and audit it; returns what may leave (the first cached
        release of this study if another process finished first)."""
        digest = hashlib.sha256(body).hexdigest()
        with self._tx():
            existing = self.cached(study_id)
            self.db.execute("UPDATE spends SET state = 'released' WHERE id = ?", (res.spend_id,))
            if existing is not None:
                if existing[0] != study_hash:  # lost a race with a different study
                    raise LedgerRefusal(ErrorCode.STUDY_CONFLICT, "study id reused")
                self._append(
                    "discarded",
                    {
                        "study_id": study_id,
                        "spend_id": res.spend_id,
                        "reason": "another process released it first",
                    },
                )
                return existing[1]
            self.db.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                (study_id, study_hash, res.spend_id, body, digest, self.clock().isoformat()),
            )
            self._append(
                "released",
                {
                    "study_id": study_id,
                    "study_hash": study_hash,
                    "spend_id": res.spend_id,
                    "sha256": digest,
                },
            )
        return body

    # -- approvals ------------------------------------------------------------------

    def request_state(self, request_id: str) -> str | None:
        row = self.db.execute(
            "SELECT state FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def add_pending(
        self,
        *,
        request_id: str,
        study_id: str,
        study_hash: str,
        title: str,
        rho: Fraction,
        study: bytes,
    ) -> None:
        with self._tx():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO requests VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, NULL)",
                (
                    request_id,
                    study_id,
                    study_hash,
                    title,
                    str(rho),
                    study,
                    self.clock().isoformat(),
                ),
            )
            if cur.rowcount:
                self._append(
                    "pending",
                    {
                        "request_id": request_id,
                        "study_id": study_id,
                        "study_hash": study_hash,
                        "rho": str(rho),
                    },
                )

    def decide(self, request_id: str, approve: bool) -> dict[str, Any]:
        with self._tx():
            row = self.db.execute(
                "SELECT study_id, state FROM requests WHERE request_id = ?", (request_id,)
            ).fetchone()
            if row is None:
                raise KeyError(request_id)
            state = "approved" if approve else "denied"
            self.db.execute(
                "UPDATE requests SET state = ?, decided = ? WHERE request_id = ?",
                (state, self.clock().isoformat(), request_id),
            )
            self._append(state, {"request_id": request_id, "study_id": row[0], "previous": row[1]})
        return {"request_id": request_id, "study_id": row[0], "state": state}

    def requests(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT request_id, study_id, title, rho, state, created, decided "
            "FROM requests ORDER BY created"
        )
        keys = ("request_id", "study_id", "title", "rho", "state", "created", "decided")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- audit ----------------------------------------------------------------------

    def audit(self, kind: str, body: dict[str, Any]) -> None:
        with self._tx():
            self._append(kind, body)

    def _append(self, kind: str, body: dict[str, Any]) -> None:
        seq = int(self._meta("audit_seq")) + 1
        prev = self._meta("audit_head")
        ts = self.clock().isoformat()
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        digest = _entry_hash(prev, seq, ts, kind, text)
        self.db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)", (seq, ts, kind, text, prev, digest)
        )
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'audit_seq'", (str(seq),))
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (digest,))

    def audit_entries(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT seq, ts, kind, body, prev, hash FROM audit ORDER BY seq")
        return [
            {"seq": r[0], "ts": r[1], "kind": r[2], "body": _body(r[3]), "prev": r[4], "hash": r[5]}
            for r in rows
        ]

    def verify_audit(self) -> list[str]:
        """Every problem found in the chain and its cross-checks; empty when intact."""
        problems: list[str] = []
        prev = _GENESIS
        expected_seq = 1
        rows = self.db.execute(
            "SELECT rowid, seq, ts, kind, body, prev, hash FROM audit ORDER BY rowid"
        ).fetchall()
        for _rowid, seq, ts, kind, body, stored_prev, stored in rows:
            if seq != expected_seq:
                problems.append(
                    f"entry {seq}: expected sequence number {expected_seq} "
                    "(an entry was deleted or moved)"
                )
            if stored_prev != prev:
                problems.append(f"entry {seq}: does not follow the previous entry's hash")
            if _entry_hash(stored_prev, seq, ts, kind, body) != stored:
                problems.append(f"entry {seq}: content does not match its hash (edited)")
            prev = stored
            expected_seq = seq + 1
        head_seq, head = int(self._meta("audit_seq")), self._meta("audit_head")
        if head_seq != len(rows) or head != prev:
            problems.append(
                f"the log ends at entry {len(rows)} but the recorded head is entry "
                f"{head_seq} (entries were removed from the end)"
            )
        bodies: dict[str, list[dict[str, Any]]] = {}
        for _rowid, seq, _ts, kind, body, _prev, _hash in rows:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                problems.append(f"entry {seq}: body is not a JSON object (edited)")
                continue
            bodies.setdefault(kind, []).append(parsed)
        # Every spend must match its audited reservation, so a deleted or lowered spend
        # (a silent refund) is caught, and every cached release must have been audited.
        reserved = {b.get("spend_id"): b for b in bodies.get("reserved", [])}
        spends = {r[0]: r for r in self.db.execute("SELECT id, rho, study_hash FROM spends")}
        for spend_id, entry in sorted(reserved.items(), key=lambda kv: str(kv[0])):
            row = spends.get(spend_id)
            if row is None:
                problems.append(f"spend {spend_id} was audited but is missing from the ledger")
            elif row[1] != entry.get("rho") or row[2] != entry.get("study_hash"):
                problems.append(f"spend {spend_id} differs from its audited reservation")
        for spend_id in sorted(set(spends) - set(reserved)):
            problems.append(f"spend {spend_id} has no audited reservation")
        released = {r[0] for r in self.db.execute("SELECT spend_id FROM releases")}
        audited = {b.get("spend_id") for b in bodies.get("released", [])}
        for spend_id in sorted(released - audited):
            problems.append(f"release of spend {spend_id} has no audit entry")
        return problems


def _body(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"unparseable": text}


def _entry_hash(prev: str, seq: int, ts: str, kind: str, body: str) -> str:
    material = json.dumps([prev, seq, ts, kind, body], separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()

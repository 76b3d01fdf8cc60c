"""The site's privacy ledger and audit log: one SQLite database (WAL) in the state dir,
anchored by signed checkpoints in a file outside it.

**Spending.** Spending is checked and reserved in one transaction before any data is
touched, and never refunded. A release leaves only after the transaction that caches it,
marks its spend released and appends its audit entry has committed. So a crash (SIGKILL
anywhere) can leave a reserved spend with no release (nothing out), never a release
without a charge, and spending never exceeds the budget. A reservation that did not
complete is reused by a retry of the same request instead of a second charge (see
:meth:`Ledger.reserve`). Amounts are exact fractions stored as text.

**The chain is the account.** The audit log is append-only and hash-chained: entry n
stores SHA-256(hash of n-1 || canonical JSON of entry n). Entry 1 (``genesis``) fixes the
period start; every ``reserved`` entry carries its request id, rho as an exact fraction,
its period number and the period's start. What has been spent is summed from the chain,
never from the ``spends`` table or ``meta`` (they are indexes, cross-checked against the
chain), so editing them refunds nothing and is reported by :meth:`Ledger.verify_audit`.
Each cached release body's SHA-256 is in the chain too.

**The anchor.** After every write the ledger signs a checkpoint of the chain head
(sequence number, hash, genesis hash, period, spent) with the site's Ed25519 key and
replaces the anchor file atomically (default: ``<state_dir>.anchor.json`` beside the state
dir; policy key ``anchor``). A budget reservation is anchored before the data is touched
and a release before it leaves. A ledger that was deleted, truncated, wiped, rolled back
to an older copy or edited, a signing key that is missing or other than the anchor's, or
an anchor that is missing or forged makes :class:`Ledger` raise :class:`LedgerError`
(the message names the file and the fix): the agent refuses to release rather than start
afresh. Only a truly fresh site (no ledger, no anchor, no key) is initialised.

**Unusable state.** A state dir that is not a directory or not writable, a ledger file
that is not a SQLite database or is damaged, a full disk: every such failure of SQLite
or the file system, at opening or in any later call, is a :class:`LedgerError` that says
which path, what is wrong and the fix (:meth:`Ledger._unusable`), never a bare
``sqlite3`` or ``OSError``.

**Concurrency.** Every write holds an exclusive ``flock`` on ``ledger.lock`` for its
SQLite transaction and the anchor update, so writers (threads or processes) are
serialised and the anchor never goes back. :meth:`Ledger.study_lock` serialises all
work on one study id, so concurrent identical requests are charged once: the second
waits and is answered from the cache.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import functools
import hashlib
import json
import os
import pwd
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.codes import ErrorCode
from site_agent import crypto

__all__ = [
    "ANCHOR_FORMAT",
    "SCHEMA_VERSION",
    "Budget",
    "HistoryRow",
    "Ledger",
    "LedgerError",
    "LedgerRefusal",
    "Reservation",
    "default_anchor",
]

SCHEMA_VERSION = 2
ANCHOR_FORMAT = "outcomebench.ledger-anchor"
LEDGER_FILE = "ledger.sqlite"
_GENESIS = "0" * 64
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE spends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL, study_id TEXT NOT NULL, study_hash TEXT NOT NULL,
    rho TEXT NOT NULL, period INTEGER NOT NULL, period_start TEXT NOT NULL,
    created TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('reserved', 'released')));
CREATE TABLE releases (
    study_id TEXT PRIMARY KEY, study_hash TEXT NOT NULL, spend_id INTEGER NOT NULL,
    body BLOB NOT NULL, sha256 TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY, study_id TEXT NOT NULL, study_hash TEXT NOT NULL,
    title TEXT NOT NULL, rho TEXT NOT NULL, study BLOB,
    approval TEXT CHECK (approval IS NULL OR approval IN ('pending', 'approved', 'denied')),
    state TEXT NOT NULL
        CHECK (state IN ('released', 'refused', 'pending', 'approved', 'denied')),
    code TEXT, sha256 TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL);
"""
_P = ParamSpec("_P")
_R = TypeVar("_R")
_TITLE_MAX = 200  # characters of a study title kept in the requests table
_FIELD = re.compile(r"^\s*-\s*([A-Za-z0-9_.\[\]-]{1,64}):", re.MULTILINE)


class LedgerRefusal(Exception):
    """The ledger refuses a request; ``code`` is the protocol error code."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class LedgerError(Exception):
    """The ledger, its anchor or the site's signing key is missing, unreadable or does not
    match: nothing may be released. The message names the file and the fix; it is for
    the site's operators only (over the wire: ``internal_error``)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    spend_id: int
    rho: Fraction
    request_id: str = ""
    reused: bool = False  # an earlier reservation of this request that never completed

    @property
    def charged(self) -> Fraction:
        """What this reservation added to the period's spending."""
        return Fraction(0) if self.reused else self.rho


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


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One request's outcome (or the privacy officer's decision), from the audit chain.

    ``cost`` is what this event added to the spending (a retry reusing an incomplete
    reservation costs 0; the reservation's cost is on the attempt that made it), so the
    costs of a period sum to its spending. ``sha256`` is what left the site, if anything.
    """

    seq: int
    when: str
    period: int  # the budget period (0 = the first) the event fell in
    request_id: str
    study_id: str
    title: str
    decision: str  # released | cached | refused | pending | approved | denied | interrupted
    code: str | None
    cost: Fraction
    sha256: str | None


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    ts: str
    kind: str
    text: str
    prev: str
    hash: str
    body: dict[str, Any] | None


@dataclass(slots=True)
class _Chain:
    entries: list[_Entry]
    problems: list[str] = field(default_factory=list)

    @property
    def head(self) -> tuple[int, str]:
        return (self.entries[-1].seq, self.entries[-1].hash) if self.entries else (0, _GENESIS)

    @property
    def genesis(self) -> dict[str, Any] | None:
        first = self.entries[0] if self.entries else None
        return first.body if first is not None and first.kind == "genesis" else None

    def of(self, *kinds: str) -> Iterator[tuple[_Entry, dict[str, Any]]]:
        for e in self.entries:
            if e.kind in kinds and e.body is not None:
                yield e, e.body

    def reservations(self) -> dict[Any, dict[str, Any]]:
        return {b.get("spend_id"): b for _, b in self.of("reserved")}

    def concluded(self) -> set[Any]:
        """Spends whose release committed (released, or discarded after a lost race)."""
        return {b.get("spend_id") for _, b in self.of("released", "discarded")}

    def spent(self, period: int, start: str, upto: int | None = None) -> Fraction:
        total = Fraction(0)
        for e, b in self.of("reserved"):
            if upto is not None and e.seq > upto:
                break
            if b.get("period") == period and b.get("period_start") == start:
                total += _fraction(b.get("rho"))
        return total


def default_anchor(state_dir: Path) -> Path:
    """``<state_dir>.anchor.json`` beside the state dir, so losing the state dir does not
    lose the anchor (the privacy officer backs both up)."""
    return state_dir.parent / f"{state_dir.name}.anchor.json"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fraction(value: Any) -> Fraction:
    try:
        return Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return Fraction(0)


def _canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _translated(
    method: Callable[Concatenate[Ledger, _P], _R],
) -> Callable[Concatenate[Ledger, _P], _R]:
    """A ledger call whose SQLite or file system failure is a LedgerError naming the
    path, what is wrong and the fix (:meth:`Ledger._unusable`)."""

    @functools.wraps(method)
    def call(self: Ledger, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from None

    return call


def _user() -> str:
    """The agent's OS user, as `chown` takes it."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class Ledger:
    """The ledger in ``state_dir``. Opening it initialises a fresh site or checks an
    existing one against its anchor; with ``check=False`` (``audit --verify``) a broken
    ledger opens so that :meth:`verify_audit` can list its problems."""

    def __init__(
        self,
        state_dir: Path,
        *,
        budget: Fraction,
        period_days: int,
        anchor: Path | None = None,
        clock: Callable[[], dt.datetime] = _now,
        check: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_FILE
        self.anchor_path = anchor if anchor is not None else default_anchor(state_dir)
        self.key_file = crypto.key_path(state_dir)
        self.budget = budget
        self.period_days = period_days
        self.clock = clock
        self._lock_depth = 0
        self._lock_fd = -1
        self._key: Ed25519PrivateKey | None = None
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():  # writers append and re-anchor under this lock
                self.db = self._open_or_init(check)
                problems = self._problems(self._chain(), deep=False) if check else []
                if not problems and check and self._anchor_seq() != self._chain().head[0]:
                    self._write_anchor()  # a crash between a commit and its checkpoint
        except (OSError, sqlite3.Error) as exc:
            self._abandon()
            raise self._unusable(exc) from None
        except BaseException:
            self._abandon()
            raise
        if problems:
            self.close()
            raise LedgerError(self._broken(problems))

    # -- opening: a fresh site, or an existing one that must match its anchor ---------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 120000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        return db

    def _has_ledger(self) -> bool:
        """A ledger file with our tables (an empty or truncated-to-zero file is none)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        db = sqlite3.connect(self.path, timeout=120)
        try:
            row = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            return bool(row[0])
        finally:
            db.close()

    def _open_or_init(self, check: bool) -> sqlite3.Connection:
        has_ledger, has_anchor = self._has_ledger(), self.anchor_path.exists()
        has_key = self.key_file.exists()
        if not has_ledger and not has_anchor and not has_key:
            return self._initialise()
        if not has_ledger:
            raise LedgerError(self._missing_ledger(has_anchor))
        db = self._connect()
        try:
            self._check_schema(db)
            if not has_anchor and self._only_genesis(db):
                # An interrupted first start (the anchor is written last): finish it.
                self.db = db
                self._key = self._load_key() if has_key else crypto.create_key(self.state_dir)
                self._write_anchor()
                return db
            if has_key:
                self._key = self._load_key()
            elif check:
                raise LedgerError(
                    f"{self.key_file}: the site's signing key is missing. Restore it from "
                    "backup into the state dir; a new key would match neither the ledger's "
                    f"anchor {self.anchor_path} nor the key the network registered"
                )
            if not has_anchor and check:
                raise LedgerError(
                    f"{self.anchor_path}: the ledger's anchor is missing, but {self.path} "
                    "holds a ledger. Restore the anchor from the privacy officer's backup "
                    "(or set `anchor:` in the privacy policy to where it is kept)"
                )
        except BaseException:
            db.close()
            raise
        return db

    def _missing_ledger(self, has_anchor: bool) -> str:
        if has_anchor:
            return (
                f"{self.path}: missing or empty, but the anchor {self.anchor_path} records "
                "a ledger. The agent will not start a new ledger over a budget already "
                f"spent: restore {LEDGER_FILE} (with its -wal file) from backup into "
                f"{self.state_dir}. To retire this site's history deliberately, move both "
                f"{self.state_dir} and {self.anchor_path} aside"
            )
        return (
            f"{self.path} and its anchor {self.anchor_path} are missing, but the site's "
            f"signing key {self.key_file} exists: the ledger was deleted. Restore both "
            "from backup. Only if this site never answered a study (an interrupted first "
            f"start), delete {self.key_file} to start afresh"
        )

    def _check_schema(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = "1" if row is None else str(row[0])
        if version != str(SCHEMA_VERSION):
            raise LedgerError(
                f"{self.path}: ledger schema {version}, this outcomebench needs schema "
                f"{SCHEMA_VERSION} (periods and cached releases bound in the audit chain, "
                "an anchor outside the database); there is no migration. Keep the old "
                f"state dir as the record of what was spent, move it aside (and lower the "
                "new budget by what it spent this period), then start the agent to create "
                "a new ledger, anchor and key (register the new public key with the network)"
            )

    @staticmethod
    def _only_genesis(db: sqlite3.Connection) -> bool:
        rows = db.execute("SELECT kind FROM audit ORDER BY seq LIMIT 2").fetchall()
        return [r[0] for r in rows] == ["genesis"]

    def _initialise(self) -> sqlite3.Connection:
        """A fresh site: the ledger with its genesis entry, then the key, then the anchor
        (so an interrupted start leaves a genesis-only ledger, which is finished above)."""
        self.db = db = self._connect()
        start = self.clock().date().isoformat()
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", str(SCHEMA_VERSION)),
                    ("period_start", start),
                    ("audit_seq", "0"),
                    ("audit_head", _GENESIS),
                ],
            )
            self._append(
                "genesis",
                {"schema": SCHEMA_VERSION, "period_start": start, "period_days": self.period_days},
            )
        self._key = crypto.create_key(self.state_dir)
        self._write_anchor()
        return db

    def _load_key(self) -> Ed25519PrivateKey:
        try:
            return crypto.load_key(self.state_dir)
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"{self.key_file}: the site's signing key cannot be read "
                f"({exc.__class__.__name__}); restore it from backup"
            ) from None

    def _broken(self, problems: list[str]) -> str:
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" * (len(problems) > 3))
        return (
            f"{self.path} does not match its audit chain or its anchor {self.anchor_path}: "
            f"{shown}. The ledger was edited, truncated or replaced by another copy; nothing "
            "is released until it is restored from the backup that matches the anchor "
            "(`outcomebench-site audit --verify` lists every problem)"
        )

    def _unusable(self, exc: OSError | sqlite3.Error) -> LedgerError:
        """What a failure of the file system or SQLite means for the site: the path, what
        is wrong with it, and the fix."""
        state, ledger, text = self.state_dir, self.path, str(exc)
        low = text.lower()
        code = exc.errno if isinstance(exc, OSError) else None
        where = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else state
        if isinstance(exc, NotADirectoryError) or (state.exists() and not state.is_dir()):
            return LedgerError(
                f"{state}: the privacy policy's state_dir is not a directory; move that file "
                "aside, or set state_dir to the directory that holds the site's ledger"
            )
        if ledger.is_dir():
            return LedgerError(
                f"{ledger}: is a directory, not the ledger database; move it aside and "
                f"restore {LEDGER_FILE} from backup"
            )
        if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "readonly" in low:
            user = _user()
            return LedgerError(
                f"{where}: permission denied: not writable by the agent's user {user} "
                f"({text}); the agent writes {state} and the anchor {self.anchor_path}. "
                f"Give {user} ownership of them (e.g. `chown -R {user} {state}`, "
                f"`chmod 700 {state}`), or run the agent as the user that owns them"
            )
        if code == errno.ENOSPC or "disk is full" in low:
            return LedgerError(f"{where}: the disk is full ({text}); free space on it")
        if isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in low or "malformed" in low or "corrupt" in low
        ):
            return LedgerError(
                f"{ledger}: not a SQLite database, or damaged ({text}); nothing is released "
                f"until {LEDGER_FILE} is restored (with its -wal file, if any) from the "
                f"backup that matches the anchor {self.anchor_path}"
            )
        if "locked" in low:
            return LedgerError(
                f"{ledger}: locked by another process for too long ({text}); check for a "
                "hung outcomebench-site process and stop it"
            )
        return LedgerError(
            f"{ledger}: cannot be used ({exc.__class__.__name__}: {text}); check that "
            f"{state} is a directory writable by the agent's user {_user()}, or restore "
            f"{LEDGER_FILE} from backup"
        )

    def close(self) -> None:
        self.db.close()
        self._close_lock()

    def _abandon(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        self._close_lock()

    def _close_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def signing_key(self) -> Ed25519PrivateKey:
        """The site's key, checked against the anchor when the ledger was opened."""
        if self._key is None:
            raise LedgerError(f"{self.key_file}: the site's signing key is missing")
        return self._key

    # -- locking and transactions ---------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The ledger-wide writer lock (re-entrant within this object)."""
        if self._lock_depth == 0:
            if self._lock_fd < 0:
                lock = self.state_dir / "ledger.lock"
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def study_lock(self, study_id: str) -> Iterator[None]:
        """Serialise everything done for one study id, across threads and processes.

        Each call opens its own file description, so threads of one process exclude each
        other too; the kernel drops the lock of a process that dies."""
        locks = self.state_dir / "locks"
        name = hashlib.sha256(study_id.encode()).hexdigest()[:32] + ".lock"
        try:
            locks.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(locks / name, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._unusable(exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise self._unusable(exc) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def _write(self) -> Iterator[_Chain]:
        """A write: lock, check the chain and the anchor, change, commit, re-anchor.

        Nothing is written to a ledger that does not verify (writing would re-sign the
        anchor over the damage)."""
        with self._locked():
            with self._tx():
                chain = self._chain()
                problems = self._problems(chain, deep=False)
                if problems:
                    raise LedgerError(self._broken(problems))
                yield chain
            self._write_anchor()

    # -- the chain ------------------------------------------------------------------

    def _meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return "" if row is None else str(row[0])

    def _chain(self) -> _Chain:
        rows = self.db.execute(
            "SELECT seq, ts, kind, body, prev, hash FROM audit ORDER BY rowid"
        ).fetchall()
        chain = _Chain([])
        prev, expected_seq = _GENESIS, 1
        for seq, ts, kind, text, stored_prev, stored in rows:
            if seq != expected_seq:
                chain.problems.append(
                    f"entry {seq}: expected sequence number {expected_seq} "
                    "(an entry was deleted or moved)"
                )
            if stored_prev != prev:
                chain.problems.append(f"entry {seq}: does not follow the previous entry's hash")
            if _entry_hash(stored_prev, seq, ts, kind, text) != stored:
                chain.problems.append(f"entry {seq}: content does not match its hash (edited)")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                chain.problems.append(f"entry {seq}: body is not a JSON object (edited)")
                parsed = None
            chain.entries.append(_Entry(seq, ts, kind, text, stored_prev, stored, parsed))
            prev, expected_seq = stored, seq + 1
        return chain

    def _append(self, kind: str, body: dict[str, Any]) -> None:
        seq = int(self._meta("audit_seq") or 0) + 1
        prev = self._meta("audit_head") or _GENESIS
        ts = self.clock().isoformat()
        text = _canonical(body)
        digest = _entry_hash(prev, seq, ts, kind, text)
        self.db.execute(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)", (seq, ts, kind, text, prev, digest)
        )
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'audit_seq'", (str(seq),))
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (digest,))

    # -- the anchor -----------------------------------------------------------------

    def _checkpoint(self, chain: _Chain) -> dict[str, Any]:
        seq, head = chain.head
        n, begin, _ = self._period(chain)
        return {
            "seq": seq,
            "hash": head,
            "genesis": chain.entries[0].hash if chain.entries else _GENESIS,
            "period": n,
            "period_start": begin.isoformat(),
            "spent": str(chain.spent(n, begin.isoformat())),
            "ts": self.clock().isoformat(),
        }

    def _write_anchor(self) -> None:
        """Sign the chain head and replace the anchor file atomically (write, fsync,
        rename, fsync the directory), under the writer lock so it only moves forward."""
        key = self.signing_key()
        checkpoint = self._checkpoint(self._chain())
        doc = {
            "format": ANCHOR_FORMAT,
            "version": 1,
            "ledger": str(self.path.resolve()),
            "checkpoint": checkpoint,
            "public_key": crypto.raw_public(key).hex(),
            "signature": crypto.sign_detached(key, _canonical(checkpoint).encode()).hex(),
        }
        target = self.anchor_path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read_anchor(self) -> tuple[dict[str, Any] | None, str | None]:
        """The anchor's verified checkpoint, or the problem with it."""
        where = self.anchor_path
        try:
            doc = json.loads(where.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, (
                f"the anchor {where} is missing: restore it from the privacy officer's backup"
            )
        except (OSError, ValueError) as exc:
            return None, f"the anchor {where} cannot be read ({exc.__class__.__name__})"
        cp = doc.get("checkpoint") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("format") != ANCHOR_FORMAT or not isinstance(
            cp, dict
        ):
            return None, f"the anchor {where} is not an {ANCHOR_FORMAT} file"
        if self._key is None:
            return None, (
                f"the anchor {where} cannot be checked: the signing key {self.key_file} "
                "is missing; restore it from backup"
            )
        public = crypto.raw_public(self._key)
        if str(doc.get("public_key", "")) != public.hex():
            return None, (
                f"the anchor {where} was signed by another key than {self.key_file}: the "
                "key or the anchor was replaced; restore the matching pair from backup"
            )
        try:
            signature = bytes.fromhex(str(doc.get("signature", "")))
        except ValueError:
            signature = b""
        if not crypto.verify_detached(public, signature, _canonical(cp).encode()):
            return None, f"the anchor {where}: its signature does not verify (edited)"
        return cp, None

    def _anchor_seq(self) -> int:
        cp, _ = self._read_anchor()
        return int(cp.get("seq", -1)) if cp is not None else -1

    def _anchor_problems(self, chain: _Chain) -> list[str]:
        cp, problem = self._read_anchor()
        if cp is None:
            return [problem or f"the anchor {self.anchor_path} is unusable"]
        where, problems = self.anchor_path, []
        seq = cp.get("seq")
        if not isinstance(seq, int) or seq < 1:
            return [f"the anchor {where}: no valid sequence number"]
        n = len(chain.entries)
        if n < seq:
            problems.append(
                f"the log ends at entry {n} but the anchor {where} signed entry {seq}: "
                "entries were removed from the end, or the ledger is an older copy"
            )
        elif chain.entries[seq - 1].hash != cp.get("hash"):
            problems.append(
                f"entry {seq} is not the one the anchor {where} signed: the ledger was "
                "replaced or rewritten"
            )
        elif chain.entries[0].hash != cp.get("genesis"):
            problems.append(f"the log's first entry is not the anchor's genesis ({where})")
        else:
            spent = chain.spent(cp.get("period", -1), str(cp.get("period_start")), upto=seq)
            if str(spent) != cp.get("spent"):
                problems.append(
                    f"the chain's spending {spent} in period {cp.get('period')} differs from "
                    f"the anchor's {cp.get('spent')} ({where})"
                )
        return problems

    # -- verification ---------------------------------------------------------------

    def _problems(self, chain: _Chain, *, deep: bool) -> list[str]:
        problems = list(chain.problems)
        head_seq, head = int(self._meta("audit_seq") or 0), self._meta("audit_head")
        n = len(chain.entries)
        if head_seq != n or head != chain.head[1]:
            problems.append(
                f"the log ends at entry {n} but the recorded head is entry "
                f"{head_seq} (entries were removed from the end)"
            )
        genesis = chain.genesis
        if genesis is None:
            problems.append("entry 1 is not the genesis entry (the log was cut or replaced)")
        elif genesis.get("period_start") != self._meta("period_start"):
            problems.append(
                f"meta.period_start {self._meta('period_start')!r} differs from the "
                f"genesis entry's {genesis.get('period_start')!r} (moved)"
            )
        # The spends table is an index of the chain's reservations: a deleted, lowered
        # or re-dated spend (a silent refund) shows here, though spending is summed from
        # the chain anyway.
        reserved = chain.reservations()
        concluded = chain.concluded()
        spends = {
            r[0]: r
            for r in self.db.execute(
                "SELECT id, request_id, study_hash, rho, period, period_start, state FROM spends"
            )
        }
        for spend_id, entry in sorted(reserved.items(), key=lambda kv: str(kv[0])):
            row = spends.get(spend_id)
            if row is None:
                problems.append(f"spend {spend_id} was audited but is missing from the ledger")
                continue
            audited = (
                entry.get("request_id"),
                entry.get("study_hash"),
                entry.get("rho"),
                entry.get("period"),
                entry.get("period_start"),
                "released" if spend_id in concluded else "reserved",
            )
            if tuple(row[1:]) != audited:
                problems.append(f"spend {spend_id} differs from its audited reservation")
        for spend_id in sorted(set(spends) - set(reserved)):
            problems.append(f"spend {spend_id} has no audited reservation")
        released = {b.get("study_id"): b for _, b in chain.of("released")}
        for study_id, study_hash, spend_id, digest, body in self.db.execute(
            "SELECT study_id, study_hash, spend_id, sha256, body FROM releases"
        ):
            audit_entry = released.get(study_id)
            if audit_entry is None or audit_entry.get("spend_id") != spend_id:
                problems.append(f"release of spend {spend_id} has no audit entry")
            elif audit_entry.get("sha256") != digest or audit_entry.get("study_hash") != study_hash:
                problems.append(
                    f"cached release of study {study_id!r} differs from its audit entry "
                    "(swapped)"
                )
            elif deep and hashlib.sha256(bytes(body)).hexdigest() != digest:
                problems.append(
                    f"cached release of study {study_id!r}: its body does not match the "
                    "SHA-256 in the audit log (swapped)"
                )
        problems += self._anchor_problems(chain)
        return problems

    def verify_audit(self) -> list[str]:
        """Every problem found in the database file (SQLite's quick_check), the chain, its
        cross-checks and the anchor (cached release bodies are re-hashed); empty when
        intact."""
        try:
            damage = [str(r[0]) for r in self.db.execute("PRAGMA quick_check(10)")]
            problems = (
                []
                if damage == ["ok"]
                else [
                    f"{self.path}: the database file is damaged (SQLite: "
                    f"{'; '.join(damage)}); restore it from backup"
                ]
            )
            return problems + self._problems(self._chain(), deep=True)
        except sqlite3.Error as exc:
            return [str(self._unusable(exc))]

    @_translated
    def audit_entries(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT seq, ts, kind, body, prev, hash FROM audit ORDER BY seq"
        ).fetchall()
        return [
            {"seq": r[0], "ts": r[1], "kind": r[2], "body": _body(r[3]), "prev": r[4], "hash": r[5]}
            for r in rows
        ]

    # -- budget ---------------------------------------------------------------------

    def _start(self, chain: _Chain) -> dt.date:
        genesis = chain.genesis
        return dt.date.fromisoformat(
            str(genesis.get("period_start")) if genesis else self._meta("period_start")
        )

    def _period_of(self, start: dt.date, day: dt.date) -> int:
        return max(0, (day - start).days // self.period_days)

    def _period(
        self, chain: _Chain | None = None, n: int | None = None
    ) -> tuple[int, dt.date, dt.date]:
        start = self._start(chain or self._chain())
        if n is None:
            n = self._period_of(start, self.clock().date())
        begin = start + dt.timedelta(days=n * self.period_days)
        return n, begin, begin + dt.timedelta(days=self.period_days - 1)

    @_translated
    def status(self, period: int | None = None) -> Budget:
        """The budget of ``period`` (default: the current one) and what it spent."""
        chain = self._chain()
        n, begin, end = self._period(chain, period)
        return Budget(
            period=n,
            period_start=begin,
            period_end=end,
            budget=self.budget,
            spent=chain.spent(n, begin.isoformat()),
        )

    def _reusable(self, chain: _Chain, request_id: str, rho: Fraction) -> dict[str, Any] | None:
        """A reservation of this request in this period that never completed."""
        n, begin, _ = self._period(chain)
        concluded = chain.concluded()
        for _, b in chain.of("reserved"):
            if (
                b.get("request_id") == request_id
                and b.get("spend_id") not in concluded
                and b.get("period") == n
                and b.get("period_start") == begin.isoformat()
                and _fraction(b.get("rho")) == rho
            ):
                return b
        return None

    @_translated
    def charge_for(self, request_id: str, rho: Fraction) -> Fraction:
        """What reserving ``rho`` for this request would add to the spending now."""
        return Fraction(0) if self._reusable(self._chain(), request_id, rho) else rho

    @_translated
    def cached(self, study_id: str) -> tuple[str, bytes] | None:
        """The cached release of ``study_id`` (its study hash and body). The body is
        checked against the SHA-256 in the audit chain: a swapped body is a LedgerError."""
        row = self.db.execute(
            "SELECT study_hash, body FROM releases WHERE study_id = ?", (study_id,)
        ).fetchone()
        if row is None:
            return None
        body = bytes(row[1])
        digest = hashlib.sha256(body).hexdigest()
        audited = [b.get("sha256") for _, b in self._chain().of("released")
                   if b.get("study_id") == study_id]
        if audited != [digest]:
            raise LedgerError(
                self._broken([f"cached release of study {study_id!r}: its body does not "
                              "match the SHA-256 in the audit log (swapped)"])
            )
        return str(row[0]), body

    @_translated
    def reserve(
        self, *, request_id: str, study_id: str, study_hash: str, rho: Fraction, cap: Fraction
    ) -> Reservation:
        """Check the cap and the period budget and reserve ``rho``, atomically.

        A reservation of the same request in the same period that never completed is
        reused instead of charging again. That is safe: a release leaves the site only
        after :meth:`complete` has committed, so nothing was released under it (its noise
        was drawn and thrown away, or never drawn), and the caller holds
        :meth:`study_lock`, so no other attempt is still working under it. A retried
        request therefore releases at most once for the one charge."""
        if rho <= 0:
            raise ValueError(f"a reservation must be positive, got {rho}")
        if rho > cap:
            raise LedgerRefusal(ErrorCode.OVER_STUDY_CAP, f"rho {rho} > per-study cap {cap}")
        with self._write() as chain:
            n, begin, _ = self._period(chain)
            # A spend's chain entry binds it to its request, exact rho and period.
            entry = {
                "request_id": request_id,
                "study_id": study_id,
                "study_hash": study_hash,
                "rho": str(rho),
                "period": n,
                "period_start": begin.isoformat(),
            }
            earlier = self._reusable(chain, request_id, rho)
            if earlier is not None:
                spend_id = int(earlier["spend_id"])
                self._append("reused", entry | {"spend_id": spend_id})
                return Reservation(spend_id=spend_id, rho=rho, request_id=request_id, reused=True)
            spent = chain.spent(n, begin.isoformat())
            if spent + rho > self.budget:
                raise LedgerRefusal(
                    ErrorCode.BUDGET_EXHAUSTED, f"spent {spent} + {rho} > budget {self.budget}"
                )
            cur = self.db.execute(
                "INSERT INTO spends (request_id, study_id, study_hash, rho, period, "
                "period_start, created, state) VALUES (?, ?, ?, ?, ?, ?, ?, 'reserved')",
                (
                    request_id,
                    study_id,
                    study_hash,
                    str(rho),
                    n,
                    begin.isoformat(),
                    self.clock().isoformat(),
                ),
            )
            spend_id = int(cur.lastrowid or 0)
            self._append("reserved", entry | {"spend_id": spend_id})
        return Reservation(spend_id=spend_id, rho=rho, request_id=request_id)

    @_translated
    def complete(
        self,
        res: Reservation,
        *,
        study_id: str,
        study_hash: str,
        body: bytes,
        title: str = "",
    ) -> bytes:
        """Cache the release and audit it; returns what may leave (the first cached
        release of this study if another process finished first)."""
        digest = hashlib.sha256(body).hexdigest()
        with self._write():
            row = self.db.execute(
                "SELECT study_hash, body FROM releases WHERE study_id = ?", (study_id,)
            ).fetchone()
            self.db.execute("UPDATE spends SET state = 'released' WHERE id = ?", (res.spend_id,))
            common = {
                "request_id": res.request_id,
                "study_id": study_id,
                "spend_id": res.spend_id,
                "charged": str(res.charged),
            }
            if row is not None:
                if str(row[0]) != study_hash:  # lost a race with a different study
                    raise LedgerRefusal(ErrorCode.STUDY_CONFLICT, "study id reused")
                kept = bytes(row[1])
                self._append(
                    "discarded",
                    common
                    | {
                        "sha256": hashlib.sha256(kept).hexdigest(),
                        "reason": "another process released it first",
                    },
                )
                return kept
            self.db.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                (study_id, study_hash, res.spend_id, body, digest, self.clock().isoformat()),
            )
            self._append("released", common | {"study_hash": study_hash, "sha256": digest})
            self._upsert_request(
                request_id=res.request_id,
                study_id=study_id,
                study_hash=study_hash,
                title=title,
                rho=res.rho,
                state="released",
                sha256=digest,
            )
        return body

    # -- requests: every one recorded, approvals ------------------------------------

    def _upsert_request(
        self,
        *,
        request_id: str,
        study_id: str,
        study_hash: str,
        title: str,
        rho: Fraction,
        state: str,
        code: str | None = None,
        sha256: str | None = None,
        approval: str | None = None,
        study: bytes | None = None,
    ) -> None:
        if not request_id:
            return
        now = self.clock().isoformat()
        self.db.execute(
            "INSERT INTO requests (request_id, study_id, study_hash, title, rho, study, "
            "approval, state, code, sha256, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (request_id) DO UPDATE SET state = excluded.state, "
            "code = excluded.code, sha256 = coalesce(excluded.sha256, sha256), "
            "rho = excluded.rho, approval = coalesce(excluded.approval, approval), "
            "study = coalesce(excluded.study, study), updated = excluded.updated",
            (
                request_id,
                study_id,
                study_hash,
                title[:_TITLE_MAX],
                str(rho),
                study,
                approval,
                state,
                code,
                sha256,
                now,
                now,
            ),
        )

    @_translated
    def record(
        self,
        kind: str,
        *,
        request_id: str,
        study_id: str,
        study_hash: str,
        title: str = "",
        rho: Fraction = Fraction(0),
        code: str | None = None,
        sha256: str | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        """Audit a request's outcome (``cached`` or ``refused``) and record it in
        ``requests``, in one transaction. A refusal after a reservation says what that
        attempt charged (the reservation stays: nothing is refunded)."""
        if kind not in ("cached", "refused"):
            raise ValueError(f"not a request outcome: {kind}")
        body: dict[str, Any] = {
            "request_id": request_id,
            "study_id": study_id,
            "study_hash": study_hash,
        }
        if code is not None:
            body["code"] = code
        if sha256 is not None:
            body["sha256"] = sha256
        if reservation is not None:
            body |= {"spend_id": reservation.spend_id, "charged": str(reservation.charged)}
        with self._write():
            self._append(kind, body)
            if kind == "refused":
                self._upsert_request(
                    request_id=request_id,
                    study_id=study_id,
                    study_hash=study_hash,
                    title=title,
                    rho=rho,
                    state="refused",
                    code=code,
                )

    @_translated
    def audit(self, kind: str, body: dict[str, Any]) -> None:
        """Append a free-form entry (e.g. an operator's note). The kinds that carry the
        account (genesis, reserved, reused, released, discarded) are written only by the
        ledger itself."""
        if kind in ("genesis", "reserved", "reused", "released", "discarded"):
            raise ValueError(f"audit kind {kind!r} is written only by the ledger")
        with self._write():
            self._append(kind, body)

    @_translated
    def record_malformed(self, *, channel: str, size: int, sha256: str, detail: str) -> None:
        """Audit a study that failed to parse: its size, its SHA-256 and the names of the
        fields at fault (bounded; never the raw text)."""
        fields = sorted(set(_FIELD.findall(detail)))[:10]
        with self._write():
            self._append(
                "refused",
                {
                    "code": str(ErrorCode.MALFORMED_STUDY),
                    "channel": channel[:32],
                    "bytes": size,
                    "sha256": sha256,
                    "fields": fields,
                },
            )

    @_translated
    def request_state(self, request_id: str) -> str | None:
        """The privacy officer's decision on a request: pending, approved, denied, or None."""
        row = self.db.execute(
            "SELECT approval FROM requests WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    @_translated
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
        with self._write():
            self._upsert_request(
                request_id=request_id,
                study_id=study_id,
                study_hash=study_hash,
                title=title,
                rho=rho,
                state="pending",
                code=str(ErrorCode.PENDING_APPROVAL),
                approval="pending",
                study=study,
            )
            self._append(
                "pending",
                {
                    "request_id": request_id,
                    "study_id": study_id,
                    "study_hash": study_hash,
                    "rho": str(rho),
                },
            )

    @_translated
    def decide(self, request_id: str, approve: bool) -> dict[str, Any]:
        with self._write():
            row = self.db.execute(
                "SELECT study_id, coalesce(approval, state) FROM requests WHERE request_id = ?",
                (request_id,),
            ).fetchone()
            if row is None:
                raise KeyError(request_id)
            state = "approved" if approve else "denied"
            self.db.execute(
                "UPDATE requests SET approval = ?, state = ?, code = NULL, updated = ? "
                "WHERE request_id = ?",
                (state, state, self.clock().isoformat(), request_id),
            )
            self._append(state, {"request_id": request_id, "study_id": row[0], "previous": row[1]})
        return {"request_id": request_id, "study_id": row[0], "state": state}

    @_translated
    def requests(self) -> list[dict[str, Any]]:
        """Every request (one row per request id, its latest state)."""
        rows = self.db.execute(
            "SELECT request_id, study_id, title, rho, state, approval, code, sha256, created, "
            "updated FROM requests ORDER BY created, request_id"
        )
        keys = (
            "request_id",
            "study_id",
            "title",
            "rho",
            "state",
            "approval",
            "code",
            "sha256",
            "created",
            "updated",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    @_translated
    def history(self) -> list[HistoryRow]:
        """Every request's outcome and every approval decision, oldest first, from the
        audit chain (so it is as tamper-evident as the chain), with the study's title."""
        titles = dict(self.db.execute("SELECT request_id, title FROM requests").fetchall())
        chain = self._chain()
        start = self._start(chain)
        reserved = chain.reservations()
        charged_by_outcome = {  # reservations whose cost is on their attempt's outcome
            b.get("spend_id")
            for _, b in chain.of("released", "refused", "discarded")
            if _fraction(b.get("charged", 0)) > 0
        }
        rows: list[HistoryRow] = []
        for e, b in chain.of(
            "released", "cached", "discarded", "refused", "pending", "approved", "denied",
            "reserved",
        ):
            rid = str(b.get("request_id", ""))
            if e.kind == "reserved":
                if b.get("spend_id") in charged_by_outcome:
                    continue
                # No outcome for the attempt that reserved it: still running, or killed.
                decision, cost = "interrupted", _fraction(b.get("rho"))
            else:
                decision = {"discarded": "cached"}.get(e.kind, e.kind)
                cost = _fraction(b.get("charged", 0))
            # A cost belongs to the period of its reservation, even if the outcome was
            # written after midnight of the period's last day.
            reservation = reserved.get(b.get("spend_id"))
            if reservation is not None and isinstance(reservation.get("period"), int):
                period = int(reservation["period"])
            else:
                period = self._period_of(start, dt.datetime.fromisoformat(e.ts).date())
            code = b.get("code")
            if code == str(ErrorCode.PENDING_APPROVAL):
                decision = "pending"
            rows.append(
                HistoryRow(
                    seq=e.seq,
                    when=e.ts,
                    period=period,
                    request_id=rid,
                    study_id=str(b.get("study_id", "")),
                    title=str(titles.get(rid, "")),
                    decision=decision,
                    code=None if code is None else str(code),
                    cost=cost,
                    sha256=b.get("sha256") if e.kind in ("released", "cached", "discarded")
                    else None,
                )
            )
        return rows


def _body(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"unparseable": text}


def _entry_hash(prev: str, seq: int, ts: str, kind: str, body: str) -> str:
    material = json.dumps([prev, seq, ts, kind, body], separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()

"""Intake of the clinic's outcome export: read, validate every row, quarantine the bad ones.

The export is long format, one row per administered measure (CSV or Parquet). Each row is
checked (client id, instrument, score, session, date); rows that fail go to the
quarantine report with the file, line, field, value, reason and how to fix it, and are
left out. Then rows are grouped into episodes (an episode column, or a gap in dates) and
checked together: duplicate sessions and dates out of session order are quarantined too.

Everything is vectorised (pyarrow compute and numpy); no per-row Python runs on valid
data, so ten million rows fit on a small machine. Line numbers are the file's physical
lines (header = line 1) for CSV, and 1-based row numbers for Parquet.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from protocols import Instrument
from protocols.spec import did_you_mean
from site_agent.config import DataSource
from site_agent.errors import DataError

__all__ = ["QUARANTINE_COLUMNS", "Intake", "Records", "read_intake"]

QUARANTINE_COLUMNS = ("file", "line", "field", "value", "reason", "fix")
_NO_DATE = np.iinfo(np.int32).min
_INT_RE = r"^[+-]?[0-9]+(\.0*)?$"
_NUMBER_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"

Int = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


_G = TypeVar("_G", bound=np.generic)


def _frozen(a: npt.NDArray[_G]) -> npt.NDArray[_G]:
    a.flags.writeable = False
    return a


@dataclass(frozen=True, slots=True, kw_only=True)
class Records:
    """Valid scores, sorted by episode then session; arrays are read-only.

    ``episode`` numbers episodes 0..n_episodes-1 in sorted order; each episode belongs to
    one client and one instrument. ``date`` is days since 1970-01-01, or INT32_MIN where
    the export has no dates.
    """

    instrument_ids: tuple[str, ...]
    client_ids: tuple[str, ...]
    instrument: npt.NDArray[np.int16]  # index into instrument_ids
    client: npt.NDArray[np.int32]  # index into client_ids
    episode: npt.NDArray[np.int64]
    session: npt.NDArray[np.int32]
    score: npt.NDArray[np.int32]
    date: npt.NDArray[np.int32]
    line: npt.NDArray[np.int64]  # source line, to trace any figure back to the export

    @property
    def n_rows(self) -> int:
        return int(self.score.shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self.episode[-1]) + 1 if self.n_rows else 0

    @property
    def has_dates(self) -> bool:
        return bool(self.n_rows) and bool(self.date[0] != _NO_DATE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Intake:
    """What intake produced: the valid records and the quarantine report."""

    path: Path
    rows_read: int
    records: Records
    quarantine: pd.DataFrame  # columns QUARANTINE_COLUMNS, one row per problem
    reasons: Mapping[str, int] = field(default_factory=dict)  # problems by reason

    @property
    def rows_quarantined(self) -> int:
        return int(self.quarantine["line"].nunique()) if len(self.quarantine) else 0


class _Problems:
    """Collects quarantine entries column-wise, vectorised per rule."""

    def __init__(self, file: str, lines: Int) -> None:
        self.file = file
        self.lines = lines
        self.parts: list[pd.DataFrame] = []
        self.bad = np.zeros(lines.shape[0], dtype=bool)

    def add(self, mask: Bool, fld: str, raw: pa.Array | None, reason: str, fix: str) -> None:
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        self.bad[idx] = True
        if raw is None:
            values: list[str] = [""] * idx.size
        else:
            values = ["" if v is None else str(v) for v in raw.take(pa.array(idx)).to_pylist()]
        self.parts.append(
            pd.DataFrame(
                {
                    "file": self.file,
                    "line": self.lines[idx],
                    "field": fld,
                    "value": values,
                    "reason": reason,
                    "fix": fix,
                }
            )
        )

    def frame(self) -> pd.DataFrame:
        if not self.parts:
            return pd.DataFrame(
                {c: pd.Series(dtype="int64" if c == "line" else "str") for c in QUARANTINE_COLUMNS}
            )
        out = pd.concat(self.parts, ignore_index=True)
        return out.sort_values(["line", "field"], kind="stable", ignore_index=True)


def _read_table(src: DataSource) -> tuple[pa.Table, Int, list[tuple[int, str]]]:
    """The mapped columns as a table, the source line of each row, and unparseable lines."""
    wanted = src.columns.mapped()
    path = src.path
    if not path.is_file():
        raise DataError(str(path), "no such file; check data.path in site.yaml")
    try:
        if src.format == "parquet":
            schema = pq.read_schema(path)
            _check_columns(path, list(schema.names), wanted)
            table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
            return table, np.arange(1, table.num_rows + 1, dtype=np.int64), []
        with path.open("rb") as fh:
            header = fh.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
        names = next(csv.reader([header]), [])
        _check_columns(path, names, wanted)
        table, ragged = _read_csv(path, list(dict.fromkeys(wanted.values())), threads=True)
        if not ragged:
            return table, np.arange(2, table.num_rows + 2, dtype=np.int64), []
        # Rare: some lines have the wrong number of fields. Only a sequential read knows
        # their line numbers, which the lines of every other row depend on.
        table, ragged = _read_csv(path, list(dict.fromkeys(wanted.values())), threads=False)
        skipped = np.array(sorted(n for n, _ in ragged), dtype=np.int64)
        all_lines = np.arange(2, table.num_rows + len(skipped) + 2, dtype=np.int64)
        return table, np.setdiff1d(all_lines, skipped, assume_unique=True), ragged
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataError(
            str(path),
            f"cannot read the file as {src.format} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200]}); export it again as UTF-8 "
            f"{'CSV with a header line' if src.format == 'csv' else 'Parquet'}",
        ) from None


def _read_csv(
    path: Path, columns: list[str], *, threads: bool
) -> tuple[pa.Table, list[tuple[int, str]]]:
    ragged: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        ragged.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=threads, block_size=1 << 24),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=False),
        # Everything as text: ids keep their leading zeros, and a bad value is reported
        # as written instead of becoming a silent null.
        convert_options=pacsv.ConvertOptions(
            include_columns=columns,
            column_types=dict.fromkeys(columns, pa.string()),
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    return table, ragged


def _check_columns(path: Path, names: list[str], wanted: Mapping[str, str]) -> None:
    missing = [
        f"{fld} -> {col!r}{did_you_mean(col, names)}"
        for fld, col in wanted.items()
        if col not in names
    ]
    if missing:
        raise DataError(
            str(path),
            f"columns named in data.columns are not in the file: {'; '.join(missing)}. "
            f"The file has: {', '.join(names)}. Fix data.columns in site.yaml.",
        )


def _text(col: pa.ChunkedArray) -> pa.Array:
    """A column as trimmed text (Parquet columns may be typed), nulls as empty strings."""
    arr = col.combine_chunks()
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return pc.fill_null(pc.utf8_trim_whitespace(arr), "")


def _integers(col: pa.ChunkedArray) -> tuple[Int, Bool, Bool, pa.Array]:
    """(values, missing, not_integer, raw text) for a column that should hold integers."""
    arr = col.combine_chunks()
    if pa.types.is_integer(arr.type):
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        values = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return values, missing, np.zeros_like(missing), arr
    if pa.types.is_floating(arr.type):
        f = pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False)
        missing = np.isnan(f)
        not_int = ~missing & ((f != np.round(f)) | ~np.isfinite(f) | (np.abs(f) > 2**31))
        values = np.where(missing | not_int, 0, f).astype(np.int64)
        return values, missing, not_int, arr
    text = _text(col)
    missing = pc.equal(text, "").to_numpy(zero_copy_only=False)
    is_int = pc.match_substring_regex(text, _INT_RE).to_numpy(zero_copy_only=False)
    digits = pc.utf8_length(text).to_numpy(zero_copy_only=False) <= 12
    ok = is_int & digits
    not_int = ~missing & ~ok
    if ok.all():
        values = pc.cast(pc.replace_substring_regex(text, r"\.0*$", ""), pa.int64())
    else:
        cleaned = pc.if_else(pa.array(ok), text, pa.scalar("0"))
        values = pc.cast(pc.replace_substring_regex(cleaned, r"\.0*$", ""), pa.int64())
    return values.to_numpy(zero_copy_only=False).astype(np.int64), missing, not_int, text


def _dates(col: pa.ChunkedArray, fmt: str) -> tuple[Int, Bool, Bool, pa.Array]:
    """(days since epoch, missing, unparseable, raw text)."""
    arr = col.combine_chunks()
    if pa.types.is_date(arr.type) or pa.types.is_timestamp(arr.type):
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        days = pc.cast(pc.cast(arr, pa.date32()), pa.int32())
        values = pc.fill_null(days, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return values, missing, np.zeros_like(missing), arr
    text = _text(col)
    missing = pc.equal(text, "").to_numpy(zero_copy_only=False)
    # Exports repeat few distinct dates, so parse each distinct text once. strptime
    # rolls impossible dates over (2026-02-31 -> 2026-03-03): a date is valid only if
    # it prints back as written (leading zeros aside).
    enc = pc.dictionary_encode(text)
    distinct = enc.dictionary
    parsed = pc.strptime(distinct, format=fmt, unit="s", error_is_null=True)
    back = pc.strftime(parsed, format=fmt)
    same = pc.equal(_strip_zeros(back), _strip_zeros(distinct))
    parsed = pc.if_else(pc.fill_null(same, False), parsed, pa.nulls(len(parsed), parsed.type))
    days = pc.cast(pc.cast(parsed, pa.date32()), pa.int32()).take(enc.indices)
    bad = days.is_null().to_numpy(zero_copy_only=False) & ~missing
    values = pc.fill_null(days, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, missing, bad, text


def _strip_zeros(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(text, r"(^|[^0-9])0+([0-9])", r"\1\2")


def _encode(text: pa.Array) -> tuple[npt.NDArray[np.int32], list[str]]:
    enc = pc.dictionary_encode(text)
    return (
        enc.indices.to_numpy(zero_copy_only=False).astype(np.int32),
        [str(v) for v in enc.dictionary.to_pylist()],
    )


def read_intake(src: DataSource, instruments: Mapping[str, Instrument]) -> Intake:
    """Read and validate the export. Raises :class:`DataError` only when the file as a
    whole cannot be read; every row-level problem goes to the quarantine report."""
    table, lines, ragged = _read_table(src)
    cols = src.columns
    n = table.num_rows
    file = src.path.name
    q = _Problems(file, lines)
    if ragged:
        q.parts.append(
            pd.DataFrame(
                {
                    "file": file,
                    "line": [ln for ln, _ in ragged],
                    "field": "(row)",
                    "value": [text[:200] for _, text in ragged],
                    "reason": "wrong number of fields",
                    "fix": "quote values that contain the delimiter, or remove the stray delimiter",
                }
            )
        )

    client_text = _text(table.column(cols.client_id))
    q.add(
        pc.equal(client_text, "").to_numpy(zero_copy_only=False),
        "client_id",
        None,
        "missing client id",
        f"fill in column '{cols.client_id}'",
    )

    # Instruments: a constant, or a column mapped to known instrument ids.
    if cols.instrument is None:
        ins_ids: list[str] = [str(src.instrument)]
        ins_code = np.zeros(n, dtype=np.int16)
    else:
        codes, names = _encode(_text(table.column(cols.instrument)))
        known = [nm for nm in names if nm in instruments]
        remap = np.array(
            [known.index(nm) if nm in instruments else -1 for nm in names] or [-1], dtype=np.int16
        )
        ins_code = remap[codes] if n else np.zeros(0, dtype=np.int16)
        ins_ids = known
        raw_ins = table.column(cols.instrument).combine_chunks()
        for code, nm in enumerate(names):
            if nm in instruments:
                continue
            mask = codes == code
            q.add(
                mask,
                "instrument",
                raw_ins,
                "missing instrument" if nm == "" else f"unknown instrument {nm!r}",
                f"use a registry id{did_you_mean(nm, instruments)} or define {nm!r} under "
                "`instruments:` in site.yaml"
                if nm
                else f"fill in column '{cols.instrument}'",
            )
    ins_ok = ins_code >= 0

    score, s_missing, s_notint, s_raw = _integers(table.column(cols.score))
    q.add(
        s_missing,
        "score",
        s_raw,
        "missing score",
        f"fill in column '{cols.score}' or delete the row",
    )
    q.add(
        s_notint,
        "score",
        s_raw,
        "score is not a whole number",
        "scores are instrument totals in whole points; correct the value",
    )
    if ins_ids:
        lo = np.array([instruments[i].lo for i in ins_ids], dtype=np.int64)
        hi = np.array([instruments[i].hi for i in ins_ids], dtype=np.int64)
        safe = np.where(ins_ok, ins_code, 0)
        out_of_range = ins_ok & ~s_missing & ~s_notint & ((score < lo[safe]) | (score > hi[safe]))
        for code, ins_id in enumerate(ins_ids):
            ins = instruments[ins_id]
            q.add(
                out_of_range & (ins_code == code),
                "score",
                s_raw,
                f"score out of the {ins_id} range {ins.lo}-{ins.hi}",
                f"correct the value; {ins_id} totals run from {ins.lo} to {ins.hi}",
            )

    if cols.session is not None:
        session, ss_missing, ss_notint, ss_raw = _integers(table.column(cols.session))
        q.add(
            ss_missing,
            "session",
            ss_raw,
            "missing session number",
            f"fill in column '{cols.session}'",
        )
        q.add(
            ss_notint | (~ss_missing & ~ss_notint & ((session < 1) | (session > 10_000))),
            "session",
            ss_raw,
            "session number is not a whole number from 1",
            "session numbers count attended sessions: 1, 2, 3, ...",
        )
    else:
        session = np.zeros(n, dtype=np.int64)

    if cols.date is not None:
        date, d_missing, d_bad, d_raw = _dates(table.column(cols.date), src.date_format)
        q.add(d_missing, "date", d_raw, "missing date", f"fill in column '{cols.date}'")
        q.add(
            d_bad,
            "date",
            d_raw,
            f"date does not match the format {src.date_format!r}",
            "correct the date, or set data.date_format in site.yaml (e.g. '%d/%m/%Y')",
        )
    else:
        date = np.full(n, _NO_DATE, dtype=np.int64)

    if cols.episode_id is not None:
        ep_text = _text(table.column(cols.episode_id))
        q.add(
            pc.equal(ep_text, "").to_numpy(zero_copy_only=False),
            "episode_id",
            None,
            "missing episode id",
            f"fill in column '{cols.episode_id}'",
        )
        ep_code, _ = _encode(ep_text)
    else:
        ep_code = np.zeros(n, dtype=np.int32)

    client_code, client_ids = _encode(client_text)
    keep = ~q.bad
    idx = np.flatnonzero(keep)
    records = _group(
        ins_ids=tuple(ins_ids),
        client_ids=tuple(client_ids),
        idx=idx,
        ins=ins_code[idx].astype(np.int64),
        client=client_code[idx].astype(np.int64),
        ep=ep_code[idx].astype(np.int64),
        session=session[idx],
        score=score[idx],
        date=date[idx],
        src=src,
        q=q,
        lines=lines,
        raw=(
            table.column(cols.session).combine_chunks() if cols.session else None,
            table.column(cols.date).combine_chunks() if cols.date else None,
        ),
    )
    quarantine = q.frame()
    reasons = quarantine["reason"].value_counts().to_dict() if len(quarantine) else {}
    return Intake(
        path=src.path,
        rows_read=n + len(ragged),
        records=records,
        quarantine=quarantine,
        reasons={str(k): int(v) for k, v in reasons.items()},
    )


def _group(
    *,
    ins_ids: tuple[str, ...],
    client_ids: tuple[str, ...],
    idx: Int,
    ins: Int,
    client: Int,
    ep: Int,
    session: Int,
    score: Int,
    date: Int,
    src: DataSource,
    q: _Problems,
    lines: Int,
    raw: tuple[pa.Array | None, pa.Array | None],
) -> Records:
    """Sort valid rows into episodes; quarantine duplicate sessions and out-of-order dates."""
    cols = src.columns
    by_gap = cols.episode_id is None and cols.date is not None
    # First order: within a client and instrument, by episode id, or by date when
    # episodes come from gaps in dates.
    order = (
        np.lexsort((session, date, ep, client, ins))
        if by_gap
        else np.lexsort((date, session, ep, client, ins))
    )
    ins, client, ep, session, score, date, idx = (
        a[order] for a in (ins, client, ep, session, score, date, idx)
    )
    new = np.ones(idx.size, dtype=bool)
    if idx.size:
        new[1:] = (np.diff(ins) != 0) | (np.diff(client) != 0) | (np.diff(ep) != 0)
        if by_gap:
            new[1:] |= np.diff(date) > src.episode_gap_days
    episode = np.cumsum(new) - 1
    if cols.session is None:
        # Session numbers from the order of distinct dates within the episode; two
        # scores on one day share a session number and are caught as duplicates below.
        new_day = new.copy()
        new_day[1:] |= date[1:] != date[:-1]
        day_rank = np.cumsum(new_day)
        session = day_rank - day_rank[np.flatnonzero(new)][episode] + 1
    # Second order: by session within each episode.
    order = np.lexsort((date, session, episode))
    ins, client, episode, session, score, date, idx = (
        a[order] for a in (ins, client, episode, session, score, date, idx)
    )

    bad = np.zeros(idx.size, dtype=bool)
    if idx.size:
        same_ep = np.zeros(idx.size, dtype=bool)
        same_ep[1:] = episode[1:] == episode[:-1]
        key_same = same_ep.copy()
        key_same[1:] &= session[1:] == session[:-1]
        # Runs of rows sharing an episode and session.
        run = np.cumsum(~key_same) - 1
        size = np.bincount(run)
        in_dup = size[run] > 1
        if in_dup.any():
            starts = np.flatnonzero(~key_same)
            smin = np.minimum.reduceat(score, starts)[run]
            smax = np.maximum.reduceat(score, starts)[run]
            dmin = np.minimum.reduceat(date, starts)[run]
            dmax = np.maximum.reduceat(date, starts)[run]
            exact = in_dup & (smin == smax) & (dmin == dmax)
            extra_copy = exact & key_same
            conflicting = in_dup & ~exact
            what = "date" if cols.session is None else "session"
            _flag(
                q,
                idx,
                extra_copy,
                what,
                raw,
                "exact duplicate of an earlier row",
                "none needed: the first copy is used; remove repeated rows from the export",
            )
            _flag(
                q,
                idx,
                conflicting,
                what,
                raw,
                f"duplicate {what} with conflicting scores",
                f"keep one row per client, episode and {what}; all copies were left out",
            )
            bad |= extra_copy | conflicting
        if cols.session is not None and cols.date is not None:
            # A later session dated before an earlier one of the same episode.
            rel = date - date.min()
            combined = episode * (int(rel.max()) + 1) + rel
            prior_max = np.maximum.accumulate(combined)
            out_of_order = np.zeros(idx.size, dtype=bool)
            out_of_order[1:] = same_ep[1:] & (combined[1:] < prior_max[:-1]) & ~bad[1:]
            _flag(
                q,
                idx,
                out_of_order,
                "date",
                raw,
                "dated before an earlier session of the same episode",
                "correct the date or the session number",
            )
            bad |= out_of_order

    keep = ~bad
    ins, client, episode, session, score, date, idx = (
        a[keep] for a in (ins, client, episode, session, score, date, idx)
    )
    if idx.size:  # renumber episodes 0..E-1 after removals
        start = np.ones(idx.size, dtype=bool)
        start[1:] = episode[1:] != episode[:-1]
        episode = np.cumsum(start) - 1
    if cols.date is None:
        date = np.full(idx.size, _NO_DATE, dtype=np.int64)
    return Records(
        instrument_ids=ins_ids,
        client_ids=client_ids,
        instrument=_frozen(ins.astype(np.int16)),
        client=_frozen(client.astype(np.int32)),
        episode=_frozen(episode.astype(np.int64)),
        session=_frozen(session.astype(np.int32)),
        score=_frozen(score.astype(np.int32)),
        date=_frozen(date.astype(np.int32)),
        line=_frozen(lines[idx]),
    )


def _flag(
    q: _Problems,
    idx: Int,
    mask: Bool,
    fld: str,
    raw: tuple[pa.Array | None, pa.Array | None],
    reason: str,
    fix: str,
) -> None:
    rows = idx[mask]
    if rows.size == 0:
        return
    full = np.zeros(q.bad.shape[0], dtype=bool)
    full[rows] = True
    q.add(full, fld, raw[0] if fld == "session" else raw[1], reason, fix)

"""Intake of the clinic's outcome export: read, validate every row, quarantine the bad ones.

The export is long format, one row per administered measure (CSV or Parquet). Each row is
checked (client id, instrument, score, session, date); rows that fail go to the
quarantine report with the file, line, field, value, reason and how to fix it, and are
left out. Then rows are grouped into episodes (an episode column, or a gap in dates) and
checked together: duplicate sessions and dates out of session order are quarantined too.

Everything is vectorised (pyarrow compute and numpy); no per-row Python runs on valid
data, so ten million rows fit on a small machine. Text columns are checked and converted
once per distinct value, not once per row: an export repeats a few dozen scores and
session numbers and a few hundred dates millions of times. Exports usually come sorted
by client and session, so sorting is skipped when the rows are already in order. Line
numbers are the file's physical lines (header = line 1) for CSV, and 1-based row numbers
for Parquet.

What refuses the whole file and what goes to the quarantine (the rule the release engine
relies on: a refusal must never depend on the clinic's client records, because it would
tell the coordinator something about them without noise):

- The file's *structure* refuses it with :class:`DataError`: it is missing or unreadable,
  it is not in its format (Parquet bytes behind a ``.csv`` name, or the reverse), a column
  named in ``data.columns`` is not in the header or schema, or a Parquet column has a type
  that cannot hold its field (binary, bool, list, struct ... ids, scores, sessions or
  dates). These are properties of the export's format, the same for a data set and its
  neighbour with one client more or less. :func:`check_export` checks exactly these, reads
  no records, and is what the release engine calls before it reserves budget.
- Everything about *values* is per row: a value that is missing, cannot be parsed, or is
  out of range quarantines its row, never the file. Parquet types that pandas picks from
  the values themselves are accepted for that reason: an integer column becomes float
  when one value is missing, and a column whose values are all missing has type null.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = [
    "QUARANTINE_COLUMNS",
    "QUARANTINE_WARNING_SHARE",
    "Intake",
    "IntakeCounts",
    "Records",
    "check_export",
    "default_quarantine_report",
    "read_intake",
]

QUARANTINE_COLUMNS = ("file", "line", "field", "value", "reason", "fix")
# From this share of quarantined rows on, the commands that use the data warn the operator
# (locally: the warning never leaves the site and changes nothing that does).
QUARANTINE_WARNING_SHARE = 0.10
_NO_DATE = np.iinfo(np.int32).min
_INT_RE = r"^-?[0-9]+(\.0*)?$"  # no "+": pyarrow's cast rejects it
_NUMBER_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_INT64_MAX = int(np.iinfo(np.int64).max)
# Dates are valid from 0001-01-01 to 9999-12-31 (days since 1970-01-01); the sentinel
# _NO_DATE lies outside, so no value in a file can pose as "no date".
_DAY_MIN, _DAY_MAX = -719_162, 2_932_896
_PARQUET_MAGIC = b"PAR1"

Int = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]
Code = npt.NDArray[np.int32]
Num = npt.NDArray[np.signedinteger[Any]]  # int32 or int64


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

    @property
    def counts(self) -> IntakeCounts:
        return IntakeCounts(
            path=self.path, rows_read=self.rows_read, rows_quarantined=self.rows_quarantined
        )


def default_quarantine_report(config: Path) -> Path:
    """Where ``check`` writes the quarantine report unless told otherwise."""
    return config.parent / "quarantine.csv"


@dataclass(frozen=True, slots=True, kw_only=True)
class IntakeCounts:
    """How many rows intake read and quarantined: all a local warning needs (no records)."""

    path: Path
    rows_read: int
    rows_quarantined: int

    @property
    def share(self) -> float:
        return self.rows_quarantined / self.rows_read if self.rows_read else 0.0

    def warning(self, config: Path) -> str | None:
        """The operator's warning when at least QUARANTINE_WARNING_SHARE of the rows were
        quarantined (None below it), naming the command that lists the fixes."""
        if self.rows_read == 0 or self.share < QUARANTINE_WARNING_SHARE:
            return None
        return (
            f"{self.rows_quarantined:,} of {self.rows_read:,} rows of {self.path} "
            f"({self.share:.0%}) are quarantined and left out of what is computed from the "
            f"export. `outcomebench-site check --config {config}` lists every problem with "
            f"its fix and writes the quarantine report ({default_quarantine_report(config)}). "
            "This warning is local only: nothing about it leaves the site"
        )


@dataclass(frozen=True, slots=True)
class _Written:
    """A column's values as the quarantine report shows them: ``values[codes[row]]``, or
    ``values[row]`` without codes."""

    values: pa.Array | pa.ChunkedArray
    codes: Code | None = None

    def at(self, rows: Int) -> list[str]:
        """The values of ``rows`` (ascending) as text."""
        pos = rows if self.codes is None else self.codes[rows]
        values = self.values
        if isinstance(values, pa.ChunkedArray):
            # Chunk by chunk: a take from the chunked column would copy all of it.
            taken: list[Any] = []
            start = 0
            for chunk in values.chunks:
                end = start + len(chunk)
                lo, hi = np.searchsorted(pos, [start, end])
                taken += _pylist(chunk.take(pa.array(pos[lo:hi] - start)))
                start = end
        else:
            taken = _pylist(values.take(pa.array(pos)))
        return ["" if v is None else str(v) for v in taken]


def _pylist(values: pa.Array) -> list[Any]:
    """Python values for the report; a date or time Python cannot hold (year 10000 and
    beyond) is shown as its raw count of days or ticks, never an error."""
    try:
        return list(values.to_pylist())
    except (OverflowError, ValueError, pa.ArrowException):
        width = pa.int32() if pa.types.is_date32(values.type) else pa.int64()
        ticks = values.cast(width).to_pylist()
        return [None if v is None else f"{v} ({values.type} units since 1970)" for v in ticks]


class _Problems:
    """Collects quarantine entries column-wise, vectorised per rule."""

    def __init__(self, file: str, lines: Int) -> None:
        self.file = file
        self.lines = lines
        self.parts: list[pd.DataFrame] = []
        self.bad = np.zeros(lines.shape[0], dtype=bool)

    def add(self, rows: Int, fld: str, written: _Written | None, reason: str, fix: str) -> None:
        """Quarantine ``rows`` (positions in the table, ascending)."""
        if rows.size == 0:
            return
        self.bad[rows] = True
        self.parts.append(
            pd.DataFrame(
                {
                    "file": self.file,
                    "line": self.lines[rows],
                    "field": fld,
                    "value": [""] * rows.size if written is None else written.at(rows),
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


def check_export(src: DataSource) -> None:
    """Check the export's structure without reading its records: the file exists and can
    be opened in its format, the mapped columns are there and, in Parquet, each has a type
    its field can use. Raises :class:`DataError` naming the file, the problem and the fix.

    Only structure is checked (see the module docstring): the outcome is the same for any
    two exports that differ in one client's records."""
    _structure(src)


def _structure(src: DataSource) -> pa.Schema | None:
    """:func:`check_export`; returns the Parquet schema (None for CSV)."""
    wanted = src.columns.mapped()
    path = src.path
    if not path.is_file():
        raise DataError(str(path), "no such file; check data.path in site.yaml")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(_PARQUET_MAGIC))
            if src.format == "parquet":
                if head != _PARQUET_MAGIC:
                    raise DataError(
                        str(path),
                        "is not a Parquet file (it does not start with PAR1); export it "
                        "again as Parquet, or set data.format: csv if it is a CSV file",
                    )
            else:
                if head == _PARQUET_MAGIC:
                    raise DataError(
                        str(path),
                        "is a Parquet file, not CSV; name it .parquet or set "
                        "data.format: parquet in site.yaml",
                    )
                fh.seek(0)
                header = fh.readline().decode("utf-8-sig", errors="replace").rstrip("\r\n")
        if src.format == "parquet":
            schema = pq.read_schema(path)
            _check_columns(path, list(schema.names), wanted)
            _check_types(path, schema, wanted)
            return schema
        _check_columns(path, next(csv.reader([header]), []), wanted)
        return None
    except DataError:
        raise
    except (pa.ArrowException, OSError, csv.Error) as exc:
        raise _unreadable(src, exc) from None


def _unreadable(src: DataSource, exc: Exception) -> DataError:
    return DataError(
        str(src.path),
        f"cannot read the file as {src.format} ({exc.__class__.__name__}: "
        f"{(str(exc).splitlines() or [''])[0][:200]}); export it again "
        f"as UTF-8 {'CSV with a header line' if src.format == 'csv' else 'Parquet'}",
    )


# Which Parquet types each field can be read from. Text and integers (and floats, which
# pandas makes of an integer column with a missing value) for identifiers; numbers or
# text for scores and sessions; dates, timestamps or text (parsed with data.date_format)
# for dates. Null (every value missing) for all: the rows go to the quarantine.
def _text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


_USABLE: Mapping[str, tuple[str, Any]] = {
    "id": ("text or integers", lambda t: _text(t) or _number(t)),
    "number": (
        "integers, floats, decimals or text",
        lambda t: _text(t) or _number(t) or pa.types.is_decimal(t),
    ),
    "date": (
        "dates, timestamps or text",
        lambda t: (
            _text(t) or pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_integer(t)
        ),
    ),
}
_FIELD_KIND = {
    "client_id": "id",
    "episode_id": "id",
    "instrument": "id",
    "score": "number",
    "session": "number",
    "date": "date",
}


def _check_types(path: Path, schema: pa.Schema, wanted: Mapping[str, str]) -> None:
    problems = []
    for fld, col in wanted.items():
        kind = _FIELD_KIND.get(fld)
        if kind is None:
            continue  # read but not used (therapist_id): any type will do
        t = schema.field(col).type
        value = t.value_type if pa.types.is_dictionary(t) else t
        described, usable = _USABLE[kind]
        if not (pa.types.is_null(value) or usable(value)):
            problems.append(f"column {col!r} ({fld}) has Parquet type {t}; {fld} needs {described}")
    if problems:
        raise DataError(
            str(path),
            f"{'; '.join(problems)}. Export these columns with those types (e.g. ids as "
            "text, scores and sessions as integers, dates as dates), or map data.columns "
            "in site.yaml to other columns.",
        )


def _read_table(src: DataSource) -> tuple[pa.Table, Int, list[tuple[int, str]], _BadText]:
    """The mapped columns as a table, the source line of each row, unparseable lines, and
    the rows of each CSV column whose bytes are not UTF-8."""
    wanted = src.columns.mapped()
    path = src.path
    schema = _structure(src)
    columns = list(dict.fromkeys(wanted.values()))
    try:
        if schema is not None:
            table = pq.read_table(path, columns=columns)
            return _plain(table), np.arange(1, table.num_rows + 1, dtype=np.int64), [], {}
        table, ragged, bad_text = _read_csv(path, columns, threads=True)
        if not ragged:
            return table, np.arange(2, table.num_rows + 2, dtype=np.int64), [], bad_text
        # Rare: some lines have the wrong number of fields. Only a sequential read knows
        # their line numbers, which the lines of every other row depend on.
        table, ragged, bad_text = _read_csv(path, columns, threads=False)
        skipped = np.array(sorted(n for n, _ in ragged), dtype=np.int64)
        all_lines = np.arange(2, table.num_rows + len(skipped) + 2, dtype=np.int64)
        return table, np.setdiff1d(all_lines, skipped, assume_unique=True), ragged, bad_text
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise _unreadable(src, exc) from None


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas categoricals) decoded to their value type."""
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, pc.cast(table.column(i), f.type.value_type))
    return table


_BadText = dict[str, npt.NDArray[np.bool_]]


def _read_csv(
    path: Path, columns: list[str], *, threads: bool
) -> tuple[pa.Table, list[tuple[int, str]], _BadText]:
    ragged: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        ragged.append((row.number if row.number is not None else -1, row.text))
        return "skip"

    def read(kind: pa.DataType) -> pa.Table:
        ragged.clear()
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_invalid, ignore_empty_lines=False
            ),
            # Everything as text: ids keep their leading zeros, and a bad value is
            # reported as written instead of becoming a silent null.
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types=dict.fromkeys(columns, kind),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    try:
        return read(pa.string()), ragged, {}
    except pa.ArrowInvalid as exc:
        if "UTF8" not in str(exc):
            raise
    # Rare: bytes that are not UTF-8 in some values. They are one client's data, not the
    # file's structure, so their rows are quarantined rather than the file refused.
    table = read(pa.binary())
    bad: _BadText = {}
    for name in table.column_names:
        text, invalid = _utf8(table.column(name))
        table = table.set_column(table.schema.get_field_index(name), name, text)
        if invalid.any():
            bad[name] = invalid
    return table, ragged, bad


def _utf8(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, npt.NDArray[np.bool_]]:
    """A binary column as text (bytes that are not UTF-8 replaced), and its rows that had
    such bytes. Decoded once per distinct value."""
    enc = pc.dictionary_encode(col.combine_chunks())
    decoded, invalid = [], []
    for raw in enc.dictionary.to_pylist():
        try:
            decoded.append(raw.decode("utf-8"))
            invalid.append(False)
        except UnicodeDecodeError:
            decoded.append(raw.decode("utf-8", errors="replace"))
            invalid.append(True)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    text = pa.array(decoded, pa.string()).take(enc.indices)
    return pa.chunked_array([text]), np.asarray(invalid, dtype=bool)[codes]


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
            f"The file has: {', '.join(names)[:2000]}. Fix data.columns in "
            "site.yaml.",
        )


_NO_ROWS: Int = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A column checked and converted once per entry: a distinct value of a text column
    (``codes`` maps each row to its entry), or each row (no codes)."""

    codes: Code | None
    value: Num  # 0 where missing or invalid
    missing: Bool
    invalid: Bool  # present but not a valid value
    written: pa.Array | pa.ChunkedArray  # what the report shows for the entry

    def rows(self, *flags: Bool) -> list[Int]:
        """For each of ``flags`` (one per entry), the rows whose entry it flags."""
        return _rows(self.codes, *flags)

    def at(self, rows: Int | None = None) -> Num:
        """The value of ``rows`` (of every row if None)."""
        if self.codes is None:
            return self.value if rows is None else self.value[rows]
        # Gathering int32 instead of int64 halves the memory traffic.
        fits = self.value.size == 0 or (
            int(self.value.min()) >= -(2**30) and int(self.value.max()) < 2**30
        )
        table = self.value.astype(np.int32) if fits else self.value
        return table[self.codes if rows is None else self.codes[rows]]

    def outside(self, lo: int, hi: int) -> Bool:
        """Entries holding a whole number outside lo..hi."""
        v = self.value
        if v.size == 0 or (int(v.min()) >= lo and int(v.max()) <= hi):
            return np.zeros(v.size, dtype=bool)  # the usual case, without temporaries
        return ~self.missing & ~self.invalid & ((v < lo) | (v > hi))

    def report(self) -> _Written:
        return _Written(self.written, self.codes)


def _rows(codes: Code | None, *flags: Bool) -> list[Int]:
    """For each of ``flags`` (one per entry; ``codes`` maps rows to entries, or None when
    each row is its own entry), the rows whose entry it flags, ascending. The rows are
    scanned once for all the flags."""
    raised = [f for f in flags if f.any()]
    if not raised:
        return [_NO_ROWS] * len(flags)
    either = functools.reduce(np.logical_or, raised)
    rows = np.flatnonzero(either if codes is None else either[codes])
    entries = rows if codes is None else codes[rows]
    return [rows[f[entries]] for f in flags]


def _as_text(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """A column as text, nulls as empty strings (Parquet columns may be typed)."""
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col, "") if col.null_count else col


def _distinct(col: pa.ChunkedArray) -> tuple[Code, pa.Array]:
    """(code of each row, the distinct values trimmed) of a column read as text."""
    enc = pc.dictionary_encode(_as_text(col))
    if enc.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], pa.string())
    # Every chunk of the result shares one dictionary.
    codes = np.concatenate([c.indices.to_numpy() for c in enc.chunks])
    return codes, pc.utf8_trim_whitespace(enc.chunk(0).dictionary)


def _ids(col: pa.ChunkedArray) -> tuple[Code, pa.Array]:
    """(code of each row, the distinct values trimmed) of a column of identifiers. Codes
    number the trimmed values in order of first appearance.

    Client and episode ids and instruments come in runs of rows (exports list a client's
    rows together): a run needs one dictionary look-up, and none at all if the runs are
    sorted, as they are in exports sorted by client.
    """
    runs = pc.run_end_encode(_as_text(col), run_end_type=pa.int64()).chunks
    if not runs:
        return np.zeros(0, dtype=np.int32), pa.array([], pa.string())
    values = pa.concat_arrays([r.values for r in runs])
    lengths = np.concatenate([np.diff(r.run_ends.to_numpy(), prepend=0) for r in runs])
    if len(values) < 2 or pc.all(pc.less_equal(values[:-1], values[1:])).as_py():
        # Equal neighbours are one value running on from one chunk into the next.
        first = np.ones(len(values), dtype=bool)
        first[1:] = pc.not_equal(values[:-1], values[1:]).to_numpy(zero_copy_only=False)
        run_codes = np.cumsum(first, dtype=np.int32) - 1
        values = values.filter(pa.array(first))
    else:
        enc = pc.dictionary_encode(values)
        run_codes, values = enc.indices.to_numpy(), enc.dictionary
    codes = np.repeat(run_codes, lengths)
    trimmed = pc.utf8_trim_whitespace(values)
    if not trimmed.equals(values):
        # Values that differ only in surrounding whitespace share a code. Encoding the
        # dictionary in its own order keeps codes in order of first appearance.
        again = pc.dictionary_encode(trimmed)
        codes = again.indices.to_numpy()[codes]
        trimmed = again.dictionary
    return codes, trimmed


def _client_ids(col: pa.ChunkedArray) -> tuple[Code, pa.Array, tuple[str, ...]]:
    codes, text = _ids(col)
    # Made here, in parallel with the other columns: a million ids take a while.
    return codes, text, tuple(text.to_pylist())


def _integers(col: pa.ChunkedArray) -> _Parsed:
    """A column that should hold integers."""
    if pa.types.is_integer(col.type):
        arr = col.combine_chunks()
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        raw = pc.fill_null(arr, 0).to_numpy(zero_copy_only=False)
        # uint64 beyond int64 would wrap around to a small (maybe valid) number.
        huge = raw > _INT64_MAX if raw.dtype == np.uint64 else np.zeros_like(missing)
        values = np.where(huge, 0, raw).astype(np.int64)
        return _Parsed(None, values, missing, huge, arr)
    if pa.types.is_floating(col.type):
        arr = col.combine_chunks()
        f = pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False)
        missing = np.isnan(f)
        not_int = ~missing & ((f != np.round(f)) | ~np.isfinite(f) | (np.abs(f) > 2**31))
        values = np.where(missing | not_int, 0, f).astype(np.int64)
        return _Parsed(None, values, missing, not_int, arr)
    width = _digits_only(col)
    if width is not None:
        # Nothing to trim, match or strip: cast the rows, skipping the dictionary.
        by_row: Num = np.empty(len(col), dtype=np.int32 if width <= 9 else np.int64)
        start = 0
        for chunk in col.chunks:
            cast = pc.cast(chunk, pa.from_numpy_dtype(by_row.dtype))
            by_row[start : start + len(chunk)] = cast.to_numpy()
            start += len(chunk)
        none = np.zeros(len(col), dtype=bool)
        return _Parsed(None, by_row, none, none, col)
    codes, text = _distinct(col)
    missing = pc.equal(text, "").to_numpy(zero_copy_only=False)
    is_int = pc.match_substring_regex(text, _INT_RE).to_numpy(zero_copy_only=False)
    digits = pc.utf8_length(text).to_numpy(zero_copy_only=False) <= 12
    ok = is_int & digits
    cleaned = pc.if_else(pa.array(ok), text, pa.scalar("0"))
    values = pc.cast(pc.replace_substring_regex(cleaned, r"\.0*$", ""), pa.int64())
    return _Parsed(codes, values.to_numpy().astype(np.int64), missing, ~missing & ~ok, text)


def _digits_only(col: pa.ChunkedArray) -> int | None:
    """The longest value's length if every value is 1 to 12 ASCII digits, as in most
    exports, else None. Checked on the raw bytes: several times faster than a kernel."""
    if col.null_count or not pa.types.is_string(col.type) or len(col) == 0:
        return None
    width = 0
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, dtype=np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths = np.diff(ends)
        if lengths.min() < 1 or lengths.max() > 12:
            return None
        text = np.frombuffer(data, dtype=np.uint8)[ends[0] : ends[-1]]
        if (text - np.uint8(ord("0")) > 9).any():  # below "0" wraps around to > 9
            return None
        width = max(width, int(lengths.max()))
    return width


def _dates(col: pa.ChunkedArray, fmt: str) -> _Parsed:
    """A column of dates, as days since 1970-01-01."""
    if pa.types.is_date(col.type) or pa.types.is_timestamp(col.type):
        arr = col.combine_chunks()
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        values, bad = _typed_days(arr)
        bad &= ~missing
        values[missing | bad] = 0
        return _Parsed(None, values, missing, bad, arr)
    codes, text = _distinct(col)
    missing = pc.equal(text, "").to_numpy(zero_copy_only=False)
    # strptime rolls impossible dates over (2026-02-31 -> 2026-03-03): a date is valid
    # only if it prints back as written (leading zeros aside).
    parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
    back = pc.strftime(parsed, format=fmt)
    same = pc.equal(_strip_zeros(back), _strip_zeros(text))
    parsed = pc.if_else(pc.fill_null(same, False), parsed, pa.nulls(len(parsed), parsed.type))
    days = pc.cast(pc.cast(parsed, pa.date32()), pa.int32())
    bad = days.is_null().to_numpy(zero_copy_only=False) & ~missing
    values = pc.fill_null(days, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    bad |= ~missing & ((values < _DAY_MIN) | (values > _DAY_MAX))
    return _Parsed(codes, values, missing, bad, text)


_PER_DAY = {"s": 86_400, "ms": 86_400_000, "us": 86_400_000_000, "ns": 86_400_000_000_000}


def _typed_days(arr: pa.Array) -> tuple[Int, Bool]:
    """Days since 1970-01-01 of a date or timestamp array, and which values lie outside
    years 1-9999 (arrow's casts would raise on them, or silently wrap around)."""
    t = arr.type
    if pa.types.is_date32(t):
        days = pc.fill_null(arr.cast(pa.int32()), 0).to_numpy(zero_copy_only=False)
        days = days.astype(np.int64)
        return days, (days < _DAY_MIN) | (days > _DAY_MAX)
    ticks = pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    per_day = _PER_DAY["ms"] if pa.types.is_date64(t) else _PER_DAY[t.unit]
    # A day's margin, so that a time zone cannot carry a date past the ends.
    lo, hi = (_DAY_MIN + 1) * per_day, (_DAY_MAX - 1) * per_day
    bad = (ticks < lo) | (ticks > hi)
    if pa.types.is_date64(t) or t.tz is None:
        return np.floor_divide(np.where(bad, 0, ticks), per_day), bad
    # A zoned timestamp's date is its local date: arrow's cast knows the zone's rules.
    safe = pc.if_else(pa.array(bad), pa.nulls(len(arr), t), arr)
    days = pc.cast(pc.cast(safe, pa.date32()), pa.int32())
    return pc.fill_null(days, 0).to_numpy(zero_copy_only=False).astype(np.int64), bad


def _strip_zeros(text: pa.Array) -> pa.Array:
    return pc.replace_substring_regex(text, r"(^|[^0-9])0+([0-9])", r"\1\2")


@dataclass(frozen=True, slots=True)
class _Columns:
    """The mapped columns, parsed; text columns as (code of each row, trimmed values)."""

    client: tuple[Code, pa.Array, tuple[str, ...]]  # and the ids as Python strings
    instrument: tuple[Code, pa.Array] | None
    episode: tuple[Code, pa.Array] | None
    score: _Parsed
    session: _Parsed | None
    date: _Parsed | None


def _parse(table: pa.Table, src: DataSource) -> _Columns:
    cols = src.columns
    # The columns are independent and pyarrow compute releases the GIL, so they are
    # parsed in parallel, the slowest first.
    with ThreadPoolExecutor(max_workers=max(1, pa.cpu_count())) as pool:
        client = pool.submit(_client_ids, table.column(cols.client_id))
        episode = (
            pool.submit(_ids, table.column(cols.episode_id))
            if cols.episode_id is not None
            else None
        )
        date = (
            pool.submit(_dates, table.column(cols.date), src.date_format)
            if cols.date is not None
            else None
        )
        score = pool.submit(_integers, table.column(cols.score))
        session = (
            pool.submit(_integers, table.column(cols.session)) if cols.session is not None else None
        )
        instrument = (
            pool.submit(_ids, table.column(cols.instrument))
            if cols.instrument is not None
            else None
        )
    return _Columns(
        client=client.result(),
        instrument=instrument.result() if instrument is not None else None,
        episode=episode.result() if episode is not None else None,
        score=score.result(),
        session=session.result() if session is not None else None,
        date=date.result() if date is not None else None,
    )


def _empty(text: pa.Array) -> Bool:
    return np.asarray(pc.equal(text, "").to_numpy(zero_copy_only=False), dtype=bool)


def read_intake(src: DataSource, instruments: Mapping[str, Instrument]) -> Intake:
    """Read and validate the export. Raises :class:`DataError` only when the file as a
    whole cannot be read; every row-level problem goes to the quarantine report."""
    table, lines, ragged, bad_text = _read_table(src)
    cols = src.columns
    n = table.num_rows
    file = src.path.name
    q = _Problems(file, lines)
    for fld, col in cols.mapped().items():
        if col in bad_text and fld != "therapist_id":
            q.add(
                np.flatnonzero(bad_text.pop(col)),
                fld,
                _Written(table.column(col)),
                "not UTF-8 text",
                "export the file again as UTF-8 (the value is shown with the bad bytes "
                "replaced by U+FFFD)",
            )
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
    parsed = _parse(table, src)
    # The report shows instruments, and sessions and dates of duplicate or out-of-order
    # rows, as written; the other columns are no longer needed.
    raw_ins = _Written(table.column(cols.instrument)) if cols.instrument else None
    raw_session = _Written(table.column(cols.session)) if cols.session else None
    raw_date = _Written(table.column(cols.date)) if cols.date else None
    del table

    client_code, client_text, client_ids = parsed.client
    q.add(
        _rows(client_code, _empty(client_text))[0],
        "client_id",
        None,
        "missing client id",
        f"fill in column '{cols.client_id}'",
    )

    # Instruments: a constant, or a column mapped to known instrument ids.
    if parsed.instrument is None or raw_ins is None:
        ins_ids: list[str] = [str(src.instrument)]
        ins_code = np.zeros(n, dtype=np.int16)
    else:
        codes, names_text = parsed.instrument
        names = [str(v) for v in names_text.to_pylist()]
        ins_ids = [nm for nm in names if nm in instruments]
        position = {nm: i for i, nm in enumerate(ins_ids)}
        remap = np.array([position.get(nm, -1) for nm in names], dtype=np.int16)
        ins_code = remap[codes]
        (unknown,) = _rows(codes, remap < 0)
        # One entry per unknown name, found by sorting the unknown rows, not a scan each.
        by_name = np.argsort(codes[unknown], kind="stable")
        starts = np.flatnonzero(np.diff(codes[unknown][by_name])) + 1
        for rows in np.split(unknown[by_name], starts) if unknown.size else []:
            nm = names[codes[rows[0]]]
            q.add(
                rows,
                "instrument",
                raw_ins,
                "missing instrument" if nm == "" else f"unknown instrument {nm!r}",
                f"use a registry id{did_you_mean(nm, instruments)} or define {nm!r} under "
                "`instruments:` in site.yaml"
                if nm
                else f"fill in column '{cols.instrument}'",
            )

    score = parsed.score
    lo = np.array([instruments[i].lo for i in ins_ids], dtype=np.int64)
    hi = np.array([instruments[i].hi for i in ins_ids], dtype=np.int64)
    # Only a score outside the range every instrument allows needs its row's instrument.
    outside = (
        score.outside(int(lo.max()), int(hi.min()))
        if ins_ids
        else np.zeros(score.value.size, dtype=bool)
    )
    missing, not_whole, suspect = score.rows(score.missing, score.invalid, outside)
    q.add(
        missing,
        "score",
        score.report(),
        "missing score",
        f"fill in column '{cols.score}' or delete the row",
    )
    q.add(
        not_whole,
        "score",
        score.report(),
        "score is not a whole number",
        "scores are instrument totals in whole points; correct the value",
    )
    if ins_ids:
        code = ins_code[suspect]
        safe = np.where(code >= 0, code, 0)
        value = score.at(suspect)
        out = suspect[(code >= 0) & ((value < lo[safe]) | (value > hi[safe]))]
        for c, ins_id in enumerate(ins_ids):
            ins = instruments[ins_id]
            q.add(
                out[ins_code[out] == c],
                "score",
                score.report(),
                f"score out of the {ins_id} range {ins.lo}-{ins.hi}",
                f"correct the value; {ins_id} totals run from {ins.lo} to {ins.hi}",
            )

    session = parsed.session
    if session is not None:
        missing, bad = session.rows(session.missing, session.invalid | session.outside(1, 10_000))
        q.add(
            missing,
            "session",
            session.report(),
            "missing session number",
            f"fill in column '{cols.session}'",
        )
        q.add(
            bad,
            "session",
            session.report(),
            "session number is not a whole number from 1",
            "session numbers count attended sessions: 1, 2, 3, ...",
        )

    date = parsed.date
    if date is not None:
        missing, bad = date.rows(date.missing, date.invalid)
        q.add(
            missing,
            "date",
            date.report(),
            "missing date",
            f"fill in column '{cols.date}'",
        )
        q.add(
            bad,
            "date",
            date.report(),
            f"date does not match the format {src.date_format!r}",
            "correct the date, or set data.date_format in site.yaml (e.g. '%d/%m/%Y')",
        )

    ep_code: Code | None = None
    if parsed.episode is not None:
        ep_code, ep_text = parsed.episode
        q.add(
            _rows(ep_code, _empty(ep_text))[0],
            "episode_id",
            None,
            "missing episode id",
            f"fill in column '{cols.episode_id}'",
        )

    records = _group(
        _Valid(
            rows=np.flatnonzero(~q.bad) if q.bad.any() else None,
            ins=ins_code,
            client=client_code,
            ep=ep_code,
            session=session,
            date=date,
            score=score,
        ),
        ins_ids=tuple(ins_ids),
        client_ids=client_ids,
        gap_days=src.episode_gap_days,
        q=q,
        written=(raw_session, raw_date),
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


@dataclass(frozen=True, slots=True)
class _Valid:
    """The rows that passed the row checks (None: all of them), and each row's parsed
    columns (indexed by table row)."""

    rows: Int | None
    ins: npt.NDArray[np.int16]
    client: Code
    ep: Code | None
    session: _Parsed | None
    date: _Parsed | None
    score: _Parsed


def _group(
    v: _Valid,
    *,
    ins_ids: tuple[str, ...],
    client_ids: tuple[str, ...],
    gap_days: int,
    q: _Problems,
    written: tuple[_Written | None, _Written | None],
) -> Records:
    """Sort valid rows into episodes; quarantine duplicate sessions and out-of-order dates."""
    by_gap = v.ep is None and v.date is not None
    # ``rows`` is the table row of each valid row in the current order (None: every row,
    # in table order). Only the sort keys are gathered for the valid rows; the other
    # columns are gathered once, at the end.
    rows = v.rows
    ident: list[Num] = [_pick(v.client, rows)]
    if len(ins_ids) > 1:  # valid rows have a known instrument: with one, all the same
        ident.insert(0, _pick(v.ins, rows))
    if v.ep is not None:
        ident.append(_pick(v.ep, rows))
    group = ident[0] if len(ident) == 1 else _radix(ident)
    if group is None:
        group = _rank(ident)
    date = v.date.at(rows) if v.date is not None else None
    session = v.session.at(rows) if v.session is not None else None
    m = group.size

    # First order: within a client and instrument, by episode id, or by date when episodes
    # come from gaps in dates.
    first = (group, date, session) if by_gap else (group, session, date)
    order = _order([k for k in first if k is not None])
    if order is not None:
        rows = order(np.arange(m) if rows is None else rows)
        group = order(group) if order.at is None else group  # sorted within groups: as is
        date = order(date) if date is not None else None
        session = order(session) if session is not None else None
    new = np.ones(m, dtype=bool)
    np.not_equal(group[1:], group[:-1], out=new[1:])
    del group
    if by_gap and date is not None:
        new[1:] |= np.diff(date) > gap_days
    same_ep = ~new
    episode = np.cumsum(new, dtype=np.int64)
    episode -= 1
    if session is None:
        # Session numbers from the order of distinct dates within the episode; two
        # scores on one day share a session number and are caught as duplicates below.
        new_day = new.copy()
        if date is not None:
            new_day[1:] |= date[1:] != date[:-1]
        day_rank = np.cumsum(new_day)
        session = day_rank - day_rank[np.flatnonzero(new)][episode] + 1
    elif by_gap and date is not None and not np.all(new[1:] | (session[1:] >= session[:-1])):
        # Second order: by session within each episode. Only needed here: otherwise the
        # first order already sorts each episode by session, then date (sessions from
        # dates follow the dates). Sorting by episode first leaves ``episode`` as is.
        order = _order([episode, session, date])
        if order is not None:
            rows = order(np.arange(m) if rows is None else rows)
            session, date = order(session), order(date)

    bad = np.zeros(m, dtype=bool)
    what = "session" if v.session is not None else "date"
    # Rows sharing an episode and session with the row before.
    again = same_ep.copy()
    again[1:] &= session[1:] == session[:-1]
    in_dup = again.copy()
    in_dup[:-1] |= again[1:]
    if in_dup.any():
        dup = np.flatnonzero(in_dup)  # runs of rows sharing an episode and session
        first_of_run = ~again[dup]
        starts = np.flatnonzero(first_of_run)
        run = np.cumsum(first_of_run) - 1
        s = v.score.at(_table_rows(dup, rows))
        exact = np.minimum.reduceat(s, starts) == np.maximum.reduceat(s, starts)
        if date is not None:
            d = date[dup]
            exact &= np.minimum.reduceat(d, starts) == np.maximum.reduceat(d, starts)
        extra_copy = dup[exact[run] & ~first_of_run]
        conflicting = dup[~exact[run]]
        _flag(
            q,
            _table_rows(extra_copy, rows),
            what,
            written,
            "exact duplicate of an earlier row",
            "none needed: the first copy is used; remove repeated rows from the export",
        )
        _flag(
            q,
            _table_rows(conflicting, rows),
            what,
            written,
            f"duplicate {what} with conflicting scores",
            f"keep one row per client, episode and {what}; all copies were left out",
        )
        bad[extra_copy] = True
        bad[conflicting] = True
    if v.session is not None and date is not None:
        # A later session dated before an earlier one of the same episode. Only episodes
        # whose dates go down somewhere can hold one.
        down = np.flatnonzero(same_ep[1:] & (date[1:] < date[:-1])) + 1
        if down.size:
            at = _blocks(episode, episode[down])
            rel = date[at] - np.int64(date[at].min())
            combined = episode[at] * (int(rel.max()) + 1) + rel
            prior_max = np.maximum.accumulate(combined)
            late = np.zeros(at.size, dtype=bool)
            late[1:] = same_ep[at[1:]] & (combined[1:] < prior_max[:-1]) & ~bad[at[1:]]
            out_of_order = at[late]
            _flag(
                q,
                _table_rows(out_of_order, rows),
                "date",
                written,
                "dated before an earlier session of the same episode",
                "correct the date or the session number",
            )
            bad[out_of_order] = True

    if bad.any():
        keep = ~bad
        rows = np.flatnonzero(keep) if rows is None else rows[keep]
        episode, session = episode[keep], session[keep]
        date = date[keep] if date is not None else None
        start = np.ones(rows.size, dtype=bool)  # renumber episodes 0..E-1 after removals
        np.not_equal(episode[1:], episode[:-1], out=start[1:])
        np.cumsum(start, out=episode)
        episode -= 1
    return Records(
        instrument_ids=ins_ids,
        client_ids=client_ids,
        instrument=_frozen(_pick(v.ins, rows)),
        client=_frozen(_pick(v.client, rows)),
        episode=_frozen(episode),
        session=_frozen(session.astype(np.int32, copy=False)),
        score=_frozen(v.score.at(rows).astype(np.int32, copy=False)),
        date=_frozen(
            date.astype(np.int32, copy=False)
            if date is not None
            else np.full(episode.size, _NO_DATE, dtype=np.int32)
        ),
        line=_frozen(_pick(q.lines, rows)),
    )


def _flag(
    q: _Problems,
    rows: Int,
    fld: str,
    written: tuple[_Written | None, _Written | None],
    reason: str,
    fix: str,
) -> None:
    q.add(np.sort(rows), fld, written[0] if fld == "session" else written[1], reason, fix)


def _pick(a: npt.NDArray[_G], rows: Int | None) -> npt.NDArray[_G]:
    """``a[rows]``, or ``a`` itself for all rows in order."""
    return a if rows is None else a[rows]


def _table_rows(positions: Int, rows: Int | None) -> Int:
    """The table rows at ``positions`` of the current order."""
    return positions if rows is None else rows[positions]


@dataclass(frozen=True, slots=True)
class _Reorder:
    """A reordering of rows: position ``at[k]`` gets the row from ``at[order[k]]`` (``at``
    None: every position), the other rows stay where they are."""

    at: Int | None
    order: Int

    def __call__(self, a: npt.NDArray[_G]) -> npt.NDArray[_G]:
        if self.at is None:
            return a[self.order]
        out = a.copy()
        out[self.at] = a[self.at[self.order]]
        return out


def _order(parts: Sequence[Num]) -> _Reorder | None:
    """How to put the rows in stable order by the parts (most significant first), or None
    if they are in order already, as exports listed by client and session are. When only
    rows sharing a first part are out of order among themselves (a misdated or repeated
    row), only their blocks are sorted."""
    down = _descents(parts)
    if down.size == 0:
        return None
    first = parts[0]
    if (first[down] < first[down - 1]).any():
        return _Reorder(None, _stable_sort(parts))
    at = _blocks(first, first[down])
    return _Reorder(at, _stable_sort([p[at] for p in parts]))


def _descents(parts: Sequence[Num]) -> Int:
    """The positions of rows that sort before the row above them."""
    down = np.zeros(max(parts[0].size - 1, 0), dtype=bool)
    tie: Bool | None = None  # rows equal to the row above on the parts so far
    for p in parts:
        later, earlier = p[1:], p[:-1]
        down |= later < earlier if tie is None else tie & (later < earlier)
        same = later == earlier
        tie = same if tie is None else tie & same
        if not tie.any():
            break
    return np.flatnonzero(down) + 1


def _blocks(key: Num, values: Num) -> Int:
    """The positions of the rows whose ``key`` (non-decreasing) is among ``values``."""
    values = np.unique(values)
    lo = np.searchsorted(key, values, side="left")
    size = np.searchsorted(key, values, side="right") - lo
    positions: Int = np.arange(int(size.sum())) + np.repeat(lo - (np.cumsum(size) - size), size)
    return positions


def _stable_sort(parts: Sequence[Num]) -> Int:
    key = _radix(parts)
    return np.lexsort(parts[::-1]) if key is None else np.argsort(key, kind="stable")


def _radix(parts: Sequence[Num]) -> Int | None:
    """One int64 key that orders rows as the parts do (most significant first), or None
    if their ranges together need more than 63 bits."""
    key: Int | None = None
    span = 1
    for p in parts:
        lo, hi = (int(p.min()), int(p.max())) if p.size else (0, 0)
        if lo == hi:
            continue  # a constant part orders nothing
        span *= hi - lo + 1
        if span > _INT64_MAX:
            return None
        rel = np.subtract(p, lo, dtype=np.int64)
        if key is None:
            key = rel
        else:
            key *= hi - lo + 1
            key += rel
    return np.zeros(parts[0].size, dtype=np.int64) if key is None else key


def _rank(parts: Sequence[Num]) -> Int:
    """Dense rank of each row's parts in lexicographic order (when _radix overflows)."""
    order = np.lexsort(parts[::-1])
    change = np.zeros(order.size, dtype=bool)
    for p in parts:
        s = p[order]
        change[1:] |= s[1:] != s[:-1]
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.cumsum(change)
    return rank

"""Site configuration: ``site.yaml`` read once, validated into frozen values.

Every problem in the file is reported at once, each naming the key and the fix; unknown
keys are refused with a did-you-mean. Paths are relative to the YAML file's directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocols import Instrument, SpecError, builtin_instruments, parse_instruments
from protocols.spec import did_you_mean, read_yaml, unknown_keys
from site_agent.errors import ConfigError

__all__ = ["ColumnMap", "DataSource", "SiteConfig", "load_site_config"]

_SITE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_TOP_KEYS = ("site", "data", "instruments", "privacy_policy")
_SITE_KEYS = ("id",)
_DATA_KEYS = ("path", "format", "instrument", "columns", "episode_gap_days", "date_format")
_COLUMN_KEYS = ("client_id", "session", "date", "instrument", "score", "episode_id", "therapist_id")
_FORMATS = ("csv", "parquet")


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnMap:
    """Which column of the export holds each field (None: not in the export)."""

    client_id: str
    score: str
    session: str | None = None
    date: str | None = None
    instrument: str | None = None
    episode_id: str | None = None
    therapist_id: str | None = None

    def mapped(self) -> dict[str, str]:
        """Our field name -> the export's column name, for the mapped fields only."""
        return {f: c for f in _COLUMN_KEYS if (c := getattr(self, f)) is not None}


@dataclass(frozen=True, slots=True, kw_only=True)
class DataSource:
    """The clinic's outcome export: long format, one row per administered measure."""

    path: Path
    format: str
    columns: ColumnMap
    instrument: str | None = None  # constant instrument for a single-measure file
    episode_gap_days: int = 90
    date_format: str = "%Y-%m-%d"


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteConfig:
    site_id: str
    data: DataSource
    instruments: Mapping[str, Instrument]  # built-in registry plus the site's own
    privacy_policy: Path | None
    source: Path


def load_site_config(path: Path | str) -> SiteConfig:
    """Read and validate ``site.yaml``; raise :class:`ConfigError` listing every problem."""
    path = Path(path)
    where = str(path)
    _, doc = read_yaml(path, missing="pass --config PATH/TO/site.yaml", error=ConfigError)
    if not isinstance(doc, Mapping):
        raise ConfigError(where, [f"{where}: expected a mapping with keys site, data"])

    problems = unknown_keys(doc, _TOP_KEYS, "site.yaml")
    base = path.resolve().parent

    site = doc.get("site")
    site_id = ""
    if not isinstance(site, Mapping):
        problems.append("site: missing; add `site: {id: your-clinic-id}`")
    else:
        problems += unknown_keys(site, _SITE_KEYS, "site")
        raw_id = site.get("id")
        if not isinstance(raw_id, str) or not _SITE_ID.match(raw_id):
            problems.append(
                f"site.id: {raw_id!r} is not a valid site id; use 1-63 lower-case letters, "
                "digits, '.', '_' or '-', e.g. clinic-north"
            )
        else:
            site_id = raw_id

    instruments: dict[str, Instrument] = dict(builtin_instruments())
    try:
        custom = parse_instruments(doc.get("instruments"), "instruments")
    except SpecError as exc:
        problems += exc.problems
        custom = {}
    for ins_id in custom:
        if ins_id in instruments:
            problems.append(
                f"instruments.{ins_id}: clashes with the built-in instrument of that name; "
                "give the custom instrument another id (e.g. add a suffix)"
            )
    instruments.update(custom)

    data = _parse_data(doc.get("data"), base, instruments, problems)

    policy: Path | None = None
    raw_policy = doc.get("privacy_policy")
    if raw_policy is not None:
        if isinstance(raw_policy, str) and raw_policy:
            policy = (base / raw_policy).resolve()
        else:
            problems.append(f"privacy_policy: expected a file path, got {raw_policy!r}")

    if problems or data is None:
        raise ConfigError(where, problems)
    return SiteConfig(
        site_id=site_id,
        data=data,
        instruments=MappingProxyType(instruments),
        privacy_policy=policy,
        source=path.resolve(),
    )


def _parse_data(
    data: Any, base: Path, instruments: Mapping[str, Instrument], problems: list[str]
) -> DataSource | None:
    if not isinstance(data, Mapping):
        problems.append("data: missing; add `data: {path: exports/outcomes.csv, columns: {...}}`")
        return None
    n_before = len(problems)
    problems += unknown_keys(data, _DATA_KEYS, "data")

    raw_path = data.get("path")
    file = Path()
    if not isinstance(raw_path, str) or not raw_path:
        problems.append("data.path: missing; the CSV or Parquet export, relative to site.yaml")
    else:
        file = (base / raw_path).resolve()

    fmt = data.get("format")
    if fmt is None:
        suffix = file.suffix.lower().lstrip(".")
        fmt = {"csv": "csv", "txt": "csv", "parquet": "parquet", "pq": "parquet"}.get(suffix)
        if fmt is None and isinstance(raw_path, str) and raw_path:
            problems.append(
                f"data.path: cannot tell the format of {raw_path!r} from its extension; "
                "add `format: csv` or `format: parquet`"
            )
    elif fmt not in _FORMATS:
        problems.append(f"data.format: {fmt!r} is not supported; use csv or parquet")

    columns = _parse_columns(data.get("columns"), problems)

    constant = data.get("instrument")
    if constant is not None:
        if not isinstance(constant, str) or constant not in instruments:
            problems.append(
                f"data.instrument: unknown instrument {constant!r}"
                f"{did_you_mean(str(constant), instruments)}; use a registry id "
                f"({', '.join(sorted(instruments))}) or define it under `instruments:`"
            )
        if columns is not None and columns.instrument is not None:
            problems.append(
                "data: give either a constant `instrument` or an instrument column in "
                "`columns`, not both"
            )
    elif columns is not None and columns.instrument is None:
        problems.append(
            "data: which instrument? add `instrument: PHQ-9` for a single-measure file, or map "
            "the instrument column in `columns: {instrument: <column>}`"
        )

    gap = data.get("episode_gap_days", 90)
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        problems.append(f"data.episode_gap_days: expected a whole number of days >= 1, got {gap!r}")
    date_format = data.get("date_format", "%Y-%m-%d")
    if not isinstance(date_format, str) or "%" not in date_format:
        problems.append(
            f"data.date_format: expected a strftime pattern such as '%d/%m/%Y', got {date_format!r}"
        )

    if len(problems) > n_before or columns is None or fmt is None:
        return None
    return DataSource(
        path=file,
        format=str(fmt),
        columns=columns,
        instrument=constant,
        episode_gap_days=int(gap),
        date_format=str(date_format),
    )


def _parse_columns(columns: Any, problems: list[str]) -> ColumnMap | None:
    if not isinstance(columns, Mapping):
        problems.append(
            "data.columns: missing; map at least client_id, score and session or date, e.g. "
            "`columns: {client_id: client, session: session_no, score: total}`"
        )
        return None
    n_before = len(problems)
    problems += unknown_keys(columns, _COLUMN_KEYS, "data.columns")
    for key, value in columns.items():
        if key in _COLUMN_KEYS and (not isinstance(value, str) or not value):
            problems.append(f"data.columns.{key}: expected the export's column name, got {value!r}")
    for key in ("client_id", "score"):
        if key not in columns:
            problems.append(f"data.columns.{key}: required; name the export's column for it")
    if "session" not in columns and "date" not in columns:
        problems.append(
            "data.columns: map `session` (session number) and/or `date`, so scores can be ordered"
        )
    used = [v for v in columns.values() if isinstance(v, str)]
    for dup in sorted({v for v in used if used.count(v) > 1}):
        problems.append(f"data.columns: column {dup!r} is mapped to more than one field")
    if len(problems) > n_before:
        return None
    return ColumnMap(**{k: str(v) for k, v in columns.items()})

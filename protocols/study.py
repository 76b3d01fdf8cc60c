"""Study requests: frozen, validated values with a canonical serialization and a hash.

A study is what a research network asks every site: which instrument, which episodes
(time window, minimum scores), which intake bands, which statistic families, up to which
session, at what privacy loss per site, and how many sites it needs. ``parse_study`` turns
the YAML draft (a plain mapping) into a :class:`Study`, the only type a site accepts.

The canonical form is sorted-key compact JSON of the normalized study; its SHA-256 is
the study hash that every release carries. The same study always has the same hash;
any change to what is asked changes it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from fractions import Fraction
from typing import Any

from protocols.errors import SpecError
from protocols.instruments import Instrument, builtin_instruments, parse_instrument
from protocols.spec import did_you_mean, unknown_keys

__all__ = [
    "SCHEMA_VERSION",
    "Family",
    "PrivacyRequest",
    "Study",
    "parse_families",
    "parse_loss",
    "parse_study",
    "study_from_canonical",
]

SCHEMA_VERSION = 1


class Family(StrEnum):
    """Statistic families, each a set of bounded integer sums per intake band."""

    COUNTS = "counts"
    CHANGE = "change"
    CATEGORIES = "categories"
    TRAJECTORY = "trajectory"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyRequest:
    """Privacy loss asked of each site: zCDP ``rho``, or ``epsilon`` at ``delta``.

    Values are exact decimals as written (Fractions), never floats.
    """

    rho: Fraction | None = None
    epsilon: Fraction | None = None
    delta: Fraction | None = None

    def __post_init__(self) -> None:
        if (self.rho is None) == (self.epsilon is None):
            raise ValueError("give either rho or epsilon with delta")
        if self.rho is not None and (self.rho <= 0 or self.delta is not None):
            raise ValueError("rho must be > 0 and comes without delta")
        if self.epsilon is not None and (
            self.epsilon <= 0 or self.delta is None or not 0 < self.delta < 1
        ):
            raise ValueError("epsilon must be > 0 with a delta in (0, 1)")

    def canonical(self) -> dict[str, str]:
        if self.rho is not None:
            return {"rho": _dec(self.rho)}
        return {
            "epsilon": _dec(self.epsilon or Fraction(0)),
            "delta": _dec(self.delta or Fraction(0)),
        }

    def describe(self) -> str:
        if self.rho is not None:
            return f"rho = {_dec(self.rho)} (zCDP)"
        c = self.canonical()
        return f"epsilon = {c['epsilon']} at delta = {c['delta']}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Study:
    """A releasable study request. Construct it with :func:`parse_study`."""

    id: str
    title: str
    instrument: Instrument
    instrument_inline: bool  # True when the study defines the instrument itself
    window: tuple[dt.date, dt.date]
    min_scores: int
    bands: tuple[tuple[int, int], ...]
    families: tuple[Family, ...]
    max_session: int
    privacy: PrivacyRequest
    min_sites: int

    def canonical(self) -> dict[str, Any]:
        ins = self.instrument
        instrument: dict[str, Any] = {"id": ins.id}
        if self.instrument_inline:
            instrument["definition"] = {
                "range": [ins.lo, ins.hi],
                "better": str(ins.better),
                "cutoff": _num(ins.cutoff),
                "reliable_change": None
                if ins.reliable_change is None
                else _num(ins.reliable_change),
            }
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "title": self.title,
            "instrument": instrument,
            "window": {"start": self.window[0].isoformat(), "end": self.window[1].isoformat()},
            "inclusion": {"min_scores": self.min_scores},
            "bands": [list(b) for b in self.bands],
            "families": [str(f) for f in self.families],
            "max_session": self.max_session,
            "privacy": self.privacy.canonical(),
            "min_sites": self.min_sites,
        }

    def canonical_bytes(self) -> bytes:
        return json.dumps(
            self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def band_of(self, intake: int) -> int | None:
        for i, (lo, hi) in enumerate(self.bands):
            if lo <= intake <= hi:
                return i
        return None


def _dec(x: Fraction) -> str:
    """A Fraction from a decimal as its shortest exact decimal text."""
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return format(d.normalize(), "f") if d == Fraction(d) else str(x)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _fraction(value: Any, where: str, problems: list[str]) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    try:
        # Via the decimal text, so 0.1 means exactly 1/10, not the nearest binary float.
        return Fraction(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        problems.append(f"{where}: expected a number, got {value!r}")
        return None


def parse_loss(spec: Any, where: str, problems: list[str]) -> PrivacyRequest | None:
    """``{rho: r}`` or ``{epsilon: e, delta: d}`` as exact values; problems recorded."""
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: expected {{rho: 0.05}} or {{epsilon: 1.0, delta: 1.0e-6}}")
        return None
    n = len(problems)
    problems += unknown_keys(spec, ("rho", "epsilon", "delta"), where)
    if "rho" in spec and ("epsilon" in spec or "delta" in spec):
        problems.append(f"{where}: give rho, or epsilon with delta, not both")
    elif "rho" in spec:
        rho = _fraction(spec["rho"], f"{where}.rho", problems)
        if rho is not None and rho <= 0:
            problems.append(f"{where}.rho: must be > 0, got {spec['rho']!r}")
        if len(problems) == n and rho is not None:
            return PrivacyRequest(rho=rho)
    elif "epsilon" in spec:
        eps = _fraction(spec["epsilon"], f"{where}.epsilon", problems)
        delta = _fraction(spec.get("delta"), f"{where}.delta", problems)
        if eps is not None and eps <= 0:
            problems.append(f"{where}.epsilon: must be > 0")
        if delta is not None and not 0 < delta < Fraction(1, 1000):
            problems.append(f"{where}.delta: must be in (0, 0.001), e.g. 1.0e-6")
        if len(problems) == n and eps is not None and delta is not None:
            return PrivacyRequest(epsilon=eps, delta=delta)
    else:
        problems.append(f"{where}: missing; give rho, or epsilon with delta")
    return None


_STUDY_KEYS = (
    "id",
    "title",
    "instrument",
    "window",
    "inclusion",
    "bands",
    "families",
    "max_session",
    "privacy",
    "min_sites",
)


def parse_families(
    raw: Any, where: str, problems: list[str], *, empty: bool = True
) -> list[Family]:
    """The statistic families in a YAML list (each problem appended, naming ``where``)."""
    if not isinstance(raw, list) or (not raw and not empty):
        problems.append(f"{where}: expected a list from {', '.join(Family)}")
        return []
    families: list[Family] = []
    for f in raw:
        try:
            families.append(Family(f))
        except ValueError:
            problems.append(f"{where}: unknown family {f!r}{did_you_mean(str(f), list(Family))}")
    return families


def parse_study(doc: Any, where: str = "study") -> Study:
    """Validate a study draft (the YAML mapping, with or without a top ``study:`` key)."""
    if isinstance(doc, Mapping) and set(doc) == {"study"}:
        doc = doc["study"]
    if not isinstance(doc, Mapping):
        raise SpecError(where, [f"{where}: expected a mapping with keys {', '.join(_STUDY_KEYS)}"])
    problems = unknown_keys(doc, _STUDY_KEYS, where)

    sid = doc.get("id")
    if not isinstance(sid, str) or not sid or len(sid) > 80 or not sid.isprintable():
        problems.append(f"{where}.id: expected a short printable text id, got {sid!r}")
    title = doc.get("title", "")
    if not isinstance(title, str):
        problems.append(f"{where}.title: expected text")

    instrument, inline = _parse_study_instrument(doc.get("instrument"), where, problems)

    window = _parse_window(doc.get("window"), where, problems)

    inclusion = doc.get("inclusion", {"min_scores": 2})
    min_scores = 2
    if not isinstance(inclusion, Mapping):
        problems.append(f"{where}.inclusion: expected {{min_scores: 2}}")
    else:
        problems += unknown_keys(inclusion, ("min_scores",), f"{where}.inclusion")
        min_scores = inclusion.get("min_scores", 2)
        if isinstance(min_scores, bool) or not isinstance(min_scores, int) or min_scores < 2:
            problems.append(
                f"{where}.inclusion.min_scores: must be a whole number >= 2 "
                "(an episode needs an intake and a final score)"
            )
            min_scores = 2

    bands = _parse_bands(doc.get("bands"), instrument, where, problems)

    families = parse_families(doc.get("families"), f"{where}.families", problems, empty=False)
    if len(set(families)) != len(families):
        problems.append(f"{where}.families: a family is listed twice")
    ordered = tuple(f for f in Family if f in families)

    k = doc.get("max_session", 20)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 100:
        problems.append(f"{where}.max_session: expected a whole number 1..100, got {k!r}")
        k = 20

    privacy = parse_loss(doc.get("privacy"), f"{where}.privacy", problems)

    min_sites = doc.get("min_sites", 3)
    if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 1:
        problems.append(f"{where}.min_sites: expected a whole number >= 1, got {min_sites!r}")

    if problems or instrument is None or window is None or privacy is None:
        raise SpecError(where, problems or [f"{where}: invalid"])
    return Study(
        id=str(sid),
        title=str(title),
        instrument=instrument,
        instrument_inline=inline,
        window=window,
        min_scores=int(min_scores),
        bands=bands,
        families=ordered,
        max_session=int(k),
        privacy=privacy,
        min_sites=int(min_sites),
    )


def _parse_study_instrument(
    raw: Any, where: str, problems: list[str]
) -> tuple[Instrument | None, bool]:
    registry = builtin_instruments()
    if isinstance(raw, str):
        if raw in registry:
            return registry[raw], False
        problems.append(
            f"{where}.instrument: unknown instrument {raw!r}"
            f"{did_you_mean(raw, registry)}; use a registry id or an inline "
            "definition {id: X, definition: {range: ..., better: ..., ...}}"
        )
        return None, False
    if isinstance(raw, Mapping) and set(raw) <= {"id", "definition"} and "definition" in raw:
        ins_id = raw.get("id")
        if not isinstance(ins_id, str) or not ins_id:
            problems.append(f"{where}.instrument.id: required with an inline definition")
            return None, True
        if ins_id in registry:
            problems.append(
                f"{where}.instrument.id: {ins_id!r} is a registry instrument; "
                "give the inline definition another id"
            )
            return None, True
        try:
            return parse_instrument(ins_id, raw["definition"], f"{where}.instrument"), True
        except SpecError as exc:
            problems.extend(exc.problems)
            return None, True
    problems.append(
        f"{where}.instrument: expected a registry id such as PHQ-9, or "
        "{id: X, definition: {...}}"
    )
    return None, False


def _parse_window(raw: Any, where: str, problems: list[str]) -> tuple[dt.date, dt.date] | None:
    if not isinstance(raw, Mapping) or set(raw) != {"start", "end"}:
        problems.append(f"{where}.window: expected {{start: YYYY-MM-DD, end: YYYY-MM-DD}}")
        return None
    out: list[dt.date] = []
    for key in ("start", "end"):
        v = raw[key]
        if isinstance(v, dt.datetime):
            v = v.date()
        if isinstance(v, str):
            with contextlib.suppress(ValueError):
                v = dt.date.fromisoformat(v)
        if not isinstance(v, dt.date):
            problems.append(f"{where}.window.{key}: expected a date YYYY-MM-DD, got {raw[key]!r}")
            return None
        out.append(v)
    if out[0] > out[1]:
        problems.append(f"{where}.window: start {out[0]} is after end {out[1]}")
        return None
    return out[0], out[1]


def _parse_bands(
    raw: Any, ins: Instrument | None, where: str, problems: list[str]
) -> tuple[tuple[int, int], ...]:
    if raw is None and ins is not None:
        return tuple((b.lo, b.hi) for b in ins.bands)
    if not isinstance(raw, list) or not raw:
        problems.append(f"{where}.bands: expected a list of [lo, hi] intake bands")
        return ()
    bands: list[tuple[int, int]] = []
    for i, b in enumerate(raw):
        if (
            not isinstance(b, list | tuple)
            or len(b) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in b)
            or b[0] > b[1]
        ):
            problems.append(f"{where}.bands[{i}]: expected [lo, hi] whole scores with lo <= hi")
            return ()
        bands.append((int(b[0]), int(b[1])))
    for prev, nxt in itertools.pairwise(bands):
        if nxt[0] != prev[1] + 1:
            problems.append(
                f"{where}.bands: {list(nxt)} does not follow {list(prev)}; bands "
                "must be sorted and adjacent"
            )
    if ins is not None and (bands[0][0] != ins.lo or bands[-1][1] != ins.hi):
        problems.append(f"{where}.bands: must cover the whole {ins.id} range {ins.lo}-{ins.hi}")
    if len(bands) > 50:
        problems.append(f"{where}.bands: at most 50 bands")
    return tuple(bands)


def study_from_canonical(data: bytes) -> Study:
    """Rebuild a study from its canonical bytes (as sent over the wire) and check the
    round trip, so a site answers exactly the study whose hash it reports."""
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecError("study", ["study: not canonical study JSON"]) from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise SpecError("study", [f"study: unsupported schema (expected {SCHEMA_VERSION})"])
    draft = dict(doc)
    draft.pop("schema")
    ins = draft.get("instrument")
    if isinstance(ins, Mapping) and set(ins) == {"id"}:
        draft["instrument"] = ins["id"]
    study = parse_study(draft)
    if study.canonical_bytes() != data:
        raise SpecError("study", ["study: bytes are not in canonical form"])
    return study

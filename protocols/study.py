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
from pathlib import Path
from typing import Any

from protocols.errors import SpecError
from protocols.instruments import Instrument, builtin_instruments, parse_instrument
from protocols.limits import MAX_DEPTH, MAX_RELEASE_VALUES, MAX_STUDY_WIRE_BYTES
from protocols.release import Envelope, parse_envelope
from protocols.spec import did_you_mean, nested_deeper_than, read_yaml, short, unknown_keys

__all__ = [
    "MAX_BANDS",
    "MAX_EXPONENT",
    "MAX_ID_CHARS",
    "MAX_MIN_SCORES",
    "MAX_MIN_SITES",
    "MAX_NUMBER_CHARS",
    "MAX_SCORE",
    "MAX_SESSION",
    "MAX_TITLE_CHARS",
    "SCHEMA_VERSION",
    "SIGNED_STUDY_FORMAT",
    "Family",
    "PrivacyRequest",
    "Study",
    "parse_families",
    "parse_loss",
    "parse_study",
    "read_study_file",
    "study_from_canonical",
]

SCHEMA_VERSION = 1
SIGNED_STUDY_FORMAT = "outcomebench.signed-study"

# Bounds of a study's fields, so that what a study costs to read, plan, store (manual
# approval keeps pending studies) and log stays small whatever a coordinator sends.
MAX_ID_CHARS = 80  # the study id and an inline instrument's id
MAX_TITLE_CHARS = 300
MAX_BANDS = 50
MAX_SESSION = 100  # K, the last session of a trajectory
MAX_MIN_SCORES = 1000
MAX_MIN_SITES = 10_000
MAX_SCORE = 10_000  # an inline instrument's range lies within [-MAX_SCORE, MAX_SCORE]
# A privacy loss is a decimal of at most MAX_NUMBER_CHARS characters between
# 10**-MAX_EXPONENT and 10**MAX_EXPONENT: an exact Fraction of "1e-1000000" alone would
# cost a minute of CPU, and no meaningful loss lies outside that range.
MAX_NUMBER_CHARS = 40
MAX_EXPONENT = 30


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
    """An exact, bounded decimal (see MAX_NUMBER_CHARS); its size is checked on the text
    before any arithmetic."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        problems.append(f"{where}: expected a number, got {short(value)}")
        return None
    if isinstance(value, int) and value.bit_length() > 4 * MAX_NUMBER_CHARS:
        text = ""  # too long; str() of a huge int is itself costly
    else:
        text = str(value).strip()
    if not text or len(text) > MAX_NUMBER_CHARS:
        problems.append(
            f"{where}: expected a decimal number of at most {MAX_NUMBER_CHARS} characters, "
            f"got {short(value)}"
        )
        return None
    try:
        # Via the decimal text, so 0.1 means exactly 1/10, not the nearest binary float.
        number = Decimal(text)
    except (InvalidOperation, ValueError):
        problems.append(f"{where}: expected a number, got {short(value)}")
        return None
    if not number.is_finite():
        problems.append(f"{where}: expected a finite number, got {short(value)}")
        return None
    if number and not -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        problems.append(
            f"{where}: {short(value)} is out of range; a privacy loss lies between "
            f"1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}"
        )
        return None
    return Fraction(number)


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
            problems.append(f"{where}.rho: must be > 0, got {short(spec['rho'])}")
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
    if len(raw) > len(Family):
        problems.append(f"{where}: at most {len(Family)} families, from {', '.join(Family)}")
        return []
    families: list[Family] = []
    for f in raw:
        try:
            families.append(Family(f))
        except ValueError:
            hint = did_you_mean(f, Family) if isinstance(f, str) else ""
            problems.append(f"{where}: unknown family {short(f)}{hint}")
    return families


def parse_study(doc: Any, where: str = "study") -> Study:
    """Validate a study draft (the YAML mapping, with or without a top ``study:`` key)."""
    if isinstance(doc, Mapping) and set(doc) == {"study"}:
        doc = doc["study"]
    if not isinstance(doc, Mapping):
        raise SpecError(where, [f"{where}: expected a mapping with keys {', '.join(_STUDY_KEYS)}"])
    problems = unknown_keys(doc, _STUDY_KEYS, where)

    sid = doc.get("id")
    if not _short_text(sid, MAX_ID_CHARS) or not sid:
        problems.append(
            f"{where}.id: expected a printable text id of at most {MAX_ID_CHARS} characters, "
            f"got {short(sid)}"
        )
    title = doc.get("title", "")
    if not _short_text(title, MAX_TITLE_CHARS):
        problems.append(
            f"{where}.title: expected printable text (one line) of at most {MAX_TITLE_CHARS} "
            f"characters, got {short(title)}"
        )

    instrument, inline = _parse_study_instrument(doc.get("instrument"), where, problems)

    window = _parse_window(doc.get("window"), where, problems)

    inclusion = doc.get("inclusion", {"min_scores": 2})
    min_scores = 2
    if not isinstance(inclusion, Mapping):
        problems.append(f"{where}.inclusion: expected {{min_scores: 2}}")
    else:
        problems += unknown_keys(inclusion, ("min_scores",), f"{where}.inclusion")
        min_scores = inclusion.get("min_scores", 2)
        if not _whole(min_scores, 2, MAX_MIN_SCORES):
            problems.append(
                f"{where}.inclusion.min_scores: must be a whole number 2..{MAX_MIN_SCORES} "
                "(an episode needs an intake and a final score)"
            )
            min_scores = 2

    bands = _parse_bands(doc.get("bands"), instrument, where, problems)

    families = parse_families(doc.get("families"), f"{where}.families", problems, empty=False)
    if len(set(families)) != len(families):
        problems.append(f"{where}.families: a family is listed twice")
    ordered = tuple(f for f in Family if f in families)

    k = doc.get("max_session", 20)
    if not _whole(k, 1, MAX_SESSION):
        problems.append(
            f"{where}.max_session: expected a whole number 1..{MAX_SESSION}, got {short(k)}"
        )
        k = 20

    if instrument is not None and bands and ordered:
        _check_release_size(ordered, len(bands), instrument.width, int(k), where, problems)

    privacy = parse_loss(doc.get("privacy"), f"{where}.privacy", problems)

    min_sites = doc.get("min_sites", 3)
    if not _whole(min_sites, 1, MAX_MIN_SITES):
        problems.append(
            f"{where}.min_sites: expected a whole number 1..{MAX_MIN_SITES}, got {short(min_sites)}"
        )

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


def _short_text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit and value.isprintable()


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_release_size(
    families: tuple[Family, ...],
    n_bands: int,
    width: int,
    max_session: int,
    where: str,
    problems: list[str],
) -> None:
    """A release that could never fit into one message is refused before anything is
    computed or charged (the count is arithmetic: nothing is allocated)."""
    # The layout imports this module; the count is the layout's, so it is asked here.
    from protocols.layout import release_values  # noqa: PLC0415

    n = release_values(families, n_bands, width, max_session)
    if n > MAX_RELEASE_VALUES:
        problems.append(
            f"{where}: asks each site for {n} values ({n_bands} bands, range width {width}, "
            f"max_session {max_session}); at most {MAX_RELEASE_VALUES} fit into one release "
            "message: use fewer bands, a narrower range or a smaller max_session, or leave "
            "out the histogram family"
        )


def _parse_study_instrument(
    raw: Any, where: str, problems: list[str]
) -> tuple[Instrument | None, bool]:
    registry = builtin_instruments()
    if isinstance(raw, str):
        if raw in registry:
            return registry[raw], False
        problems.append(
            f"{where}.instrument: unknown instrument {short(raw)}"
            f"{did_you_mean(raw, registry)}; use a registry id or an inline "
            "definition {id: X, definition: {range: ..., better: ..., ...}}"
        )
        return None, False
    if isinstance(raw, Mapping) and set(raw) <= {"id", "definition"} and "definition" in raw:
        ins_id = raw.get("id")
        if not isinstance(ins_id, str) or not ins_id:
            problems.append(f"{where}.instrument.id: required with an inline definition")
            return None, True
        if not _short_text(ins_id, MAX_ID_CHARS):
            problems.append(
                f"{where}.instrument.id: expected a printable id of at most {MAX_ID_CHARS} "
                f"characters, got {short(ins_id)}"
            )
            return None, True
        if ins_id in registry:
            problems.append(
                f"{where}.instrument.id: {short(ins_id)} is a registry instrument; "
                "give the inline definition another id"
            )
            return None, True
        try:
            ins = parse_instrument(ins_id, raw["definition"], f"{where}.instrument")
        except SpecError as exc:
            problems.extend(exc.problems)
            return None, True
        if not -MAX_SCORE <= ins.lo < ins.hi <= MAX_SCORE:
            problems.append(
                f"{where}.instrument.definition.range: [{short(ins.lo)}, {short(ins.hi)}] "
                f"must lie within [-{MAX_SCORE}, {MAX_SCORE}]"
            )
            return None, True
        return ins, True
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
            problems.append(
                f"{where}.window.{key}: expected a date YYYY-MM-DD, got {short(raw[key])}"
            )
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
    if len(raw) > MAX_BANDS:
        problems.append(f"{where}.bands: at most {MAX_BANDS} bands, got {len(raw)}")
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
    return tuple(bands)


def study_from_canonical(data: bytes) -> Study:
    """Rebuild a study from its canonical bytes (as sent over the wire) and check the
    round trip, so a site answers exactly the study whose hash it reports."""
    if len(data) > MAX_STUDY_WIRE_BYTES:
        raise SpecError(
            "study", [f"study: larger than {MAX_STUDY_WIRE_BYTES} bytes; not a canonical study"]
        )
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError: also an integer of more digits than Python converts
        raise SpecError("study", ["study: not canonical study JSON"]) from None
    if nested_deeper_than(doc, MAX_DEPTH):
        raise SpecError("study", [f"study: nested more than {MAX_DEPTH} levels deep"])
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


def read_study_file(path: Path) -> tuple[Study, Envelope | None]:
    """A study file: the YAML draft, or a signed study (JSON, with its envelope), read
    within the document bounds of :func:`protocols.spec.read_yaml`; SpecError lists
    every problem. The one reader of study files, for sites and the coordinator."""
    where = str(path)
    text, doc = read_yaml(path, missing="pass --study PATH/TO/study.yaml")  # JSON is YAML
    try:
        if isinstance(doc, Mapping) and doc.get("format") == SIGNED_STUDY_FORMAT:
            envelope = parse_envelope(text, "study")
            return study_from_canonical(envelope.payload), envelope
        return parse_study(doc), None
    except SpecError as exc:  # each problem names the field; the file is named once more
        raise SpecError(where, [f"{where}: {p}" for p in exc.problems]) from None

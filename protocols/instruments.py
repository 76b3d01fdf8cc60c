"""Instrument registry: frozen descriptions of outcome measures.

An :class:`Instrument` says what a score means: its range, which direction is better, the
clinical cut-off (caseness), the reliable-change threshold in points and the intake
severity bands. The built-in registry is ``configs/instruments.yaml`` (shipped as
``protocols/data/instruments.yaml``); sites and studies may define custom instruments in
YAML with :func:`parse_instrument`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from importlib import resources
from statistics import NormalDist
from types import MappingProxyType
from typing import Any

import yaml

from protocols.errors import SpecError
from protocols.spec import as_number, unknown_keys

__all__ = [
    "Band",
    "Better",
    "CutoffCriterion",
    "Instrument",
    "builtin_instruments",
    "jacobson_truax_cutoff",
    "jacobson_truax_threshold",
    "parse_instrument",
    "parse_instruments",
]


class Better(StrEnum):
    """Which end of the scale is better."""

    LOWER = "lower"
    HIGHER = "higher"


class CutoffCriterion(StrEnum):
    """Jacobson-Truax cut-off criteria (Jacobson & Truax 1991)."""

    A = "a"  # two SDs beyond the clinical mean, toward the functional side
    B = "b"  # two SDs beyond the functional mean, toward the clinical side
    C = "c"  # the point between the two distributions, weighted by their SDs


@dataclass(frozen=True, slots=True, kw_only=True)
class Band:
    """An intake severity band, inclusive at both ends."""

    lo: int
    hi: int
    label: str

    def __post_init__(self) -> None:
        if self.lo > self.hi:
            raise ValueError(f"band [{self.lo}, {self.hi}] is empty: lo must be <= hi")

    @property
    def name(self) -> str:
        return f"{self.lo}-{self.hi}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Instrument:
    """One outcome measure.

    Caseness follows the published convention: with ``better=lower`` a score is at
    caseness when ``score >= cutoff``; with ``better=higher`` when ``score < cutoff``.
    A change of at least ``reliable_change`` points in the better direction is a reliable
    improvement (in the worse direction, a reliable deterioration). ``reliable_change`` is
    None where no value is known: reliable-change outcomes are then not derived.
    """

    id: str
    name: str
    lo: int
    hi: int
    better: Better
    cutoff: float
    reliable_change: float | None
    bands: tuple[Band, ...]
    source: str = ""
    unverified: tuple[str, ...] = ()
    cutoff_criterion: CutoffCriterion | None = None

    def __post_init__(self) -> None:
        problems = _check_instrument(self)
        if problems:
            raise SpecError(f"instrument {self.id}", problems)

    @property
    def width(self) -> int:
        return self.hi - self.lo


def _check_instrument(ins: Instrument) -> list[str]:
    problems: list[str] = []
    if ins.lo >= ins.hi:
        problems.append(f"range: [{ins.lo}, {ins.hi}] is empty; write [lowest, highest]")
    if not math.isfinite(ins.cutoff) or not ins.lo <= ins.cutoff <= ins.hi + 1:
        problems.append(f"cutoff: {ins.cutoff} lies outside the range [{ins.lo}, {ins.hi}]")
    if ins.reliable_change is not None and not 0 < ins.reliable_change <= ins.width:
        problems.append(
            f"reliable_change: {ins.reliable_change} must be > 0 and at most the range width "
            f"{ins.width}"
        )
    previous: Band | None = None
    for band in ins.bands:
        if band.lo < ins.lo or band.hi > ins.hi:
            problems.append(f"bands: [{band.lo}, {band.hi}] lies outside [{ins.lo}, {ins.hi}]")
        if previous is not None and band.lo != previous.hi + 1:
            problems.append(
                f"bands: [{band.lo}, {band.hi}] does not follow [{previous.lo}, {previous.hi}]; "
                "bands must be sorted, adjacent and not overlap"
            )
        previous = band
    if ins.bands and (ins.bands[0].lo != ins.lo or ins.bands[-1].hi != ins.hi):
        problems.append(f"bands: must cover the whole range [{ins.lo}, {ins.hi}]")
    return problems


def jacobson_truax_threshold(sd: float, reliability: float, confidence: float = 0.95) -> float:
    """Reliable-change threshold in points: z * sqrt(2) * SD * sqrt(1 - r)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return z * math.sqrt(2.0) * sd * math.sqrt(1.0 - reliability)


def jacobson_truax_cutoff(
    criterion: CutoffCriterion,
    better: Better,
    clinical: tuple[float, float],
    functional: tuple[float, float],
) -> float:
    """Clinical-significance cut-off from clinical and functional (mean, SD)."""
    (m_clin, sd_clin), (m_func, sd_func) = clinical, functional
    toward_functional = -1.0 if better is Better.LOWER else 1.0
    if criterion is CutoffCriterion.A:
        return m_clin + toward_functional * 2 * sd_clin
    if criterion is CutoffCriterion.B:
        return m_func - toward_functional * 2 * sd_func
    return (sd_clin * m_func + sd_func * m_clin) / (sd_clin + sd_func)


_REGISTRY_KEYS = frozenset(
    {"name", "range", "better", "cutoff", "reliable_change", "bands", "source", "unverified"}
)
_CUSTOM_KEYS = frozenset(
    {
        "name",
        "range",
        "better",
        "cutoff",
        "reliable_change",
        "reliability",
        "sd",
        "confidence",
        "clinical",
        "functional",
        "cutoff_criterion",
        "bands",
        "source",
        "unverified",
    }
)


def parse_instrument(instrument_id: str, spec: Any, where: str = "instruments") -> Instrument:
    """Validate one YAML instrument definition; raise :class:`SpecError` listing all problems.

    Keys: ``range: [lo, hi]``, ``better: lower|higher``; either ``reliable_change`` (points)
    or ``reliability`` and ``sd`` (Jacobson-Truax, optional ``confidence``, default 0.95);
    either ``cutoff`` or ``clinical: {mean, sd}`` and ``functional: {mean, sd}`` with
    ``cutoff_criterion: a|b|c`` (default c); optional ``bands: [[lo, hi, label], ...]``
    (default: below and at/over the cut-off), ``name``, ``source``, ``unverified``.
    """
    here = f"{where}.{instrument_id}"
    if not isinstance(spec, Mapping):
        raise SpecError(here, [f"{here}: expected a mapping of keys, got {spec!r}"])
    problems = unknown_keys(spec, _CUSTOM_KEYS, here)

    lo = hi = 0
    rng = spec.get("range")
    if (
        isinstance(rng, list | tuple)
        and len(rng) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
    ):
        lo, hi = int(rng[0]), int(rng[1])
    else:
        problems.append(f"{here}.range: expected [lowest, highest] integer scores, got {rng!r}")

    better_raw = spec.get("better")
    try:
        better = Better(str(better_raw))
    except ValueError:
        problems.append(f"{here}.better: expected 'lower' or 'higher', got {better_raw!r}")
        better = Better.LOWER

    reliable_change = _parse_reliable_change(spec, here, problems)
    cutoff, criterion = _parse_cutoff(spec, here, better, problems)

    bands: list[Band] = []
    raw_bands = spec.get("bands")
    if raw_bands is None:
        if cutoff is not None and lo < hi:
            bands = _default_bands(lo, hi, better, cutoff)
    elif isinstance(raw_bands, list) and raw_bands:
        for i, b in enumerate(raw_bands):
            ok = (
                isinstance(b, list | tuple)
                and len(b) in (2, 3)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in b[:2])
                and int(b[0]) <= int(b[1])
            )
            if ok:
                label = str(b[2]) if len(b) == 3 else f"{b[0]}-{b[1]}"
                bands.append(Band(lo=int(b[0]), hi=int(b[1]), label=label))
            else:
                problems.append(
                    f"{here}.bands[{i}]: expected [lo, hi, label] with lo <= hi, got {b!r}"
                )
    else:
        problems.append(f"{here}.bands: expected a list of [lo, hi, label], got {raw_bands!r}")

    unverified = spec.get("unverified", [])
    if not isinstance(unverified, list) or not all(isinstance(u, str) for u in unverified):
        problems.append(f"{here}.unverified: expected a list of field names, got {unverified!r}")
        unverified = []

    if problems:
        raise SpecError(here, problems)
    if cutoff is None:  # unreachable: a missing cut-off is always a recorded problem
        raise SpecError(here, [f"{here}: missing cut-off"])
    try:
        return Instrument(
            id=instrument_id,
            name=str(spec.get("name", instrument_id)),
            lo=lo,
            hi=hi,
            better=better,
            cutoff=cutoff,
            reliable_change=reliable_change,
            bands=tuple(bands),
            source=str(spec.get("source", "")),
            unverified=tuple(unverified),
            cutoff_criterion=criterion,
        )
    except SpecError as exc:
        raise SpecError(here, [f"{here}: {p}" for p in exc.problems]) from None


def _parse_reliable_change(spec: Mapping[str, Any], here: str, problems: list[str]) -> float | None:
    has_points = "reliable_change" in spec
    has_jt = "reliability" in spec or "sd" in spec
    if has_points and has_jt:
        problems.append(f"{here}: give either reliable_change or reliability + sd, not both")
        return None
    if has_points:
        if spec["reliable_change"] is None:
            return None
        return as_number(spec["reliable_change"], f"{here}.reliable_change", problems)
    if has_jt:
        r = as_number(spec.get("reliability"), f"{here}.reliability", problems)
        sd = as_number(spec.get("sd"), f"{here}.sd", problems)
        conf = as_number(spec.get("confidence", 0.95), f"{here}.confidence", problems)
        if r is not None and not 0 <= r < 1:
            problems.append(f"{here}.reliability: {r} must be in [0, 1)")
        elif sd is not None and sd <= 0:
            problems.append(f"{here}.sd: {sd} must be positive")
        elif conf is not None and not 0 < conf < 1:
            problems.append(f"{here}.confidence: {conf} must be in (0, 1), e.g. 0.95")
        elif r is not None and sd is not None and conf is not None:
            return jacobson_truax_threshold(sd, r, conf)
        return None
    problems.append(
        f"{here}: missing reliable change: add reliable_change: <points>, or reliability: <r> "
        "and sd: <intake SD> (Jacobson-Truax)"
    )
    return None


def _parse_cutoff(
    spec: Mapping[str, Any], here: str, better: Better, problems: list[str]
) -> tuple[float | None, CutoffCriterion | None]:
    has_norms = "clinical" in spec or "functional" in spec
    if "cutoff" in spec and has_norms:
        problems.append(f"{here}: give either cutoff or clinical + functional norms, not both")
        return None, None
    if "cutoff" in spec:
        if "cutoff_criterion" in spec:
            problems.append(
                f"{here}.cutoff_criterion: only applies with clinical + functional norms"
            )
        return as_number(spec["cutoff"], f"{here}.cutoff", problems), None
    if has_norms:
        norms: list[tuple[float, float]] = []
        for key in ("clinical", "functional"):
            norm = spec.get(key)
            if not isinstance(norm, Mapping) or set(norm) != {"mean", "sd"}:
                problems.append(f"{here}.{key}: expected {{mean: <m>, sd: <s>}}, got {norm!r}")
                continue
            m = as_number(norm["mean"], f"{here}.{key}.mean", problems)
            s = as_number(norm["sd"], f"{here}.{key}.sd", problems)
            if s is not None and s <= 0:
                problems.append(f"{here}.{key}.sd: {s} must be positive")
            elif m is not None and s is not None:
                norms.append((m, s))
        raw = spec.get("cutoff_criterion", "c")
        try:
            criterion = CutoffCriterion(raw)
        except ValueError:
            problems.append(f"{here}.cutoff_criterion: expected a, b or c, got {raw!r}")
            return None, None
        if len(norms) != 2:
            return None, None
        return jacobson_truax_cutoff(criterion, better, norms[0], norms[1]), criterion
    problems.append(
        f"{here}: missing cut-off: add cutoff: <score>, or clinical: {{mean, sd}} and "
        "functional: {mean, sd} (Jacobson-Truax)"
    )
    return None, None


def _default_bands(lo: int, hi: int, better: Better, cutoff: float) -> list[Band]:
    # The first clinical integer score on each side of the published convention.
    if better is Better.LOWER:
        first_case = max(lo, min(hi, math.ceil(cutoff)))
        if first_case <= lo:
            return [Band(lo=lo, hi=hi, label="all")]
        return [
            Band(lo=lo, hi=first_case - 1, label="below cut-off"),
            Band(lo=first_case, hi=hi, label="at or over cut-off"),
        ]
    last_case = min(hi, max(lo, math.ceil(cutoff) - 1))
    if last_case >= hi:
        return [Band(lo=lo, hi=hi, label="all")]
    return [
        Band(lo=lo, hi=last_case, label="under cut-off"),
        Band(lo=last_case + 1, hi=hi, label="at or over cut-off"),
    ]


def parse_instruments(specs: Any, where: str = "instruments") -> dict[str, Instrument]:
    """Parse a mapping ``{id: spec}``; all problems of all instruments in one SpecError."""
    if specs is None:
        return {}
    if not isinstance(specs, Mapping):
        raise SpecError(where, [f"{where}: expected a mapping of instrument id to definition"])
    out: dict[str, Instrument] = {}
    problems: list[str] = []
    for ins_id, spec in specs.items():
        try:
            out[str(ins_id)] = parse_instrument(str(ins_id), spec, where)
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(where, problems)
    return out


@cache
def _builtin() -> Mapping[str, Instrument]:
    text = resources.files("protocols").joinpath("data/instruments.yaml").read_text("utf-8")
    doc = yaml.safe_load(text)
    specs = doc["instruments"]
    problems: list[str] = []
    for ins_id, spec in specs.items():
        problems.extend(unknown_keys(spec, _REGISTRY_KEYS, f"registry.{ins_id}"))
    if problems:
        raise SpecError("instrument registry", problems)
    return MappingProxyType(parse_instruments(specs, "registry"))


def builtin_instruments() -> Mapping[str, Instrument]:
    """The built-in registry, read once: PHQ-9, GAD-7, CORE-10, CORE-OM, ORS, OQ-45, WSAS, K10."""
    return _builtin()

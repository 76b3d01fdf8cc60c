"""Synthetic clinics: seeded, realistic routine-outcome exports for tests, demos and benchmarks.

This is test-data generation, not a release path: it uses numpy's general-purpose RNG on
purpose, and nothing here may be used to add privacy noise.

The model follows the "Parameters for synthetic clinics" of DOMAIN.md. Scores are simulated
on a *severity* scale (higher is worse) and mapped onto the instrument's own direction at
the end. Per episode:

- intake: a mixture of clinical-range clients and, by default, 27% sub-clinical clients
  whose expected change is zero (so that >= 25% start below the cut-off);
- trajectory: expected severity at session k is ``intake - gain * ln(k)`` (log-linear),
  where ``gain`` grows with intake severity, varies per client and carries a therapist
  effect (about 5% of outcome variance); 7% of episodes have a negative gain, so that
  5-10% reliably deteriorate;
- length: a rounded lognormal number of sessions (median 5, mean 6.5, SD 4.4, at least 1,
  at most 30), linked by rank to the gain so that fast improvers leave early; about 20%
  of episodes are drop-outs, drawn mostly from the short ones (they stopped before their
  final planned session, and gained less per session);
- each administration adds measurement error with SEM = reliable change / (1.96 sqrt 2),
  which for PHQ-9 (6 points) is 2.16, i.e. intake SD 6.5 with alpha .89; scores are
  rounded and clipped to the instrument's range;
- sessions are roughly weekly from start dates spread over 2025-2026; 8% of clients come
  back for a second episode more than 180 days after the first ended.

:func:`generate_site` returns one clinic as a compact frame (vectorised: a million
clients take seconds). :func:`synthesize` writes whole clinics as a clinic would export
them: ``outcomes.csv`` with the clinic's own column names and ``site.yaml`` mapping them;
with ``messy=True`` it also injects the kinds of bad rows real exports have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml

from coordinator.clinic_sizes import DEFAULT_CLIENTS_RANGE, MIN_CLIENTS
from protocols import Better, Instrument, SpecError, builtin_instruments
from protocols.spec import did_you_mean

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_CLIENTS_RANGE",
    "EPISODE_GAP_DAYS",
    "MIN_CLIENTS",
    "BadRowKind",
    "SiteFiles",
    "SiteParams",
    "draw_site_params",
    "generate_site",
    "site_id",
    "synthesize",
]

EPISODE_GAP_DAYS = 180
"""A gap of more than this many days between sessions starts a new episode."""

CSV_COLUMNS = ("client", "session_no", "seen_on", "measure", "total", "therapist", "clinic_room")
"""The export's columns; deliberately not our canonical names, to exercise column mapping."""

_COLUMN_MAP = {
    "client_id": "client",
    "session": "session_no",
    "date": "seen_on",
    "instrument": "measure",
    "score": "total",
    "therapist_id": "therapist",
}

# Reference values in PHQ-9 points (cut-off 10, range 0-27). Other instruments get the same
# model, placed relative to their own cut-off and rescaled (see SiteParams.typical). With
# these values a large PHQ-9 clinic has: sessions median 5, mean 6.5; 20% drop-out; 33%
# starting below the cut-off; mean change of clinical-range clients 6.4 points (d about 1
# against the intake SD of 6.5); recovery 48%; reliable deterioration 6%; therapist share
# of the variance of intake-adjusted final scores 5%.
_REF_WIDTH = 27.0
_REF_BOUNDARY = 9.5  # the true severity at which a rounded PHQ-9 score reaches the cut-off
_REF_INTAKE_MEAN = 16.0  # NHS Talking Therapies intakes average in the moderate band
_REF_INTAKE_SD = 4.5
_REF_SUBCLINICAL_MEAN = 5.5
_REF_SUBCLINICAL_SD = 2.2
_REF_GAIN_MEAN = 5.2  # points per unit ln(session), before drop-outs' smaller gains
_REF_GAIN_SD = 1.8
_REF_GAIN_PER_INTAKE = 0.12
_REF_SUBCLINICAL_GAIN_SD = 0.5
_REF_DETERIORATION_GAIN = 3.5
_REF_DETERIORATION_GAIN_SD = 1.2
_REF_THERAPIST_SD = 0.8
_REF_RELIABLE_CHANGE = 6.0
_REF_SEM = _REF_RELIABLE_CHANGE / (1.96 * math.sqrt(2.0))
_INTAKE_HEADROOM_SDS = 2.2

_REPEAT_GAP_DAYS = (200, 330)  # well clear of the 180-day split, so episodes are unambiguous
_INTERVAL_DAYS = np.array([5, 6, 7, 8, 14, 21], dtype=np.int64)
_INTERVAL_P = np.array([0.03, 0.07, 0.65, 0.10, 0.11, 0.04])
_ROOMS = np.array(["Room 1", "Room 2", "Room 3", "Room 4", "Annex", "Online"], dtype=object)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ObjArray = npt.NDArray[np.object_]


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteParams:
    """Everything that makes one synthetic clinic differ from another.

    Locations and spreads are in the instrument's points on the severity scale (higher is
    worse; for a ``better=lower`` instrument that is the score itself). Use
    :meth:`typical` for values calibrated to DOMAIN.md; set fields directly to explore
    (``dataclasses.replace`` re-validates).

    - ``intake_mean``, ``intake_sd``: true intake severity of clinical-range clients;
    - ``subclinical_*``: the share of clients below the cut-off, their intake and the
      spread of their (zero-mean) gain;
    - ``gain_mean``, ``gain_sd``: improvement per unit of ln(session) of clinical-range
      clients, plus ``gain_per_intake`` per point of intake above ``intake_mean``;
    - ``deterioration_*``: the share of episodes that worsen, and by how much per ln(session);
    - ``therapist_sd``: SD of therapist effects on the gain;
    - ``noise_sd``: measurement error per administration (the SEM);
    - ``sessions_*``, ``max_sessions``: course length (see ``_session_cdf``);
    - ``fast_improver_link``: how strongly a larger gain means a shorter course;
    - ``dropout``, ``dropout_gain_factor``: share of drop-outs and their smaller gain;
    - ``repeat_share``: share of clients with a second episode;
    - ``first_day``, ``last_day``: the export's date range.
    """

    instrument: Instrument
    n_clients: int
    n_therapists: int
    intake_mean: float
    intake_sd: float
    subclinical_share: float
    subclinical_mean: float
    subclinical_sd: float
    subclinical_gain_sd: float
    gain_mean: float
    gain_sd: float
    gain_per_intake: float
    deterioration_share: float
    deterioration_gain: float
    deterioration_gain_sd: float
    therapist_sd: float
    noise_sd: float
    sessions_median: float = 5.3  # of the lognormal before rounding; see _session_cdf
    sessions_sigma: float = 0.66
    max_sessions: int = 30
    fast_improver_link: float = 0.3  # rank correlation between gain and fewer sessions
    dropout: float = 0.20
    dropout_gain_factor: float = 0.6  # drop-outs benefit less per session
    repeat_share: float = 0.08
    first_day: date = date(2025, 1, 1)
    last_day: date = date(2026, 12, 31)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.n_clients < 1:
            problems.append(f"n_clients: {self.n_clients} must be >= 1")
        if self.n_therapists < 1:
            problems.append(f"n_therapists: {self.n_therapists} must be >= 1")
        for name in (
            "subclinical_share",
            "deterioration_share",
            "dropout",
            "repeat_share",
            "fast_improver_link",
            "dropout_gain_factor",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}: {value} must be between 0 and 1")
        if self.subclinical_share + self.deterioration_share > 1.0:
            problems.append("subclinical_share + deterioration_share must be at most 1")
        for name in (
            "intake_mean",
            "subclinical_mean",
            "gain_mean",
            "gain_per_intake",
            "deterioration_gain",
        ):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name}: {getattr(self, name)} must be a finite number")
        for name in (
            "intake_sd",
            "subclinical_sd",
            "subclinical_gain_sd",
            "gain_sd",
            "deterioration_gain_sd",
            "therapist_sd",
            "noise_sd",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                problems.append(f"{name}: {value} must be a finite number >= 0")
        if not (math.isfinite(self.sessions_median) and self.sessions_median > 0.0):
            problems.append(f"sessions_median: {self.sessions_median} must be > 0")
        if not (math.isfinite(self.sessions_sigma) and self.sessions_sigma > 0.0):
            problems.append(f"sessions_sigma: {self.sessions_sigma} must be > 0")
        if not 1 <= self.max_sessions <= 200:
            problems.append(f"max_sessions: {self.max_sessions} must be between 1 and 200")
        if (self.last_day - self.first_day).days < 180:
            problems.append(
                f"first_day {self.first_day} .. last_day {self.last_day}: allow at least 180 days"
            )
        if problems:
            raise SpecError("SiteParams", problems)

    @classmethod
    def typical(
        cls,
        instrument: Instrument,
        n_clients: int,
        *,
        n_therapists: int | None = None,
        case_mix: float = 0.0,
        effectiveness: float = 1.0,
        subclinical_share: float = 0.27,
        dropout: float = 0.20,
    ) -> SiteParams:
        """A clinic calibrated to DOMAIN.md, on any instrument.

        ``case_mix`` shifts the clinical intake mean by that many intake SDs (positive:
        more severe). ``effectiveness`` multiplies the mean gain (1.0: a typical clinic).
        ``n_therapists`` defaults to one per 40 clients.

        PHQ-9 reference values are placed relative to the instrument's cut-off and scaled
        by the geometric mean of the range-width ratio and the reliable-change ratio (the
        width alone where no reliable change is known): by width alone OQ-45 would get an
        intake SD of 30, by reliable change alone 10; the published figure is about 20.
        """
        scale = instrument.width / _REF_WIDTH
        if instrument.reliable_change is not None:
            scale = math.sqrt(scale * instrument.reliable_change / _REF_RELIABLE_CHANGE)
            sem = instrument.reliable_change / (1.96 * math.sqrt(2.0))
        else:
            sem = _REF_SEM * scale
        boundary = _case_boundary(instrument)

        def at(ref: float) -> float:
            return boundary + (ref - _REF_BOUNDARY) * scale

        intake_sd = _REF_INTAKE_SD * scale
        # Where the cut-off sits high in the range (WSAS), keep the clinical intake clear of
        # the ceiling, or a pile of maximum scores would stand in for severity.
        # (The severity scale spans lo..hi for either direction, so the worst is hi.)
        headroom = instrument.hi - _INTAKE_HEADROOM_SDS * intake_sd
        intake_mean = min(at(_REF_INTAKE_MEAN), headroom)
        return cls(
            instrument=instrument,
            n_clients=n_clients,
            n_therapists=max(1, round(n_clients / 40)) if n_therapists is None else n_therapists,
            intake_mean=intake_mean + case_mix * intake_sd,
            intake_sd=intake_sd,
            subclinical_share=subclinical_share,
            subclinical_mean=at(_REF_SUBCLINICAL_MEAN),
            subclinical_sd=_REF_SUBCLINICAL_SD * scale,
            subclinical_gain_sd=_REF_SUBCLINICAL_GAIN_SD * scale,
            gain_mean=_REF_GAIN_MEAN * scale * effectiveness,
            gain_sd=_REF_GAIN_SD * scale,
            gain_per_intake=_REF_GAIN_PER_INTAKE,
            deterioration_share=0.07,
            deterioration_gain=_REF_DETERIORATION_GAIN * scale,
            deterioration_gain_sd=_REF_DETERIORATION_GAIN_SD * scale,
            therapist_sd=_REF_THERAPIST_SD * scale,
            noise_sd=sem,
            dropout=dropout,
        )


def _case_boundary(ins: Instrument) -> float:
    """The true severity at which the rounded score first reaches caseness."""
    if ins.better is Better.LOWER:
        return math.ceil(ins.cutoff) - 0.5
    # better=higher: caseness is score < cutoff, i.e. score <= ceil(cutoff) - 1.
    return ins.lo + ins.hi - math.ceil(ins.cutoff) + 0.5


def _soft_bounds(x: FloatArray, lo: float, hi: float, softness: float) -> FloatArray:
    """``x`` bent smoothly into [lo, hi] (softplus at each end).

    A log-linear trajectory has no floor: without this, long courses of fast improvers
    would sit far below zero, and every later score would be a clipped 0 with no spread.
    """
    y = lo + softness * np.logaddexp(0.0, (x - lo) / softness)
    return np.asarray(hi - softness * np.logaddexp(0.0, (hi - y) / softness), np.float64)


def draw_site_params(
    rng: np.random.Generator,
    instrument: Instrument,
    clients_range: tuple[int, int] = DEFAULT_CLIENTS_RANGE,
) -> SiteParams:
    """A random clinic: size log-uniform in ``clients_range``, its own case mix,
    effectiveness, share of sub-clinical clients, drop-out rate and caseloads."""
    lo, hi = clients_range
    if not 1 <= lo <= hi:
        raise ValueError(
            f"clients_range: {clients_range!r} must be (min, max) with 1 <= min <= max"
        )
    n_clients = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    n_clients = min(hi, max(lo, n_clients))
    caseload = rng.uniform(25.0, 60.0)
    return SiteParams.typical(
        instrument,
        n_clients,
        n_therapists=max(1, round(n_clients / caseload)),
        case_mix=float(rng.normal(0.0, 0.3)),
        effectiveness=float(np.exp(rng.normal(0.0, 0.15))),
        subclinical_share=float(rng.uniform(0.27, 0.38)),
        dropout=float(rng.uniform(0.15, 0.25)),
    )


@dataclass(frozen=True, slots=True)
class _Rows:
    """One clinic's rows, sorted by client, episode and session (internal layout)."""

    client: npt.NDArray[np.int32]
    episode: npt.NDArray[np.int8]
    session: npt.NDArray[np.int16]
    day: npt.NDArray[np.int32]  # days since 1970-01-01
    score: npt.NDArray[np.int16]
    therapist: npt.NDArray[np.int32]
    dropped_out: BoolArray


def _session_cdf(median: float, sigma: float, most: int) -> FloatArray:
    """CDF over 1..most sessions of a lognormal rounded to whole sessions, truncated at most.

    A negative binomial with mean 6.5 and SD 4 has median 6, not the published 5; the
    rounded lognormal (median 5.3, sigma 0.66, at most 30) gives median 5, mean 6.5 and
    SD 4.4, the closest fit to all three of Baldwin 2009's figures.
    """
    edges = np.arange(1, most + 1) + 0.5
    z = (np.log(edges) - math.log(median)) / (sigma * math.sqrt(2.0))
    cdf = np.array([0.5 * (1.0 + math.erf(v)) for v in z])
    cdf /= cdf[-1]
    return cdf


def _ranks01(x: FloatArray) -> FloatArray:
    """Mid-ranks scaled to (0, 1): an empirical copula, which needs no inverse normal CDF."""
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size, dtype=np.float64)
    return (ranks + 0.5) / x.size


def _simulate(rng: np.random.Generator, p: SiteParams) -> _Rows:
    ins = p.instrument
    n = p.n_clients
    repeat = rng.random(n) < p.repeat_share
    n_rep = int(repeat.sum())
    n_ep = n + n_rep
    # Episode-level arrays: first episodes of every client, then the second episodes.
    client = np.concatenate([np.arange(n), np.flatnonzero(repeat)]).astype(np.int32)
    ep_no = np.concatenate([np.ones(n, np.int8), np.full(n_rep, 2, np.int8)])

    # Case mix: sub-clinical, deteriorating and clinical-range episodes.
    u = rng.random(n_ep)
    subclinical = u < p.subclinical_share
    deteriorates = (u >= p.subclinical_share) & (u < p.subclinical_share + p.deterioration_share)
    clinical = ~subclinical & ~deteriorates
    # Deterioration is not confined to any severity: draw its intake from the whole mix.
    from_clinical_mix = clinical | (deteriorates & (rng.random(n_ep) >= p.subclinical_share))
    intake = np.where(
        from_clinical_mix,
        rng.normal(p.intake_mean, p.intake_sd, n_ep),
        rng.normal(p.subclinical_mean, p.subclinical_sd, n_ep),
    )
    intake = np.clip(intake, ins.lo, ins.hi)

    gain = np.where(
        clinical,
        p.gain_mean
        + p.gain_per_intake * (intake - p.intake_mean)
        + rng.normal(0.0, p.gain_sd, n_ep),
        rng.normal(0.0, p.subclinical_gain_sd, n_ep),
    )
    gain = np.where(
        deteriorates, -np.abs(rng.normal(p.deterioration_gain, p.deterioration_gain_sd, n_ep)), gain
    )

    # Fast improvers leave early: sessions are linked by rank to the client's gain.
    link = p.fast_improver_link
    z_gain = (gain - gain.mean()) / (gain.std() or 1.0)
    z_len = -link * z_gain + math.sqrt(1.0 - link * link) * rng.standard_normal(n_ep)
    cdf = _session_cdf(p.sessions_median, p.sessions_sigma, p.max_sessions)
    n_sessions = 1 + np.minimum(
        np.searchsorted(cdf, _ranks01(z_len), side="right"), p.max_sessions - 1
    )

    # Drop-outs are mostly the short episodes: P(drop-out) proportional to 1 / sessions,
    # scaled so that the share is p.dropout (bisection over the histogram of lengths, which
    # is as exact as over every episode and independent of the clinic's size).
    lengths = np.arange(p.max_sessions + 1, dtype=np.float64)
    share_of_length = np.bincount(n_sessions, minlength=p.max_sessions + 1) / n_ep
    lo_c, hi_c = 0.0, float(p.max_sessions)
    for _ in range(60):
        mid = (lo_c + hi_c) / 2.0
        if float((share_of_length[1:] * np.minimum(1.0, mid / lengths[1:])).sum()) < p.dropout:
            lo_c = mid
        else:
            hi_c = mid
    dropped_out = rng.random(n_ep) < np.minimum(1.0, lo_c / n_sessions)
    gain = np.where(dropped_out & (gain > 0), gain * p.dropout_gain_factor, gain)

    therapist = rng.integers(0, p.n_therapists, n_ep).astype(np.int32)
    therapist_effect = rng.normal(0.0, p.therapist_sd, p.n_therapists)
    gain = gain + therapist_effect[therapist]

    # Row level.
    n_rows = int(n_sessions.sum())
    ep_of_row = np.repeat(np.arange(n_ep), n_sessions)
    first_row = np.cumsum(n_sessions) - n_sessions
    session = np.arange(n_rows) - first_row[ep_of_row] + 1
    expected = _soft_bounds(
        intake[ep_of_row] - gain[ep_of_row] * np.log(session),
        ins.lo,
        ins.hi,
        max(p.noise_sd / 2.0, 1e-6),
    )
    severity = np.rint(expected + rng.normal(0.0, p.noise_sd, n_rows))
    np.clip(severity, ins.lo, ins.hi, out=severity)
    score = severity if ins.better is Better.LOWER else ins.lo + ins.hi - severity

    interval = rng.choice(_INTERVAL_DAYS, size=n_rows, p=_INTERVAL_P)
    interval[first_row] = 0
    offset = np.cumsum(interval)
    offset -= offset[first_row][ep_of_row]
    duration = offset[first_row + n_sessions - 1]

    # Start dates put every course inside first_day..last_day where it fits: a returning
    # client's two courses and the gap between them must fit together.
    span = (p.last_day - p.first_day).days
    epoch = (p.first_day - date(1970, 1, 1)).days
    gap = rng.integers(_REPEAT_GAP_DAYS[0], _REPEAT_GAP_DAYS[1] + 1, n_rep)
    need = duration[:n].copy()
    need[repeat] += gap + duration[n:]
    start = np.zeros(n_ep, dtype=np.int64)
    start[:n] = np.floor(rng.random(n) * (np.maximum(0, span - need) + 1)).astype(np.int64)
    start[n:] = start[client[n:]] + duration[client[n:]] + gap
    day = epoch + start[ep_of_row] + offset

    order = np.lexsort((ep_no, client))  # episodes by client, then episode number
    row_order = _rows_in_episode_order(order, first_row, n_sessions)
    # Two very long courses can overrun last_day; the export is taken on last_day, so
    # those later sessions have not happened yet.
    row_order = row_order[day[row_order] <= epoch + span]
    return _Rows(
        client=client[ep_of_row][row_order],
        episode=ep_no[ep_of_row][row_order],
        session=session[row_order].astype(np.int16),
        day=day[row_order].astype(np.int32),
        score=score[row_order].astype(np.int16),
        therapist=therapist[ep_of_row][row_order],
        dropped_out=dropped_out[ep_of_row][row_order],
    )


def _rows_in_episode_order(order: IntArray, first_row: IntArray, n_sessions: IntArray) -> IntArray:
    """Row indices that lay episodes out in ``order``, each episode's rows kept in place."""
    lengths = n_sessions[order]
    starts = first_row[order]
    new_first = np.cumsum(lengths) - lengths
    ep = np.repeat(np.arange(order.size), lengths)
    return np.asarray(starts[ep] + (np.arange(int(lengths.sum())) - new_first[ep]), np.int64)


def generate_site(rng: np.random.Generator, params: SiteParams) -> pd.DataFrame:
    """One clinic's scores, one row per administration, sorted by client, episode, session.

    Columns: ``client`` (int32, 0..n_clients-1), ``episode`` (int8, 1 or 2: ground truth;
    exports carry no episode, it is derived from date gaps), ``session_no`` (int16, 1..n
    within the episode), ``seen_on`` (datetime64), ``total`` (int16 score in the
    instrument's range), ``therapist`` (int32) and ``dropped_out`` (bool ground truth per
    episode, repeated on its rows).
    """
    rows = _simulate(rng, params)
    return pd.DataFrame(
        {
            "client": rows.client,
            "episode": rows.episode,
            "session_no": rows.session,
            "seen_on": rows.day.astype("datetime64[D]").astype("datetime64[s]"),
            "total": rows.score,
            "therapist": rows.therapist,
            "dropped_out": rows.dropped_out,
        }
    )


class BadRowKind(StrEnum):
    """The kinds of bad rows ``messy=True`` injects; every kind appears in every clinic."""

    UNKNOWN_INSTRUMENT = "unknown instrument"
    EMPTY_SCORE = "empty score"
    NON_INTEGER_SCORE = "non-integer score"
    SCORE_OUT_OF_RANGE = "score out of range"
    EMPTY_CLIENT = "empty client id"
    CONFLICTING_DUPLICATE = "duplicated session with a conflicting score"
    EXACT_DUPLICATE = "exact duplicate row"
    DATE_OUT_OF_ORDER = "later session dated before an earlier one"
    UNPARSEABLE_DATE = "unparseable date"


_BAD_ROW_SHARE = 0.03


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteFiles:
    """What :func:`synthesize` wrote for one clinic.

    ``n_rows`` counts data rows in the CSV (injected duplicates included), ``n_clients``
    the distinct clients before any damage, ``n_bad_rows`` the rows damaged or added by
    ``messy`` (0 otherwise).
    """

    site_id: str
    directory: Path
    data_path: Path
    config_path: Path
    n_rows: int
    n_clients: int
    n_bad_rows: int


def _to_columns(rng: np.random.Generator, rows: _Rows, ins: Instrument) -> dict[str, ObjArray]:
    """The export as string columns (object arrays, so damage can change their length)."""
    n_clients = int(rows.client.max()) + 1 if rows.client.size else 0
    width = max(6, len(str(3 * n_clients)))
    # Random, sorted record numbers, as a clinic's records system would have assigned them.
    numbers = np.sort(rng.choice(10**width - 1, size=n_clients, replace=False) + 1)
    client_ids = np.char.add("N-", np.char.zfill(numbers.astype(str), width)).astype(object)
    n_therapists = int(rows.therapist.max()) + 1 if rows.therapist.size else 0
    therapist_ids = np.char.add(
        "T-", np.char.zfill((np.arange(n_therapists) + 1).astype(str), 3)
    ).astype(object)
    n = rows.client.size
    return {
        "client": client_ids[rows.client],
        "session_no": rows.session.astype(str).astype(object),
        "seen_on": np.datetime_as_string(rows.day.astype("datetime64[D]")).astype(object),
        "measure": np.full(n, ins.id, dtype=object),
        "total": rows.score.astype(str).astype(object),
        "therapist": therapist_ids[rows.therapist],
        "clinic_room": _ROOMS[rng.integers(0, _ROOMS.size, n)],
    }


def _inject_bad_rows(
    rng: np.random.Generator, cols: dict[str, ObjArray], ins: Instrument, site: str
) -> tuple[dict[str, ObjArray], dict[BadRowKind, int]]:
    """Damage about 3% of rows, every kind at least once; returns the counts per kind.

    ``cols`` is changed in place; the returned columns also hold the added duplicates.
    """
    kinds = list(BadRowKind)
    n = len(cols["client"])
    total = max(len(kinds), round(_BAD_ROW_SHARE * n))
    counts = 1 + rng.multinomial(total - len(kinds), np.full(len(kinds), 1.0 / len(kinds)))
    want = dict(zip(kinds, (int(c) for c in counts), strict=True))

    # Each damaged row is chosen once, and a re-dated row's predecessor stays intact, so
    # every injected problem is exactly one problem.
    session = cols["session_no"].astype(np.int64)
    taken = np.zeros(n, dtype=bool)
    ooo = rng.permutation(np.flatnonzero(session >= 2))[: want[BadRowKind.DATE_OUT_OF_ORDER]]
    ooo = np.sort(ooo[~np.isin(ooo - 1, ooo)])
    taken[ooo] = True
    taken[ooo - 1] = True
    free = rng.permutation(np.flatnonzero(~taken))
    needed = sum(c for k, c in want.items() if k is not BadRowKind.DATE_OUT_OF_ORDER)
    if ooo.size == 0 or free.size < needed:
        raise ValueError(
            f"{site}: only {n} rows, too few to inject every kind of bad row; "
            "use more clients per site"
        )
    picks: dict[BadRowKind, IntArray] = {BadRowKind.DATE_OUT_OF_ORDER: ooo}
    cursor = 0
    for kind in kinds:
        if kind is not BadRowKind.DATE_OUT_OF_ORDER:
            picks[kind] = np.sort(free[cursor : cursor + want[kind]])
            cursor += want[kind]

    def choose(options: list[str], k: int) -> ObjArray:
        return np.array(options, dtype=object)[rng.integers(0, len(options), k)]

    i = picks[BadRowKind.UNKNOWN_INSTRUMENT]
    cols["measure"][i] = choose([ins.id.replace("-", "") + " ", "BDI"], i.size)
    i = picks[BadRowKind.EMPTY_SCORE]
    cols["total"][i] = ""
    i = picks[BadRowKind.NON_INTEGER_SCORE]
    cols["total"][i] = np.where(rng.random(i.size) < 0.5, cols["total"][i] + ".5", "n/a")
    i = picks[BadRowKind.SCORE_OUT_OF_RANGE]
    cols["total"][i] = choose([str(max(99, ins.hi + 1)), str(ins.lo - 1)], i.size)
    i = picks[BadRowKind.EMPTY_CLIENT]
    cols["client"][i] = ""
    i = picks[BadRowKind.UNPARSEABLE_DATE]
    cols["seen_on"][i] = choose(["31/02/2026", "yesterday"], i.size)
    i = picks[BadRowKind.DATE_OUT_OF_ORDER]
    before = cols["seen_on"][i - 1].astype("datetime64[D]")
    moved = before - rng.integers(1, 6, i.size).astype("timedelta64[D]")
    cols["seen_on"][i] = np.datetime_as_string(moved).astype(object)

    # Duplicates go right after their original, as a double submission would.
    exact = picks[BadRowKind.EXACT_DUPLICATE]
    conflict = picks[BadRowKind.CONFLICTING_DUPLICATE]
    original = cols["total"][conflict].astype(np.int64)
    step = rng.integers(1, 6, conflict.size) * np.where(rng.random(conflict.size) < 0.5, -1, 1)
    changed = np.clip(original + step, ins.lo, ins.hi)
    # Clipping can land back on the original score; the copy must conflict.
    changed = np.where(
        changed != original, changed, np.where(original > ins.lo, original - 1, original + 1)
    )
    dup_src = np.concatenate([exact, conflict])
    order = np.argsort(np.concatenate([np.arange(n) * 2, dup_src * 2 + 1]), kind="stable")
    out: dict[str, ObjArray] = {}
    for name, values in cols.items():
        extra = values[dup_src]
        if name == "total":
            extra[exact.size :] = changed.astype(str).astype(object)
        out[name] = np.concatenate([values, extra])[order]
    return out, {kind: int(picked.size) for kind, picked in picks.items()}


def site_id(index: int, n_sites: int) -> str:
    """``clinic-01``, ``clinic-02``...: 1-based, zero-padded to at least two digits."""
    return f"clinic-{index:0{max(2, len(str(n_sites)))}d}"


class _FlowMap(dict[str, str]):
    """A mapping written on one line, like the column map in the documented site.yaml."""


class _SiteDumper(yaml.SafeDumper):
    pass


def _represent_flow(dumper: yaml.SafeDumper, data: _FlowMap) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


_SiteDumper.add_representer(_FlowMap, _represent_flow)


def _site_yaml(site: str, seed: int, ins: Instrument, messy: bool) -> str:
    doc: dict[str, Any] = {
        "site": {"id": site},
        "data": {
            "path": "outcomes.csv",
            "columns": _FlowMap(_COLUMN_MAP),
            "episode_gap_days": EPISODE_GAP_DAYS,
        },
    }
    header = (
        f"# Synthetic clinic {site}: generated by `outcomebench-coordinator synth` "
        f"(seed {seed}, {ins.id}{', messy' if messy else ''}).\n"
        "# Not real client data. The data path is relative to this file's directory.\n"
    )
    body = yaml.dump(doc, Dumper=_SiteDumper, sort_keys=False, width=1000, default_flow_style=False)
    return header + body


def _check_args(
    n_sites: int, seed: int, instrument: str, clients_range: tuple[int, int]
) -> Instrument:
    problems: list[str] = []
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        problems.append(f"n_sites: {n_sites!r} must be a whole number >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: {seed!r} must be a whole number >= 0")
    registry: Mapping[str, Instrument] = builtin_instruments()
    if instrument not in registry:
        problems.append(
            f"instrument: unknown {instrument!r}{did_you_mean(instrument, registry)}; "
            f"use one of {', '.join(sorted(registry))}"
        )
    lo, hi = clients_range
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < MIN_CLIENTS or hi < lo:
        problems.append(
            f"clients_range: {clients_range!r} must be (min, max) whole numbers with "
            f"{MIN_CLIENTS} <= min <= max"
        )
    if problems:
        raise SpecError("synthesize", problems)
    return registry[instrument]


def synthesize(
    n_sites: int,
    out: Path,
    *,
    seed: int = 0,
    messy: bool = False,
    instrument: str = "PHQ-9",
    clients_range: tuple[int, int] | None = None,
) -> list[SiteFiles]:
    """Write ``n_sites`` synthetic clinics under ``out``: ``<site id>/outcomes.csv`` and
    ``<site id>/site.yaml`` each; existing files of the same names are replaced.

    Clinic sizes are drawn log-uniformly from ``clients_range`` (default
    :data:`DEFAULT_CLIENTS_RANGE`). Each clinic draws from its own stream of ``seed``, so
    the same seed writes byte-identical files, and clinic k's rows are the same whatever
    ``n_sites``. Raises :class:`~protocols.SpecError` (a ValueError) for bad arguments and
    OSError when ``out`` cannot be written.
    """
    out = Path(out)
    rng_range = clients_range if clients_range is not None else DEFAULT_CLIENTS_RANGE
    ins = _check_args(n_sites, seed, instrument, rng_range)
    written: list[SiteFiles] = []
    streams = np.random.SeedSequence(seed).spawn(n_sites)
    for index, stream in enumerate(streams, start=1):
        sid = site_id(index, n_sites)
        rng = np.random.default_rng(stream)
        params = draw_site_params(rng, ins, rng_range)
        columns = _to_columns(rng, _simulate(rng, params), ins)
        n_bad = 0
        if messy:
            columns, counts = _inject_bad_rows(rng, columns, ins, sid)
            n_bad = sum(counts.values())
        directory = out / sid
        directory.mkdir(parents=True, exist_ok=True)
        data_path = directory / "outcomes.csv"
        config_path = directory / "site.yaml"
        frame = pd.DataFrame({name: columns[name] for name in CSV_COLUMNS})
        data_path.write_text(frame.to_csv(index=False, lineterminator="\n"), encoding="utf-8")
        config_path.write_text(_site_yaml(sid, seed, ins, messy), encoding="utf-8")
        written.append(
            SiteFiles(
                site_id=sid,
                directory=directory,
                data_path=data_path,
                config_path=config_path,
                n_rows=len(columns["client"]),
                n_clients=params.n_clients,
                n_bad_rows=n_bad,
            )
        )
    return written

"""Per-episode outcome derivation: pure, vectorised functions of validated records.

For each client episode: intake and final score, sessions, change (positive = improvement
whatever the instrument's direction), reliable change, caseness at start and end, NHS
Talking Therapies recovery and reliable recovery (single-measure versions),
Jacobson-Truax categories, response, remission, the intake band and the score at each
session number 1..K. Definitions follow docs/METHODS.md:

- reliable improvement: change >= reliable_change points; reliable deterioration:
  change <= -reliable_change; otherwise no reliable change;
- caseness: score >= cutoff (lower is better) or score < cutoff (higher is better);
- recovery: at caseness at intake and not at the end (denominator: episodes at caseness
  at intake); reliable recovery: recovery and reliable improvement;
- Jacobson-Truax: recovered (reliable improvement and crossed the cut-off from caseness),
  improved (other reliable improvement), unchanged, deteriorated;
- response: change >= 50% of the distance from intake to the better end of the range;
- remission: not at caseness at the end.

Episodes with fewer than two scores are counted and excluded with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocols import Better, Instrument
from site_agent.data import Records

__all__ = ["JT", "RELIABLE", "Episodes", "Reliable", "derive_episodes"]

MISSING = -1  # in the trajectory matrix: no score at that session


class Reliable(IntEnum):
    DETERIORATED = -1
    NO_CHANGE = 0
    IMPROVED = 1


class JT(IntEnum):
    """Jacobson-Truax categories."""

    DETERIORATED = 0
    UNCHANGED = 1
    IMPROVED = 2
    RECOVERED = 3


RELIABLE = {
    Reliable.IMPROVED: "reliably_improved",
    Reliable.NO_CHANGE: "no_reliable_change",
    Reliable.DETERIORATED: "reliably_deteriorated",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Episodes:
    """Derived episodes of one instrument.

    ``table`` has one row per included episode with columns: client, episode, intake,
    final, n_scores, last_session, first_date, last_date, change, band, reliable
    (Reliable, or -2 where the instrument has no reliable-change value), case_start,
    case_end, recovered, reliably_recovered, jt (JT, or -1 without a reliable-change
    value), response, remission. ``trajectory[i, k-1]`` is episode i's score at session
    k (MISSING where absent).
    """

    instrument: Instrument
    table: pd.DataFrame
    trajectory: npt.NDArray[np.int32]
    excluded: Mapping[str, int]

    @property
    def has_reliable_change(self) -> bool:
        return self.instrument.reliable_change is not None


def is_case(
    scores: npt.NDArray[np.integer] | npt.NDArray[np.floating], ins: Instrument
) -> npt.NDArray[np.bool_]:
    """Caseness by the instrument's published convention."""
    if ins.better is Better.LOWER:
        return np.asarray(scores >= ins.cutoff)
    return np.asarray(scores < ins.cutoff)


def band_index(scores: npt.NDArray[np.integer], ins: Instrument) -> npt.NDArray[np.int16]:
    """Index of the intake band of each score (bands are adjacent and cover the range)."""
    upper = np.array([b.hi for b in ins.bands], dtype=np.int64)
    return np.searchsorted(upper, scores, side="left").astype(np.int16)


def derive_episodes(
    records: Records, instruments: Mapping[str, Instrument], max_session: int = 20
) -> dict[str, Episodes]:
    """Derive outcomes for every episode, per instrument id."""
    if max_session < 1:
        raise ValueError(f"max_session must be >= 1, got {max_session}")
    out: dict[str, Episodes] = {}
    if records.n_rows == 0:
        return out
    ep = records.episode
    starts = np.flatnonzero(np.diff(ep, prepend=-1) != 0)
    ends = np.append(starts[1:], ep.size) - 1
    n_scores = ends - starts + 1
    ep_ins = records.instrument[starts]
    for code, ins_id in enumerate(records.instrument_ids):
        sel = ep_ins == code
        if not sel.any():
            continue
        out[ins_id] = _derive_one(
            records, instruments[ins_id], starts[sel], ends[sel], n_scores[sel], max_session
        )
    return out


def _derive_one(
    records: Records,
    ins: Instrument,
    starts: npt.NDArray[np.int64],
    ends: npt.NDArray[np.int64],
    n_scores: npt.NDArray[np.int64],
    max_session: int,
) -> Episodes:
    single = n_scores < 2
    excluded = {"fewer than 2 scores (no intake and final)": int(single.sum())}
    starts, ends, n_scores = starts[~single], ends[~single], n_scores[~single]

    intake = records.score[starts].astype(np.int64)
    final = records.score[ends].astype(np.int64)
    change = intake - final if ins.better is Better.LOWER else final - intake
    case_start = is_case(intake, ins)
    case_end = is_case(final, ins)
    recovered = case_start & ~case_end

    n = intake.size
    if ins.reliable_change is not None:
        rc = ins.reliable_change
        reliable = np.where(
            change >= rc,
            Reliable.IMPROVED,
            np.where(change <= -rc, Reliable.DETERIORATED, Reliable.NO_CHANGE),
        )
        improved = reliable == Reliable.IMPROVED
        reliably_recovered = recovered & improved
        jt = np.select(
            [reliable == Reliable.DETERIORATED, reliable == Reliable.NO_CHANGE, reliably_recovered],
            [JT.DETERIORATED, JT.UNCHANGED, JT.RECOVERED],
            default=JT.IMPROVED,
        )
    else:
        reliable = np.full(n, -2)
        reliably_recovered = np.zeros(n, dtype=bool)
        jt = np.full(n, -1)

    # Response: at least half the way from intake to the better end of the range.
    room = intake - ins.lo if ins.better is Better.LOWER else ins.hi - intake
    response = (room > 0) & (2 * change >= room)

    # Score at each session number 1..K; sessions beyond K are not part of trajectories.
    trajectory = np.full((n, max_session), MISSING, dtype=np.int32)
    ep_of_row = np.repeat(np.arange(n), n_scores)
    rows = _ranges(starts, n_scores)
    sess = records.session[rows]
    inside = sess <= max_session
    trajectory[ep_of_row[inside], sess[inside] - 1] = records.score[rows[inside]]
    trajectory.flags.writeable = False

    table = pd.DataFrame(
        {
            "client": records.client[starts],
            "episode": records.episode[starts],
            "intake": intake,
            "final": final,
            "n_scores": n_scores,
            "last_session": records.session[ends],
            "first_date": records.date[starts],
            "last_date": records.date[ends],
            "change": change,
            "band": band_index(intake, ins),
            "reliable": reliable.astype(np.int8),
            "case_start": case_start,
            "case_end": case_end,
            "recovered": recovered,
            "reliably_recovered": reliably_recovered,
            "jt": jt.astype(np.int8),
            "response": response,
            "remission": ~case_end,
        }
    )
    return Episodes(instrument=ins, table=table, trajectory=trajectory, excluded=excluded)


def _ranges(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Concatenated ranges [s, s+len) without a Python loop."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets

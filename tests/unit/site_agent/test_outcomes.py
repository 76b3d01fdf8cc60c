from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols import Instrument, builtin_instruments, parse_instrument
from site_agent.data import Records, read_intake
from site_agent.outcomes import JT, MISSING, Reliable, derive_episodes

from .helpers import HEADER, write_site

REG = builtin_instruments()


def _records(episodes: list[list[int]], ins_id: str = "PHQ-9",
             sessions: list[list[int]] | None = None) -> Records:
    """Records for one instrument: one client per episode, sessions 1..n unless given."""
    sess = sessions or [list(range(1, len(e) + 1)) for e in episodes]
    ep = np.repeat(np.arange(len(episodes)), [len(e) for e in episodes])
    n = int(ep.size)
    return Records(
        instrument_ids=(ins_id,), client_ids=tuple(str(i) for i in range(len(episodes))),
        instrument=np.zeros(n, np.int16), client=ep.astype(np.int32), episode=ep.astype(np.int64),
        session=np.array([s for e in sess for s in e], np.int32),
        score=np.array([s for e in episodes for s in e], np.int32),
        date=np.full(n, np.iinfo(np.int32).min, np.int32), line=np.arange(2, n + 2, dtype=np.int64),
    )


def _one(episodes: list[list[int]], ins: Instrument | None = None) -> pd.DataFrame:
    ins = ins or REG["PHQ-9"]
    return derive_episodes(_records(episodes, ins.id), {ins.id: ins})[ins.id].table


def test_nhs_definitions_on_hand_built_cases_phq9() -> None:
    t = _one([
        [18, 12, 8],   # case -> not case, drop 10: recovered, reliably improved, reliably recovered
        [12, 9],       # case -> not case, drop 3: recovered but not reliably
        [22, 15],      # drop 7: reliable improvement, still case: not recovered
        [8, 3],        # not case at start: never "recovered"; drop 5 < 6: no reliable change
        [9, 16],       # rise 7: reliable deterioration
        [10, 10],      # unchanged, still a case
        [15, 9, 4],    # response (>= 50% toward 0) and remission
    ])
    assert t["change"].tolist() == [10, 3, 7, 5, -7, 0, 11]
    assert t["reliable"].tolist() == [Reliable.IMPROVED, Reliable.NO_CHANGE, Reliable.IMPROVED,
                                      Reliable.NO_CHANGE, Reliable.DETERIORATED,
                                      Reliable.NO_CHANGE, Reliable.IMPROVED]
    assert t["case_start"].tolist() == [True, True, True, False, False, True, True]
    assert t["recovered"].tolist() == [True, True, False, False, False, False, True]
    assert t["reliably_recovered"].tolist() == [True, False, False, False, False, False, True]
    assert t["jt"].tolist() == [JT.RECOVERED, JT.UNCHANGED, JT.IMPROVED, JT.UNCHANGED,
                                JT.DETERIORATED, JT.UNCHANGED, JT.RECOVERED]
    assert t["response"].tolist() == [True, False, False, True, False, False, True]
    assert t["remission"].tolist() == [True, True, False, True, False, False, True]


def test_reliable_change_boundary_is_inclusive() -> None:
    # NHS: "a drop of at least the reliable change" (6 points on PHQ-9).
    t = _one([[16, 10], [16, 11], [10, 16], [10, 15]])
    assert t["reliable"].tolist() == [1, 0, -1, 0]


def test_direction_higher_is_better_ors() -> None:
    ors = REG["ORS"]
    t = _one([[15, 30], [30, 20], [20, 24]], ors)
    assert t["change"].tolist() == [15, -10, 4]
    assert t["case_start"].tolist() == [True, False, True]  # ORS case if < 25
    assert t["case_end"].tolist() == [False, True, True]
    assert t["reliable"].tolist() == [1, -1, 0]
    assert t["recovered"].tolist() == [True, False, False]
    # response: half the way from 15 to 40 is 12.5; 15 points is enough
    assert t["response"].tolist() == [True, False, False]


def test_single_scores_excluded_with_reason() -> None:
    ins = REG["PHQ-9"]
    ep = derive_episodes(_records([[20], [20, 10], [5]]), {"PHQ-9": ins})["PHQ-9"]
    assert len(ep.table) == 1
    assert ep.excluded == {"fewer than 2 scores (no intake and final)": 2}


def test_trajectory_by_session_number() -> None:
    ins = REG["PHQ-9"]
    rec = _records([[20, 15, 9], [12, 8]], sessions=[[1, 3, 25], [2, 4]])
    ep = derive_episodes(rec, {"PHQ-9": ins}, max_session=5)["PHQ-9"]
    assert ep.trajectory.tolist() == [[20, MISSING, 15, MISSING, MISSING],
                                      [MISSING, 12, MISSING, 8, MISSING]]
    # Final score is the last score even beyond K.
    assert ep.table["final"].tolist() == [9, 8]
    assert ep.table["last_session"].tolist() == [25, 4]


def test_instrument_without_reliable_change() -> None:
    t = _one([[30, 10]], REG["WSAS"])
    assert t["reliable"].tolist() == [-2] and t["jt"].tolist() == [-1]
    assert t["recovered"].tolist() == [True]


def test_intake_bands() -> None:
    t = _one([[0, 0], [4, 1], [5, 1], [14, 1], [20, 1], [27, 1]])
    assert t["band"].tolist() == [0, 0, 1, 2, 4, 4]


_score_lists = st.lists(st.lists(st.integers(0, 27), min_size=1, max_size=8), min_size=1,
                        max_size=30)


@settings(max_examples=200, deadline=None)
@given(episodes=_score_lists, better=st.sampled_from(["lower", "higher"]),
       rc=st.one_of(st.none(), st.floats(0.5, 20)), cutoff=st.integers(1, 27))
def test_properties_on_any_well_typed_records(episodes: list[list[int]], better: str,
                                              rc: float | None, cutoff: int) -> None:
    ins = parse_instrument("T", {"range": [0, 27], "better": better, "reliable_change": rc,
                                 "cutoff": cutoff})
    ep = derive_episodes(_records(episodes, "T"), {"T": ins}).get("T")
    kept = [e for e in episodes if len(e) >= 2]
    if ep is None:
        assert not kept
        return
    t = ep.table
    assert len(t) == len(kept)
    assert ep.excluded["fewer than 2 scores (no intake and final)"] == len(episodes) - len(kept)
    sign = 1 if better == "lower" else -1
    # Change is positive for improvement, whatever the direction.
    assert t["change"].tolist() == [sign * (e[0] - e[-1]) for e in kept]
    if rc is None:
        assert (t["reliable"] == -2).all()
        return
    # Reliable-change categories and JT categories are exclusive and exhaustive.
    assert t["reliable"].isin([-1, 0, 1]).all()
    assert t["jt"].isin([0, 1, 2, 3]).all()
    assert ((t["jt"] == JT.RECOVERED) == t["reliably_recovered"]).all()
    assert ((t["jt"] == JT.DETERIORATED) == (t["reliable"] == -1)).all()
    assert (t["reliably_recovered"] <= t["recovered"]).all()
    assert (t["recovered"] <= t["case_start"]).all()
    assert (t["remission"] == ~t["case_end"]).all()


@settings(max_examples=50, deadline=None)
@given(scores=hnp.arrays(np.int32, st.integers(2, 200), elements=st.integers(0, 27)),
       cuts=hnp.arrays(np.bool_, st.integers(2, 200)))
def test_derivation_never_crashes_on_random_frames(scores: np.ndarray, cuts: np.ndarray) -> None:
    n = min(scores.size, cuts.size)
    starts = cuts[:n].copy()
    starts[0] = True
    episode = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    session = np.arange(n) - first[episode] + 1
    rec = Records(instrument_ids=("PHQ-9",), client_ids=("c",),
                  instrument=np.zeros(n, np.int16), client=np.zeros(n, np.int32),
                  episode=episode.astype(np.int64), session=session.astype(np.int32),
                  score=scores[:n], date=np.zeros(n, np.int32),
                  line=np.arange(n, dtype=np.int64))
    out = derive_episodes(rec, REG, max_session=3)
    total = len(out["PHQ-9"].table) if out else 0
    assert total == int((np.bincount(episode) >= 2).sum())


def test_end_to_end_from_csv(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "a,1,2026-01-01,20\na,2,2026-01-08,13\nb,1,2026-01-01,9\n")
    eps = derive_episodes(read_intake(cfg.data, cfg.instruments).records, cfg.instruments)
    t = eps["PHQ-9"].table
    assert t["change"].tolist() == [7]
    assert eps["PHQ-9"].excluded["fewer than 2 scores (no intake and final)"] == 1


def test_max_session_must_be_positive() -> None:
    with pytest.raises(ValueError):
        derive_episodes(_records([[1, 2]]), REG, max_session=0)

"""Contribution bounding: adding or removing one client changes every block by at most
its declared L2 sensitivity, whatever the client's data."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocols import Instrument, builtin_instruments
from protocols.layout import block_layout
from protocols.study import Study, parse_study
from site_agent.data import Records
from site_agent.outcomes import derive_episodes
from site_agent.privacy.statistics import exact_blocks, select_episodes

PHQ = builtin_instruments()["PHQ-9"]
ALL = ["counts", "change", "categories", "trajectory", "histogram"]


def _study(k: int) -> Study:
    return parse_study({"id": "s", "instrument": "PHQ-9",
                        "window": {"start": "2026-01-01", "end": "2026-12-31"},
                        "bands": [[0, 9], [10, 14], [15, 19], [20, 27]], "families": ALL,
                        "max_session": k, "privacy": {"rho": 0.1}})


# A client: a list of episodes; an episode: (first day offset, scores at sessions 1..n)
_episode = st.tuples(st.integers(0, 700), st.lists(st.integers(0, 27), min_size=1, max_size=22))
_client = st.lists(_episode, min_size=1, max_size=3)


def _records(clients: list[list[tuple[int, list[int]]]], instrument: str = "PHQ-9") -> Records:
    ins, cli, ep, sess, score, date = [], [], [], [], [], []
    e = 0
    base = 20454 - 365  # 2025-01-01 in days since the epoch
    for c, episodes in enumerate(clients):
        for start, scores in sorted(episodes):
            for k, s in enumerate(scores, start=1):
                ins.append(0)
                cli.append(c)
                ep.append(e)
                sess.append(k)
                score.append(s)
                date.append(base + start + 7 * k)
            e += 1
    n = len(score)
    return Records(instrument_ids=(instrument,), client_ids=tuple(map(str, range(len(clients)))),
                   instrument=np.array(ins, np.int16), client=np.array(cli, np.int32),
                   episode=np.array(ep, np.int64), session=np.array(sess, np.int32),
                   score=np.array(score, np.int32), date=np.array(date, np.int32),
                   line=np.arange(n, dtype=np.int64))


def _blocks(clients: list[list[tuple[int, list[int]]]], study: Study, m: int
            ) -> dict[str, np.ndarray]:
    ins = study.instrument
    if not clients:
        return {b.name: np.zeros(b.size, np.int64) for b in block_layout(study)}
    ep = derive_episodes(_records(clients, ins.id), {ins.id: ins}, study.max_session).get(ins.id)
    if ep is None:
        return {b.name: np.zeros(b.size, np.int64) for b in block_layout(study)}
    return exact_blocks(select_episodes(ep, study, m), study)


@settings(max_examples=150, deadline=None)
@given(others=st.lists(_client, max_size=6), extra=_client, k=st.integers(1, 20),
       m=st.integers(1, 3))
def test_one_client_moves_each_block_by_at_most_its_sensitivity(
        others: list[list[tuple[int, list[int]]]], extra: list[tuple[int, list[int]]], k: int,
        m: int) -> None:
    study = _study(k)
    without = _blocks(others, study, m)
    with_ = _blocks([*others, extra], study, m)
    for spec in block_layout(study):
        diff = (with_[spec.name] - without[spec.name]).astype(float)
        l2 = math.sqrt(float((diff * diff).sum()))
        assert l2 <= spec.sensitivity(m) + 1e-9, (spec.name, l2, spec.sensitivity(m))


# Any bands: the fixed bands above lie on one side of the cut-off each, so they never
# release ``case_at_intake``, never mask a ``cases`` block and have no single-score band (a
# band fixing the intake, whose centred intake blocks are not released). Here the bands
# are any partition of the range, on an instrument where lower is better and on one where
# higher is better, and scores favour the extremes and the cut-off, where the bounds bind.
_INSTRUMENTS = ("PHQ-9", "ORS")


@st.composite
def _banded_study(draw: st.DrawFn) -> Study:
    ins = builtin_instruments()[draw(st.sampled_from(_INSTRUMENTS))]
    cuts = sorted(draw(st.sets(st.integers(ins.lo + 1, ins.hi), max_size=6)))
    starts = [ins.lo, *cuts]
    bands = [[a, b - 1] for a, b in zip(starts, [*cuts, ins.hi + 1], strict=True)]
    return _any_study(ins, bands, draw(st.integers(1, 20)))


def _any_study(ins: Instrument, bands: list[list[int]], k: int) -> Study:
    return parse_study({"id": "s", "instrument": ins.id,
                        "window": {"start": "2026-01-01", "end": "2026-12-31"},
                        "bands": bands, "families": ALL, "max_session": k,
                        "privacy": {"rho": 0.1}})


def _score(ins: Instrument) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([ins.lo, ins.hi, ins.cutoff - 1, ins.cutoff]),
                     st.integers(ins.lo, ins.hi))


@st.composite
def _neighbours(draw: st.DrawFn) -> tuple[Study, list[list[tuple[int, list[int]]]],
                                          list[tuple[int, list[int]]]]:
    study = draw(_banded_study())
    episode = st.tuples(st.integers(0, 700),
                        st.lists(_score(study.instrument), min_size=1, max_size=22))
    client = st.lists(episode, min_size=1, max_size=3)
    return study, draw(st.lists(client, max_size=6)), draw(client)


# Straddling bands and single-score bands on both instruments, whatever the search finds.
_PHQ_EDGES = _any_study(PHQ, [[0, 0], [1, 4], [5, 12], [13, 13], [14, 27]], 20)
_ORS_EDGES = _any_study(builtin_instruments()["ORS"], [[0, 20], [21, 29], [30, 30], [31, 40]],
                        20)


@settings(max_examples=200, deadline=None)
@given(case=_neighbours(), m=st.integers(1, 3))
@example(case=(_PHQ_EDGES, [[(10, [12, 0, 0, 0])], [(5, [13, 27])]], [(400, [12] + [0] * 21)]),
         m=1)
@example(case=(_ORS_EDGES, [[(10, [24, 40])], [(5, [30, 0])]], [(400, [21] + [40] * 21)]), m=1)
def test_any_bands_one_client_moves_each_block_by_at_most_its_sensitivity(
        case: tuple[Study, list[list[tuple[int, list[int]]]], list[tuple[int, list[int]]]],
        m: int) -> None:
    study, others, extra = case
    without = _blocks(others, study, m)
    with_ = _blocks([*others, extra], study, m)
    for spec in block_layout(study):
        diff = (with_[spec.name] - without[spec.name]).astype(float)
        l2 = math.sqrt(float((diff * diff).sum()))
        assert l2 <= spec.sensitivity(m) + 1e-9, (study.bands, spec.name, l2, spec.sensitivity(m))


def test_the_edge_studies_release_every_kind_of_block() -> None:
    """The explicit examples above reach what the fixed bands never do: a caseness block,
    recoveries among the cases of a band that straddles the cut-off, and single-score bands
    whose intake blocks are fixed (multiplier 0) while the band is still counted."""
    for study, straddling, single in ((_PHQ_EDGES, 2, (0, 3)), (_ORS_EDGES, 1, (2,))):
        layout = {b.name: b for b in block_layout(study)}
        assert layout["case_at_intake"].mult[straddling] > 0
        assert sum(m > 0 for m in layout["case_at_intake"].mult) == 1
        assert layout["recovered"].over == "cases" and layout["recovered"].mult[straddling] > 0
        for band in single:
            assert layout["sum_intake"].mult[band] == 0
            assert layout["episodes"].mult[band] == 1


def test_latest_episode_per_client_and_window() -> None:
    study = _study(3)
    # client 0: an episode in 2025 (outside the window) and one in 2026; client 1: one score
    clients = [[(10, [20, 12]), (420, [18, 9])], [(400, [15])]]
    ep = derive_episodes(_records(clients), {"PHQ-9": PHQ}, 3)["PHQ-9"]
    sel = select_episodes(ep, study, 1)
    assert sel.window_applied
    assert sel.table["intake"].tolist() == [18]
    assert sel.counts["outside window"] == 1
    blocks = exact_blocks(sel, study)
    layout = {b.name: b for b in block_layout(study)}

    def decoded(name: str, band: int, n: int, col: int = 0) -> float:
        """sum v = (R / m_b + n (lo_b + hi_b)) / 2 (protocols/layout.py)."""
        spec = layout[name]
        lo, hi = spec.raw[band]
        return (blocks[name].reshape(4, -1)[band, col] / spec.mult[band] + n * (lo + hi)) / 2

    assert blocks["episodes"].tolist() == [0, 0, 1, 0]
    # intake 18 in band 15-19: u = 2 (18 - 15) - 4 = 2; final 9: g = 2 * 9 - 27 = -9
    assert decoded("sum_intake", 2, 1) == 2 and decoded("sum_final", 2, 1) == -9
    assert decoded("sum_intake_sq", 2, 1) == 4 and decoded("sum_final_sq", 2, 1) == 81
    assert decoded("sum_intake_final", 2, 1) == -18
    assert not blocks["sum_intake"].reshape(4)[[0, 1, 3]].any()
    # one review group per session for K = 3: sessions 2 and 3; improvement 9 at session 2
    assert blocks["traj_n"].reshape(4, 2)[2].tolist() == [1, 0]
    assert decoded("traj_sum", 2, 1, 0) == 9
    assert blocks["traj_sum"].reshape(4, 2)[2, 1] == 0
    c_lo, c_hi = layout["traj_sum"].raw[2]
    assert decoded("traj_sum_sq", 2, 1, 0) == (2 * 9 - (c_lo + c_hi)) ** 2
    hist = blocks["change_hist"].reshape(4, -1)
    assert hist[2, 9 - layout["change_hist"].raw[2][0]] == 1 and hist.sum() == 1


def test_a_review_group_takes_the_latest_scored_session() -> None:
    study = _study(20)  # groups ..., 7-8, 9-12, ...
    scores = [20, 18, 16, 15, 14, 13, 12, 11, 10, 9, 8]  # sessions 1..11
    ep = derive_episodes(_records([[(400, scores)]]), {"PHQ-9": PHQ}, 20)["PHQ-9"]
    blocks = exact_blocks(select_episodes(ep, study, 1), study)
    spec = {b.name: b for b in block_layout(study)}["traj_sum"]
    groups = list(spec.labels)
    n = blocks["traj_n"].reshape(4, -1)[3]
    assert n.tolist() == [1 if g in ("2", "3", "4", "5", "6", "7-8", "9-12") else 0
                          for g in groups]
    lo, hi = spec.raw[3]
    k = groups.index("9-12")
    raw = blocks["traj_sum"].reshape(4, -1)[3, k]
    assert (raw / spec.mult[3] + lo + hi) / 2 == 20 - 8  # session 11, the latest of 9-12


def test_max_episodes_keeps_the_latest() -> None:
    study = _study(2)
    clients = [[(400, [20, 10]), (500, [15, 14]), (600, [9, 3])]]
    ep = derive_episodes(_records(clients), {"PHQ-9": PHQ}, 2)["PHQ-9"]
    assert select_episodes(ep, study, 1).table["intake"].tolist() == [9]
    assert sorted(select_episodes(ep, study, 2).table["intake"]) == [9, 15]
    assert sorted(select_episodes(ep, study, 3).table["intake"]) == [9, 15, 20]

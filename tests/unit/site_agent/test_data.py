from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from site_agent.data import QUARANTINE_COLUMNS, read_intake
from site_agent.errors import DataError

from .helpers import HEADER, write_site


def _reasons(q: pd.DataFrame) -> dict[int, str]:
    return dict(zip(q["line"], q["reason"], strict=True))


def test_clean_file_passes(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "a,1,2026-01-01,20\na,2,2026-01-08,15\nb,1,2026-01-02,9\n")
    intake = read_intake(cfg.data, cfg.instruments)
    assert intake.rows_read == 3 and intake.records.n_rows == 3
    assert len(intake.quarantine) == 0
    assert list(intake.quarantine.columns) == list(QUARANTINE_COLUMNS)
    assert intake.records.n_episodes == 2


@pytest.mark.parametrize("row, fld, reason", [
    (",1,2026-01-01,20", "client_id", "missing client id"),
    ("a,1,2026-01-01,", "score", "missing score"),
    ("a,1,2026-01-01,12.5", "score", "not a whole number"),
    ("a,1,2026-01-01,n/a", "score", "not a whole number"),
    ("a,1,2026-01-01,+5", "score", "not a whole number"),  # once crashed the cast
    ("a,+1,2026-01-01,5", "session", "whole number from 1"),
    ("a,1,2026-01-01,28", "score", "out of the PHQ-9 range 0-27"),
    ("a,1,2026-01-01,-1", "score", "out of the PHQ-9 range 0-27"),
    ("a,0,2026-01-01,5", "session", "whole number from 1"),
    ("a,x,2026-01-01,5", "session", "whole number from 1"),
    ("a,,2026-01-01,5", "session", "missing session"),
    ("a,1,31/02/2026,5", "date", "does not match the format"),
    ("a,1,2026-02-31,5", "date", "does not match the format"),
    ("a,1,,5", "date", "missing date"),
    ("a,1,2026-01-01,5,extra", "(row)", "wrong number of fields"),
])
def test_each_row_rule(tmp_path: Path, row: str, fld: str, reason: str) -> None:
    cfg = write_site(tmp_path, HEADER + "z,1,2026-01-01,10\n" + row + "\nz,2,2026-01-08,9\n")
    intake = read_intake(cfg.data, cfg.instruments)
    q = intake.quarantine
    assert len(q) == 1, q
    entry = q.iloc[0]
    assert entry["line"] == 3 and entry["field"] == fld and reason in entry["reason"]
    assert entry["file"] == "outcomes.csv" and entry["fix"]
    assert intake.records.n_rows == 2  # the good rows are all kept


def test_score_written_as_whole_float_is_accepted(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "a,1,2026-01-01,12.0\na,2,2026-01-08, 7 \n")
    intake = read_intake(cfg.data, cfg.instruments)
    assert len(intake.quarantine) == 0
    assert intake.records.score.tolist() == [12, 7]


def test_duplicates_exact_and_conflicting(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "\n".join([
        "a,1,2026-01-01,20",   # line 2
        "a,1,2026-01-01,20",   # 3 exact copy: dropped, first kept
        "a,2,2026-01-08,15",   # 4 conflicting with 5: both dropped
        "a,2,2026-01-08,14",   # 5
        "a,3,2026-01-15,10",   # 6
    ]) + "\n")
    intake = read_intake(cfg.data, cfg.instruments)
    reasons = _reasons(intake.quarantine)
    assert reasons[3] == "exact duplicate of an earlier row"
    assert "conflicting" in reasons[4] and "conflicting" in reasons[5]
    assert 2 not in reasons
    assert intake.records.line.tolist() == [2, 6]


def test_date_out_of_order(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "a,1,2026-01-10,20\na,2,2026-01-03,15\na,3,2026-01-17,9\n")
    intake = read_intake(cfg.data, cfg.instruments)
    assert _reasons(intake.quarantine) == {3: "dated before an earlier session of the same episode"}
    assert intake.records.session.tolist() == [1, 3]


def test_unknown_instrument_column_with_suggestion(tmp_path: Path) -> None:
    cfg = write_site(
        tmp_path,
        "client,n,ins,total\na,1,PHQ-9,20\na,2,PHQ9,15\na,2,GAD-7,9\na,3,GAD-7,5\nb,1,,4\n",
        data={"path": "outcomes.csv",
              "columns": {"client_id": "client", "session": "n", "instrument": "ins",
                          "score": "total"}},
    )
    intake = read_intake(cfg.data, cfg.instruments)
    q = intake.quarantine.set_index("line")
    assert q.loc[3, "reason"] == "unknown instrument 'PHQ9'"
    assert "did you mean 'PHQ-9'" in q.loc[3, "fix"]
    assert q.loc[6, "reason"] == "missing instrument"
    rec = intake.records
    assert sorted(rec.instrument_ids) == ["GAD-7", "PHQ-9"]
    assert rec.n_episodes == 2  # a/PHQ-9 and a/GAD-7 are separate episodes


def test_range_is_per_instrument(tmp_path: Path) -> None:
    cfg = write_site(
        tmp_path, "client,n,ins,total\na,1,GAD-7,22\na,1,PHQ-9,22\n",
        data={"path": "outcomes.csv", "columns": {"client_id": "client", "session": "n",
                                                  "instrument": "ins", "score": "total"}},
    )
    intake = read_intake(cfg.data, cfg.instruments)
    assert _reasons(intake.quarantine) == {2: "score out of the GAD-7 range 0-21"}


def test_episodes_split_at_date_gap(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "\n".join([
        "a,1,2026-01-01,20", "a,2,2026-01-08,15",
        "a,1,2026-09-01,18", "a,2,2026-09-08,12",  # > 90 days later: a new episode
    ]) + "\n")
    rec = read_intake(cfg.data, cfg.instruments).records
    assert rec.episode.tolist() == [0, 0, 1, 1]
    assert rec.session.tolist() == [1, 2, 1, 2]


def test_episode_id_column(tmp_path: Path) -> None:
    cfg = write_site(
        tmp_path, "client,ep,n,total\na,r1,1,20\na,r2,1,18\na,r1,2,10\na,r2,2,17\n",
        data={"path": "outcomes.csv", "instrument": "PHQ-9",
              "columns": {"client_id": "client", "episode_id": "ep", "session": "n",
                          "score": "total"}},
    )
    rec = read_intake(cfg.data, cfg.instruments).records
    assert rec.episode.tolist() == [0, 0, 1, 1]
    assert rec.score.tolist() == [20, 10, 18, 17]


def test_sessions_from_dates_only(tmp_path: Path) -> None:
    cfg = write_site(
        tmp_path, "client,seen,total\na,2026-01-15,9\na,2026-01-01,20\na,2026-01-08,15\n"
        "a,2026-01-08,16\n",
        data={"path": "outcomes.csv", "instrument": "PHQ-9",
              "columns": {"client_id": "client", "date": "seen", "score": "total"}},
    )
    intake = read_intake(cfg.data, cfg.instruments)
    # Two scores on one day without session numbers conflict.
    assert set(_reasons(intake.quarantine)) == {4, 5}
    # The day with conflicting scores still counts as the client's second session.
    assert intake.records.session.tolist() == [1, 3]
    assert intake.records.score.tolist() == [20, 9]


def test_client_ids_keep_leading_zeros(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "007,1,2026-01-01,20\n7,1,2026-01-01,10\n")
    rec = read_intake(cfg.data, cfg.instruments).records
    assert sorted(rec.client_ids) == ["007", "7"]
    assert rec.n_episodes == 2


def test_parquet_with_typed_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "client": ["a", "a", "b"], "session_no": [1, 2, 1],
        "seen_on": pd.to_datetime(["2026-01-01", "2026-01-08", "2026-01-01"]),
        "total": [20, 30, 9],
    })
    frame.to_parquet(tmp_path / "outcomes.parquet")
    cfg = write_site(tmp_path, "", data={
        "path": "outcomes.parquet", "instrument": "PHQ-9",
        "columns": {"client_id": "client", "session": "session_no", "date": "seen_on",
                    "score": "total"}})
    intake = read_intake(cfg.data, cfg.instruments)
    assert _reasons(intake.quarantine) == {2: "score out of the PHQ-9 range 0-27"}
    assert intake.records.n_rows == 2


def test_missing_column_names_the_fix(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, "client,session,seen_on,total\na,1,2026-01-01,3\n")
    with pytest.raises(DataError) as err:
        read_intake(cfg.data, cfg.instruments)
    assert "session_no" in str(err.value) and "did you mean 'session'" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER)
    (tmp_path / "outcomes.csv").unlink()
    with pytest.raises(DataError, match="no such file"):
        read_intake(cfg.data, cfg.instruments)


def test_records_are_read_only(tmp_path: Path) -> None:
    cfg = write_site(tmp_path, HEADER + "a,1,2026-01-01,20\n")
    rec = read_intake(cfg.data, cfg.instruments).records
    with pytest.raises(ValueError):
        rec.score[0] = 1


_cell = st.one_of(st.sampled_from(["", "1", "2", "27", "28", "-3", "1.5", "x", "2026-01-01",
                                   "2026-13-01", " 3 ", "a", "b"]),
                  st.text(alphabet="ab019-./ \"", max_size=6))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(_cell, min_size=4, max_size=4), max_size=25))
def test_intake_never_crashes_and_accounts_for_every_row(tmp_path: Path,
                                                         rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["client", "session_no", "seen_on", "total"])
    w.writerows(rows)
    cfg = write_site(tmp_path, buf.getvalue())
    intake = read_intake(cfg.data, cfg.instruments)
    rec = intake.records
    kept = set(rec.line.tolist())
    quarantined = set(intake.quarantine["line"].tolist())
    # Every row is either used or quarantined, never both, never lost.
    assert kept.isdisjoint(quarantined)
    assert kept | quarantined == set(range(2, len(rows) + 2))
    assert ((rec.score >= 0) & (rec.score <= 27)).all()
    assert (rec.session >= 1).all()
    assert np.all(np.diff(rec.episode) >= 0)

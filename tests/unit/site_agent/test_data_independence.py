"""No refusal and no error may depend on the clinic's client records (issue 8).

For a base clinic D and its neighbour D' = D plus one client with extreme or odd values,
the real engine (preview and release, auto and manual approval, budget left or not,
allowed and not allowed instruments and families, an inline redefinition) must give the
same kind of answer: a release, or the same refusal code. What cannot be computed is
released as the noised result of an empty or clipped contribution. Refusals that depend
only on the export's structure (missing file, a Parquet column type the configuration
cannot use) come before budget is reserved and cost nothing.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.study import parse_study
from site_agent.cli import main
from site_agent.data import read_intake
from site_agent.errors import DataError, ExitCode
from site_agent.privacy import Refused, ReleaseEngine, StudyRequest

from .privacy_helpers import POLICY, STUDY, engine

ALL = ["counts", "change", "categories", "trajectory", "histogram"]
BDI_X = {"range": [0, 27], "better": "lower", "reliable_change": 5, "cutoff": 10}
COLUMNS = {"client_id": "client", "session": "session", "date": "date", "score": "score",
           "instrument": "measure"}

Row = tuple[str, str, str, str, str]  # client, measure, session, date, score (as written)


def _base_rows() -> list[Row]:
    rows: list[Row] = []
    for i in range(24):
        for k in (1, 2, 3):
            rows.append((f"p{i:02d}", "PHQ-9", str(k), f"2026-0{1 + i % 6}-{7 * k:02d}",
                         str(max(0, min(27, 8 + i % 17 - 2 * k)))))
    for i in range(8):
        for k in (1, 2):
            rows.append((f"b{i}", "BDI-X", str(k), f"2026-03-{7 * k:02d}", str(6 + i - k)))
    return rows


def _write_csv(path: Path, rows: list[Row], raw_tail: bytes = b"") -> None:
    text = "client,measure,session,date,score\n" + "".join(",".join(r) + "\n" for r in rows)
    path.write_bytes(text.encode() + raw_tail)


def _clinic(tmp: Path, *, approval: str = "auto", export: str = "outcomes.csv") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "site.yaml").write_text(yaml.safe_dump({
        "site": {"id": "clinic-n"},
        "data": {"path": export, "columns": COLUMNS},
        "instruments": {"BDI-X": BDI_X},
        "privacy_policy": "privacy.yaml",
    }))
    (tmp / "privacy.yaml").write_text(yaml.safe_dump(POLICY | {
        "approval": approval,
        "per_study": {"rho": 0.1},
        "budget": {"rho": 0.5, "period_days": 365},
        "allow": {"instruments": ["PHQ-9", "GAD-7", "BDI-X"],
                  "families": ["counts", "change", "categories", "histogram"]},
    }))
    return tmp / "site.yaml"


def _study(**change: Any) -> StudyRequest:
    return StudyRequest(parse_study(STUDY | {"families": ["counts", "change", "categories",
                                                          "histogram"]} | change))


STUDIES = {
    "phq9": _study(),
    "gad7 (allowed, absent from D)": _study(id="gad", instrument="GAD-7",
                                            bands=[[0, 9], [10, 21]]),
    "bdi-x as the site defines it": _study(id="bdi", instrument={"id": "BDI-X",
                                                                 "definition": BDI_X},
                                           bands=[[0, 9], [10, 27]]),
    "bdi-x redefined narrower": _study(id="bdi5", instrument={
        "id": "BDI-X", "definition": BDI_X | {"range": [5, 27]}}, bands=[[5, 27]]),
    "core-10 (not allowed)": _study(id="core", instrument="CORE-10", bands=[[0, 10], [11, 40]]),
    "trajectory (family not allowed)": _study(id="traj", families=ALL),
    "over the per-study cap": _study(id="cap", privacy={"rho": 0.2}),
}


def _kind(eng: ReleaseEngine, req: StudyRequest) -> str:
    try:
        eng.release(req)
    except Refused as r:
        return str(r.code)
    return "release"


def _answers(config: Path, req: StudyRequest) -> tuple[str, ...]:
    """Preview, release, and for a pending request the release once approved."""
    eng = engine(config)
    preview = eng.preview(req)
    first = _kind(eng, req)
    out = (preview["outcome"], preview.get("code", ""), first)
    if first == "pending_approval":
        with eng.ledger() as led:
            led.decide(eng.request_id(req.study), approve=True)
        out += (_kind(eng, req),)
    return out


def _spend_all_but(config: Path, rest: float) -> None:
    """Leave about ``rest`` of the budget (rho), by earlier releases of other studies."""
    eng = engine(config)
    for i in range(10):
        with eng.ledger() as led:
            left = float(led.status().remaining)
        if left - rest < 1e-4:
            return
        req = _study(id=f"earlier-{i}", families=["counts"],
                     privacy={"rho": round(min(0.1, left - rest), 6)})
        if _kind(eng, req) == "pending_approval":
            with eng.ledger() as led:
                led.decide(eng.request_id(req.study), approve=True)
        assert _kind(eng, req) == "release"


def _neighbours(tmp: Path, extra: list[Row], raw: bytes = b"", *, exhausted: bool = False,
                **policy: Any) -> tuple[Path, Path]:
    d, d1 = _clinic(tmp / "D", **policy), _clinic(tmp / "D1", **policy)
    _write_csv(d.parent / "outcomes.csv", _base_rows())
    _write_csv(d1.parent / "outcomes.csv", _base_rows() + extra, raw)
    if exhausted:  # too little left for any study below
        _spend_all_but(d, 0.01)
        _spend_all_but(d1, 0.01)
    return d, d1


# One client each: the odd values a real export has, and the extremes.
ODD_CLIENTS: dict[str, tuple[list[Row], bytes]] = {
    "intake at the range ends": ([("z", "PHQ-9", "1", "2026-02-01", "27"),
                                  ("z", "PHQ-9", "2", "2026-02-08", "0")], b""),
    "intake below the narrower band": ([("z", "BDI-X", "1", "2026-02-01", "4"),
                                        ("z", "BDI-X", "2", "2026-02-08", "3")], b""),
    "scores out of range": ([("z", "PHQ-9", "1", "2026-02-01", "28"),
                             ("z", "PHQ-9", "2", "2026-02-08", "-1")], b""),
    "a score of an instrument otherwise absent": ([("z", "GAD-7", "1", "2026-02-01", "15"),
                                                   ("z", "GAD-7", "2", "2026-02-08", "5")],
                                                  b""),
    "a single-score episode": ([("z", "GAD-7", "1", "2026-02-01", "21")], b""),
    "a not-allowed instrument": ([("z", "CORE-10", "1", "2026-02-01", "30"),
                                  ("z", "CORE-10", "2", "2026-02-08", "3")], b""),
    "a huge session number": ([("z", "PHQ-9", "1", "2026-02-01", "20"),
                               ("z", "PHQ-9", "1000000000000", "2026-02-08", "3")], b""),
    "duplicate sessions": ([("z", "PHQ-9", "1", "2026-02-01", "20"),
                            ("z", "PHQ-9", "1", "2026-02-01", "3"),
                            ("z", "PHQ-9", "2", "2026-02-08", "3")], b""),
    "unparseable dates": ([("z", "PHQ-9", "1", "2026-02-31", "20"),
                           ("z", "PHQ-9", "2", "yesterday", "3")], b""),
    "non-numeric scores": ([("z", "PHQ-9", "1", "2026-02-01", "twenty"),
                            ("z", "PHQ-9", "2", "2026-02-08", "1e400")], b""),
    "an unknown instrument": ([("z", "XYZ", "1", "2026-02-01", "20")], b""),
    "bytes that are not UTF-8": ([], b"z\xff\xfe,PHQ-9,1,2026-02-01,20\n"
                                     b"z\xff\xfe,PHQ-9,2,2026-02-08,3\n"),
    "a ragged line": ([], b'z,PHQ-9,1,"2026-02-01,20\n'),
}


@pytest.mark.slow
@pytest.mark.parametrize("odd", list(ODD_CLIENTS))
def test_one_odd_client_never_changes_the_kind_of_answer(tmp_path: Path, odd: str) -> None:
    extra, raw = ODD_CLIENTS[odd]
    for approval in ("auto", "manual"):
        for exhausted in (False, True):
            where = tmp_path / f"{approval}-{exhausted}"
            d, d1 = _neighbours(where, extra, raw, approval=approval, exhausted=exhausted)
            for name, req in STUDIES.items():
                a, a1 = _answers(d, req), _answers(d1, req)
                assert a == a1, (odd, approval, exhausted, name)
                if exhausted and name == "phq9":
                    assert "budget_exhausted" in a
    # The matrix is not vacuous: it holds releases and each refusal code.
    d, _ = _neighbours(tmp_path / "again", extra, raw)
    kinds = {name: _kind(engine(d), req) for name, req in STUDIES.items()}
    assert kinds == {
        "phq9": "release",
        "gad7 (allowed, absent from D)": "release",
        "bdi-x as the site defines it": "release",
        "bdi-x redefined narrower": "not_allowed",
        "core-10 (not allowed)": "not_allowed",
        "trajectory (family not allowed)": "not_allowed",
        "over the per-study cap": "over_study_cap",
    }


_cell = st.one_of(
    st.sampled_from(["", "0", "1", "2", "4", "21", "27", "28", "-1", "1.5", "x", "1e9",
                     "99999999999999", " 3 ", "2026-01-01", "2026-02-31", "2026-13-01"]),
    st.integers(-10, 10**6).map(str),
    st.text(alphabet="az09-./ é\t", max_size=5),
)
_odd_rows = st.lists(st.tuples(_cell, st.one_of(st.sampled_from(
    ["2026-02-01", "1999-01-01", "2026-02-30", "9999-12-31", ""]), _cell), _cell), max_size=3)


@pytest.mark.slow
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(measure=st.sampled_from(["PHQ-9", "GAD-7", "BDI-X", "CORE-10", "", "phq9"]),
       scores=st.lists(st.integers(0, 21), max_size=4), odd=_odd_rows,
       client=st.sampled_from(["z", "p00", " z ", "zé", "0007"]))
def test_any_added_client_gives_the_same_kind_of_answer(
    tmp_path_factory: pytest.TempPathFactory, measure: str, scores: list[int],
    odd: list[tuple[str, str, str]], client: str,
) -> None:
    # One client's episode (well formed, with scores anywhere in 0..21) and odd rows; the
    # client may already be in D ("p00"): still one client's records.
    tmp = tmp_path_factory.mktemp("hyp")
    extra = [(client, measure, str(k), f"2026-02-{7 * k:02d}", str(x))
             for k, x in enumerate(scores, start=1)]
    extra += [(client, measure, k, d, x) for k, d, x in odd]  # the cells hold no commas
    d, d1 = _neighbours(tmp, extra)
    for name in ("phq9", "gad7 (allowed, absent from D)", "bdi-x as the site defines it",
                 "bdi-x redefined narrower"):
        req = STUDIES[name]
        assert _answers(d, req) == _answers(d1, req), name


# --- Parquet: column types are structure, values are rows ---------------------------

def _parquet_clinic(tmp: Path, table: pa.Table) -> Path:
    config = _clinic(tmp, export="outcomes.parquet")
    pq.write_table(table, tmp / "outcomes.parquet")
    return config


def _good_columns() -> dict[str, pa.Array]:
    base = _base_rows()
    return {
        "client": pa.array([r[0] for r in base]),
        "measure": pa.array([r[1] for r in base]),
        "session": pa.array([int(r[2]) for r in base]),
        "date": pa.array([dt.date.fromisoformat(r[3]) for r in base]),
        "score": pa.array([int(r[4]) for r in base]),
    }


def _n() -> int:
    return len(_base_rows())


BAD_TYPES = {
    "binary ids": ("client", pa.array([r[0].encode() for r in _base_rows()], pa.binary())),
    "list ids": ("client", pa.array([[r[0]] for r in _base_rows()])),
    "bool dates": ("date", pa.array([True] * _n())),
    "struct scores": ("score", pa.array([{"points": 3}] * _n())),
    "bool scores": ("score", pa.array([False] * _n())),
    "time sessions": ("session", pa.array([dt.time(1)] * _n())),
}


@pytest.mark.parametrize("case", list(BAD_TYPES))
def test_unusable_parquet_type_is_refused_before_budget_with_the_fix(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    column, values = BAD_TYPES[case]
    config = _parquet_clinic(tmp_path, pa.table(_good_columns() | {column: values}))
    assert main(["check", "--config", str(config)]) == ExitCode.DATA
    err = capsys.readouterr().err
    assert "outcomes.parquet" in err and f"column {column!r}" in err
    found = pq.read_schema(tmp_path / "outcomes.parquet").field(column).type
    assert f"has Parquet type {found};" in err and "Export these columns" in err
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": STUDY | {"families": ["counts"]}}))
    code = main(["release", "--config", str(config), "--study", str(study), "--out",
                 str(tmp_path / "r.json")])
    assert code == ExitCode.INVALID_DATA
    with engine(config).ledger() as led:
        assert led.status().spent == 0  # refused before anything was reserved


def test_parquet_behind_a_csv_name_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _clinic(tmp_path)
    pq.write_table(pa.table(_good_columns()), tmp_path / "outcomes.csv")
    assert main(["check", "--config", str(config)]) == ExitCode.DATA
    assert "is a Parquet file, not CSV" in capsys.readouterr().err
    assert _kind(engine(config), STUDIES["phq9"]) == "invalid_data"
    with engine(config).ledger() as led:
        assert led.status().spent == 0


def test_parquet_types_pandas_picks_from_the_values_are_accepted(tmp_path: Path) -> None:
    # D has integer scores and ids; its neighbour's one client has a missing score and id
    # (pandas writes floats), a date out of range, a score column of one null...: the
    # same answers, and the odd rows are quarantined one by one.
    base = pd.DataFrame(_good_columns() | {"date": pd.to_datetime(
        [r[3] for r in _base_rows()])})
    base = base.assign(client=range(len(base)))
    odd = pd.DataFrame({"client": [None, 999.0, 999.0], "measure": ["PHQ-9"] * 3,
                        "session": [1, None, 2],
                        "date": pd.to_datetime(["2026-01-01", "2026-01-08", "2200-01-01"]),
                        "score": [3.0, None, 2.5]})
    d = _clinic(tmp_path / "D", export="outcomes.parquet")
    d1 = _clinic(tmp_path / "D1", export="outcomes.parquet")
    base.to_parquet(d.parent / "outcomes.parquet")
    both = pd.concat([base, odd], ignore_index=True)
    both.to_parquet(d1.parent / "outcomes.parquet")
    assert pq.read_schema(d1.parent / "outcomes.parquet").field("client").type == pa.float64()
    for req in STUDIES.values():
        assert _answers(d, req) == _answers(d1, req)
    cfg = engine(d1).site
    intake = read_intake(cfg.data, cfg.instruments)
    assert intake.rows_quarantined == 3 and intake.records.n_rows == len(base)


def test_typed_dates_out_of_range_and_huge_integers_are_per_row(tmp_path: Path) -> None:
    n = 4
    table = pa.table({
        "client": pa.array(["a", "a", "b", "b"]),
        "measure": pa.array(["PHQ-9"] * n),
        "session": pa.array([1, 2, 1, 2 ** 64 - 1], pa.uint64()),
        "date": pa.array([0, 86_400_000 * 7 + 5, -2 ** 62, 2 ** 62], pa.date64()),
        "score": pa.array([10, 5, 12, 6]),
    })
    config = _parquet_clinic(tmp_path, table)
    cfg = engine(config).site
    intake = read_intake(cfg.data, cfg.instruments)
    assert intake.records.n_rows == 2  # client a; b's rows are quarantined
    assert intake.records.date.tolist() == [0, 7]  # a time of day is dropped, not an error
    assert set(intake.quarantine["field"]) == {"date", "session"}
    stamps = table.set_column(2, "session", pa.array([1, 2, 1, 2])).set_column(
        3, "date", pa.array([-2 ** 62, 0, 2 ** 62, 1], pa.timestamp("ms", tz="Europe/Berlin")))
    pq.write_table(stamps, tmp_path / "outcomes.parquet")
    intake = read_intake(cfg.data, cfg.instruments)
    assert sorted(intake.quarantine["line"]) == [1, 3]  # the dates that would wrap around


def test_missing_export_is_still_a_data_error(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    cfg = engine(config).site
    with pytest.raises(DataError, match="no such file"):
        read_intake(cfg.data, cfg.instruments)

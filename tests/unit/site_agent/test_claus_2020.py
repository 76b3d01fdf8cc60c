"""Intake of real data (Claus, Scherbaum & Bonnet 2020) through a site YAML with a custom
BDI-II instrument, checked against a plain independent computation."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from site_agent.config import load_site_config
from site_agent.data import read_intake
from site_agent.outcomes import JT, derive_episodes

# Optional external data (GPL-3, so not shipped): beside the checkout, or named by the
# environment; without it the test is skipped with the reason.
DATA = Path(
    os.environ.get("OUTCOMEBENCH_CLAUS_2020")
    or Path(__file__).resolve().parents[4] / "shared" / "data" / "claus_2020" / "claus_2020.csv"
)
pytestmark = pytest.mark.skipif(
    not DATA.is_file(),
    reason=f"optional data set {DATA} not present (set OUTCOMEBENCH_CLAUS_2020 to its CSV)",
)

RC = 1.959964 * math.sqrt(2) * 8.16 * math.sqrt(1 - 0.801)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    doc = {
        "site": {"id": "claus-2020"},
        "data": {"path": str(DATA), "instrument": "BDI-II",
                 "columns": {"client_id": "id", "session": "time", "score": "bdi"}},
        "instruments": {"BDI-II": {"range": [0, 63], "better": "lower", "reliability": 0.801,
                                   "sd": 8.16, "cutoff": 20}},
    }
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "site.yaml"


def test_claus_intake_and_outcomes(site: Path) -> None:
    cfg = load_site_config(site)
    intake = read_intake(cfg.data, cfg.instruments)
    raw = pd.read_csv(DATA)
    # Rows without a BDI-II score are quarantined as such, nothing else.
    assert intake.rows_read == len(raw) == 172
    assert intake.reasons == {"missing score": int(raw["bdi"].isna().sum())}
    assert intake.records.n_rows == int(raw["bdi"].notna().sum())

    ep = derive_episodes(intake.records, cfg.instruments, max_session=4)["BDI-II"]
    assert ep.instrument.reliable_change == pytest.approx(RC, rel=1e-5)

    # Independent computation: first and last available BDI-II per patient.
    valid = raw.dropna(subset=["bdi"]).sort_values(["id", "time"])
    g = valid.groupby("id")["bdi"]
    expected = pd.DataFrame({"pre": g.first(), "post": g.last(), "n": g.size()})
    expected = expected[expected["n"] >= 2]
    change = expected["pre"] - expected["post"]
    t = ep.table.assign(id=[int(intake.records.client_ids[c]) for c in ep.table["client"]])
    t = t.set_index("id").sort_index()
    assert t.index.tolist() == expected.index.tolist()
    assert t["change"].tolist() == change.astype(int).tolist()
    improved = change >= RC
    deteriorated = change <= -RC
    recovered = (expected["pre"] >= 20) & (expected["post"] < 20)
    assert int((t["reliable"] == 1).sum()) == int(improved.sum())
    assert int((t["reliable"] == -1).sum()) == int(deteriorated.sum())
    assert int((t["jt"] == JT.RECOVERED).sum()) == int((improved & recovered).sum())
    assert int(t["recovered"].sum()) == int(recovered.sum())
    # Trajectory at session 1 is the intake for everybody with a time-1 score.
    assert (ep.trajectory[:, 0][ep.trajectory[:, 0] >= 0] == t["intake"].to_numpy()[
        ep.trajectory[:, 0] >= 0]).all()

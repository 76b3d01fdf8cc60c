from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from site_agent.config import load_site_config
from site_agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def _write(tmp: Path, doc: object) -> Path:
    p = tmp / "site.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


def test_issue_example_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, """
site:
  id: clinic-north
data:
  path: exports/outcomes.csv      # or .parquet
  instrument: PHQ-9               # constant instrument
  columns: {client_id: client, session: session_no, date: seen_on, score: total}
instruments:
  BDI-II: {range: [0, 63], better: lower, reliability: 0.801, sd: 8.16, cutoff: 20}
""")
    cfg = load_site_config(p)
    assert cfg.site_id == "clinic-north"
    assert cfg.data.path == (tmp_path / "exports" / "outcomes.csv").resolve()
    assert cfg.data.format == "csv"
    assert cfg.data.columns.session == "session_no"
    assert cfg.instruments["BDI-II"].reliable_change == pytest.approx(10.09, abs=0.01)
    assert "PHQ-9" in cfg.instruments


def test_example_config_in_repo_loads() -> None:
    cfg = load_site_config(REPO / "configs" / "site.example.yaml")
    assert cfg.site_id
    assert cfg.data.columns.client_id


def test_unknown_keys_are_refused_with_did_you_mean(tmp_path: Path) -> None:
    p = _write(tmp_path, {
        "site": {"id": "x1", "nmae": "y"},
        "data": {"path": "a.csv", "instrument": "PHQ-9",
                 "colums": {"client_id": "c", "score": "s", "session": "n"}},
        "privacy_polcy": "p.yaml",
    })
    with pytest.raises(ConfigError) as err:
        load_site_config(p)
    text = str(err.value)
    assert "did you mean 'columns'" in text
    assert "did you mean 'privacy_policy'" in text
    assert "'nmae'" in text


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    p = _write(tmp_path, {
        "site": {"id": "Bad Id!"},
        "data": {"path": "a.xlsx", "instrument": "PHQ9",
                 "columns": {"client_id": "c", "session": "c"}},
    })
    with pytest.raises(ConfigError) as err:
        load_site_config(p)
    problems = err.value.problems
    joined = "\n".join(problems)
    assert "site.id" in joined
    assert "did you mean 'PHQ-9'" in joined
    assert "score: required" in joined
    assert "cannot tell the format" in joined
    assert "mapped to more than one field" in joined
    assert len(problems) >= 5


def test_instrument_needed(tmp_path: Path) -> None:
    p = _write(tmp_path, {"site": {"id": "a"}, "data": {
        "path": "a.csv", "columns": {"client_id": "c", "session": "n", "score": "s"}}})
    with pytest.raises(ConfigError, match="which instrument"):
        load_site_config(p)


def test_order_column_needed(tmp_path: Path) -> None:
    p = _write(tmp_path, {"site": {"id": "a"}, "data": {
        "path": "a.csv", "instrument": "GAD-7", "columns": {"client_id": "c", "score": "s"}}})
    with pytest.raises(ConfigError, match="session"):
        load_site_config(p)


def test_custom_instrument_cannot_shadow_registry(tmp_path: Path) -> None:
    p = _write(tmp_path, {"site": {"id": "a"}, "data": {
        "path": "a.csv", "instrument": "PHQ-9",
        "columns": {"client_id": "c", "session": "n", "score": "s"}},
        "instruments": {"PHQ-9": {"range": [0, 30], "better": "lower", "reliable_change": 5,
                                  "cutoff": 9}}})
    with pytest.raises(ConfigError, match="clashes"):
        load_site_config(p)


@pytest.mark.parametrize("text, needle", [
    ("site: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_broken_yaml(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_site_config(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_site_config(tmp_path / "nope.yaml")

"""Synthetic clinics: determinism, realism against DOMAIN.md, messy rows, files and CLI."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import yaml

from coordinator import cli, synth
from coordinator.cli import EXIT_CODE_HELP, ExitCode, main
from coordinator.synth import (
    CSV_COLUMNS,
    EPISODE_GAP_DAYS,
    SiteParams,
    generate_site,
    synthesize,
)
from protocols import Better, SpecError, builtin_instruments

PHQ9 = builtin_instruments()["PHQ-9"]
INTEGER = re.compile(r"^-?\d+$")


def _episodes(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per episode: length, first and last score, drop-out, therapist."""
    return (
        frame.groupby(["client", "episode"], sort=False)
        .agg(
            n=("session_no", "size"),
            first=("total", "first"),
            last=("total", "last"),
            dropped_out=("dropped_out", "first"),
            therapist=("therapist", "first"),
        )
        .reset_index()
    )


@pytest.fixture(scope="module")
def big_site() -> pd.DataFrame:
    params = SiteParams.typical(PHQ9, 100_000)
    return generate_site(np.random.default_rng(2024), params)


@pytest.fixture(scope="module")
def big_episodes(big_site: pd.DataFrame) -> pd.DataFrame:
    return _episodes(big_site)


def _read_export(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- determinism ---------------------------------------------------------------------


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    synthesize(3, tmp_path / "a", seed=7, messy=True)
    synthesize(3, tmp_path / "b", seed=7, messy=True)
    synthesize(3, tmp_path / "c", seed=8, messy=True)
    a, b, c = (_file_bytes(tmp_path / x) for x in "abc")
    assert len(a) == 6
    assert a == b
    csv_a = {k: v for k, v in a.items() if k.endswith(".csv")}
    csv_c = {k: v for k, v in c.items() if k.endswith(".csv")}
    assert csv_a.keys() == csv_c.keys()
    assert all(csv_a[k] != csv_c[k] for k in csv_a)


def test_clinic_k_does_not_depend_on_the_number_of_clinics(tmp_path: Path) -> None:
    synthesize(1, tmp_path / "one", seed=3)
    synthesize(4, tmp_path / "four", seed=3)
    one = (tmp_path / "one" / "clinic-01" / "outcomes.csv").read_bytes()
    assert one == (tmp_path / "four" / "clinic-01" / "outcomes.csv").read_bytes()


def test_generate_site_is_seeded() -> None:
    params = SiteParams.typical(PHQ9, 500)
    a = generate_site(np.random.default_rng(1), params)
    b = generate_site(np.random.default_rng(1), params)
    c = generate_site(np.random.default_rng(2), params)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


# --- realism (DOMAIN.md, "Parameters for synthetic clinics") ------------------------------


def test_sessions_per_episode_are_right_skewed_median_5_mean_6_5(
    big_episodes: pd.DataFrame,
) -> None:
    n = big_episodes["n"]
    assert n.median() == 5
    assert 6.2 <= n.mean() <= 6.8
    assert 3.5 <= n.std() <= 5.0  # published SD about 4
    assert n.min() == 1
    assert 0.01 <= (n == 1).mean() <= 0.08  # some episodes have a single score
    assert n.mean() > n.median()


def test_dropout_is_about_20_percent(big_episodes: pd.DataFrame) -> None:
    share = big_episodes["dropped_out"].mean()
    assert 0.18 <= share <= 0.22
    # Drop-outs stopped early: their courses are shorter than completers'.
    by = big_episodes.groupby("dropped_out")["n"].mean()
    assert by[True] < by[False]


def test_at_least_a_quarter_start_below_cutoff_and_change_about_zero(
    big_episodes: pd.DataFrame,
) -> None:
    below = big_episodes["first"] < PHQ9.cutoff
    assert 0.25 <= below.mean() <= 0.45
    finished = big_episodes["n"] >= 2
    change = (big_episodes["first"] - big_episodes["last"])[below & finished]
    assert abs(change.mean()) < 1.0
    clinical = (big_episodes["first"] - big_episodes["last"])[~below & finished]
    assert clinical.mean() > 4.0  # pre-post d around 1 in routine care


def test_reliable_deterioration_between_3_and_12_percent(big_episodes: pd.DataFrame) -> None:
    finished = big_episodes[big_episodes["n"] >= 2]
    rise = finished["last"] - finished["first"]
    assert PHQ9.reliable_change == 6
    assert 0.03 <= (rise >= 6).mean() <= 0.12


def test_recovery_is_near_published_rates(big_episodes: pd.DataFrame) -> None:
    finished = big_episodes[(big_episodes["n"] >= 2) & (big_episodes["first"] >= 10)]
    recovered = (finished["last"] < 10).mean()
    assert 0.35 <= recovered <= 0.60  # NHS Talking Therapies: 45-51%


def test_therapist_effect_is_about_5_percent_of_outcome_variance(
    big_episodes: pd.DataFrame,
) -> None:
    # One-way random-effects ANOVA on the intake-adjusted final score.
    d = big_episodes[big_episodes["n"] >= 2]
    x = d["first"].to_numpy(float)
    y = d["last"].to_numpy(float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = pd.Series(y - (intercept + slope * x), index=d.index)
    groups = resid.groupby(d["therapist"])
    k = groups.size()
    n_total, n_groups = len(resid), len(k)
    ms_between = (k * (groups.mean() - resid.mean()) ** 2).sum() / (n_groups - 1)
    ms_within = ((resid - groups.transform("mean")) ** 2).sum() / (n_total - n_groups)
    n0 = (n_total - (k**2).sum() / n_total) / (n_groups - 1)
    between = (ms_between - ms_within) / n0
    icc = between / (between + ms_within)
    assert 0.025 <= icc <= 0.09


def test_trajectories_fall_log_linearly_for_clinical_clients(big_site: pd.DataFrame) -> None:
    first = big_site.groupby(["client", "episode"])["total"].transform("first")
    clinical = big_site[first >= 15]
    mean_at = clinical.groupby("session_no")["total"].mean()
    assert mean_at[1] > mean_at[2] > mean_at[4] > mean_at[8]
    # Log-linear: the drop from 1 to 2 is close to the drop from 2 to 4 (ln 2 each).
    assert abs((mean_at[1] - mean_at[2]) - (mean_at[2] - mean_at[4])) < 1.0


def test_scores_are_integers_in_range(big_site: pd.DataFrame) -> None:
    assert big_site["total"].dtype.kind == "i"
    assert big_site["total"].between(PHQ9.lo, PHQ9.hi).all()


def test_repeat_episodes_are_recovered_from_date_gaps(big_site: pd.DataFrame) -> None:
    frame = big_site.sort_values(["client", "seen_on"], kind="stable")
    gap = frame["seen_on"].diff().dt.days
    same_client = frame["client"].eq(frame["client"].shift())
    new_episode = ~same_client | (gap > EPISODE_GAP_DAYS)
    derived = new_episode.groupby(frame["client"]).cumsum()
    assert (derived.to_numpy() == frame["episode"].to_numpy()).all()
    repeat_share = (big_site.groupby("client")["episode"].max() == 2).mean()
    assert 0.05 <= repeat_share <= 0.11
    # Sessions are weekly-ish, so no gap inside an episode comes close to the split.
    inside = gap[same_client & ~new_episode]
    assert inside.max() <= 30
    assert inside.median() == 7


def test_dates_are_spread_over_2025_and_2026(big_site: pd.DataFrame) -> None:
    days = big_site["seen_on"]
    assert days.min() >= pd.Timestamp("2025-01-01")
    assert days.max() <= pd.Timestamp("2026-12-31")
    by_year = days.dt.year.value_counts(normalize=True)
    assert by_year[2025] > 0.3
    assert by_year[2026] > 0.3


@pytest.mark.parametrize("instrument_id", sorted(builtin_instruments()))
def test_every_registry_instrument_improves_in_its_better_direction(instrument_id: str) -> None:
    ins = builtin_instruments()[instrument_id]
    frame = generate_site(np.random.default_rng(5), SiteParams.typical(ins, 5_000))
    assert frame["total"].between(ins.lo, ins.hi).all()
    episodes = _episodes(frame)
    episodes = episodes[episodes["n"] >= 4]
    change = (episodes["last"] - episodes["first"]).mean()
    if ins.better is Better.LOWER:
        assert change < 0
    else:
        assert change > 0


# --- files ----------------------------------------------------------------------------


def test_synthesize_writes_csv_and_site_yaml(tmp_path: Path) -> None:
    sites = synthesize(2, tmp_path, seed=11)
    assert [s.site_id for s in sites] == ["clinic-01", "clinic-02"]
    for s in sites:
        assert s.directory == tmp_path / s.site_id
        assert s.data_path == s.directory / "outcomes.csv"
        assert s.config_path == s.directory / "site.yaml"
        text = s.config_path.read_text(encoding="utf-8")
        assert text.startswith("#")
        assert "synthetic" in text.lower().split("\nsite:")[0]
        assert yaml.safe_load(text) == {
            "site": {"id": s.site_id},
            "data": {
                "path": "outcomes.csv",
                "columns": {
                    "client_id": "client", "session": "session_no", "date": "seen_on",
                    "instrument": "measure", "score": "total", "therapist_id": "therapist",
                },
                "episode_gap_days": 180,
            },
        }
        export = _read_export(s.data_path)
        assert tuple(export.columns) == CSV_COLUMNS
        assert len(export) == s.n_rows
        assert export["client"].str.fullmatch(r"N-\d{6}").all()
        assert export["client"].nunique() == s.n_clients
        assert s.n_bad_rows == 0


def test_clean_export_has_only_valid_rows(tmp_path: Path) -> None:
    (site,) = synthesize(1, tmp_path, seed=4, clients_range=(300, 300))
    export = _read_export(site.data_path)
    assert (export["measure"] == "PHQ-9").all()
    assert export["total"].str.fullmatch(INTEGER.pattern).all()
    assert export["total"].astype(int).between(0, 27).all()
    dates = pd.to_datetime(export["seen_on"], format="%Y-%m-%d", errors="coerce")
    assert dates.notna().all()
    assert not export.duplicated(["client", "session_no", "seen_on"]).any()
    assert (export["session_no"].astype(int) >= 1).all()
    # A negative control for the detectors the messy tests rely on.
    assert not any(_kinds_found(export).values())


def test_site_sizes_vary_and_respect_clients_range(tmp_path: Path) -> None:
    sizes = [s.n_clients for s in synthesize(6, tmp_path / "default", seed=0)]
    assert len(set(sizes)) == 6
    assert max(sizes) >= 3 * min(sizes)
    assert all(30 <= n <= 3000 for n in sizes)
    ranged = synthesize(5, tmp_path / "ranged", seed=0, clients_range=(40, 60))
    assert all(40 <= s.n_clients <= 60 for s in ranged)


def test_clinics_differ_in_case_mix_and_effectiveness() -> None:
    rng = np.random.default_rng(9)
    params = [synth.draw_site_params(rng, PHQ9) for _ in range(8)]
    assert len({round(p.intake_mean, 6) for p in params}) == 8
    assert len({round(p.gain_mean, 6) for p in params}) == 8


# --- messy exports --------------------------------------------------------------------


def _kinds_found(export: pd.DataFrame) -> dict[str, int]:
    total = export["total"]
    is_int = total.str.fullmatch(INTEGER.pattern)
    value = pd.to_numeric(total.where(is_int), errors="coerce")
    dates = pd.to_datetime(export["seen_on"], format="%Y-%m-%d", errors="coerce")
    key = ["client", "session_no", "seen_on", "measure", "therapist", "clinic_room"]
    same_key = export.duplicated(key, keep=False)
    conflicting = same_key & ~export.duplicated(keep=False)
    # A later session dated before the previous session of the same client's episode.
    prev_same = export["client"].eq(export["client"].shift()) & (export["client"] != "")
    session = pd.to_numeric(export["session_no"], errors="coerce")
    later = session > session.shift()
    out_of_order = prev_same & later & (dates < dates.shift())
    return {
        "unknown instrument": int((export["measure"] != "PHQ-9").sum()),
        "empty score": int((total == "").sum()),
        "non-integer score": int(((total != "") & ~is_int).sum()),
        "score out of range": int((is_int & ~value.between(0, 27)).sum()),
        "empty client id": int((export["client"] == "").sum()),
        "duplicated session with a conflicting score": int(conflicting.sum()),
        "exact duplicate row": int(export.duplicated().sum()),
        "later session dated before an earlier one": int(out_of_order.sum()),
        "unparseable date": int(dates.isna().sum()),
    }


def test_messy_injects_every_kind_in_every_site(tmp_path: Path) -> None:
    sites = synthesize(3, tmp_path, seed=5, messy=True, clients_range=(30, 400))
    assert {k.value for k in synth.BadRowKind} == set(_kinds_found(_read_export(
        sites[0].data_path)))
    for s in sites:
        export = _read_export(s.data_path)
        found = _kinds_found(export)
        assert all(count >= 1 for count in found.values()), (s.site_id, found)
        assert 9 <= s.n_bad_rows <= max(9, 0.05 * s.n_rows)
        # Each injected row shows as one problem (a conflicting pair shows twice).
        assert s.n_bad_rows <= sum(found.values()) <= 2 * s.n_bad_rows


def test_messy_values_look_like_real_mistakes(tmp_path: Path) -> None:
    (site,) = synthesize(1, tmp_path, seed=2, messy=True, clients_range=(2000, 2000))
    export = _read_export(site.data_path)
    assert set(export["measure"]) - {"PHQ-9"} <= {"PHQ9 ", "BDI"}
    odd_dates = set(export["seen_on"][~export["seen_on"].str.fullmatch(r"\d{4}-\d\d-\d\d")])
    assert odd_dates <= {"31/02/2026", "yesterday"}
    bad_scores = set(export["total"][~export["total"].str.fullmatch(INTEGER.pattern)])
    assert "n/a" in bad_scores
    assert any(v.endswith(".5") for v in bad_scores)


def test_smallest_clinics_still_get_every_kind(tmp_path: Path) -> None:
    for s in synthesize(4, tmp_path, seed=1, messy=True, clients_range=(10, 10)):
        found = _kinds_found(_read_export(s.data_path))
        assert all(count >= 1 for count in found.values()), (s.site_id, found)


# --- validation -----------------------------------------------------------------------


def test_bad_arguments_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        synthesize(0, tmp_path, seed=-1, instrument="PHQ9", clients_range=(5, 3))
    problems = " ".join(info.value.problems)
    assert "n_sites" in problems
    assert "seed" in problems
    assert "did you mean 'PHQ-9'" in problems
    assert "clients_range" in problems
    assert not any(tmp_path.iterdir())


def test_site_params_are_validated() -> None:
    params = SiteParams.typical(PHQ9, 100)
    with pytest.raises(SpecError) as info:
        replace(params, n_clients=0, dropout=1.5, noise_sd=-1.0)
    assert len(info.value.problems) == 3


# --- command line ---------------------------------------------------------------------


def test_cli_synth_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["synth", "--sites", "2", "--out", str(tmp_path), "--seed", "1", "--messy",
                 "--clients-min", "40", "--clients-max", "80"])
    assert code == 0
    out = capsys.readouterr().out
    assert "clinic-01" in out
    assert "clinic-02" in out
    assert (tmp_path / "clinic-02" / "site.yaml").is_file()


def test_cli_synth_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--sites", "3", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["site_id"] for s in report["sites"]] == ["clinic-01", "clinic-02", "clinic-03"]
    assert all(Path(s["data_path"]).is_file() for s in report["sites"])
    assert report["messy"] is False


@pytest.mark.parametrize(
    "argv",
    [
        ["synth", "--sites", "0", "--out", "x"],
        ["synth", "--sites", "two", "--out", "x"],
        ["synth", "--out", "x"],
        ["synth", "--sites", "1", "--out", "x", "--clients-min", "90", "--clients-max", "50"],
        ["synth", "--sites", "1", "--out", "x", "--instrument", "BDI"],
        [],
    ],
)
def test_cli_usage_errors_return_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tmp_path / a) if a == "x" else a for a in argv]
    assert main(argv) == ExitCode.USAGE
    assert capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out_returns_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["synth", "--sites", "1", "--out", str(blocker / "out")]) == ExitCode.OUTPUT_ERROR
    err = capsys.readouterr().err
    assert "cannot write" in err
    assert "--out" in err


@pytest.mark.parametrize("argv", [["--help"], ["synth", "--help"]])
def test_cli_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    assert "exit codes:" in out


def test_every_exit_code_has_help() -> None:
    assert set(EXIT_CODE_HELP) == set(ExitCode)
    assert all(text.strip() for text in EXIT_CODE_HELP.values())


@pytest.mark.parametrize("module", [synth, cli])
def test_public_names_exist(module: ModuleType) -> None:
    names = module.__all__
    assert len(set(names)) == len(names)
    assert all(hasattr(module, name) for name in names)
    public = {n for n, v in vars(module).items()
              if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__}
    assert public <= set(names)

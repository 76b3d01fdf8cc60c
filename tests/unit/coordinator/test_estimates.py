from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.estimates import (
    MIN_EPISODES,
    Estimate,
    _fit_log_curve,
    estimate_all,
    mean,
    rate,
    sd,
)
from coordinator.pooling import Pooled, PooledBlock
from protocols.layout import block_layout
from protocols.study import Study, parse_study


def _study(families: list[str] | None = None) -> Study:
    return parse_study({"id": "s", "instrument": "PHQ-9",
                        "window": {"start": "2026-01-01", "end": "2026-12-31"},
                        "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
                        "families": families or ["counts", "change", "categories",
                                                 "trajectory", "histogram"],
                        "max_session": 4, "privacy": {"rho": 0.1}})


def _pooled(study: Study, fill: dict[str, np.ndarray], noise: float) -> Pooled:
    blocks = {}
    for spec in block_layout(study):
        values = fill.get(spec.name, np.zeros((spec.n_bands, spec.width)))
        blocks[spec.name] = PooledBlock(spec=spec, values=np.asarray(values, float).reshape(
            spec.n_bands, spec.width), noise_var=np.full((spec.n_bands, spec.width), noise))
    return Pooled(study=study, contributions=(), blocks=blocks)


def test_mean_adds_sampling_and_noise_variance() -> None:
    # 100 episodes, change mean 5, SD 2: sum 500, sum of squares 100 * (4 + 25) - ...
    n, m, s = 100.0, 5.0, 2.0
    total, squares = n * m, (n - 1) * s * s + n * m * m
    est = mean((total, 400.0), (squares, 0.0), (n, 9.0))
    assert est.value == pytest.approx(5.0)
    assert est.se_sampling == pytest.approx(s / math.sqrt(n))
    # noise: (var_S + m^2 var_N) / N^2
    assert est.se_noise == pytest.approx(math.sqrt(400 + 25 * 9) / n, rel=1e-4)
    lo, hi = est.ci or (0, 0)
    assert lo < 5 < hi and hi - lo == pytest.approx(2 * 1.959964 * est.se)


def test_rate_and_suppression() -> None:
    est = rate((30.0, 4.0), (100.0, 4.0))
    assert est.value == pytest.approx(0.3)
    assert est.se_sampling == pytest.approx(math.sqrt(0.3 * 0.7 / 100))
    assert est.se_noise == pytest.approx(math.sqrt(4 + 0.09 * 4) / 100, rel=1e-4)
    few = rate((3.0, 1.0), (MIN_EPISODES - 1.0, 1.0))
    assert few.value is None and few.suppressed and "fewer than" in few.suppressed
    noisy = rate((30.0, 1.0), (100.0, 400.0))  # noise SD 20 > 15% of 100
    assert noisy.value is None and noisy.suppressed and "DP noise" in noisy.suppressed
    bounded = rate((99.0, 1.0), (100.0, 1.0))
    assert bounded.ci is not None and bounded.ci[1] <= 1.0


def test_sd_suppressed_when_noise_makes_it_negative() -> None:
    assert sd((1000.0, 1.0), (10.0, 1.0), (100.0, 1.0)).value is None


def test_estimate_all_on_exact_sums_is_the_exact_union(tmp_path: Path) -> None:
    """Without noise every published figure is the exact figure computed directly from
    the episodes (pandas/numpy here, independent of the layout's encoding)."""
    from coordinator.synth import synthesize  # noqa: PLC0415
    from site_agent.config import load_site_config  # noqa: PLC0415
    from site_agent.data import read_intake  # noqa: PLC0415
    from site_agent.outcomes import MISSING, derive_episodes  # noqa: PLC0415
    from site_agent.privacy.statistics import exact_blocks, select_episodes  # noqa: PLC0415

    study = parse_study({"id": "s", "instrument": "PHQ-9",
                         "window": {"start": "2020-01-01", "end": "2030-12-31"},
                         "bands": [[0, 7], [8, 12], [13, 19], [20, 27]],
                         "families": ["counts", "change", "categories", "trajectory",
                                      "histogram"],
                         "max_session": 20, "privacy": {"rho": 0.1}})
    [site] = synthesize(1, tmp_path, seed=3, clients_range=(2500, 2600))
    cfg = load_site_config(site.config_path)
    ep = derive_episodes(read_intake(cfg.data, cfg.instruments).records, cfg.instruments,
                         20)["PHQ-9"]
    sel = select_episodes(ep, study, 1)
    tables = estimate_all(_pooled(study, exact_blocks(sel, study), 0.0))
    t, band = sel.table, sel.band
    x, change = t["intake"].to_numpy(float), t["change"].to_numpy(float)
    for i, row in enumerate(tables.bands):
        est, mine = row["estimates"], band == i
        assert est["episodes"].value == mine.sum()
        assert est["mean_intake"].value == pytest.approx(x[mine].mean())
        assert est["mean_change"].value == pytest.approx(change[mine].mean())
        assert est["sd_change"].value == pytest.approx(change[mine].std(ddof=1))
        assert est["effect_size"].value == pytest.approx(change[mine].mean() / x.std(ddof=1))
        rel = t["reliable"].to_numpy()[mine]
        assert est["reliable_improvement_rate"].value == pytest.approx((rel == 1).mean())
        cases = t["case_start"].to_numpy(bool)[mine]
        rec = t["recovered"].to_numpy(bool)[mine]
        if cases.any():
            assert est["recovery_rate"].value == pytest.approx(rec[cases].mean())
        else:
            assert est["recovery_rate"].value is None and "by definition" in str(
                est["recovery_rate"].suppressed)
        assert est["case_at_intake_rate"].value == pytest.approx(cases.mean())
        assert est["remission_rate"].value == pytest.approx(
            t["remission"].to_numpy(bool)[mine].mean())
    assert tables.bands[0]["estimates"]["case_at_intake_rate"].note  # 0 by definition
    assert tables.reference_sd.value == pytest.approx(x.std(ddof=1))
    slope, intercept = np.polyfit(x, change, 1)
    reg = tables.regression
    assert reg["slope"]["value"] == pytest.approx(slope, rel=1e-5)
    assert reg["intercept"]["value"] == pytest.approx(intercept, rel=1e-5, abs=1e-4)
    resid = change - (intercept + slope * x)
    assert reg["residual_sd"]["value"] == pytest.approx(
        math.sqrt((resid**2).sum() / (x.size - 2)), rel=1e-5)
    medians = {r["band"]: r["value"] for r in tables.quantiles if r["quantile"] == 0.5}
    for i, (lo, hi) in enumerate(study.bands):
        c = np.sort(change[band == i])
        assert medians[f"{lo}-{hi}"] == c[int(np.ceil(0.5 * c.size)) - 1]
    # Review groups: the change at the latest scored session of each group.
    traj = sel.trajectory
    for r in tables.trajectory:
        if r["mean_change"]["value"] is None:
            continue
        i = [f"{lo}-{hi}" for lo, hi in study.bands].index(r["band"])
        block = traj[band == i][:, r["first"] - 1 : r["last"]]
        seen = block != MISSING
        has = seen.any(axis=1)
        latest = block.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1)
        score = block[np.arange(block.shape[0]), latest][has]
        expected = (x[band == i][has] - score).mean()  # PHQ-9: improvement = intake - score
        assert r["clients"] == has.sum()
        assert r["mean_change"]["value"] == pytest.approx(expected, rel=1e-5), r["sessions"]
    assert sum(r["mean_change"]["value"] is not None for r in tables.trajectory) >= 20


_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), noise=st.floats(0.0, 1e8))
def test_estimates_never_crash_on_any_noisy_sums(data: st.DataObject, noise: float) -> None:
    study = _study()
    fill = {spec.name: np.array(data.draw(st.lists(_values, min_size=spec.size,
                                                   max_size=spec.size)))
            for spec in block_layout(study)}
    tables = estimate_all(_pooled(study, fill, noise))
    for band in tables.bands:
        for est in band["estimates"].values():
            assert est.value is None or math.isfinite(est.value)
            if est.value is not None and est.ci is not None:
                assert est.ci[0] <= est.ci[1]


# -- the a + b ln(session) fit ------------------------------------------------------------


def _session_means(values: list[float], se_s: list[float], se_n: list[float]) -> list[Estimate]:
    return [Estimate(v, s, n) for v, s, n in zip(values, se_s, se_n, strict=True)]


def test_the_fit_recovers_a_log_curve() -> None:
    xs = [math.log(k) for k in range(1, 9)]
    means = _session_means([1.5 + 2.25 * x for x in xs], [0.3] * 8, [0.2] * 8)
    a, b = _fit_log_curve(xs, means)
    assert a.value == pytest.approx(1.5) and b.value == pytest.approx(2.25)


def test_the_fit_intervals_bound_correlated_sampling_error_and_add_noise_exactly() -> None:
    xs = [math.log(k) for k in (1, 2, 4, 8)]
    se_s, se_n = [0.5, 0.4, 0.6, 0.9], [0.3, 0.3, 0.5, 0.7]
    a, b = _fit_log_curve(xs, _session_means([0.0, 1.0, 2.0, 3.5], se_s, se_n))
    # the linear map from session means to (a, b), computed independently here
    x = np.array(xs)
    design = np.column_stack([np.ones_like(x), x])
    w = 1 / (np.array(se_s) ** 2 + np.array(se_n) ** 2)
    lin = np.linalg.inv(design.T @ (design * w[:, None])) @ (design.T * w)
    for row, est in zip(lin, (a, b), strict=True):
        assert est.se_noise == pytest.approx(math.sqrt(float(np.sum(row**2 * np.square(se_n)))))
        independent = math.sqrt(float(np.sum(row**2 * np.square(se_s))))
        perfectly_correlated = abs(float(np.sum(row * se_s)))
        worst_case = float(np.sum(np.abs(row) * se_s))
        # covers independence and perfect positive correlation, never beyond the worst case
        assert est.se_sampling >= max(independent, perfectly_correlated) - 1e-12
        assert est.se_sampling <= worst_case + 1e-12
    # the slope's weights change sign, so its bound is strictly below the worst case
    assert b.se_sampling < float(np.sum(np.abs(lin[1]) * se_s))


def test_the_fit_needs_three_sessions() -> None:
    a, b = _fit_log_curve([0.0, 0.7], _session_means([1.0, 2.0], [0.1, 0.1], [0.1, 0.1]))
    assert a.value is None and b.value is None and a.suppressed


def test_reliable_rates_are_not_defined_without_a_reliable_change_value() -> None:
    study = parse_study({"id": "w", "instrument": "WSAS",
                         "window": {"start": "2026-01-01", "end": "2026-12-31"},
                         "families": ["counts", "categories"], "privacy": {"rho": 0.1}})
    names = {b.name for b in block_layout(study)}
    assert not names & {"reliably_improved", "reliably_deteriorated", "reliably_recovered"}
    fill = {"episodes": np.full(len(study.bands), 500.0)}
    tables = estimate_all(_pooled(study, fill, 1.0))
    for band in tables.bands:
        ri = band["estimates"]["reliable_improvement_rate"]
        assert ri.value is None and "no reliable-change value" in str(ri.suppressed)
        assert band["estimates"]["response_rate"].value is not None

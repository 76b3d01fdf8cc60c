"""Coverage of the benchmarks' 95% intervals, measured rather than assumed.

Pooled studies are repeated many times over the same five synthetic clinics, and each
interval (DP noise and sampling error together, coordinator.estimates) is checked against
the clinics' true population value. Nominal 95% intervals must cover it between 93% and
97% of the time, for mean change and for the reliable improvement rate, in a band with few
episodes (intake 25-27, about 300 pooled) and in a large one (10-24, about 4,450).

Design
------
The intervals are conditional on the participating services, so the target is the pooled
population of *these* clinics. Each clinic is a finite population of 100,000 clients drawn
once from coordinator.synth (parameters from ``draw_site_params``, fixed seed, PHQ-9). It is
exported as Parquet and read by the site's own pipeline: ``load_site_config`` ->
``read_intake`` -> ``derive_episodes``. Every repeated study samples each clinic's clients
at the clinic's real size, with replacement, so clients are independent draws from it, as
the intervals assume; therapist effects are then fixed properties of the clinic, like
everything else about it.

The truth is known by construction: with n_s clients sampled from a population of N_s,
E[summed change in band b] = sum_s n_s / N_s * S_sb and E[episodes in b] =
sum_s n_s / N_s * E_sb, where S_sb and E_sb are the population's own exact blocks
(``select_episodes`` + ``exact_blocks`` over all its clients). The pooled estimate is a
ratio of those sums, so its target is the ratio of their expectations.

(Redrawing every clinic from the generator at each repetition and taking the truth from
one very large draw was tried first: that truth carries its own sampling error, about a
tenth of an interval's SE, and its seed alone moved one band's estimates by -0.37 SE; and
the generator redraws therapist effects each time, a between-therapist variance outside
the intervals' conditional target.)

Per repetition each sampled clinic runs ``select_episodes`` (at most one episode per
client) and ``exact_blocks``; every block is then noised by the real OpenDP mechanism,
compiled by ``compile_block`` at the site's share of rho and released through
``CompiledBlock.release`` (of a twin with more bands, so one call noises every repetition:
the same measurement, independent draws per value). The releases are pooled by
``coordinator.pooling.pool`` and estimated by ``estimate_all``.

rho = 0.05 per site is chosen so that the DP noise is most of the variance in the small
band and a smaller part in the large band: the small band checks the noise propagation,
the large one the sampling formula. (Layout version 2 made the noise about 20 times
smaller in variance: at rho 1 the small band's noise share fell from 75-80% to 22% and
the negative control no longer bit.) No estimate is suppressed at this rho. Near the
suppression threshold the published intervals could under-cover, because the
decision to publish is taken on the same noisy count: with the earlier budget split, which
gave the count 1/320 of rho, about half of the small band was suppressed at rho = 0.4 and
the rest covered only 90-91%. With the count's share now about 5% (protocols/layout.py),
measured with this design: at rho 0.4 nothing is suppressed and the six estimates cover
0.936-0.954; at rho 0.04, 57 of 2000 small-band estimates are suppressed and the rest
cover 0.957 (mean change) and 0.969 (reliable improvement rate).

Repetitions: OpenDP's noise cannot be seeded, so the test is stochastic (the sampled
clients are seeded). With R = 2000, a method with exact 95% coverage falls outside
[93%, 97%] with probability 4.5e-5 per check, under 2e-4 for the four (exact binomial,
checked by test_the_design_is_not_flaky); a method at 94.5% fails a check with probability
1.9e-3, one at 95.5% with 2.5e-4.

Negative control: the same intervals without the DP noise term (sampling error only) must
cover less than 93% of the time for at least one checked estimate (about 70% in the small
band), so the noise term matters and the test can fail.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml

from coordinator.estimates import Z95, Estimate, Tables, _group_x, estimate_all
from coordinator.pooling import Contribution, Pooled, PooledBlock, check_release, pool
from coordinator.synth import EPISODE_GAP_DAYS, draw_site_params, generate_site
from protocols import builtin_instruments
from protocols.layout import block_layout, budget_weights, trajectory_groups
from protocols.release import NoisyBlock, SiteRelease
from protocols.study import Study, parse_study

pytestmark = pytest.mark.slow


def _site_agent(module: str) -> Any:
    """``site_agent.<module>``, imported when a test runs, not when this file is collected
    (see test_noise.py: tests/unit/site_agent is a test package of the same name)."""
    return importlib.import_module(f"site_agent.{module}")


SEED = 20240611
INSTRUMENT = "PHQ-9"
SIZES = (800, 1200, 1600, 2000, 2400)  # clients per clinic in every repeated study
POPULATION = 100_000  # clients in each clinic's population
MAX_EPISODES = 1
RHO = "0.05"  # per site
BANDS = ((0, 9), (10, 24), (25, 27))
LARGE, SMALL = 1, 2  # the checked bands (indices into BANDS)
REPS = 2000
LOWER, UPPER = Fraction(93, 100), Fraction(97, 100)
MAX_SUPPRESSED = 0.05
ESTIMATES = {  # estimate -> its numerator block
    "mean_change": "sum_change",
    "reliable_improvement_rate": "reliably_improved",
}
CHECKS = [(name, band) for name in ESTIMATES for band in (SMALL, LARGE)]


def _study(study_id: str = "coverage",
           families: tuple[str, ...] | list[str] = ("counts", "change", "categories"),
           rho: str = RHO) -> Study:
    return parse_study(
        {
            "id": study_id,
            "title": "coverage of the benchmark intervals",
            "instrument": INSTRUMENT,
            "window": {"start": "2025-01-01", "end": "2026-12-31"},  # the generator's dates
            "bands": [list(b) for b in BANDS],
            "families": list(families),
            "max_session": 20,
            "privacy": {"rho": rho},
            "min_sites": 1,
        }
    )


STUDY = _study()
LAYOUT = block_layout(STUDY)


# -- the binomial risk of the check itself ---------------------------------------------


def _passes(covered: int, reps: int) -> bool:
    return LOWER <= Fraction(covered, reps) <= UPPER


def _fail_probability(coverage: float, reps: int) -> float:
    """P(a method whose true coverage is ``coverage`` fails one check), exact binomial."""
    total = 0.0
    for k in range(reps + 1):
        if not _passes(k, reps):
            log_pmf = (math.lgamma(reps + 1) - math.lgamma(k + 1) - math.lgamma(reps - k + 1)
                       + k * math.log(coverage) + (reps - k) * math.log1p(-coverage))
            total += math.exp(log_pmf)
    return total


# -- the clinics -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clinic:
    size: int  # clients per study
    episodes: Any  # site_agent.outcomes.Episodes of the whole population
    n_clients: int  # in the population
    client_rows: npt.NDArray[np.int64]  # episode rows ordered by client
    client_start: npt.NDArray[np.int64]  # client c's rows: client_rows[start[c]:start[c+1]]
    exact: dict[str, npt.NDArray[np.int64]]  # the population's own blocks


def _population(index: int, size: int, directory: Path) -> Clinic:
    """Clinic ``index``'s population, exported and read back as the site reads it."""
    ins = builtin_instruments()[INSTRUMENT]
    params = draw_site_params(np.random.default_rng([SEED, index]), ins)
    params = dataclasses.replace(params, n_clients=POPULATION)
    frame = generate_site(np.random.default_rng([SEED, index, 1]), params)
    directory.mkdir(parents=True)
    frame[["client", "session_no", "seen_on", "total"]].to_parquet(directory / "outcomes.parquet")
    site = {
        "site": {"id": f"clinic-{index}"},
        "data": {
            "path": "outcomes.parquet",
            "instrument": INSTRUMENT,
            "columns": {"client_id": "client", "session": "session_no", "date": "seen_on",
                        "score": "total"},
            "episode_gap_days": EPISODE_GAP_DAYS,
        },
    }
    (directory / "site.yaml").write_text(yaml.safe_dump(site), encoding="utf-8")
    cfg = _site_agent("config").load_site_config(directory / "site.yaml")
    intake = _site_agent("data").read_intake(cfg.data, cfg.instruments)
    assert intake.rows_quarantined == 0
    episodes = _site_agent("outcomes").derive_episodes(
        intake.records, cfg.instruments, STUDY.max_session)[INSTRUMENT]
    stats = _site_agent("privacy.statistics")
    n_clients = len(intake.records.client_ids)
    client = episodes.table["client"].to_numpy()
    rows = np.argsort(client, kind="stable")
    start = np.searchsorted(client[rows], np.arange(n_clients + 1))
    exact = stats.exact_blocks(stats.select_episodes(episodes, STUDY, MAX_EPISODES), STUDY)
    return Clinic(size=size, episodes=episodes, n_clients=n_clients, client_rows=rows,
                  client_start=start, exact=exact)


def _sample(clinic: Clinic, rng: np.random.Generator) -> Any:
    """The episodes of ``clinic.size`` clients drawn with replacement, relabelled 0..n-1."""
    picked = rng.integers(0, clinic.n_clients, clinic.size)
    first = clinic.client_start[picked]
    count = clinic.client_start[picked + 1] - first
    offset = np.repeat(first - (np.cumsum(count) - count), count)
    rows = clinic.client_rows[offset + np.arange(int(count.sum()))]
    ep = clinic.episodes
    table = ep.table.iloc[rows].reset_index(drop=True)
    table["client"] = np.repeat(np.arange(clinic.size), count).astype(table["client"].dtype)
    return dataclasses.replace(ep, table=table, trajectory=ep.trajectory[rows])


def _exact_vector(episodes: Any, study: Study = STUDY) -> npt.NDArray[np.int64]:
    stats = _site_agent("privacy.statistics")
    blocks = stats.exact_blocks(stats.select_episodes(episodes, study, MAX_EPISODES), study)
    return np.concatenate([blocks[spec.name] for spec in block_layout(study)])


# -- the repeated studies --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runs:
    truth: dict[str, npt.NDArray[np.float64]]  # estimate -> per band
    expected_episodes: npt.NDArray[np.float64]  # per band, pooled
    estimates: dict[str, list[list[Estimate]]]  # estimate -> [repetition][band]

    def kept(self, name: str, band: int) -> list[Estimate]:
        return [rep[band] for rep in self.estimates[name] if rep[band].value is not None]

    def suppressed(self, name: str, band: int) -> int:
        return REPS - len(self.kept(name, band))

    def covered(self, name: str, band: int, with_noise: bool = True) -> int:
        truth = float(self.truth[name][band])
        hits = 0
        for e in self.kept(name, band):
            ci = (e if with_noise else dataclasses.replace(e, se_noise=0.0)).ci
            assert ci is not None
            hits += ci[0] <= truth <= ci[1]
        return hits

    def coverage(self, name: str, band: int, with_noise: bool = True) -> float:
        return self.covered(name, band, with_noise) / len(self.kept(name, band))

    def noise_share(self, name: str, band: int) -> float:
        """Mean share of the DP noise in the interval's variance."""
        return float(np.mean([e.se_noise**2 / e.se**2 for e in self.kept(name, band)]))

    def summary(self) -> str:
        lines = [f"{REPS} pooled studies of {len(SIZES)} clinics ({sum(SIZES)} clients), "
                 f"rho {RHO} per site"]
        for name in ESTIMATES:
            for b, (lo, hi) in enumerate(BANDS):
                lines.append(
                    f"{name} {lo}-{hi} (~{self.expected_episodes[b]:.0f} episodes): "
                    f"coverage {self.coverage(name, b):.4f}, sampling-only "
                    f"{self.coverage(name, b, with_noise=False):.4f}, noise share "
                    f"{self.noise_share(name, b):.2f}, suppressed {self.suppressed(name, b)}, "
                    f"truth {self.truth[name][b]:.4f}")
        return "\n".join(lines)


def _truth(study: Study, expected: Callable[[str], npt.NDArray[np.float64]]) -> Tables:
    """The estimand: every figure computed from the expected pooled sums, without noise."""
    blocks = {}
    for spec in block_layout(study):
        values = np.broadcast_to(expected(spec.name), (spec.size,)).reshape(
            spec.n_bands, spec.width)
        blocks[spec.name] = PooledBlock(spec=spec, values=values,
                                        noise_var=np.zeros((spec.n_bands, spec.width)))
    return estimate_all(Pooled(study=study, contributions=(), blocks=blocks))


def _compiled(study: Study = STUDY) -> list[Any]:
    compile_block = _site_agent("privacy.accounting").compile_block
    rho = study.privacy.rho
    assert rho is not None
    layout = block_layout(study)
    return [compile_block(spec, rho * share, MAX_EPISODES)
            for spec, share in zip(layout, budget_weights(layout), strict=True)]


def _noisy(exact: npt.NDArray[np.int64], compiled: list[Any]) -> npt.NDArray[np.int64]:
    """``exact`` (repetitions, sites, values) noised block by block, one OpenDP call per
    block: a twin of the compiled block with a band per repetition, site and band."""
    out = np.empty_like(exact)
    reps, sites, _ = exact.shape
    at = 0
    for block in compiled:
        size = block.spec.size
        twin = dataclasses.replace(
            block, spec=dataclasses.replace(block.spec, n_bands=block.spec.n_bands * reps * sites))
        assert twin.measurement is block.measurement and twin.scale == block.scale
        values = exact[:, :, at: at + size]
        out[:, :, at: at + size] = twin.release(values.reshape(-1)).reshape(values.shape)
        at += size
    return out


def _contribution(site: int, values: npt.NDArray[np.int64], compiled: list[Any],
                  study: Study = STUDY) -> Contribution:
    blocks, at = [], 0
    for b in compiled:
        spec = b.spec
        blocks.append(NoisyBlock(
            name=spec.name, family=str(spec.family), n_bands=spec.n_bands, width=spec.width,
            values=tuple(int(v) for v in values[at: at + spec.size]), lo=spec.lo, hi=spec.hi,
            sensitivity=b.d_in, scale=b.scale, rho=b.rho))
        at += spec.size
    release = SiteRelease(
        study_id=study.id, study_hash=study.hash, site_id=f"clinic-{site}",
        created="2027-01-01T00:00:00", blocks=tuple(blocks),
        rho=sum((b.rho for b in compiled), Fraction(0)), epsilon=math.inf, delta=0.0,
        unit="client", max_episodes_per_client=MAX_EPISODES, mechanism="test", window_applied=True,
        versions={})
    return Contribution(site_id=release.site_id, release=release, sha256=f"{site:064x}")


@pytest.fixture(scope="module")
def clinics(tmp_path_factory: pytest.TempPathFactory) -> list[Clinic]:
    base = tmp_path_factory.mktemp("clinics")
    return [_population(i, size, base / f"clinic-{i}") for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def runs(clinics: list[Clinic]) -> Runs:

    # The truth: the ratio of the expected pooled sums.
    def expected(block: str) -> npt.NDArray[np.float64]:
        return sum((c.size / c.n_clients * c.exact[block].astype(np.float64) for c in clinics),
                   np.zeros(len(BANDS)))

    n = expected("episodes")
    truth_tables = _truth(STUDY, expected)
    truth = {name: np.array([b["estimates"][name].value for b in truth_tables.bands])
             for name in ESTIMATES}

    rng = np.random.default_rng([SEED, 99])
    width = sum(spec.size for spec in LAYOUT)
    exact = np.empty((REPS, len(clinics), width), dtype=np.int64)
    for r in range(REPS):
        for s, clinic in enumerate(clinics):
            exact[r, s] = _exact_vector(_sample(clinic, rng))
    compiled = _compiled()
    noisy = _noisy(exact, compiled)

    estimates: dict[str, list[list[Estimate]]] = {name: [] for name in ESTIMATES}
    for r in range(REPS):
        contributions = [_contribution(s, noisy[r, s], compiled) for s in range(len(clinics))]
        if r == 0:  # what was built is what a coordinator accepts
            for c in contributions:
                assert check_release(STUDY, c.release.canonical_bytes()) == c.release
        tables = estimate_all(pool(STUDY, contributions))
        for name in ESTIMATES:
            estimates[name].append([band["estimates"][name] for band in tables.bands])
    result = Runs(truth=truth, expected_episodes=n, estimates=estimates)
    print("\n" + result.summary())
    return result


# -- the checks ------------------------------------------------------------------------


def test_the_design_is_not_flaky() -> None:
    """A method with exact 95% coverage fails any of the checks with probability < 0.1%."""
    assert len(CHECKS) * _fail_probability(0.95, REPS) < 1e-3
    # and one a little off nominal still passes almost always
    assert _fail_probability(0.945, REPS) < 5e-3 and _fail_probability(0.955, REPS) < 5e-3


def test_the_bands_are_small_and_large(runs: Runs) -> None:
    assert 150 <= runs.expected_episodes[SMALL] <= 400
    assert runs.expected_episodes[LARGE] >= 3000


@pytest.mark.parametrize(("name", "band"), CHECKS,
                         ids=[f"{n}-{'small' if b == SMALL else 'large'}" for n, b in CHECKS])
def test_nominal_95_intervals_cover_the_truth(runs: Runs, name: str, band: int) -> None:
    kept = runs.kept(name, band)
    assert runs.suppressed(name, band) <= MAX_SUPPRESSED * REPS, runs.summary()
    assert _passes(runs.covered(name, band), len(kept)), runs.summary()


def test_the_noise_is_a_material_part_of_the_intervals(runs: Runs) -> None:
    shares = {check: runs.noise_share(*check) for check in CHECKS}
    assert max(shares.values()) > 0.5, runs.summary()  # the small band: mostly noise
    assert min(shares.values()) < 0.2, runs.summary()  # the large band: mostly sampling


def test_negative_control_sampling_only_intervals_undercover(runs: Runs) -> None:
    """Without the noise term the intervals are too narrow: the check can fail."""
    sampling_only = {check: runs.coverage(*check, with_noise=False) for check in CHECKS}
    assert min(sampling_only.values()) < float(LOWER), runs.summary()
    # the noise term is what brings them up to nominal
    assert all(runs.coverage(*c) > sampling_only[c] for c in CHECKS if runs.noise_share(*c) > 0.5)


# -- the trajectory fit: a + b ln(session) -----------------------------------------------
#
# The fitted coefficients are linear combinations L @ (session means) with weights from the
# estimated standard errors. The interval is for L @ (true session means) with the weights
# the estimator used, so each repetition's truth is L_r @ mu over the sessions it used,
# L_r recomputed here from the published standard errors. The same clients are measured at
# many sessions, so the sampling errors are correlated and not released: the published
# interval bounds them for any nonnegative correlation (coordinator.estimates._fit_log_curve).
# It must cover at least 93% of the time; treating the means as independent (the
# published method until 2026-11) must not, for at least one coefficient: the negative
# control that shows the check can fail. Measured with 4,000 repetitions: a 0.953 / 0.963
# and b 0.951 / 0.973 (small / large band); independent means a 0.952 / 0.950 and b
# 0.949 / 0.892. The bound matters where sampling error dominates (the large band: intervals
# 1.06x and 1.35x as wide); in the small band the independent DP noise dominates. A method
# at 95% falls below 93% in 2,000 repetitions with probability 3e-5.

FIT_REPS = 2000
# At rho 1 per site: the fit's check is of the correlated sampling error (the negative
# control treats the group means as independent); at 0.05 the small band's curves are
# not estimable at this budget and nothing would be checked.
FIT_STUDY = _study("coverage-fit", ["counts", "trajectory"], rho="1")


@dataclass(frozen=True, slots=True)
class FitRuns:
    # [band][repetition] -> (estimate, its 95% interval, independent-means interval, truth)
    a: list[list[tuple[float, tuple[float, float], tuple[float, float], float]]]
    b: list[list[tuple[float, tuple[float, float], tuple[float, float], float]]]

    def coverage(self, coef: str, band: int, published: bool = True) -> float:
        rows = getattr(self, coef)[band]
        return float(np.mean([(ci if published else ind)[0] <= t <= (ci if published else ind)[1]
                              for _, ci, ind, t in rows]))

    def width_ratio(self, coef: str, band: int) -> float:
        rows = getattr(self, coef)[band]
        return float(np.median([(ci[1] - ci[0]) / (ind[1] - ind[0]) for _, ci, ind, _ in rows]))

    def summary(self) -> str:
        return "\n".join(
            f"fit {coef} {BANDS[b][0]}-{BANDS[b][1]}: {len(getattr(self, coef)[b])} fits, "
            f"coverage {self.coverage(coef, b):.4f}, independent-means "
            f"{self.coverage(coef, b, published=False):.4f}, median width ratio "
            f"{self.width_ratio(coef, b):.2f}"
            for coef in ("a", "b") for b in (SMALL, LARGE))


@pytest.fixture(scope="module")
def fit_runs(clinics: list[Clinic]) -> FitRuns:
    study = FIT_STUDY
    stats = _site_agent("privacy.statistics")

    pops = [stats.exact_blocks(stats.select_episodes(c.episodes, study, MAX_EPISODES), study)
            for c in clinics]

    def expected(block: str) -> npt.NDArray[np.float64]:
        return sum((c.size / c.n_clients * pop[block].astype(np.float64)
                    for c, pop in zip(clinics, pops, strict=True)), np.zeros(1))

    # True group means [band, group]: the estimator on the expected sums, without noise.
    rows = _truth(study, expected).trajectory
    mu = np.array([[r["mean_change"]["value"] for r in rows if r["band"] == f"{lo}-{hi}"]
                   for lo, hi in BANDS], dtype=float)
    x_of = [_group_x(a, b) for a, b in trajectory_groups(study.max_session)]
    rng = np.random.default_rng([SEED, 98])
    width = sum(spec.size for spec in block_layout(study))
    exact = np.empty((FIT_REPS, len(clinics), width), dtype=np.int64)
    for r in range(FIT_REPS):
        for s, clinic in enumerate(clinics):
            exact[r, s] = _exact_vector(_sample(clinic, rng), study)
    compiled = _compiled(study)
    noisy = _noisy(exact, compiled)
    out: dict[str, list[list[Any]]] = {"a": [[] for _ in BANDS], "b": [[] for _ in BANDS]}
    for r in range(FIT_REPS):
        contributions = [_contribution(s, noisy[r, s], compiled, study)
                         for s in range(len(clinics))]
        tables = estimate_all(pool(study, contributions))
        for b, fit in enumerate(tables.trajectory_fit):
            if fit["a"]["value"] is None:
                continue
            means = [row["mean_change"] for row in tables.trajectory
                     if row["band"] == fit["band"]]
            used = [k for k, m in enumerate(means) if m["value"] is not None and m["se"] > 0]
            x = np.array([x_of[k] for k in used])
            design = np.column_stack([np.ones_like(x), x])
            w = 1 / np.array([means[k]["se"] for k in used]) ** 2
            lin = np.linalg.solve(design.T @ (design * w[:, None]), design.T * w)
            cov = np.linalg.inv(design.T @ (design * w[:, None]))
            truth = lin @ mu[b, used]
            for j, coef in enumerate(("a", "b")):
                e = fit[coef]
                half = Z95 * math.sqrt(cov[j, j])
                out[coef][b].append((e["value"], tuple(e["ci95"]),
                                     (e["value"] - half, e["value"] + half), float(truth[j])))
    result = FitRuns(a=out["a"], b=out["b"])
    print("\n" + result.summary())
    return result


@pytest.mark.parametrize("coef", ["a", "b"])
@pytest.mark.parametrize("band", [SMALL, LARGE], ids=["small", "large"])
def test_trajectory_fit_intervals_cover_at_least_nominal(fit_runs: FitRuns, coef: str,
                                                         band: int) -> None:
    assert len(getattr(fit_runs, coef)[band]) >= 0.95 * FIT_REPS, fit_runs.summary()
    assert fit_runs.coverage(coef, band) >= float(LOWER), fit_runs.summary()


def test_negative_control_independent_means_undercover(fit_runs: FitRuns) -> None:
    independent = [fit_runs.coverage(c, b, published=False) for c in ("a", "b")
                   for b in (SMALL, LARGE)]
    assert min(independent) < float(LOWER), fit_runs.summary()

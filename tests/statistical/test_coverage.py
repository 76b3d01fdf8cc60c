"""Coverage of the benchmarks' 95% intervals, measured rather than assumed, for every kind
of published figure.

Pooled studies are repeated many times over the same five synthetic clinics, and each
interval (DP noise and sampling error together, coordinator.estimates) is checked against
the clinics' true population value: mean intake, mean change, SD of change, effect size and
every rate released in a band; the change quantiles; the trajectory's review-group means
and its fitted curve a + b ln(session); the regression of change on intake and the
reference SD of intake. Figures that the bands fix by definition must equal the truth.

Design
------
The intervals are conditional on the participating services, so the target is the pooled
population of *these* clinics. Each clinic is a finite population of 100,000 clients drawn
once from coordinator.synth (parameters from ``draw_site_params``, fixed seed, PHQ-9). It is
exported as Parquet and read by the site's own pipeline: ``load_site_config`` ->
``read_intake`` -> ``derive_episodes``. Every repeated study samples each clinic's clients
at the clinic's real size, with replacement, so clients are independent draws from it, as
the intervals assume; therapist effects are then fixed properties of the clinic, like
everything else about it. Per repetition each sampled clinic runs ``select_episodes`` (at
most one episode per client) and ``exact_blocks``.

The truth is known by construction: with n_s clients sampled from a population of N_s, the
expected pooled value of every released sum is sum_s n_s / N_s * (the population's own
exact sum), and every figure is a smooth function of those sums, so its target is
``estimate_all`` on the expected sums without noise (``_truth``; the fit's target moves
with the weights each repetition used, see below).

(Redrawing every clinic from the generator at each repetition and taking the truth from
one very large draw was tried first: that truth carries its own sampling error, about a
tenth of an interval's SE, and its seed alone moved one band's estimates by -0.37 SE; and
the generator redraws therapist effects each time, a between-therapist variance outside
the intervals' conditional target.)

Bands 0-7 ("mild", about 2,350 episodes, changes near zero with heavy tails), 8-24
("large", about 5,140; it straddles the cut-off, so caseness at intake is released and the
recovery rates divide by a noisy count of cases) and 25-27 ("small", about 300). Three arms
share the same sampled sums, the costly part (OpenDP noises one chunk of repetitions in a
thread while the next is sampled: its calls release the GIL):

- ``rho 1``: the study with every family, each block noised by the real OpenDP mechanism
  compiled by ``compile_block`` at the site's share of rho = 1 and released through
  ``CompiledBlock.release`` (of a twin with more bands, so one call noises many
  repetitions: the same measurement, independent draws per value), pooled by
  ``coordinator.pooling.pool`` and estimated by ``estimate_all``. The small band is
  noise-dominated for every family: it checks the noise propagation (the delta method,
  the CDF inversion, the fit's noise term).
- ``rho 0.01``: the study of counts, change and categories (a smaller layout, so each
  block gets more of the budget) at rho = 0.01, released the same way: the large band and
  the figures that pool every band (the regression, the reference SD) are noise-dominated.
  (The small band is mostly not estimable at this budget.)
- ``no noise``: the study with every family on its exact sums, the limit of a huge budget:
  the sampling formula of every figure alone, in the mild and the large band and for the
  pooled figures.

A figure is checked where one term dominates, not in between: the two errors are
independent and their variances add, so if each term is right so is their sum, and a check
where a figure's coverage sits near a bound would pass or fail by chance. Only figures
published (not suppressed, not "not estimable") in >= 95% of the repetitions are checked:
the small band's 90th percentile, its fitted intercept and its review groups after
session 6 are suppressed too often at rho 1. Every figure's coverage is printed.

What the checks require
-----------------------
Intervals that are exact to first order: 93-97%. At least 93% for:

- change quantiles: the interval [F^-1(q - h), F^-1(q + h)] of the noisy CDF F of a
  discrete change covers the true quantile t = F^-1(q) when F(t) >= q - h and F(t - 1) <
  q + h; as F(t) >= q > F(t - 1), each fails with probability at most about 2.5% (to first
  order), and less when q falls inside a jump of F, as it does for most quantiles of an
  integer change: coverage lies between 95% and 100%;
- the trajectory fit: its sampling term bounds the unreleased correlation of the group
  means (coordinator.estimates._fit_log_curve). The interval is for L @ (true group means)
  with the weights the estimator used, so each repetition's truth is L_r @ mu over the
  groups it used, L_r recomputed here from the published standard errors;
- a noisy figure that covers 96.3-97.0%, too near the upper bound for the repetitions to
  decide, for a known, conservative reason (``CONSERVATIVE``, the findings below): a
  two-sided check would fail by chance, and so would a strict xfail.

Caseness at intake outside 8-24, reliable deterioration from 25-27 and the recovery rates
below the cut-off are fixed by the bands: published as the truth (or as not defined) in
every repetition, with zero standard errors and the note saying so.

Repetitions and the risk of a false failure
-------------------------------------------
OpenDP's noise cannot be seeded, so the noisy arms are stochastic; the sampled clients are
seeded, so the no-noise arm is a fixed function of the seed (its checks come out the same
in every run; their binomial risk is over the choice of seed). With R = 3000 and the 73
checks (60 two-sided, 13 one-sided), a method with exact 95% coverage fails any of them
with probability 6e-5 (exact binomial, checked by test_the_design_is_not_flaky); one at
94.5% fails a given check with probability 2.2e-4 (1.3% for 60 such), one at 94% with
1.1e-2. The noisy checks nearest a bound are the small band's rates (93.7-95.2%, below):
summing each noisy check's failure probability at its measured coverage gives 0.2-0.3%
per run (0.3% at the mean of five runs before 2026-12, 0.2% in a run of 2026-12-04), most
of it from the small band's rates.

Negative controls: the same intervals without the DP noise term (sampling error only; for
the quantiles the estimator run on the pooled sums with their noise variance set to zero)
must cover less than 93% for every noise-dominated figure of each family (noise more than
half the interval's variance; at least one such figure per family), and more with the
noise term, so the noise term matters and the checks can fail; and the fit's interval
treating the group means as independent (the published method until 2026-11) must
under-cover where sampling dominates.

Findings (measured; CONSERVATIVE carries the numbers)
-----------------------------------------------------
"Spread" is the SD of (estimate - truth) over the repetitions in units of the stated SE.
Coverage without noise is of the fixed seed; "was" is the textbook formula's on the same
sums, before coordinator.moments.

1. The textbook SE of an SD, value / sqrt(2 (n - 1)), holds for a kurtosis of 3. Change
   from 0-7 has 4.8, intake over all bands 2.0, the regression's residuals 3.8: without
   noise the SD of change in 0-7 covered 84.8% (spread 1.39x), the reference SD of intake
   99.6% (0.69x), the residual SD 90.9% (1.16x). With the kurtosis of each band's change
   histogram, of the bands' maximum-entropy intake shapes and of the residuals from the
   bands' moments (coordinator.moments): 94.4% (0-7) and 95.3% (8-24), 95.2%, 95.2%; at
   rho 0.01 the reference SD 95.3% (was 96.3-96.7%). A study without the histogram family
   keeps the normal-theory SE for the SD of change (84.8% in 0-7 on these sums) and its
   residual SD covers 92.9%: the fourth moments of change are then not released.
2. The regression intercept's homoscedastic SE was too wide (98.1%, spread 0.82x): the
   residual SD grows with intake (3.5 at 0-4 to 6.0 at 20-27) and the intercept
   extrapolates to intake 0. The sandwich from the bands' moments: 96.0% (0.96x) without
   noise, 95.1% at rho 0.01; the slope 94.5% and 94.8%.
3. The effect size added the reference SD's error to the band's mean change's as if they
   were independent, though both rest on the band's intake (the large band holds two
   thirds of the episodes): 97.4% without noise, 96.8-97.5% at rho 0.01. With the delta
   method on the ratio as one function of every band's sums (noise) and their covariance
   in the sampling term: 94.9% and 95.3%; 94.9-95.2% in the mild and small bands.
4. The trajectory fit's correlation bound makes its intervals 1.7-2.1x as wide as
   independent means where sampling dominates: 99.7-100% without noise, 96.6-97.0% for
   the small band's slope at rho 1. Independent means cover 85.4% (slope, large band).
5. Quantiles cover 97.8-99.6% (small band, rho 1) and 99.6-100% (no noise): discreteness,
   as expected.
6. The small band's rates cover 93.7-95.2% at rho 1: their Wald sampling term under-covers
   at about 300 episodes (94.0-94.3% without noise, not checked).
7. The small band's SD of change covers 96.3-97.0% at rho 1, where its noise is 87% of the
   variance (CONSERVATIVE).
8. Every other checked figure covers 94.0-96.1%.

Run time: 4.3-5.5 minutes on 2 cores shared with other work (the whole fixture; the
checks take no time).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml

from coordinator.estimates import Z95, Estimate, Tables, _group_x, _quantiles, estimate_all
from coordinator.pooling import Contribution, Pooled, PooledBlock, check_release, pool
from coordinator.synth import EPISODE_GAP_DAYS, draw_site_params, generate_site
from protocols import builtin_instruments
from protocols.layout import BlockSpec, block_layout, budget_weights, trajectory_groups
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
BANDS = ((0, 7), (8, 24), (25, 27))
MILD, LARGE, SMALL = 0, 1, 2  # indices into BANDS
REPS = 3000
CHUNK = 250  # repetitions noised per OpenDP call (in a thread, while the next are sampled)
LOWER, UPPER = Fraction(93, 100), Fraction(97, 100)
MAX_SUPPRESSED = 0.05
NOISE_DOMINATES = 0.5  # share of the interval's variance


def _study(study_id: str, families: tuple[str, ...], rho: str) -> Study:
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


@dataclass(frozen=True, slots=True)
class Arm:
    name: str
    study: Study
    noised: bool  # False: the study's exact sums, no noise


STUDY = _study("coverage", ("counts", "change", "categories", "trajectory", "histogram"), "1")
LOW_STUDY = _study("coverage-low", ("counts", "change", "categories"), "0.01")
ARMS = (Arm("rho 1", STUDY, True), Arm("rho 0.01", LOW_STUDY, True),
        Arm("no noise", STUDY, False))
LAYOUT = block_layout(STUDY)


# -- the published figures -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    kind: str  # band | quantile | trajectory | fit | regression | reference_sd
    band: int  # -1: pools every band
    name: str  # the estimate, quantile, review group, coefficient or term

    def __str__(self) -> str:
        where = "" if self.band < 0 else "-" + ("mild", "large", "small")[self.band]
        what = {"band": self.name, "quantile": f"q{self.name}",
                "trajectory": f"session{self.name}", "fit": f"fit_{self.name}",
                "regression": f"regression_{self.name}", "reference_sd": "reference_sd"}
        return what[self.kind] + where


# value, interval, SEs and the note (or the reason it is not published)
Row = tuple[float, float, float, float, float, str | None]
_NAN = math.nan


def _row(e: Estimate) -> Row:
    ci = e.ci
    if e.value is None or ci is None:
        return (_NAN, _NAN, _NAN, _NAN, _NAN, e.suppressed)
    return (e.value, ci[0], ci[1], e.se_sampling, e.se_noise, e.note)


def _json_row(d: Mapping[str, Any]) -> Row:
    if d["value"] is None or d["ci95"] is None:
        return (_NAN, _NAN, _NAN, _NAN, _NAN, d["suppressed"])
    return (d["value"], d["ci95"][0], d["ci95"][1], d["se_sampling"], d["se_noise"], d["note"])


def _rows(t: Tables) -> dict[Figure, Row]:
    """Every published figure of ``t``."""
    band_of = {b["band"]: i for i, b in enumerate(t.bands)}
    out = {Figure("band", i, name): _row(e)
           for i, b in enumerate(t.bands) for name, e in b["estimates"].items()
           if name != "episodes"}  # the count's interval is its noise only, by design
    out |= {Figure("quantile", band_of[r["band"]], str(r["quantile"])): _json_row(r)
            for r in t.quantiles}
    out |= {Figure("trajectory", band_of[r["band"]], r["sessions"]): _json_row(r["mean_change"])
            for r in t.trajectory}
    out |= {Figure("fit", band_of[r["band"]], c): _json_row(r[c])
            for r in t.trajectory_fit for c in ("a", "b")}
    out |= {Figure("regression", -1, k): _json_row(t.regression[k])
            for k in ("intercept", "slope", "residual_sd") if k in t.regression}
    out[Figure("reference_sd", -1, "value")] = _row(t.reference_sd)
    return out


def _exact_pooled(study: Study, sums: Callable[[str], npt.NDArray[Any]],
                  layout: tuple[BlockSpec, ...] | None = None) -> Pooled:
    """The pooled blocks of ``study`` holding ``sums(block)`` exactly, without noise."""
    blocks = {}
    for spec in layout or block_layout(study):
        values = np.broadcast_to(sums(spec.name), (spec.size,)).reshape(spec.n_bands, spec.width)
        blocks[spec.name] = PooledBlock(spec=spec, values=values.astype(np.float64),
                                        noise_var=np.zeros((spec.n_bands, spec.width)))
    return Pooled(study=study, contributions=(), blocks=blocks)


def _truth(study: Study, expected: Callable[[str], npt.NDArray[np.float64]]) -> Tables:
    """The estimand: every figure computed from the expected pooled sums, without noise."""
    return estimate_all(_exact_pooled(study, expected))


def _sampling_only_quantiles(p: Pooled) -> dict[Figure, Row]:
    """The quantiles' intervals without the noise term: the estimator on the same sums
    with the histogram's noise variance set to zero."""
    h = p.blocks["change_hist"]
    zero = dataclasses.replace(h, noise_var=np.zeros_like(h.noise_var))
    rows = _quantiles(dataclasses.replace(p, blocks={**p.blocks, "change_hist": zero}))
    band_of = {f"{lo}-{hi}": i for i, (lo, hi) in enumerate(p.study.bands)}
    return {Figure("quantile", band_of[r["band"]], str(r["quantile"])): _json_row(r)
            for r in rows}


# -- the checks ------------------------------------------------------------------------

SMALL_BAND = ("mean_intake", "mean_change", "sd_change", "effect_size",
              "reliable_improvement_rate", "response_rate", "remission_rate", "recovery_rate",
              "reliable_recovery_rate")
LARGE_BAND = (*SMALL_BAND[:5], "reliable_deterioration_rate", "case_at_intake_rate",
              *SMALL_BAND[5:])
MILD_BAND = (*SMALL_BAND[:5], "reliable_deterioration_rate", *SMALL_BAND[5:7])
QUANTILES = ("0.1", "0.25", "0.5", "0.75", "0.9")
GROUPS = tuple(str(a) if a == b else f"{a}-{b}" for a, b in trajectory_groups(20))
POOLED = (*(Figure("regression", -1, k) for k in ("intercept", "slope", "residual_sd")),
          Figure("reference_sd", -1, "value"))
AT_LEAST = frozenset({"quantile", "fit"})  # conservative by construction: >= 93% only

CHECKED: dict[str, tuple[Figure, ...]] = {
    "rho 1": (
        *(Figure("band", SMALL, n) for n in SMALL_BAND),
        *(Figure("quantile", SMALL, q) for q in QUANTILES[:4]),
        *(Figure("trajectory", SMALL, g) for g in GROUPS[:5]),
        Figure("fit", SMALL, "b"),
    ),
    "rho 0.01": (*(Figure("band", LARGE, n) for n in LARGE_BAND), *POOLED),
    "no noise": (
        *(Figure("band", LARGE, n) for n in LARGE_BAND),
        *(Figure("band", MILD, n) for n in MILD_BAND),
        *(Figure("quantile", LARGE, q) for q in QUANTILES),
        *(Figure("trajectory", LARGE, g) for g in GROUPS),
        Figure("fit", LARGE, "a"), Figure("fit", LARGE, "b"),
        *POOLED,
    ),
}

CONSERVATIVE: dict[tuple[str, Figure], str] = {
    # Near or above 97%, too near for 3,000 noisy repetitions to decide (a strict xfail
    # would pass by chance too): checked for at least 93%; the findings are in the module
    # docstring.
    ("rho 1", Figure("band", SMALL, "sd_change")): (
        "96.3-97.0%: the delta method through the square root of a variance whose noise is "
        "large next to it (the noise is 87% of the interval's variance; spread 0.96x the SE)"),
}

XFAIL: dict[tuple[str, Figure], str] = {
    # A figure found outside 93-97% where the sampling formula alone is checked goes here
    # with its measured coverage and why (without noise the arm is a fixed function of the
    # seed, so it fails in every run: strict). None at present.
}

FAMILIES: dict[str, Callable[[Figure], bool]] = {  # the negative controls' groups
    "band means and SD": lambda f: f.kind == "band" and not f.name.endswith("_rate"),
    "rates": lambda f: f.kind == "band" and f.name.endswith("_rate"),
    "quantiles": lambda f: f.kind == "quantile",
    "trajectory means": lambda f: f.kind == "trajectory",
    "trajectory fit": lambda f: f.kind == "fit",
    "regression": lambda f: f.kind == "regression",
    "reference SD": lambda f: f.kind == "reference_sd",
}
NOISY_ARMS = tuple(a.name for a in ARMS if a.noised)


def _at_least(arm: str, f: Figure) -> bool:
    return f.kind in AT_LEAST or (arm, f) in CONSERVATIVE


def _checks() -> Iterator[Any]:
    for arm, figures in CHECKED.items():
        for f in figures:
            reason = XFAIL.get((arm, f))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(arm, f, id=f"{arm.replace(' ', '')}-{f}", marks=marks)


# -- the binomial risk of the check itself ---------------------------------------------


def _passes(covered: int, reps: int, at_least: bool = False) -> bool:
    share = Fraction(covered, reps)
    return share >= LOWER and (at_least or share <= UPPER)


def _fail_probability(coverage: float, reps: int, at_least: bool = False) -> float:
    """P(a method whose true coverage is ``coverage`` fails one check), exact binomial."""
    total = 0.0
    for k in range(reps + 1):
        if not _passes(k, reps, at_least):
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


def _exact_vector(episodes: Any, study: Study = STUDY,
                  layout: tuple[BlockSpec, ...] = LAYOUT) -> npt.NDArray[np.int64]:
    stats = _site_agent("privacy.statistics")
    blocks = stats.exact_blocks(stats.select_episodes(episodes, study, MAX_EPISODES), study)
    return np.concatenate([blocks[spec.name] for spec in layout])


# -- the noise -------------------------------------------------------------------------


def _compiled(study: Study) -> list[Any]:
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
                  study: Study) -> Contribution:
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


def _slices() -> dict[str, slice]:
    """Each block's values in STUDY's value vector."""
    out, at = {}, 0
    for spec in LAYOUT:
        out[spec.name] = slice(at, at + spec.size)
        at += spec.size
    return out


def _blocks_of(values: npt.NDArray[np.int64]) -> Callable[[str], npt.NDArray[np.int64]]:
    """STUDY's value vector as its blocks."""
    slices = _slices()
    return lambda block: values[slices[block]]


def _columns(study: Study) -> npt.NDArray[np.intp]:
    """Where ``study``'s blocks lie in STUDY's value vector (the same blocks, encoded
    alike: a block's encoding depends on the bands and the instrument, not the families)."""
    slices = _slices()
    return np.concatenate([np.arange(slices[spec.name].start, slices[spec.name].stop)
                           for spec in block_layout(study)])


# -- the repeated studies --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Draws:
    """One arm's figures over the repetitions, arrays [figure, repetition] (NaN where a
    figure is not published)."""

    arm: str
    index: Mapping[Figure, int]
    truth_rows: Mapping[Figure, Row]
    truth: npt.NDArray[np.float64]  # per repetition: the fit's target moves with its weights
    value: npt.NDArray[np.float64]
    lo: npt.NDArray[np.float64]
    hi: npt.NDArray[np.float64]
    se_sampling: npt.NDArray[np.float64]
    se_noise: npt.NDArray[np.float64]
    sampling_lo: npt.NDArray[np.float64]  # the interval without the noise term
    sampling_hi: npt.NDArray[np.float64]
    independent_lo: npt.NDArray[np.float64]  # the fit's, treating the group means as independent
    independent_hi: npt.NDArray[np.float64]
    note_as_truth: npt.NDArray[np.bool_]

    @staticmethod
    def empty(arm: str, truth: Tables, reps: int) -> Draws:
        rows = _rows(truth)
        index = {f: i for i, f in enumerate(rows)}

        def nan() -> npt.NDArray[np.float64]:
            return np.full((len(index), reps), _NAN)

        t = np.repeat(np.array([r[0] for r in rows.values()])[:, None], reps, axis=1)
        return Draws(arm, index, rows, t, nan(), nan(), nan(), nan(), nan(), nan(), nan(), nan(),
                     nan(), np.zeros((len(index), reps), dtype=bool))

    def record(self, r: int, tables: Tables, sampling_only: Mapping[Figure, Row],
               mu: npt.NDArray[np.float64] | None) -> None:
        for f, row in _rows(tables).items():
            i = self.index[f]
            v, lo, hi, se_s, se_n, note = row
            self.value[i, r], self.lo[i, r], self.hi[i, r] = v, lo, hi
            self.se_sampling[i, r], self.se_noise[i, r] = se_s, se_n
            self.note_as_truth[i, r] = note == self.truth_rows[f][5]
            ctl = sampling_only.get(f)
            if ctl is not None:
                self.sampling_lo[i, r], self.sampling_hi[i, r] = ctl[1], ctl[2]
            else:
                self.sampling_lo[i, r], self.sampling_hi[i, r] = v - Z95 * se_s, v + Z95 * se_s
        if mu is not None:
            self._record_fit(r, tables, mu)

    def _record_fit(self, r: int, tables: Tables, mu: npt.NDArray[np.float64]) -> None:
        """The fit's target and its independent-means interval in repetition ``r``."""
        x_of = [_group_x(a, b) for a, b in trajectory_groups(STUDY.max_session)]
        for b, fit in enumerate(tables.trajectory_fit):
            if fit["a"]["value"] is None and fit["b"]["value"] is None:
                continue  # no curve (a coefficient alone may be "not estimable")
            means = [row["mean_change"] for row in tables.trajectory
                     if row["band"] == fit["band"]]
            used = [k for k, m in enumerate(means) if m["value"] is not None and m["se"] > 0]
            x = np.array([x_of[k] for k in used])
            design = np.column_stack([np.ones_like(x), x])
            w = 1 / np.array([means[k]["se"] for k in used]) ** 2
            lin = np.linalg.solve(design.T @ (design * w[:, None]), design.T * w)
            cov = np.linalg.inv(design.T @ (design * w[:, None]))
            target = lin @ mu[b, used]
            for j, coef in enumerate(("a", "b")):
                i = self.index[Figure("fit", b, coef)]
                self.truth[i, r] = target[j]
                if not math.isnan(self.value[i, r]):
                    half = Z95 * math.sqrt(cov[j, j])
                    self.independent_lo[i, r] = self.value[i, r] - half
                    self.independent_hi[i, r] = self.value[i, r] + half

    # -- what was measured

    def published(self, f: Figure) -> npt.NDArray[np.bool_]:
        published: npt.NDArray[np.bool_] = ~np.isnan(self.value[self.index[f]])
        return published

    def suppressed(self, f: Figure) -> int:
        return int((~self.published(f)).sum())

    def covered(self, f: Figure, interval: str = "published") -> int:
        i, kept = self.index[f], self.published(f)
        lo, hi = {"published": (self.lo, self.hi),
                  "sampling only": (self.sampling_lo, self.sampling_hi),
                  "independent means": (self.independent_lo, self.independent_hi)}[interval]
        t = self.truth[i, kept]
        return int(((lo[i, kept] <= t) & (t <= hi[i, kept])).sum())

    def coverage(self, f: Figure, interval: str = "published") -> float:
        return self.covered(f, interval) / max(int(self.published(f).sum()), 1)

    def noise_share(self, f: Figure) -> float:
        """Mean share of the DP noise in the interval's variance (NaN for the quantiles,
        whose interval is not a multiple of a standard error)."""
        if f.kind == "quantile":
            return _NAN
        i, kept = self.index[f], self.published(f)
        s, n = self.se_sampling[i, kept], self.se_noise[i, kept]
        total = s * s + n * n
        return float(np.mean(np.where(total > 0, n * n / np.where(total > 0, total, 1), 0.0)))

    def line(self, f: Figure) -> str:
        return (f"{self.arm:9s} {f!s:36s} published {int(self.published(f).sum()):5d} "
                f"coverage {self.coverage(f):.4f} sampling-only "
                f"{self.coverage(f, 'sampling only'):.4f} noise share {self.noise_share(f):.2f}")


@dataclass(frozen=True, slots=True)
class Runs:
    arms: dict[str, Draws]
    expected_episodes: npt.NDArray[np.float64]  # per band, pooled

    def summary(self, only_checked: bool = False) -> str:
        lines = [f"{REPS} pooled studies of {len(SIZES)} clinics ({sum(SIZES)} clients); "
                 f"expected episodes per band {np.round(self.expected_episodes).tolist()}"]
        for arm, d in self.arms.items():
            for f in (CHECKED[arm] if only_checked else d.index):
                if not only_checked and d.published(f).mean() < 1 - MAX_SUPPRESSED:
                    continue
                lines.append(d.line(f) + (" (checked)" if f in CHECKED[arm] else ""))
        return "\n".join(lines)


@pytest.fixture(scope="module")
def clinics(tmp_path_factory: pytest.TempPathFactory) -> list[Clinic]:
    base = tmp_path_factory.mktemp("clinics")
    return [_population(i, size, base / f"clinic-{i}") for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def runs(clinics: list[Clinic]) -> Runs:

    # The truth: the estimator on the expected pooled sums.
    def expected(block: str) -> npt.NDArray[np.float64]:
        total: npt.NDArray[np.float64] = np.sum(
            [c.size / c.n_clients * c.exact[block] for c in clinics], axis=0)
        return total

    truths = {arm.name: _truth(arm.study, expected) for arm in ARMS}
    # The estimand does not depend on the budget split.
    shared = _rows(truths["rho 1"])
    for f, row in _rows(truths["rho 0.01"]).items():
        assert row[0] == shared[f][0] or (math.isnan(row[0]) and math.isnan(shared[f][0])), f
    # The true group means [band, group], also of the groups whose expected clients are
    # too few to publish (a noisy repetition may use them): the sums scaled up, which
    # leaves every ratio as it is.
    rows = _truth(STUDY, lambda block: 1000 * expected(block)).trajectory
    mu = np.array([[r["mean_change"]["value"] for r in rows if r["band"] == f"{lo}-{hi}"]
                   for lo, hi in BANDS], dtype=float)
    assert np.isfinite(mu).all()
    draws = {arm.name: Draws.empty(arm.name, truths[arm.name], REPS) for arm in ARMS}
    compiled = {arm.name: _compiled(arm.study) for arm in ARMS if arm.noised}
    columns = {arm.name: _columns(arm.study) for arm in ARMS if arm.noised}
    study_of = {arm.name: arm.study for arm in ARMS}

    def estimate(name: str, r: int, p: Pooled) -> None:
        tables = estimate_all(p)
        noised = name in compiled and "change_hist" in p.blocks
        controls = _sampling_only_quantiles(p) if noised else {}
        draws[name].record(r, tables, controls, mu if "traj_n" in p.blocks else None)

    def estimate_noisy(start: int, noisy: Mapping[str, Future[npt.NDArray[np.int64]]]) -> None:
        for name, future in noisy.items():
            values = future.result()
            study = study_of[name]
            for k in range(values.shape[0]):
                contributions = [_contribution(s, values[k, s], compiled[name], study)
                                 for s in range(len(clinics))]
                if start + k == 0:  # what was built is what a coordinator accepts
                    for c in contributions:
                        assert check_release(study, c.release.canonical_bytes()) == c.release
                estimate(name, start + k, pool(study, contributions))

    rng = np.random.default_rng([SEED, 99])
    width = sum(spec.size for spec in LAYOUT)
    exact = np.empty((REPS, len(clinics), width), dtype=np.int64)
    # The OpenDP calls release the GIL: a chunk is noised while the next one is sampled.
    with ThreadPoolExecutor(max_workers=1) as noiser:
        pending: list[tuple[int, dict[str, Future[npt.NDArray[np.int64]]]]] = []
        for start in range(0, REPS, CHUNK):
            stop = min(start + CHUNK, REPS)
            for r in range(start, stop):
                for s, clinic in enumerate(clinics):
                    sample = _sample(clinic, rng)
                    exact[r, s] = _exact_vector(sample)
                    if r == 0:  # the smaller study's blocks are the same values
                        assert (_exact_vector(sample, LOW_STUDY, block_layout(LOW_STUDY))
                                == exact[r, s, columns["rho 0.01"]]).all()
            chunk = exact[start:stop]
            pending.append((start, {name: noiser.submit(_noisy, chunk[:, :, columns[name]],
                                                        compiled[name]) for name in compiled}))
            for r in range(start, stop):
                estimate("no noise", r, _exact_pooled(STUDY, _blocks_of(exact[r].sum(axis=0)),
                                                      LAYOUT))
            if len(pending) > 1:
                estimate_noisy(*pending.pop(0))
        while pending:
            estimate_noisy(*pending.pop(0))
    result = Runs(arms=draws, expected_episodes=expected("episodes"))
    print("\n" + result.summary())
    return result


# -- the checks ------------------------------------------------------------------------


def _n_checks(at_least: bool) -> int:
    """The checks expected to pass, two-sided or (``at_least``) one-sided."""
    return sum(_at_least(arm, f) == at_least and (arm, f) not in XFAIL
               for arm, figures in CHECKED.items() for f in figures)


def test_the_design_is_not_flaky() -> None:
    """Methods with exact 95% coverage fail any of the checks with probability < 1e-4, and
    one half a point off nominal fails its check with probability < 5e-4."""
    risk = (_n_checks(False) * _fail_probability(0.95, REPS)
            + _n_checks(True) * _fail_probability(0.95, REPS, at_least=True))
    assert risk < 1e-4
    assert _fail_probability(0.945, REPS) < 5e-4 and _fail_probability(0.955, REPS) < 5e-4


def test_the_bands_are_small_and_large(runs: Runs) -> None:
    assert 150 <= runs.expected_episodes[SMALL] <= 400
    assert runs.expected_episodes[LARGE] >= 3000
    assert runs.expected_episodes[MILD] >= 1500


@pytest.mark.parametrize(("arm", "figure"), list(_checks()))
def test_nominal_95_intervals_cover_the_truth(runs: Runs, arm: str, figure: Figure) -> None:
    d = runs.arms[arm]
    kept = int(d.published(figure).sum())
    assert d.suppressed(figure) <= MAX_SUPPRESSED * REPS, d.line(figure)
    assert _passes(d.covered(figure), kept, _at_least(arm, figure)), d.line(figure)


def test_figures_known_by_definition_are_exact(runs: Runs) -> None:
    """Caseness outside the band that straddles the cut-off, reliable deterioration from
    25-27 and recovery below the cut-off are fixed by the bands: published as the truth
    (or as not defined), with no interval to cover."""
    seen = 0
    for d in runs.arms.values():
        for f, row in d.truth_rows.items():
            if "by definition" not in (row[5] or ""):
                continue
            seen += 1
            i = d.index[f]
            assert d.note_as_truth[i].all(), (d.arm, f, row)
            if math.isnan(row[0]):  # not defined: never published
                assert np.isnan(d.value[i]).all(), (d.arm, f)
            else:
                assert (d.value[i] == row[0]).all(), (d.arm, f)
                assert (d.se_sampling[i] == 0).all() and (d.se_noise[i] == 0).all(), (d.arm, f)
    # case at intake in 0-7 and 25-27, deterioration from 25-27, the two recoveries in 0-7
    assert seen == 5 * len(runs.arms)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_negative_control_sampling_only_intervals_undercover(runs: Runs, family: str) -> None:
    """Without the noise term the intervals are too narrow where the noise dominates: the
    checks can fail, and the noise term is what brings them up to nominal."""
    controls = [(arm, f) for arm in NOISY_ARMS for f in CHECKED[arm] if FAMILIES[family](f)]
    assert controls
    lines = "\n".join(runs.arms[a].line(f) for a, f in controls)
    sampling_only = {(a, f): runs.arms[a].coverage(f, "sampling only") for a, f in controls}
    assert min(sampling_only.values()) < float(LOWER), lines
    dominated = [(a, f) for a, f in controls if runs.arms[a].noise_share(f) > NOISE_DOMINATES]
    if family != "quantiles":  # their interval has no standard error to split
        assert dominated, lines
    for a, f in dominated:
        assert sampling_only[a, f] < float(LOWER), lines
    for a, f in controls:
        assert runs.arms[a].coverage(f) > sampling_only[a, f], lines


def test_negative_control_independent_means_undercover(runs: Runs) -> None:
    """Where sampling error dominates, treating the group means as independent makes the
    fit's interval too narrow (the same clients are measured at every review group)."""
    d = runs.arms["no noise"]
    independent = [d.coverage(Figure("fit", LARGE, c), "independent means") for c in ("a", "b")]
    assert min(independent) < float(LOWER), [d.line(Figure("fit", LARGE, c)) for c in "ab"]

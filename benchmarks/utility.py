"""Benchmark: how much accuracy site-level DP costs, against its physical limit and a naive
alternative.

Ten synthetic clinics (``coordinator.synth.synthesize``, seed ``--seed``, sizes drawn
log-uniformly from 30..3000 clients, PHQ-9) are read by the site's own pipeline
(``load_site_config`` -> ``read_intake`` -> ``derive_episodes`` -> ``select_episodes`` ->
``exact_blocks``). One study (bands 0-9/10-14/15-19/20-27, families counts + change +
categories, the least that yields mean change and the reliable improvement rate) at
epsilon 1, delta 1e-6 per site is then answered ``--reps`` times in three ways:

- ``site``: outcomebench. Every clinic noises its own blocks with the engine's compiled
  OpenDP measurements (discrete Gaussian, rho = the largest that fits (1, 1e-6), split by
  ``budget_weights``); the coordinator sums them (``coordinator.pooling.pool``) and
  estimates (``coordinator.estimates.estimate_all``).
- ``central`` (a): the same measurements applied once to the union of the ten clinics'
  blocks, as if all the data sat in one place: the best any design at this privacy level
  with this mechanism can do.
- ``dpl`` (b): each clinic releases, per band, its mean change and its reliable
  improvement rate with diffprivlib's ``tools.mean`` (Laplace, epsilon 1/2 each, bands are
  disjoint so they compose in parallel; bounds [-27, 27] and [0, 1] as in our layout), and
  the coordinator averages the ten clinic means. diffprivlib treats each clinic's n as
  public (bounded DP), so (b) gets its sample sizes for free, a weaker guarantee than
  ours; ``dpl-w`` is the same but the clinics also release their counts (epsilon 1/3 each
  for count, mean change, rate) and the coordinator weights the means by them.

Error is against the exact value on the union of the ten clinics (the benchmark's
estimand), as RMSE over the repetitions. The published estimate may be suppressed
(too few episodes, too noisy a count, or not estimable at this budget); the RMSE is over
the repetitions that published it, and the table says how often it was suppressed.

Targets: site RMSE <= 1.1 * sqrt(10) * central RMSE, and site RMSE < dpl RMSE. The exit
status is 0 whether the targets pass or not; non-zero on errors.

Usage::

    python benchmarks/utility.py                  # 10 clinics, 1000 repetitions
    python benchmarks/utility.py --reps 200 --seed 3

Needs the ``bench`` extra (``pip install -e '.[bench]'``: diffprivlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt

try:
    from diffprivlib.tools import count_nonzero
    from diffprivlib.tools import mean as dpl_mean
except ImportError:  # the bench extra is not installed: main() says so
    count_nonzero = dpl_mean = None

import clinics as sites

from coordinator.estimates import estimate_all
from coordinator.pooling import Pooled, pool
from protocols.layout import block_layout
from protocols.study import Study, parse_study
from site_agent.outcomes import Reliable
from site_agent.privacy.accounting import CompiledBlock

BANDS = sites.BANDS
EPSILON, DELTA = Fraction(1), Fraction(1, 10**6)
ESTIMATES = {"mean_change": "sum_final", "reliable_improvement_rate": "reliably_improved"}
"""Each compared estimate and a block the study must release for it."""
Float = npt.NDArray[np.float64]


def make_study(families: list[str]) -> Study:
    return parse_study(
        sites.study_draft(
            "utility",
            "utility of site-level DP",
            families,
            {"epsilon": str(EPSILON), "delta": "0.000001"},
        )
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Clinic:
    site_id: str
    exact: npt.NDArray[np.int64]  # every block, concatenated in layout order
    band: npt.NDArray[np.int64]  # per selected episode
    change: npt.NDArray[np.int64]  # per selected episode, clipped to the layout's bounds
    improved: npt.NDArray[np.int64]  # per selected episode: reliably improved (0/1)


def per_episode(clinic: sites.Clinic, study: Study) -> Clinic:
    """What diffprivlib's clinics release means of, from the clinic's selected episodes."""
    w = study.instrument.hi - study.instrument.lo
    sel = clinic.selection
    reliable = sel.table["reliable"].to_numpy()
    return Clinic(
        site_id=clinic.site_id,
        exact=clinic.exact,
        band=sel.band,
        change=np.clip(sel.table["change"].to_numpy(np.int64), -w, w),
        improved=(reliable == Reliable.IMPROVED).astype(np.int64),
    )


def pooled_estimates(
    study: Study, rows: list[npt.NDArray[np.int64]], compiled: Sequence[CompiledBlock]
) -> tuple[dict[str, Float], dict[str, npt.NDArray[np.bool_]]]:
    """Per estimate: the value per band that ``estimate_all`` publishes (NaN where it is
    suppressed or not estimable), and whether it was."""
    contributions = [
        sites.contribution(study, f"site-{i}", row, compiled) for i, row in enumerate(rows)
    ]
    tables = estimate_all(pool(study, contributions))
    values, hidden = {}, {}
    for name in answerable(study):
        got = [band["estimates"][name].value for band in tables.bands]
        values[name] = np.array([np.nan if v is None else v for v in got], dtype=np.float64)
        hidden[name] = np.array([v is None for v in got])
    return values, hidden


def diffprivlib_estimates(
    clinics: list[Clinic], names: list[str], rng: np.random.Generator, weighted: bool, w: int
) -> dict[str, Float]:
    share = EPSILON / (len(names) + weighted)  # epsilon split over what each clinic releases
    out: dict[str, Float] = {name: np.zeros(len(BANDS)) for name in names}
    for b in range(len(BANDS)):
        means: dict[str, list[float]] = {name: [] for name in ESTIMATES}
        weights: list[float] = []
        for c in clinics:
            in_band = c.band == b
            if not in_band.any():  # diffprivlib cannot release the mean of nothing
                continue
            seed = int(rng.integers(2**31))
            means["mean_change"].append(
                float(
                    dpl_mean(
                        c.change[in_band], epsilon=float(share), bounds=(-w, w), random_state=seed
                    )
                )
            )
            means["reliable_improvement_rate"].append(
                float(
                    dpl_mean(
                        c.improved[in_band],
                        epsilon=float(share),
                        bounds=(0, 1),
                        random_state=seed + 1,
                    )
                )
            )
            if weighted:
                n = count_nonzero(in_band, epsilon=float(share), random_state=seed + 2)
                weights.append(max(float(n), 1.0))
        wts = np.asarray(weights) if weighted else np.ones(len(means["mean_change"]))
        for name in names:
            v = float(np.average(np.asarray(means[name]), weights=wts))
            out[name][b] = min(max(v, 0.0), 1.0) if name.endswith("_rate") else v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument(
        "--families",
        default="counts,change,categories",
        help="the study's families, comma-separated (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    if dpl_mean is None:
        print("diffprivlib is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    study = make_study(args.families.split(","))
    names = list(answerable(study))
    if not names:
        print("the families answer neither estimate: add change or categories", file=sys.stderr)
        return 2
    w = study.instrument.hi - study.instrument.lo
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = sites.load_clinics(args.sites, args.seed, study, Path(tmp))
        compiled = sites.compiled_blocks(study, loaded[0].config)
    clinics = [per_episode(c, study) for c in loaded]
    exact = np.stack([c.exact for c in clinics])
    union = exact.sum(axis=0)
    truth = exact_estimates(study, union, names, compiled)

    site_noisy = sites.noised(np.broadcast_to(exact, (args.reps, *exact.shape)).copy(), compiled)
    central_noisy = sites.noised(np.broadcast_to(union, (args.reps, *union.shape)).copy(), compiled)
    rng = np.random.default_rng([args.seed, 7])
    errors: dict[str, dict[str, list[Float]]] = {
        m: {name: [] for name in names} for m in ("site", "central", "dpl", "dpl-w")
    }
    hidden: dict[str, dict[str, Float]] = {
        m: {name: np.zeros(len(BANDS)) for name in names} for m in ("site", "central")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffprivlib's PrivacyLeakWarning is about bounds
        for r in range(args.reps):
            for method, rows in (("site", list(site_noisy[r])), ("central", [central_noisy[r]])):
                values, sup = pooled_estimates(study, rows, compiled)
                for name in names:
                    errors[method][name].append(values[name] - truth[name])
                    hidden[method][name] += sup[name]
            for method, weighted in (("dpl", False), ("dpl-w", True)):
                values = diffprivlib_estimates(clinics, names, rng, weighted, w)
                for name in names:
                    errors[method][name].append(values[name] - truth[name])
    elapsed = time.perf_counter() - t0

    n_band = np.array(
        [int((np.concatenate([c.band for c in clinics]) == b).sum()) for b in range(len(BANDS))]
    )
    rho = sum((b.rho for b in compiled), Fraction(0))
    print(
        f"{args.sites} clinics ({sum(len(c.band) for c in clinics)} episodes), study "
        f"families {'+'.join(args.families.split(','))}, epsilon {EPSILON} delta {DELTA} per site "
        f"(rho {float(rho):.5f}), {args.reps} repetitions, {elapsed:.0f} s"
    )
    print("sizes (episodes):", ", ".join(str(len(c.band)) for c in clinics))
    bound = 1.1 * math.sqrt(args.sites)
    header = (
        f"{'estimate':<27}{'band':>6}{'n':>6}{'truth':>8}{'central':>9}{'site':>9}"
        f"{'dpl':>9}{'dpl-w':>9}{'site/cen':>9}{'site/dpl':>9}{'supp s/c':>10}  vs central  vs dpl"
    )
    print(header)
    print("-" * len(header))
    failures = 0
    for name in names:
        # Over the repetitions that published the estimate (NaN errors are the others).
        rmse = {m: np.sqrt(np.nanmean(np.square(np.stack(errors[m][name])), axis=0))
                for m in errors}
        for b, (lo, hi) in enumerate(BANDS):
            ratio_c = rmse["site"][b] / rmse["central"][b]
            ratio_d = rmse["site"][b] / rmse["dpl"][b]
            failures += (ratio_c > bound) + (ratio_d >= 1)
            print(
                f"{name:<27}{f'{lo}-{hi}':>6}{n_band[b]:>6}{truth[name][b]:>8.3f}"
                f"{rmse['central'][b]:>9.4f}{rmse['site'][b]:>9.4f}{rmse['dpl'][b]:>9.4f}"
                f"{rmse['dpl-w'][b]:>9.4f}{ratio_c:>9.2f}{ratio_d:>9.2f}"
                f"{int(hidden['site'][name][b]):>5}/{int(hidden['central'][name][b]):<4}"
                f"  {'PASS' if ratio_c <= bound else 'FAIL':<10}"
                f"  {'PASS' if ratio_d < 1 else 'FAIL'}"
            )
    print(
        f"targets: site/central <= 1.1 x sqrt({args.sites}) = {bound:.2f}, site/dpl < 1; "
        f"{failures} of {2 * len(names) * len(BANDS)} checks fail"
    )
    print(
        "RMSE is against the exact value on the union of the clinics; 'supp s/c' counts "
        "repetitions whose published estimate would be suppressed (site/central)."
    )
    return 0


def answerable(study: Study) -> dict[str, str]:
    """The compared estimates the study's families can answer, with their numerators."""
    have = {spec.name for spec in block_layout(study)}
    return {name: block for name, block in ESTIMATES.items() if block in have}


def exact_estimates(
    study: Study, union: npt.NDArray[np.int64], names: list[str],
    compiled: Sequence[CompiledBlock],
) -> dict[str, Float]:
    """The estimand: ``estimate_all`` on the union's exact sums, with no noise."""
    c = sites.contribution(study, "union", union, compiled)
    p = pool(study, [c])
    exact = Pooled(study=study, contributions=p.contributions, blocks={
        k: dataclasses.replace(b, noise_var=np.zeros_like(b.noise_var))
        for k, b in p.blocks.items()})
    tables = estimate_all(exact)
    return {name: np.array([band["estimates"][name].value for band in tables.bands],
                           dtype=np.float64) for name in names}


if __name__ == "__main__":
    raise SystemExit(main())

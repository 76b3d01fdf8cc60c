"""Benchmark: the share of published figures precise enough to act on (issue 9's metric).

A *figure* is one estimate the coordinator publishes: one kind (mean change, a rate, a
change quantile, a trajectory session mean, a fitted curve coefficient, a regression
coefficient, the reference SD...) at one place (an intake band, a session, a quantile).
It is *useful* when, over repeated studies,

- it is published (a value, not suppressed or "not estimable") in at least 90% of them, and
- its RMSE against the exact value on the union of the clinics, over the studies that
  published it, is within the kind's tolerance (:data:`TOLERANCES`; PHQ-9 points, rates as
  fractions, episode counts relative).

The exact value is ``estimate_all`` on the union's exact, un-noised blocks (pooled as one
contribution whose declared noise is that of rho = :data:`TRUTH_RHO`, i.e. none in
practice, so that no noise-driven suppression applies). A figure with no exact value (the
union has too few episodes, or no spread...) is listed apart and not counted either way.
A kind with no tolerance in the issue's table (a kind added later) is reported and not
counted, so that it is noticed rather than silently scored.

Set-up: ``synthesize(max(--clinics), seed)`` (sizes log-uniform in 30..3000 clients;
clinic k is the same whatever the number, so 10 clinics are the first 10 of 30 and of
100), read by the site's own pipeline; one study with every family, PHQ-9, bands
0-9/10-14/15-19/20-27, K = 20 sessions, epsilon 1 and delta 1e-6 per site (``--epsilon``,
``--delta``), one episode per client. The measurements are the engine's own
(``ReleaseEngine.plan``: rho the largest that fits, the layout's budget split, OpenDP).
Two arms, each ``--reps`` times:

- ``site``: site-level DP, the product. Every clinic noises its own exact blocks with the
  compiled measurements; the coordinator pools (``coordinator.pooling.pool``) and
  estimates (``coordinator.estimates.estimate_all``).
- ``central``: central DP. The same measurements applied once to the union's exact
  blocks, as if all the data sat in one place.

Noise: drawn by the compiled OpenDP measurements themselves (``CompiledBlock.release``:
OpenDP's discrete Gaussian sampler, not a substitute), one call per block for a chunk of
repetitions, chunks in ``--jobs`` threads (OpenDP runs outside the GIL). OpenDP's noise
cannot be seeded: ``--seed`` fixes the clinics, and repeated runs differ by Monte Carlo
error only.

The script relies only on the study definition, the site's pipeline and the structure of
``estimate_all``'s output (:func:`figures` walks it: every value with a ``value`` and a
``suppressed``, named by its path of keys and placed by its band / session / quantile),
so it keeps working, and keeps kinds comparable, when the blocks behind them change.

Targets (issue 9): central DP >= 80% useful at 30 clinics and >= 50% at 10; site-level DP
>= 30% at 30 and >= 50% at 100. The exit status is 0 whether they are met or not;
non-zero on errors.

Usage::

    python benchmarks/usefulness.py                          # 10, 30, 100 clinics, 200 reps
    python benchmarks/usefulness.py --quick                  # 20 reps
    python benchmarks/usefulness.py --clinics 10 --reps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from clinics import (
    ALL_FAMILIES,
    I64,
    Clinic,
    compiled_blocks,
    contribution,
    load_clinics,
    noised,
    study_draft,
)

from coordinator.estimates import Tables, estimate_all
from coordinator.pooling import pool
from protocols.layout import TOLERANCES as LAYOUT_TOLERANCES
from protocols.study import Study, parse_study
from site_agent.privacy.accounting import CompiledBlock, total_rho

FORMAT = 1  # of the --json document
TRUTH_RHO = 10**12
"""The exact value's declared noise: a rho so large that no noise-driven rule applies."""
PUBLISHED_AT_LEAST = 0.9
ARMS = ("site", "central")
IDENTITY = ("band", "session", "quantile")
"""Keys of estimate_all's rows that say where a figure is (never what it is worth)."""
CHUNK_VALUES = 600_000  # noisy values per OpenDP call: bounds the Python list it builds


@dataclass(frozen=True, slots=True)
class Tolerance:
    value: float
    relative: bool = False  # a fraction of |exact value| rather than absolute

    def at(self, exact: float) -> float:
        return self.value * abs(exact) if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value:.0%} rel." if self.relative else f"{self.value:g}"


TOLERANCES: Mapping[str, Tolerance] = {
    "bands.episodes": Tolerance(0.05, relative=True),
    "bands.mean_intake": Tolerance(0.5),
    "bands.mean_change": Tolerance(0.5),
    "bands.sd_change": Tolerance(0.5),
    "bands.effect_size": Tolerance(0.1),
    "quantiles": Tolerance(1.0),
    "trajectory.mean_change": Tolerance(1.0),
    # Not in the table (layout v2 publishes it; v1 gave only tolerance limits):
    # the layout's own target, a tolerance limit (mean - 1.96 SD) within about 3 points.
    "trajectory.sd_change": Tolerance(LAYOUT_TOLERANCES["trajectory_sd"]),
    "trajectory_fit.a": Tolerance(0.5),
    "trajectory_fit.b": Tolerance(0.5),
    "regression.intercept": Tolerance(1.0),
    "regression.slope": Tolerance(0.05),
    "regression.residual_sd": Tolerance(0.5),
    "reference_sd": Tolerance(0.3),
}
"""Issue 9's tolerance table (RMSE; PHQ-9 points; rates as fractions), by kind, and the
trajectory SD's."""
RATE_TOLERANCE = Tolerance(0.03)  # every kind whose name ends in "_rate"

TARGETS = (("central", 30, 0.80), ("central", 10, 0.50), ("site", 30, 0.30), ("site", 100, 0.50))


def tolerance(kind: str) -> Tolerance | None:
    if kind in TOLERANCES:
        return TOLERANCES[kind]
    return RATE_TOLERANCE if kind.endswith("_rate") else None


# -- figures: what estimate_all publishes, keyed by kind and place -------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    kind: str  # e.g. "bands.mean_change", "trajectory.mean_change", "reference_sd"
    value: float | None  # None: not published (suppressed, not estimable, no value)


def figures(tables: Tables) -> dict[str, Figure]:
    """Every figure in ``tables`` by key ``"<kind> [<place>]"``: anything with a ``value``
    and a ``suppressed`` (an Estimate or its JSON), its kind the path of keys to it
    (containers named ``estimates`` left out), its place the ``band``, ``session`` and
    ``quantile`` of the rows around it. Keys are the same in every repetition of a study."""
    out: dict[str, Figure] = {}
    if is_dataclass(tables):
        for f in fields(tables):
            _walk(getattr(tables, f.name), (f.name,), (), out)
    return out


def _walk(obj: Any, path: tuple[str, ...], place: tuple[str, ...], out: dict[str, Figure]) -> None:
    if isinstance(obj, Mapping):
        place = place + tuple(f"{k} {obj[k]}" for k in IDENTITY if k in obj)
        if "value" in obj and "suppressed" in obj:
            _emit(path, place, obj["value"], obj["suppressed"], out)
            return
        for key, item in obj.items():
            if key not in IDENTITY:
                _walk(item, path if key == "estimates" else (*path, str(key)), place, out)
    elif isinstance(obj, list | tuple):
        for item in obj:
            _walk(item, path, place, out)
    elif hasattr(obj, "value") and hasattr(obj, "suppressed"):
        _emit(path, place, obj.value, obj.suppressed, out)


def _emit(
    path: tuple[str, ...], place: tuple[str, ...], value: Any, why: Any, out: dict[str, Figure]
) -> None:
    kind = ".".join(path)
    key = f"{kind} [{', '.join(place)}]" if place else kind
    base, n = key, 1
    while key in out:  # two figures in one place: keep both, in output order
        n += 1
        key = f"{base} #{n}"
    number = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
    out[key] = Figure(kind, number if not why else None)


# -- the experiment ------------------------------------------------------------------------


def make_study(epsilon: str, delta: str) -> Study:
    return parse_study(
        study_draft(
            "usefulness",
            "usefulness of published figures",
            ALL_FAMILIES,
            {"epsilon": epsilon, "delta": delta},
        )
    )


def truth_figures(
    study: Study, union: I64, truth_blocks: Sequence[CompiledBlock]
) -> dict[str, Figure]:
    """estimate_all on the union's exact blocks, with (practically) no declared noise."""
    p = pool(study, [contribution(study, "union", union, truth_blocks)])
    return figures(estimate_all(p))


def noise_chunks(
    exact: I64, compiled: Sequence[CompiledBlock], reps: int, executor: ThreadPoolExecutor
) -> Iterator[I64]:
    """``exact`` noised ``reps`` times, as arrays (chunk, *exact.shape) in order, drawn in
    the executor's threads while the caller consumes the earlier chunks."""
    chunk = max(1, CHUNK_VALUES // exact.size)
    sizes = [min(chunk, reps - at) for at in range(0, reps, chunk)]
    futures = [
        executor.submit(noised, np.broadcast_to(exact, (n, *exact.shape)).copy(), compiled)
        for n in sizes
    ]
    for fut in futures:
        yield fut.result()


@dataclass(frozen=True, slots=True)
class Run:
    """One (clinics, arm): every figure's published values over the repetitions."""

    clinics: int
    arm: str
    keys: tuple[str, ...]
    values: npt.NDArray[np.float64]  # (reps, figures); NaN where not published


def run_arm(
    study: Study,
    clinics: Sequence[Clinic],
    arm: str,
    compiled: Sequence[CompiledBlock],
    keys: Sequence[str],
    reps: int,
    executor: ThreadPoolExecutor,
) -> Run:
    exact = np.stack([c.exact for c in clinics])
    if arm == "central":
        exact = exact.sum(axis=0, keepdims=True)
    ids = [c.site_id for c in clinics] if arm == "site" else ["union"]
    index = {k: j for j, k in enumerate(keys)}
    values = np.full((reps, len(keys)), np.nan)
    seen: set[str] = set()
    r = 0
    for chunk in noise_chunks(exact, compiled, reps, executor):
        for rows in chunk:
            contributions = [
                contribution(study, sid, row, compiled) for sid, row in zip(ids, rows, strict=True)
            ]
            for key, fig in figures(estimate_all(pool(study, contributions))).items():
                seen.add(key)
                if key in index and fig.value is not None:
                    values[r, index[key]] = fig.value
            r += 1
    extra = sorted(seen - set(index))
    if extra:  # not in the exact union's tables at all: no exact value, not scored
        print(f"note: {len(extra)} figure(s) only in noisy tables: {extra[:5]}", file=sys.stderr)
    return Run(len(clinics), arm, tuple(keys), values)


# -- scoring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Score:
    key: str
    kind: str
    exact: float | None
    published: float  # share of repetitions that published it
    rmse: float  # over the repetitions that published it; inf if none did
    tolerance: float | None  # absolute, at the exact value; None: no tolerance for the kind

    @property
    def counted(self) -> bool:
        return self.exact is not None and self.tolerance is not None

    @property
    def useful(self) -> bool:
        return (
            self.counted
            and self.published >= PUBLISHED_AT_LEAST
            and self.rmse <= (self.tolerance or 0.0)
        )

    @property
    def ratio(self) -> float:
        """RMSE / tolerance (inf when never published, or a zero tolerance is missed)."""
        tol = self.tolerance or 0.0
        if tol > 0:
            return self.rmse / tol
        return 0.0 if self.rmse == 0 else math.inf


def score(run: Run, truth: Mapping[str, Figure]) -> list[Score]:
    out = []
    for j, key in enumerate(run.keys):
        fig = truth[key]
        col = run.values[:, j]
        seen = col[~np.isnan(col)]
        exact = fig.value
        rmse = (
            float(np.sqrt(np.mean(np.square(seen - exact))))
            if seen.size and exact is not None
            else math.inf
        )
        tol = tolerance(fig.kind)
        out.append(
            Score(
                key=key,
                kind=fig.kind,
                exact=exact,
                published=seen.size / col.size,
                rmse=rmse,
                tolerance=None if tol is None or exact is None else tol.at(exact),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class KindSummary:
    kind: str
    figures: int  # counted: with an exact value (and a tolerance)
    useful: int
    published: int  # published in >= 90% of repetitions
    median_ratio: float  # median RMSE / tolerance over the counted figures
    no_exact: int  # figures of this kind without an exact value

    @property
    def share(self) -> float:
        return self.useful / self.figures if self.figures else math.nan


def summarize(scores: Sequence[Score]) -> list[KindSummary]:
    by_kind: dict[str, list[Score]] = {}
    for s in scores:
        by_kind.setdefault(s.kind, []).append(s)
    out = []
    for kind, group in by_kind.items():
        counted = [s for s in group if s.counted]
        out.append(
            KindSummary(
                kind=kind,
                figures=len(counted),
                useful=sum(s.useful for s in counted),
                published=sum(s.published >= PUBLISHED_AT_LEAST for s in counted),
                median_ratio=statistics.median(s.ratio for s in counted) if counted else math.nan,
                no_exact=sum(s.exact is None for s in group),
            )
        )
    return out


def share_useful(scores: Sequence[Score]) -> float:
    counted = [s for s in scores if s.counted]
    return sum(s.useful for s in counted) / len(counted) if counted else math.nan


# -- report --------------------------------------------------------------------------------


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf or NaN


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "-"


def _ratio(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else "inf"


def report(
    results: Mapping[tuple[int, str], list[Score]],
    episodes: Mapping[int, int],
    clinic_counts: Sequence[int],
) -> list[str]:
    lines = []
    runs = [(n, arm) for n in clinic_counts for arm in ARMS]
    lines.append("Share of useful figures (published in >= 90% of studies, RMSE within tolerance)")
    lines.append(f"{'clinics':>8}{'episodes':>10}{'arm':>9}{'useful':>8}{'counted':>9}{'share':>8}")
    for n, arm in runs:
        scores = results[(n, arm)]
        counted = [s for s in scores if s.counted]
        lines.append(
            f"{n:>8}{episodes[n]:>10}{arm:>9}{sum(s.useful for s in counted):>8}"
            f"{len(counted):>9}{_pct(share_useful(scores)):>8}"
        )
    lines.append("")
    lines.append(
        "Per kind, each run: share useful / figures counted, median RMSE / tolerance "
        "(inf: most never published)"
    )
    kinds = list(dict.fromkeys(s.kind for scores in results.values() for s in scores))
    summaries = {run: {k.kind: k for k in summarize(results[run])} for run in runs}
    head = f"{'kind':<34}{'tol':>8}" + "".join(f"{f'{n} {arm}':>17}" for n, arm in runs)
    lines.append(head)
    lines.append("-" * len(head))
    for kind in kinds:
        tol = tolerance(kind)
        cells = []
        for run in runs:
            k = summaries[run].get(kind)
            if k is None or not k.figures:
                cells.append(f"{'-':>17}")
            else:
                cells.append(f"{_pct(k.share):>6}/{k.figures:<3}{_ratio(k.median_ratio):>7} ")
        lines.append(f"{kind:<34}{tol.describe() if tol else 'none':>8}" + "".join(cells))
    lines.append("")
    for run in runs:
        never = [k.kind for k in summaries[run].values() if k.figures and not k.useful]
        lines.append(f"never useful, {run[0]} clinics {run[1]}: {', '.join(never) or 'none'}")
    always_never = [
        kind
        for kind in kinds
        if all(kind in summaries[run] and not summaries[run][kind].useful for run in runs)
        and tolerance(kind)
    ]
    lines.append(f"never useful in any run: {', '.join(always_never) or 'none'}")
    for n in clinic_counts:
        missing = [s.key for s in results[(n, "site")] if s.exact is None]
        lines.append(
            f"no exact value at {n} clinics ({len(missing)}, not counted): "
            f"{', '.join(missing) or 'none'}"
        )
    untoleranced = sorted(
        {
            s.kind
            for sc in results.values()
            for s in sc
            if s.tolerance is None and s.exact is not None
        }
    )
    if untoleranced:
        lines.append(f"kinds without a tolerance (not counted): {', '.join(untoleranced)}")
    return lines


def targets(results: Mapping[tuple[int, str], list[Score]]) -> list[dict[str, Any]]:
    out = []
    for arm, n, want in TARGETS:
        got = share_useful(results[(n, arm)]) if (n, arm) in results else None
        out.append(
            {
                "arm": arm,
                "clinics": n,
                "target": want,
                "share": None if got is None else _num(got),
                "met": None if got is None else bool(got >= want),
            }
        )
    return out


def document(
    results: Mapping[tuple[int, str], list[Score]],
    episodes: Mapping[int, int],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    runs = []
    for (n, arm), scores in results.items():
        runs.append(
            {
                "clinics": n,
                "arm": arm,
                "episodes": episodes[n],
                "share_useful": _num(share_useful(scores)),
                "useful": sum(s.useful for s in scores),
                "counted": sum(s.counted for s in scores),
                "kinds": {
                    k.kind: {
                        "figures": k.figures,
                        "useful": k.useful,
                        "share_useful": _num(k.share),
                        "published_90": k.published,
                        "median_rmse_over_tolerance": _num(k.median_ratio),
                        "no_exact_value": k.no_exact,
                        "tolerance": (t := tolerance(k.kind)) and t.describe(),
                    }
                    for k in summarize(scores)
                },
                "figures": {
                    s.key: {
                        "kind": s.kind,
                        "exact": s.exact,
                        "published": s.published,
                        "rmse": _num(s.rmse),
                        "tolerance": s.tolerance,
                        "useful": s.useful,
                    }
                    for s in scores
                },
                "no_exact_value": [s.key for s in scores if s.exact is None],
            }
        )
    return {
        "format": FORMAT,
        "benchmark": "usefulness",
        "settings": dict(settings),
        "runs": runs,
        "targets": targets(results),
    }


def _clinic_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 10,30,100, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("clinic counts must be >= 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--clinics",
        type=_clinic_counts,
        default=[10, 30, 100],
        help="numbers of clinics, comma-separated (default: 10,30,100)",
    )
    ap.add_argument("--reps", type=int, default=None, help="repeated studies (default 200)")
    ap.add_argument("--quick", action="store_true", help="20 repetitions unless --reps")
    ap.add_argument("--seed", type=int, default=2026, help="the synthetic clinics' seed")
    ap.add_argument("--epsilon", default="1", help="per site (default %(default)s)")
    ap.add_argument("--delta", default="0.000001", help="per site (default %(default)s)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="threads drawing noise (default: the CPUs)",
    )
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results as JSON to PATH ('-': stdout, no tables)",
    )
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (20 if args.quick else 200)
    if reps < 1:
        ap.error("--reps must be >= 1")
    out = sys.stderr if args.json == "-" else sys.stdout
    t0 = time.perf_counter()
    study = make_study(args.epsilon, args.delta)
    truth_study = parse_study(study_draft("usefulness", "exact", ALL_FAMILIES, {"rho": TRUTH_RHO}))
    results: dict[tuple[int, str], list[Score]] = {}
    episodes: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        everyone = load_clinics(args.clinics[-1], args.seed, study, Path(tmp))
        compiled = compiled_blocks(study, everyone[0].config)
        truth_blocks = compiled_blocks(truth_study, everyone[0].config)
    rho = total_rho(compiled)
    print(
        f"study: PHQ-9, every family, K = {study.max_session}, epsilon {args.epsilon} delta "
        f"{args.delta} per site (rho {float(rho):.6g}), {reps} repetitions, "
        f"{len(compiled)} blocks, {sum(b.spec.size for b in compiled)} values",
        file=out,
    )
    with ThreadPoolExecutor(max(1, args.jobs)) as executor:
        for n in args.clinics:
            clinics = everyone[:n]
            episodes[n] = sum(int(c.selection.band.size) for c in clinics)
            union = np.stack([c.exact for c in clinics]).sum(axis=0)
            truth = truth_figures(study, union, truth_blocks)
            keys = list(truth)
            for arm in ARMS:
                t_arm = time.perf_counter()
                run = run_arm(study, clinics, arm, compiled, keys, reps, executor)
                results[(n, arm)] = score(run, truth)
                print(
                    f"{n} clinics ({episodes[n]} episodes), {arm}: "
                    f"{_pct(share_useful(results[(n, arm)]))} useful, "
                    f"{time.perf_counter() - t_arm:.0f} s",
                    file=out,
                )
    elapsed = time.perf_counter() - t0
    sizes = [int(c.selection.band.size) for c in everyone]
    print(f"clinic sizes (episodes): {', '.join(map(str, sizes))}", file=out)
    print("", file=out)
    for line in report(results, episodes, args.clinics):
        print(line, file=out)
    print("", file=out)
    print("targets (issue 9):", file=out)
    for t in targets(results):
        state = "not run" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        got = "" if t["share"] is None else f" (got {t['share']:.0%})"
        print(
            f"  {t['arm']} DP >= {t['target']:.0%} at {t['clinics']} clinics: {state}{got}",
            file=out,
        )
    print(f"wall time {elapsed:.0f} s", file=out)
    if args.json:
        doc = document(
            results,
            episodes,
            {
                "clinics": args.clinics,
                "reps": reps,
                "seed": args.seed,
                "epsilon": args.epsilon,
                "delta": args.delta,
                "rho": float(rho),
                "instrument": study.instrument.id,
                "max_session": study.max_session,
                "families": [str(f) for f in study.families],
                "bands": [list(b) for b in study.bands],
                "clinic_episodes": sizes,
                "noise": "OpenDP compiled measurements (CompiledBlock.release)",
                "published_at_least": PUBLISHED_AT_LEAST,
                "elapsed_s": round(elapsed, 1),
            },
        )
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

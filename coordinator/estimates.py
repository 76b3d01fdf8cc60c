"""Benchmarks from pooled blocks, each with a 95% interval that includes both the DP
noise (known scales) and sampling error.

Every estimate is a smooth function f of summed statistics. Its variance is

    sampling variance (the usual formula for the estimator, from the pooled data)
  + noise variance    (sum over the statistics s of (df/ds)^2 * var(noise of s)),

where the noise variances are known exactly from the sites' published scales and the
derivatives are taken numerically (the delta method). The interval is the estimate
+/- 1.96 standard errors. Ratios are suppressed, with the reason, when they rest on
fewer than MIN_EPISODES (noisy) episodes or when the noise is more than
MAX_DENOMINATOR_NOISE of the denominator, where the delta method stops being honest.

Sign convention: change is positive for improvement, whatever the instrument's direction.
Intervals are conditional on the participating services: variation between services
that did not take part is not in them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.pooling import Pooled
from protocols.instruments import Better

__all__ = ["MAX_DENOMINATOR_NOISE", "MIN_EPISODES", "Estimate", "Tables", "estimate_all"]

MIN_EPISODES = 20
MAX_DENOMINATOR_NOISE = 0.15
Z95 = 1.959963984540054
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)

Stats = Mapping[str, tuple[float, float]]  # name -> (value, noise variance)


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float | None
    se_sampling: float = math.nan
    se_noise: float = math.nan
    suppressed: str | None = None
    bounds: tuple[float, float] = (-math.inf, math.inf)  # the parameter's natural range

    @property
    def se(self) -> float:
        return math.hypot(self.se_sampling, self.se_noise)

    @property
    def ci(self) -> tuple[float, float] | None:
        if self.value is None or not math.isfinite(self.se):
            return None
        b0, b1 = self.bounds
        lo, hi = self.value - Z95 * self.se, self.value + Z95 * self.se
        return min(max(lo, b0), b1), max(min(hi, b1), b0)

    def as_json(self) -> dict[str, Any]:
        ci = self.ci
        return {
            "value": None if self.value is None else _round(self.value),
            "ci95": None if ci is None else [_round(ci[0]), _round(ci[1])],
            "se": None if self.value is None else _round(self.se),
            "se_sampling": None if self.value is None else _round(self.se_sampling),
            "se_noise": None if self.value is None else _round(self.se_noise),
            "suppressed": self.suppressed,
        }


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else float(f"{x:.6g}")


def suppressed(reason: str) -> Estimate:
    return Estimate(value=None, suppressed=reason)


def _noise_se(f: Callable[[Mapping[str, float]], float], stats: Stats) -> float:
    """Delta method for the DP noise: numeric gradient times the known noise variances."""
    x = {k: v for k, (v, _) in stats.items()}
    total = 0.0
    for name, (value, var) in stats.items():
        if var <= 0:
            continue
        h = 1e-4 * max(1.0, abs(value))
        up, down = dict(x), dict(x)
        up[name], down[name] = value + h, value - h
        grad = (f(up) - f(down)) / (2 * h)
        total += grad * grad * var
    return math.sqrt(total)


def _denominator_problem(n: float, var: float, what: str = "episodes") -> str | None:
    if n < MIN_EPISODES:
        return f"fewer than {MIN_EPISODES} {what} (noisy count {n:.0f})"
    if math.sqrt(var) > MAX_DENOMINATOR_NOISE * n:
        return (
            f"the DP noise on the number of {what} (SD {math.sqrt(var):.0f}) is more than "
            f"{MAX_DENOMINATOR_NOISE:.0%} of it ({n:.0f})"
        )
    return None


def mean(
    total: tuple[float, float],
    squares: tuple[float, float],
    n: tuple[float, float],
    sign: float = 1.0,
) -> Estimate:
    problem = _denominator_problem(*n)
    if problem:
        return suppressed(problem)
    stats = {"s": total, "q": squares, "n": n}

    def f(x: Mapping[str, float]) -> float:
        return sign * x["s"] / x["n"]

    var = max((squares[0] - total[0] ** 2 / n[0]) / (n[0] - 1), 0.0)
    return Estimate(f({"s": total[0], "n": n[0]}), math.sqrt(var / n[0]), _noise_se(f, stats))


def sd(
    total: tuple[float, float], squares: tuple[float, float], n: tuple[float, float]
) -> Estimate:
    problem = _denominator_problem(*n)
    if problem:
        return suppressed(problem)
    stats = {"s": total, "q": squares, "n": n}

    def f(x: Mapping[str, float]) -> float:
        return math.sqrt(max((x["q"] - x["s"] ** 2 / x["n"]) / (x["n"] - 1), 0.0))

    value = f({"s": total[0], "q": squares[0], "n": n[0]})
    if value <= 0:
        return suppressed("the noisy sums give no positive spread")
    return Estimate(
        value, value / math.sqrt(2 * (n[0] - 1)), _noise_se(f, stats), bounds=(0.0, math.inf)
    )


def rate(k: tuple[float, float], n: tuple[float, float], what: str = "episodes") -> Estimate:
    problem = _denominator_problem(*n, what=what)
    if problem:
        return suppressed(problem)
    p = min(max(k[0] / n[0], 0.0), 1.0)

    def f(x: Mapping[str, float]) -> float:
        return x["k"] / x["n"]

    return Estimate(
        p, math.sqrt(p * (1 - p) / n[0]), _noise_se(f, {"k": k, "n": n}), bounds=(0.0, 1.0)
    )


@dataclass(frozen=True, slots=True)
class Tables:
    bands: list[dict[str, Any]]
    quantiles: list[dict[str, Any]]
    trajectory: list[dict[str, Any]]
    trajectory_fit: list[dict[str, Any]]
    regression: dict[str, Any]
    reference_sd: Estimate


def _cell(p: Pooled, block: str, band: int, col: int = 0) -> tuple[float, float]:
    b = p.blocks[block]
    return float(b.values[band, col]), float(b.noise_var[band, col])


def _total(p: Pooled, block: str) -> tuple[float, float]:
    b = p.blocks[block]
    return float(b.values[:, 0].sum()), float(b.noise_var[:, 0].sum())


def estimate_all(p: Pooled) -> Tables:
    study = p.study
    has = set(p.blocks)
    sign = 1.0 if study.instrument.better is Better.HIGHER else -1.0  # improvement = sign*diff
    ref = (
        sd(_total(p, "sum_intake"), _total(p, "sum_intake_sq"), _total(p, "episodes"))
        if "sum_intake" in has
        else suppressed("the study has no change family")
    )
    bands: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(study.bands):
        est: dict[str, Estimate] = {}
        if "episodes" in has:
            n, vn = _cell(p, "episodes", i)
            # A noisy count may dip below zero; clipping is post-processing.
            est["episodes"] = Estimate(max(n, 0.0), 0.0, math.sqrt(vn), bounds=(0.0, math.inf))
        if "sum_change" in has:
            n_ = _cell(p, "episodes", i)
            est["mean_intake"] = mean(_cell(p, "sum_intake", i), _cell(p, "sum_intake_sq", i), n_)
            est["mean_change"] = mean(_cell(p, "sum_change", i), _cell(p, "sum_change_sq", i), n_)
            est["sd_change"] = sd(_cell(p, "sum_change", i), _cell(p, "sum_change_sq", i), n_)
            est["effect_size"] = _effect_size(p, i, ref)
        if "reliably_improved" in has:
            n_ = _cell(p, "episodes", i)
            c_ = _cell(p, "case_at_intake", i)
            for name, label in RATES:
                est[label] = rate(_cell(p, name, i), n_)
            est["recovery_rate"] = rate(_cell(p, "recovered", i), c_, "episodes at caseness")
            est["reliable_recovery_rate"] = rate(
                _cell(p, "reliably_recovered", i), c_, "episodes at caseness"
            )
        bands.append({"band": f"{lo}-{hi}", "lo": lo, "hi": hi, "estimates": est})
    return Tables(
        bands=bands,
        quantiles=_quantiles(p) if "change_hist" in has else [],
        trajectory=_trajectory(p, sign) if "traj_n" in has else [],
        trajectory_fit=_trajectory_fit(p, sign) if "traj_n" in has else [],
        regression=_regression(p) if "sum_intake_change" in has else {},
        reference_sd=ref,
    )


RATES = (
    ("reliably_improved", "reliable_improvement_rate"),
    ("reliably_deteriorated", "reliable_deterioration_rate"),
    ("case_at_intake", "case_at_intake_rate"),
    ("response", "response_rate"),
    ("remission", "remission_rate"),
)


def _effect_size(p: Pooled, band: int, ref: Estimate) -> Estimate:
    """Mean change in the band / SD of intake over all bands (one reference SD for every
    band, so that bands compare; a within-band SD would inflate narrow bands)."""
    m = mean(
        _cell(p, "sum_change", band), _cell(p, "sum_change_sq", band), _cell(p, "episodes", band)
    )
    if m.value is None:
        return m
    if ref.value is None:
        return suppressed(f"no reference SD: {ref.suppressed}")
    stats = {
        "s": _cell(p, "sum_change", band),
        "n": _cell(p, "episodes", band),
        "S": _total(p, "sum_intake"),
        "Q": _total(p, "sum_intake_sq"),
        "N": _total(p, "episodes"),
    }

    def f(x: Mapping[str, float]) -> float:
        ref_sd = math.sqrt(max((x["Q"] - x["S"] ** 2 / x["N"]) / (x["N"] - 1), 1e-12))
        return x["s"] / x["n"] / ref_sd

    value = m.value / ref.value
    sampling = math.hypot(m.se_sampling / ref.value, value * ref.se_sampling / ref.value)
    return Estimate(value, sampling, _noise_se(f, stats))


def _quantiles(p: Pooled) -> list[dict[str, Any]]:
    """Change quantiles from the noisy histogram; the interval inverts the CDF's interval."""
    block = p.blocks["change_hist"]
    w = (block.spec.width - 1) // 2
    changes = np.arange(-w, w + 1)
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        counts = np.clip(block.values[i], 0, None)
        var = block.noise_var[i]
        total = float(counts.sum())
        problem = _denominator_problem(total, float(var.sum()))
        cum = np.cumsum(counts)

        def at(q: float, cum: np.ndarray = cum, total: float = total) -> float:
            return float(changes[min(int(np.searchsorted(cum, q * total)), changes.size - 1)])

        for q in QUANTILES:
            if problem:
                est = suppressed(problem)
            else:
                j = int(np.searchsorted(cum, q * total))
                below, above = float(var[: j + 1].sum()), float(var[j + 1 :].sum())
                f_var = q * (1 - q) / total + ((1 - q) ** 2 * below + q * q * above) / total**2
                half = Z95 * math.sqrt(f_var)
                lo_q, hi_q = at(max(q - half, 0.0)), at(min(q + half, 1.0))
                est = Estimate(at(q), (hi_q - lo_q) / (2 * Z95), 0.0)
                rows.append(
                    {"band": f"{lo}-{hi}", "quantile": q, **est.as_json(), "ci95": [lo_q, hi_q]}
                )
                continue
            rows.append({"band": f"{lo}-{hi}", "quantile": q, **est.as_json()})
    return rows


def _trajectory(p: Pooled, sign: float) -> list[dict[str, Any]]:
    """Mean change from intake at each session, with the interval of the mean and a
    tolerance band (mean +/- 1.96 SD) for individual clients."""
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        for k in range(p.study.max_session):
            n_ = _cell(p, "traj_n", i, k)
            s_ = _cell(p, "traj_sum", i, k)
            q_ = _cell(p, "traj_sum_sq", i, k)
            m = mean(s_, q_, n_, sign)
            spread = sd(s_, q_, n_)
            tol = None
            if m.value is not None and spread.value is not None:
                tol = [_round(m.value - Z95 * spread.value), _round(m.value + Z95 * spread.value)]
            rows.append(
                {
                    "band": f"{lo}-{hi}",
                    "session": k + 1,
                    "clients": _round(n_[0]),
                    "mean_change": m.as_json(),
                    "tolerance95": tol,
                }
            )
    return rows


def _trajectory_fit(p: Pooled, sign: float) -> list[dict[str, Any]]:
    """Weighted least squares of mean change on ln(session) per band, weights 1/variance,
    with intervals that hold whatever the (nonnegative) correlation of the session means:
    see :func:`_fit_log_curve`."""
    rows: list[dict[str, Any]] = []
    for i, (lo, hi) in enumerate(p.study.bands):
        xs: list[float] = []
        means: list[Estimate] = []
        for k in range(p.study.max_session):
            m = mean(
                _cell(p, "traj_sum", i, k),
                _cell(p, "traj_sum_sq", i, k),
                _cell(p, "traj_n", i, k),
                sign,
            )
            if m.value is not None and m.se > 0:
                xs.append(math.log(k + 1))
                means.append(m)
        a_est, b_est = _fit_log_curve(xs, means)
        rows.append(
            {
                "band": f"{lo}-{hi}",
                "sessions_used": len(xs),
                "a": a_est.as_json(),
                "b": b_est.as_json(),
            }
        )
    return rows


def _fit_log_curve(xs: list[float], means: list[Estimate]) -> tuple[Estimate, Estimate]:
    """Weighted least squares of the session means on x = ln(session): (a, b), or both
    suppressed.

    Each coefficient is a linear combination sum_k L_k * mean_k. The DP noise of different
    sessions is independent, so its variance is sum_k L_k^2 * se_noise_k^2. The sampling
    errors are not: the same clients are measured at many sessions. Their covariances are
    not released, but a client's change from intake at two sessions is not negatively
    correlated, and different clients are independent, so every covariance is >= 0. Then
    Var(A - B) <= Var(A) + Var(B) <= (sum_{L>0} L_k se_k)^2 + (sum_{L<0} |L_k| se_k)^2,
    where A and B gather the positive and negative terms: a bound that holds for any such
    correlation (treating the means as independent was too narrow)."""
    if len(xs) < 3:
        reason = "fewer than 3 sessions with enough clients"
        return suppressed(reason), suppressed(reason)
    x = np.array(xs)
    y = np.array([m.value for m in means], dtype=np.float64)
    se_s = np.array([m.se_sampling for m in means])
    se_n = np.array([m.se_noise for m in means])
    design = np.column_stack([np.ones_like(x), x])
    # A variance near zero (or subnormal) overflows 1/variance: that is a curve the sums
    # do not determine, not an error.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        wt = 1 / (se_s**2 + se_n**2)
        try:
            lin = np.linalg.solve(design.T @ (design * wt[:, None]), design.T * wt)  # 2 x K
        except np.linalg.LinAlgError:
            lin = np.full((2, len(xs)), np.nan)
        beta = lin @ y
    if not np.isfinite(beta).all() or not np.isfinite(lin).all():
        reason = "the noisy session means do not determine a curve"
        return suppressed(reason), suppressed(reason)
    out = []
    for j in range(2):
        row = lin[j]
        pos = float(np.sum(np.where(row > 0, row, 0.0) * se_s))
        neg = float(np.sum(np.where(row < 0, -row, 0.0) * se_s))
        out.append(
            Estimate(float(beta[j]), math.hypot(pos, neg), float(np.sqrt(np.sum(row**2 * se_n**2))))
        )
    return out[0], out[1]


def _regression(p: Pooled) -> dict[str, Any]:
    """Change on intake over all bands: expected change = intercept + slope * intake."""
    stats = {
        "n": _total(p, "episodes"),
        "x": _total(p, "sum_intake"),
        "y": _total(p, "sum_change"),
        "xx": _total(p, "sum_intake_sq"),
        "xy": _total(p, "sum_intake_change"),
        "yy": _total(p, "sum_change_sq"),
    }
    n = stats["n"][0]
    problem = _denominator_problem(*stats["n"])
    if problem:
        return {k: suppressed(problem).as_json() for k in ("intercept", "slope", "residual_sd")}

    def parts(v: Mapping[str, float]) -> tuple[float, float, float]:
        sxx = v["xx"] - v["x"] ** 2 / v["n"]
        sxy = v["xy"] - v["x"] * v["y"] / v["n"]
        syy = v["yy"] - v["y"] ** 2 / v["n"]
        slope = sxy / sxx
        intercept = (v["y"] - slope * v["x"]) / v["n"]
        resid = math.sqrt(max((syy - slope * sxy) / (v["n"] - 2), 0.0))
        return intercept, slope, resid

    x0 = {k: v for k, (v, _) in stats.items()}
    if x0["xx"] - x0["x"] ** 2 / n <= 0 or n <= 2:
        reason = "the noisy sums show no spread in intake"
        return {k: suppressed(reason).as_json() for k in ("intercept", "slope", "residual_sd")}
    values = parts(x0)
    resid = values[2]
    sxx = x0["xx"] - x0["x"] ** 2 / n
    mean_x = x0["x"] / n
    sampling = (
        resid * math.sqrt(1 / n + mean_x**2 / sxx),
        resid / math.sqrt(sxx),
        resid / math.sqrt(2 * (n - 2)),
    )
    out: dict[str, Any] = {"episodes": _round(n), "mean_intake": _round(mean_x)}
    for j, name in enumerate(("intercept", "slope", "residual_sd")):

        def component(v: Mapping[str, float], j: int = j) -> float:
            return parts(v)[j]

        out[name] = Estimate(values[j], sampling[j], _noise_se(component, stats)).as_json()
    return out

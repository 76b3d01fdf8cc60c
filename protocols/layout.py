"""The statistics a study asks for: named blocks of bounded integer sums per intake band.

Both sides derive the same layout from the study: the site fills and noises the blocks,
the coordinator sums, decodes and interprets them. A block is a flat integer vector of
``n_bands * width`` values (band-major). Layout version 2 (:data:`LAYOUT_VERSION`).

**Centred, band-local values.** With add/remove neighbours the sensitivity of a sum is
the largest |value| one episode adds, so every bounded value v in [lo_b, hi_b] (its
bounds in band b, from the band and the instrument alone) is released centred on the
middle of its range, in integers: enc = m_b * (2 v - (lo_b + hi_b)), |enc| <= m_b (hi_b -
lo_b). Decoding needs the band's count: sum v = (sum enc / m_b + n (lo_b + hi_b)) / 2.
Centring halves the sensitivity against an uncentred [0, hi] value, band-local bounds
shrink it to the band's width, and a count's noise barely moves a decoded mean (it
enters only as the mean's offset from the centre). The integer multiplier m_b gives
every band of a block the same encoded bound M (m_b = M // (hi_b - lo_b)), so each band's
decoded noise is proportional to its own width although one Gaussian noises the block:
one episode falls in one band, so the block's sensitivity is M, not the sum over bands.

**What is released per band** (the raw values; ``x`` the intake, ``f`` the final score,
``c`` the change, positive for improvement):

- ``episodes``: the count (uncentred: it is every ratio's denominator);
- ``sum_intake`` u = 2 (x - lo_band) - width_band in [-w, w]; ``sum_final`` g = 2 f -
  (L + H) in [-W, W]; ``sum_intake_sq`` u^2, ``sum_final_sq`` g^2, ``sum_intake_final`` u g:
  second moments of centred values, from which the pooled moments of intake, final and
  change in a band, over all bands and across the regression follow exactly by the
  parallel-axis rule;
- categories (0/1) over their denominator: ``case_at_intake`` only in bands that straddle
  the cut-off; ``recovered`` and ``reliably_recovered`` over the episodes at caseness
  (enc 0 for the others), so that their rate is centred within its own denominator; the
  reliable categories only where the band allows the reliable change. A band where a
  category is fixed by definition (a band wholly above the cut-off is all at caseness;
  no episode of intake 4 can improve by 6 PHQ-9 points) gets m_b = 0: nothing is
  released or charged for it and the coordinator uses the known value. A block that is
  fixed in every band is left out;
- trajectories at review groups (:func:`trajectory_groups`): sessions 2..6 each, then
  7-8, 9-12, 13-16, 17-24, ...; a client adds to a group its change from intake at the
  latest session of the group it was scored at: ``traj_n`` (uncentred), ``traj_sum`` c and
  ``traj_sum_sq`` (2 c - (lo + hi))^2 with c's band-local bounds. The first session's
  change is 0 by definition and is not released. A client adds to each of G groups, so
  the sensitivity grows with sqrt(G) (9 for K = 20), not with sqrt(K);
- ``change_hist``: one bin per possible change in the band (band-local: W + w + 1 bins).

**Budget split** (:func:`budget_weights`): each block's share of the study's rho is
proportional to sqrt(D_j), D_j = sum over the published figures i that depend on block j
of (g_ij q_jb / (tol_i pi_i))^2: the linearised effect g_ij of the block's decoded sum on
figure i, the decoded noise unit q_jb of band b (the block's sensitivity over 2 m_b), the
figure's clinical tolerance tol_i and the typical share pi_i of the band's episodes it
rests on. That minimises sum_i (noise SD_i / tol_i)^2 for a band of any size (Lagrange:
sum D_j / s_j is least at s_j proportional to sqrt(D_j)). Every constant here (tolerances,
typical values, retention by session) is public and fixed, never estimated from the data.
Regression and reference-SD figures pool every band and are not in the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

from protocols.errors import SpecError
from protocols.instruments import Better, Instrument
from protocols.limits import MAX_RELEASE_VALUES
from protocols.study import Family, Study

__all__ = [
    "CATEGORY_NAMES",
    "COUNT_BLOCK",
    "LAYOUT_VERSION",
    "TOLERANCES",
    "BlockSpec",
    "block_layout",
    "budget_weights",
    "category_possible",
    "change_bounds",
    "release_values",
    "trajectory_groups",
]

LAYOUT_VERSION = 2
COUNT_BLOCK = "episodes"  # the denominator of every band-level estimate

CATEGORY_NAMES = (
    "reliably_improved",
    "reliably_deteriorated",
    "recovered",
    "reliably_recovered",
    "case_at_intake",
    "response",
    "remission",
)
CASES_ONLY = frozenset({"recovered", "reliably_recovered"})  # rates among the cases

TOLERANCES = {
    "episodes": 0.05,  # relative
    "mean_intake": 0.5,
    "mean_change": 0.5,
    "sd_change": 0.5,
    "effect_size": 0.1,
    "rate": 0.03,
    "quantile": 1.0,
    "trajectory_mean": 1.0,
    "trajectory_sd": 1.5,  # a tolerance limit (mean - 1.96 SD) within about 3 points
    "fit": 0.5,
    "intercept": 1.0,
    "slope": 0.05,
    "residual_sd": 0.5,
    "reference_sd": 0.3,
}
"""The clinical tolerance of each kind of published figure (noise RMSE; instrument points
for PHQ-9-like ranges, rates as fractions, episodes relative): what the budget split aims
at and what ``benchmarks/usefulness.py`` counts as usable."""

# Public guesses for the split (never data): typical improvement as a share of the
# distance from intake to the better end; SDs of change and intake as shares of the
# range; typical rates; the share of a band's clients still scored at session s.
_IMPROVEMENT = 0.3
_SD_CHANGE = 0.25
_SD_INTAKE = 0.2
_RATE = {
    "reliably_improved": 0.5,
    "reliably_deteriorated": 0.07,
    "recovered": 0.45,
    "reliably_recovered": 0.4,
    "case_at_intake": 0.5,
    "response": 0.4,
    "remission": 0.5,
}
_QUANTILES = 5


def _retention(session: int) -> float:
    """Share of clients still scored at ``session`` (median course about 5 sessions),
    floored at 1/4: the late groups' few clients would otherwise take most of the
    budget (the sum of squares weighs a figure far from its tolerance most) although
    they stay imprecise at any affordable share."""
    return max(math.exp(-(session - 1) / 6), 0.25)


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSpec:
    """One block. ``lo``/``hi`` bound one episode's *encoded* contribution to one value
    (what a release may hold per episode); ``raw`` are the raw value's bounds in each
    band and ``mult`` its multiplier m_b (0: fixed by definition in that band, nothing
    released). ``centred`` blocks are encoded m_b (2 v - (lo_b + hi_b)); the others (the
    counts and the histogram) hold the raw 0/1 values. ``over`` names the count a
    centred block decodes with: ``episodes``, ``cases`` (episodes at caseness at intake)
    or ``group`` (the clients of the trajectory group)."""

    name: str
    family: Family
    n_bands: int
    width: int  # values per band (1, G review groups, or histogram bins)
    lo: int
    hi: int
    sensitivity_sq: int  # squared L2 bound of one episode's contribution to the block (exact)
    centred: bool
    raw: tuple[tuple[int, int], ...]  # per band
    mult: tuple[int, ...]  # per band
    over: str = "episodes"
    demand: float = 0.0  # D_j of the budget split (see the module docstring)
    column_labels: tuple[str, ...] | None = None  # None: "value", or the histogram's offsets

    @property
    def size(self) -> int:
        return self.n_bands * self.width

    @property
    def labels(self) -> tuple[str, ...]:
        if self.column_labels is not None:
            return self.column_labels
        return ("value",) if self.width == 1 else tuple(str(c) for c in range(self.width))

    def sensitivity(self, max_episodes: int = 1) -> float:
        """L2 bound for one client with up to ``max_episodes`` episodes, rounded up so
        the float never understates the exact value."""
        root = math.isqrt(self.sensitivity_sq)
        if root * root == self.sensitivity_sq:
            return float(max_episodes * root)  # exact in a float for any realistic bound
        return math.nextafter(max_episodes * math.sqrt(self.sensitivity_sq), math.inf)

    def released(self, band: int) -> bool:
        return self.mult[band] > 0

    def noise_unit(self, band: int) -> float:
        """The decoded raw sum's noise SD per unit of the block's noise SD / sensitivity:
        sensitivity / (2 m_b) for centred blocks, the sensitivity for the others."""
        root = math.sqrt(self.sensitivity_sq)
        return root / (2 * self.mult[band]) if self.centred else root


def trajectory_groups(max_session: int) -> tuple[tuple[int, int], ...]:
    """The review groups (first, last session) of sessions 2..K: 2, 3, 4, 5, 6, then
    7-8, 9-12, 13-16, 17-24, 25-32, ... (about 1.5x apart), the last cut at K."""
    ends = [2, 3, 4, 5, 6, 8]
    while ends[-1] < max_session:
        ends.append(ends[-1] * 3 // 2 if ends[-1] % 3 else ends[-1] * 4 // 3)
    out: list[tuple[int, int]] = []
    first = 2
    for end in ends:
        last = min(end, max_session)
        if first > last:
            break
        out.append((first, last))
        first = last + 1
    return tuple(out)


def release_values(
    families: tuple[Family, ...] | frozenset[Family],
    n_bands: int,
    width: int,
    max_session: int,
) -> int:
    """An upper bound on the values :func:`block_layout` releases, by arithmetic alone
    (nothing is allocated), so a study too large for one release message is refused
    first. ``width`` is the instrument's hi - lo. A test pins it to the layout's sizes."""
    per_band = 0
    if Family.COUNTS in families:
        per_band += 1
    if Family.CHANGE in families:
        per_band += 5
    if Family.CATEGORIES in families:
        per_band += len(CATEGORY_NAMES)
    if Family.TRAJECTORY in families:
        per_band += 3 * len(trajectory_groups(max_session))
    if Family.HISTOGRAM in families:
        per_band += 2 * width + 1
    return n_bands * per_band


# -- what the instrument and a band fix ------------------------------------------------


def change_bounds(ins: Instrument, lo: int, hi: int) -> tuple[int, int]:
    """Bounds of the change (positive = improvement) from an intake in [lo, hi]."""
    if ins.better is Better.LOWER:  # change = intake - final
        return lo - ins.hi, hi - ins.lo
    return ins.lo - hi, ins.hi - lo


def category_possible(ins: Instrument, lo: int, hi: int, name: str) -> bool | None:
    """Whether an episode of intake in [lo, hi] can be in category ``name``: False when
    it never can (the rate is 0 by definition), None when every such episode is (only
    ``case_at_intake``: 1 by definition), True when it depends on the data."""
    # Caseness is monotone in the score, so the band's ends decide.
    if ins.better is Better.LOWER:
        any_case, all_case, non_case_final = hi >= ins.cutoff, lo >= ins.cutoff, ins.lo < ins.cutoff
    else:
        any_case, all_case, non_case_final = lo < ins.cutoff, hi < ins.cutoff, ins.hi >= ins.cutoff
    c_lo, c_hi = change_bounds(ins, lo, hi)
    rc = ins.reliable_change
    if name == "case_at_intake":
        return None if all_case else any_case
    if name in ("recovered", "reliably_recovered"):
        possible = any_case and non_case_final
        if name == "reliably_recovered":
            possible = possible and rc is not None and c_hi >= rc
        return possible
    if name == "reliably_improved":
        return rc is not None and c_hi >= rc
    if name == "reliably_deteriorated":
        return rc is not None and -c_lo >= rc
    if name == "response":
        return c_hi > 0
    if name == "remission":
        return non_case_final
    raise KeyError(name)


# -- the layout ---------------------------------------------------------------------


def _common_bound(widths: list[int]) -> tuple[int, tuple[int, ...]]:
    """M and m_b = M // w_b for bands of raw widths w_b (0: not released): M the least
    common multiple when small enough, else 2^20 (a relative loss below 2^-20 * w_b)."""
    alive = [w for w in widths if w > 0]
    if not alive:
        return 0, tuple(0 for _ in widths)
    m = 1
    for w in alive:
        m = m * w // math.gcd(m, w)
        if m > 1 << 20:
            m = max(1 << 20, *alive)
            break
    return m, tuple(m // w if w > 0 else 0 for w in widths)


def block_layout(study: Study) -> tuple[BlockSpec, ...]:
    """The blocks of ``study`` in canonical order; SpecError, before anything is
    allocated, if they could hold more than ``MAX_RELEASE_VALUES`` values (a parsed study
    never does)."""
    ins = study.instrument
    nb = len(study.bands)
    n = release_values(study.families, nb, ins.width, study.max_session)
    if n > MAX_RELEASE_VALUES:
        raise SpecError("study", [f"study: {n} values exceed {MAX_RELEASE_VALUES} per release"])
    big_w = ins.width
    groups = trajectory_groups(study.max_session)
    blocks: list[BlockSpec] = []

    def centred(
        name: str,
        fam: Family,
        raw: list[tuple[int, int]],
        width: int = 1,
        over: str = "episodes",
        labels: tuple[str, ...] | None = None,
    ) -> None:
        _, mult = _common_bound([hi - lo for lo, hi in raw])
        bound = max((m * (hi - lo) for m, (lo, hi) in zip(mult, raw, strict=True)), default=0)
        if bound == 0:
            return  # fixed by definition in every band
        blocks.append(
            BlockSpec(
                name=name,
                family=fam,
                n_bands=nb,
                width=width,
                lo=-bound,
                hi=bound,
                sensitivity_sq=width * bound * bound,
                centred=True,
                raw=tuple(raw),
                mult=mult,
                over=over,
                column_labels=labels,
            )
        )

    def plain(
        name: str, fam: Family, width: int, labels: tuple[str, ...] | None = None,
        raw: list[tuple[int, int]] | None = None,
    ) -> None:
        blocks.append(
            BlockSpec(
                name=name,
                family=fam,
                n_bands=nb,
                width=width,
                lo=0,
                hi=1,
                # A count adds 1 to each of its columns; a histogram to exactly one.
                sensitivity_sq=1 if fam is Family.HISTOGRAM else width,
                centred=False,
                raw=tuple(raw or [(0, 1)] * nb),
                mult=tuple(1 for _ in range(nb)),
                column_labels=labels,
            )
        )

    if Family.COUNTS in study.families:
        plain(COUNT_BLOCK, Family.COUNTS, 1)
    if Family.CHANGE in study.families:
        u = [(-(hi - lo), hi - lo) for lo, hi in study.bands]
        g = [(-big_w, big_w)] * nb
        centred("sum_intake", Family.CHANGE, u)
        centred("sum_final", Family.CHANGE, g)
        centred("sum_intake_sq", Family.CHANGE, [(0, a * a) for _, a in u])
        centred("sum_final_sq", Family.CHANGE, [(0, big_w * big_w)] * nb)
        centred("sum_intake_final", Family.CHANGE, [(-a * big_w, a * big_w) for _, a in u])
    if Family.CATEGORIES in study.families:
        for name in CATEGORY_NAMES:
            raw = [
                (0, 1) if category_possible(ins, lo, hi, name) is True else (0, 0)
                for lo, hi in study.bands
            ]
            centred(name, Family.CATEGORIES, raw, over="cases" if name in CASES_ONLY else
                    "episodes")
    if Family.TRAJECTORY in study.families and groups:
        labels = tuple(str(a) if a == b else f"{a}-{b}" for a, b in groups)
        c = [change_bounds(ins, lo, hi) for lo, hi in study.bands]
        plain("traj_n", Family.TRAJECTORY, len(groups), labels)
        centred("traj_sum", Family.TRAJECTORY, c, len(groups), "group", labels)
        centred(
            "traj_sum_sq", Family.TRAJECTORY, [(0, (hi - lo) ** 2) for lo, hi in c],
            len(groups), "group", labels,
        )
    if Family.HISTOGRAM in study.families:
        c = [change_bounds(ins, lo, hi) for lo, hi in study.bands]
        bins = max(hi - lo + 1 for lo, hi in c)
        plain("change_hist", Family.HISTOGRAM, bins, raw=c)
    return tuple(_with_demand(study, blocks))


# -- the budget split ---------------------------------------------------------------


def _with_demand(study: Study, blocks: list[BlockSpec]) -> list[BlockSpec]:
    """Each block with its D_j (see the module docstring), from public constants only."""
    ins = study.instrument
    big_w = float(ins.width)
    by = {b.name: b for b in blocks}
    demand = dict.fromkeys(by, 0.0)
    sd_change, ref_sd = _SD_CHANGE * big_w, _SD_INTAKE * big_w
    groups = trajectory_groups(study.max_session)

    def add(name: str, band: int, g: float, tol: float, share: float = 1.0) -> None:
        b = by.get(name)
        if b is None or not b.released(band) or g == 0:
            return
        demand[name] += (g * b.noise_unit(band) / (tol * share)) ** 2

    for i, (lo, hi) in enumerate(study.bands):
        mid = (lo + hi) / 2
        better_end = ins.lo if ins.better is Better.LOWER else ins.hi
        final = mid + _IMPROVEMENT * (better_end - mid)
        # The count's effect on a decoded mean: the mean's offset from the centre.
        g_off = abs(2 * final - (ins.lo + ins.hi)) / 2
        add(COUNT_BLOCK, i, 1.0, TOLERANCES["episodes"])
        for name in ("sum_intake", "sum_final"):
            add(name, i, 0.5, TOLERANCES["mean_change"])
            add(name, i, 0.5 / ref_sd, TOLERANCES["effect_size"])
        add("sum_intake", i, 0.5, TOLERANCES["mean_intake"])
        add(COUNT_BLOCK, i, g_off, TOLERANCES["mean_change"])
        for name, g in (("sum_intake_sq", 1 / 8), ("sum_final_sq", 1 / 8),
                        ("sum_intake_final", 1 / 4)):
            add(name, i, g / sd_change, TOLERANCES["sd_change"])
        for name, p in _RATE.items():
            b = by.get(name)
            if b is None or not b.released(i):
                continue
            over_cases = name in CASES_ONLY and "case_at_intake" in by and by[
                "case_at_intake"].released(i)
            share = 0.5 if over_cases else 1.0
            add(name, i, 1.0, TOLERANCES["rate"], share)
            add(COUNT_BLOCK, i, abs(p - 0.5), TOLERANCES["rate"], share)
            if over_cases:
                add("case_at_intake", i, abs(p - 0.5), TOLERANCES["rate"], share)
        if "change_hist" in by:
            spec = by["change_hist"]
            c_lo, c_hi = spec.raw[i]
            bins = c_hi - c_lo + 1
            density = 1 / (math.sqrt(2 * math.pi) * sd_change) / 2  # a quantile off the mode
            add("change_hist", i, math.sqrt(bins / 4) / density * math.sqrt(_QUANTILES),
                TOLERANCES["quantile"])
        for first, _ in groups:
            share = _retention(first)
            add("traj_sum", i, 1.0, TOLERANCES["trajectory_mean"], share)
            add("traj_sum_sq", i, 1 / (8 * sd_change), TOLERANCES["trajectory_sd"], share)
            c_lo, c_hi = change_bounds(ins, lo, hi)
            typical = _IMPROVEMENT * abs(mid - better_end) * min(1.0, math.log(first) / 2)
            add("traj_n", i, abs(typical - (c_lo + c_hi) / 2), TOLERANCES["trajectory_mean"],
                share)
    return [dataclasses.replace(b, demand=demand[b.name]) for b in blocks]


COUNT_SHARE = Fraction(8, 100)
"""The least share of the episode count: it is the published count and every band
figure's denominator (a band whose count is too noisy is suppressed whole), which the
sum of squares alone undervalues (it gave 1.4% and made counts worse than before)."""


def budget_weights(blocks: tuple[BlockSpec, ...]) -> tuple[Fraction, ...]:
    """Each block's share of the study's rho (exact; they sum to 1): proportional to
    sqrt(D_j), rounded to fractions (exactness matters for the sum, not the optimum),
    with the count at least :data:`COUNT_SHARE`. A block no published figure rests on
    (D_j = 0) still gets a small share, so that every released value is noised at a
    finite scale."""
    raw = [Fraction(math.sqrt(b.demand)).limit_denominator(10**6) for b in blocks]
    floor = sum(raw, Fraction(0)) / 1000 or Fraction(1)
    raw = [max(r, floor) for r in raw]
    total = sum(raw, Fraction(0))
    shares = [r / total for r in raw]
    names = [b.name for b in blocks]
    if COUNT_BLOCK in names and len(blocks) > 1:
        i = names.index(COUNT_BLOCK)
        if shares[i] < COUNT_SHARE:
            rest = 1 - shares[i]
            shares = [COUNT_SHARE if j == i else s * (1 - COUNT_SHARE) / rest
                      for j, s in enumerate(shares)]
    return tuple(shares)

"""The statistics a study asks for: named blocks of bounded integer sums per intake band.

Both sides derive the same layout from the study: the site fills and noises the blocks,
the coordinator sums and interprets them. A block is a flat integer vector of
``n_bands * width`` values (band-major). ``sensitivity_sq`` is the exact square of the
largest L2 change one *episode* can cause; a client with up to m episodes changes the
block by at most m times that root (all m episodes may fall into one band).

Budget split (see :func:`budget_weights`): the published figures are ratios (means and
rates over the episodes of a band; session means over the clients seen at that session), so
the rule balances the relative errors of those ratios. Every numerator block gets a share of
the study's rho in proportion to 1 / typical^2, where ``typical`` is a public, fixed guess
of a statistic's per-episode value as a fraction of its bound: with Gaussian noise a block's
relative error is proportional to 1 / (typical * sqrt(share)), so the numerators' relative
errors are all equal. A denominator divides each of its numerators, so its relative error
adds to each ratio's; minimising that common error for a fixed total gives the denominator
the weight sqrt(a * A), where a = 1 / typical^2 is its own weight and A the sum of its
numerators' weights (Lagrange: share_denominator / share_numerators = sqrt(a / A)). The
denominators are the episode count (of the change and categories blocks) and the clients
per session (of the trajectory sums). Giving the count only its own weight starved it: at
epsilon 1 per site (benchmarks/utility.py) the pooled counts were noisy enough that most
bands' estimates were suppressed. The typical fractions are constants here, never
estimated from data (that would leak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from protocols.errors import SpecError
from protocols.limits import MAX_RELEASE_VALUES
from protocols.study import Family, Study

__all__ = [
    "CATEGORY_NAMES",
    "COUNT_BLOCK",
    "DENOMINATORS",
    "BlockSpec",
    "block_layout",
    "budget_weights",
    "release_values",
]

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


@dataclass(frozen=True, slots=True, kw_only=True)
class BlockSpec:
    name: str
    family: Family
    n_bands: int
    width: int  # values per band (1, K sessions, or histogram bins)
    lo: int  # bounds of one episode's contribution to one value
    hi: int
    sensitivity_sq: int  # squared L2 bound of one episode's contribution to the block (exact)
    typical: Fraction  # public guess of the typical per-episode value / bound
    labels: tuple[str, ...]  # one per column within a band

    @property
    def size(self) -> int:
        return self.n_bands * self.width

    def sensitivity(self, max_episodes: int = 1) -> float:
        """L2 bound for one client with up to ``max_episodes`` episodes, rounded up so
        the float never understates the exact value."""
        root = math.isqrt(self.sensitivity_sq)
        if root * root == self.sensitivity_sq:
            return float(max_episodes * root)  # exact in a float for any realistic bound
        return math.nextafter(max_episodes * math.sqrt(self.sensitivity_sq), math.inf)


def release_values(
    families: tuple[Family, ...] | frozenset[Family],
    n_bands: int,
    width: int,
    max_session: int,
) -> int:
    """How many values :func:`block_layout` releases, by arithmetic alone (nothing is
    allocated), so a study too large for one release message is refused first. ``width``
    is the instrument's hi - lo. A test pins it to the layout's sizes."""
    per_band = 0
    if Family.COUNTS in families:
        per_band += 1
    if Family.CHANGE in families:
        per_band += 6
    if Family.CATEGORIES in families:
        per_band += len(CATEGORY_NAMES)
    if Family.TRAJECTORY in families:
        per_band += 3 * max_session
    if Family.HISTOGRAM in families:
        per_band += 2 * width + 1
    return n_bands * per_band


def block_layout(study: Study) -> tuple[BlockSpec, ...]:
    """The blocks of ``study`` in canonical order; SpecError, before anything is
    allocated, if they hold more than ``MAX_RELEASE_VALUES`` values (a parsed study never
    does)."""
    ins = study.instrument
    nb = len(study.bands)
    n = release_values(study.families, nb, ins.width, study.max_session)
    if n > MAX_RELEASE_VALUES:
        raise SpecError("study", [f"study: {n} values exceed {MAX_RELEASE_VALUES} per release"])
    level = max(abs(ins.lo), abs(ins.hi))  # bound on |score|
    w = ins.hi - ins.lo  # bound on |change|
    k = study.max_session
    blocks: list[BlockSpec] = []

    def add(
        name: str,
        fam: Family,
        lo: int,
        hi: int,
        typical: str,
        width: int = 1,
        sens_sq: int | None = None,
        labels: tuple[str, ...] = ("value",),
    ) -> None:
        bound = max(abs(lo), abs(hi))
        blocks.append(
            BlockSpec(
                name=name,
                family=fam,
                n_bands=nb,
                width=width,
                lo=lo,
                hi=hi,
                sensitivity_sq=sens_sq if sens_sq is not None else bound * bound,
                typical=Fraction(typical),
                labels=labels,
            )
        )

    if Family.COUNTS in study.families:
        add(COUNT_BLOCK, Family.COUNTS, 0, 1, "1")
    if Family.CHANGE in study.families:
        add("sum_intake", Family.CHANGE, min(ins.lo, 0), ins.hi, "1/2")
        add("sum_final", Family.CHANGE, min(ins.lo, 0), ins.hi, "1/3")
        add("sum_change", Family.CHANGE, -w, w, "1/5")
        add("sum_change_sq", Family.CHANGE, 0, w * w, "1/12")
        add("sum_intake_sq", Family.CHANGE, 0, level * level, "1/3")
        add("sum_intake_change", Family.CHANGE, -level * w, level * w, "1/10")
    if Family.CATEGORIES in study.families:
        for name in CATEGORY_NAMES:
            add(name, Family.CATEGORIES, 0, 1, "1/2")
    if Family.TRAJECTORY in study.families:
        # One episode has at most one score per session 1..K, in its own band.
        sessions = tuple(str(s) for s in range(1, k + 1))
        add("traj_n", Family.TRAJECTORY, 0, 1, "1/2", width=k, sens_sq=k, labels=sessions)
        add(
            "traj_sum", Family.TRAJECTORY, -w, w, "1/5", width=k, sens_sq=k * w * w, labels=sessions
        )
        add(
            "traj_sum_sq",
            Family.TRAJECTORY,
            0,
            w * w,
            "1/12",
            width=k,
            sens_sq=k * w**4,
            labels=sessions,
        )
    if Family.HISTOGRAM in study.families:
        bins = tuple(str(c) for c in range(-w, w + 1))
        # One episode falls in exactly one bin; the typical populated bin holds ~1/10.
        add("change_hist", Family.HISTOGRAM, 0, 1, "1/10", width=2 * w + 1, sens_sq=1, labels=bins)
    return tuple(blocks)


_CHANGE_NAMES = (
    "sum_intake",
    "sum_final",
    "sum_change",
    "sum_change_sq",
    "sum_intake_sq",
    "sum_intake_change",
)
DENOMINATORS = MappingProxyType(
    {
        COUNT_BLOCK: frozenset(_CHANGE_NAMES + CATEGORY_NAMES),
        "traj_n": frozenset({"traj_sum", "traj_sum_sq"}),
    }
)
"""Each denominator block and the blocks its published ratios divide by it."""


def budget_weights(blocks: tuple[BlockSpec, ...]) -> tuple[Fraction, ...]:
    """Each block's share of the study's rho (exact; they sum to 1)."""
    own = {b.name: 1 / (b.typical * b.typical) for b in blocks}
    raw = dict(own)
    for name, numerators in DENOMINATORS.items():
        if name in own:
            group = sum((own[n] for n in numerators if n in own), Fraction(0))
            if group:
                # sqrt rounded to a fraction: exactness matters for the sum, not the optimum.
                raw[name] = Fraction(math.sqrt(own[name] * group)).limit_denominator(10**6)
    total = sum(raw.values(), Fraction(0))
    return tuple(raw[b.name] / total for b in blocks)

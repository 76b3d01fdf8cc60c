"""The one pre-post effect size of outcomebench, and the ACORN label decided with its
interval. The clinic's ``summary``, the published benchmark and ``compare`` all use these.

Effect size = mean change (positive = improvement) / SD of intake over all bands of the
reference population: one reference SD for every band, so that bands compare (a
within-band SD would inflate narrow bands). ``summary`` uses the clinic's own intake SD,
the benchmark the pooled one, ``compare`` the benchmark's (so the clinic is measured on
the benchmark's scale). The severity-adjusted effect size (ACORN) is labelled "effective"
when the lower end of its 90% interval exceeds 0.5 and "highly effective" above 0.8: a
label never rests on the point estimate alone, so noise cannot flip it.
"""

from __future__ import annotations

import math

__all__ = ["EFFECTIVE", "HIGHLY_EFFECTIVE", "LABEL_Z", "acorn_label", "effect_size"]

EFFECTIVE = 0.5
HIGHLY_EFFECTIVE = 0.8
LABEL_Z = 1.6448536269514722  # the lower end of a 90% interval: ACORN's "at 90% confidence"


def effect_size(mean_change: float, reference_sd: float) -> float:
    """Mean change / the reference SD of intake; NaN without a positive SD."""
    if not reference_sd > 0 or not math.isfinite(reference_sd):
        return math.nan
    return mean_change / reference_sd


def acorn_label(value: float, se: float) -> str:
    """The label of a severity-adjusted effect size with standard error ``se`` (all its
    uncertainty: the clinic's sampling and the benchmark's sampling and DP noise)."""
    if not (math.isfinite(value) and math.isfinite(se)):
        return "not shown to be effective"
    lower = value - LABEL_Z * se
    if lower > HIGHLY_EFFECTIVE:
        return "highly effective"
    if lower > EFFECTIVE:
        return "effective"
    return "not shown to be effective"

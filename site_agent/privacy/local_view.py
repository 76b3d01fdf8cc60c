"""What a study's noise means for this clinic's own figures: local only.

The preview's +/- are in each block's encoded units (protocols/layout.py), which a
privacy officer cannot read against the data. This view decodes them per intake band and
puts them beside the clinic's own exact episode count, so that "noise larger than the
data" is visible before anything is spent. It reads the export, so it is shown by the
command line only and never crosses the wire (the engine's preview reads no data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protocols.layout import COUNT_BLOCK, block_layout
from protocols.study import Study
from site_agent.data import Intake
from site_agent.outcomes import derive_episodes
from site_agent.privacy.engine import ReleaseEngine
from site_agent.privacy.statistics import select_episodes

__all__ = ["local_precision"]

Z95 = 1.959963984540054


def local_precision(
    engine: ReleaseEngine,
    study: Study,
    what_leaves: Sequence[Mapping[str, Any]],
    intake: Intake,
) -> list[dict[str, Any]]:
    """Per band: the clinic's episodes (exact, local; from ``intake``, the export as read)
    and the 95% noise +/- this site's release alone would add to its count, mean intake,
    mean change and a rate."""
    site = engine.site
    instruments = {**site.instruments, study.instrument.id: study.instrument}
    ep = derive_episodes(intake.records, instruments, study.max_session).get(study.instrument.id)
    counts = np.zeros(len(study.bands), dtype=np.int64)
    if ep is not None:
        dated = site.data.columns.date is not None
        sel = select_episodes(ep, study, engine.policy.max_episodes_per_client, dated=dated)
        counts = np.bincount(sel.band, minlength=len(study.bands))[: len(study.bands)]
    scale = {str(b["block"]): float(b["noise_scale"]) for b in what_leaves}
    layout = {b.name: b for b in block_layout(study)}

    def decoded(name: str, band: int) -> float | None:
        """The noise SD of the band's decoded raw sum (None if the block is absent)."""
        spec = layout.get(name)
        if spec is None or name not in scale or not spec.released(band):
            return None
        return scale[name] / (2 * spec.mult[band]) if spec.centred else scale[name]

    rows = []
    for i, (lo, hi) in enumerate(study.bands):
        n = int(counts[i])
        sd_n = decoded(COUNT_BLOCK, i)
        sd_u, sd_g = decoded("sum_intake", i), decoded("sum_final", i)
        rate = next((decoded(c, i) for c in ("reliably_improved", "remission", "response")
                     if decoded(c, i) is not None), None)
        row: dict[str, Any] = {"band": f"{lo}-{hi}", "episodes_here": n}
        row["count_plus_minus"] = None if sd_n is None else round(Z95 * sd_n, 1)
        if n > 0 and sd_u is not None:
            row["mean_intake_plus_minus"] = round(Z95 * sd_u / 2 / n, 2)
        if n > 0 and sd_u is not None and sd_g is not None:
            row["mean_change_plus_minus"] = round(Z95 * math.hypot(sd_u, sd_g) / 2 / n, 2)
        if n > 0 and rate is not None:
            row["rate_plus_minus"] = round(Z95 * rate / n, 3)
        row["noise_larger_than_the_data"] = bool(
            n == 0
            or (sd_n is not None and Z95 * sd_n >= n)
            or row.get("mean_change_plus_minus", 0) > study.instrument.width / 4
            or row.get("rate_plus_minus", 0) > 0.25
        )
        rows.append(row)
    return rows

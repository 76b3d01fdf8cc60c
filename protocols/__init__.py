"""The contract between coordinator and sites. Imports none of outcomebench's other packages."""

from protocols.errors import SpecError
from protocols.instruments import (
    Band,
    Better,
    CutoffCriterion,
    Instrument,
    builtin_instruments,
    jacobson_truax_cutoff,
    jacobson_truax_threshold,
    parse_instrument,
    parse_instruments,
)

__all__ = [
    "Band",
    "Better",
    "CutoffCriterion",
    "Instrument",
    "SpecError",
    "builtin_instruments",
    "jacobson_truax_cutoff",
    "jacobson_truax_threshold",
    "parse_instrument",
    "parse_instruments",
]

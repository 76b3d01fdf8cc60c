"""Size limits on everything that crosses a boundary, in one place, so that every reader
of a document applies the same bounds *before* any work that grows with the input.

The transport limit comes first: the site agent's gRPC service and its clients exchange
messages of at most :data:`MAX_MESSAGE_BYTES`. A study whose signed release could not fit
into one message is refused before any budget is charged: :data:`MAX_RELEASE_VALUES` is
derived from that limit (a noisy value is an int64, at most :data:`RELEASE_VALUE_BYTES`
bytes in the signed, indented release JSON; :data:`RELEASE_OVERHEAD_BYTES` leaves room
for everything else a release carries). ``tests/unit/protocols/test_bounds.py`` builds
the largest possible release and checks that it fits.

Study fields have their own bounds beside the study type (``protocols/study.py``).
"""

from __future__ import annotations

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_ENVELOPE_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_RELEASE_VALUES",
    "MAX_REQUEST_BYTES",
    "MAX_STUDY_WIRE_BYTES",
    "RELEASE_OVERHEAD_BYTES",
    "RELEASE_VALUE_BYTES",
]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest gRPC message between the site agent and its clients (a release reply)."""

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest YAML/JSON file read: a study, ``site.yaml``, ``privacy.yaml``, a signed study."""

MAX_DEPTH = 20
"""Deepest nesting of mappings and lists in a YAML or JSON document (a study needs 4)."""

MAX_STUDY_WIRE_BYTES = 64 * 1024
"""Largest canonical study in a request (a valid one, at every field's bound, is < 16 KiB)."""

MAX_ENVELOPE_BYTES = 256 * 1024
"""Largest signed-study envelope in a request (the study, pretty-printed, and a signature)."""

MAX_REQUEST_BYTES = MAX_STUDY_WIRE_BYTES + MAX_ENVELOPE_BYTES + 64 * 1024
"""Largest request message the site agent accepts (its gRPC receive limit)."""

RELEASE_VALUE_BYTES = 32
"""Most bytes one noisy value takes in a signed release: an int64 of 20 digits and a sign,
a comma, a newline and the envelope's indentation."""

RELEASE_OVERHEAD_BYTES = 1024 * 1024
"""Room in a release message for all but the values (provenance, block headers, signature)."""

MAX_RELEASE_VALUES = (MAX_MESSAGE_BYTES - RELEASE_OVERHEAD_BYTES) // RELEASE_VALUE_BYTES
"""Most noisy values one study may ask of a site (491,520 at the 16 MiB transport limit)."""

"""Everything that runs inside a clinic: configuration, data intake, outcome derivation,
the local summary (and, in later issues, the privacy engine and the Flower bridge)."""

__all__: list[str] = []

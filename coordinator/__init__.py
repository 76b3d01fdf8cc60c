"""The coordinator side of outcomebench: it plans studies, pools what sites release and
publishes benchmarks. It never sees raw client data.

:mod:`coordinator.synth` writes synthetic clinics for tests and demos;
:mod:`coordinator.cli` is the ``outcomebench-coordinator`` command.
"""

__all__: list[str] = []

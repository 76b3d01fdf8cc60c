"""Errors of the site agent and the exit codes its CLI returns.

    ValueError
    ├── protocols.SpecError      a YAML specification is invalid (lists every problem)
    │   └── ConfigError          the site configuration is invalid
    └── DataError                the data file cannot be used at all (missing, unreadable,
                                 no valid rows, or refused whole under --strict)

Row-level problems are not exceptions: they go to the quarantine report.
"""

from __future__ import annotations

from enum import IntEnum

from protocols.errors import SpecError

__all__ = ["EXIT_HELP", "ConfigError", "DataError", "ExitCode"]


class ConfigError(SpecError):
    """The site configuration (site.yaml, or a file it names) is invalid."""


class DataError(ValueError):
    """The outcome export cannot be used; the message names the file and the fix."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class ExitCode(IntEnum):
    """Exit codes of ``outcomebench-site``; every code has help text in EXIT_HELP."""

    OK = 0
    USAGE = 2
    CONFIG = 3
    DATA = 4
    INTERNAL = 70


EXIT_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.USAGE: "the command line was wrong: see --help",
    ExitCode.CONFIG: "the site configuration is invalid: every problem is listed with its fix",
    ExitCode.DATA: "the data file cannot be used (missing, unreadable, no valid rows, or "
    "refused whole under --strict); see the quarantine report",
    ExitCode.INTERNAL: "internal error: this is a bug, please report it",
}

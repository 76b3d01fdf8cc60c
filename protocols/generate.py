"""Regenerate the Python code for ``protocols/site_agent.proto`` with grpcio-tools.

    python -m protocols.generate           # rewrite the committed files
    python -m protocols.generate --check   # exit 1 if they differ from a fresh build

The proto is compiled from the repository root (``-I .``), so the generated modules are
``protocols.site_agent_pb2`` and ``protocols.site_agent_pb2_grpc`` and import each other
by that package path. The output depends on the grpcio-tools version (it is written into
the files), so generation refuses any version but :data:`GRPCIO_TOOLS`, the one the
``dev`` extra pins.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["GENERATED", "GRPCIO_TOOLS", "PROTO", "ROOT", "generate", "main", "stale"]

GRPCIO_TOOLS = "1.81.1"  # keep equal to the pin in pyproject.toml's dev extra
ROOT = Path(__file__).resolve().parent.parent
PROTO = "protocols/site_agent.proto"
GENERATED = (
    "protocols/site_agent_pb2.py",
    "protocols/site_agent_pb2.pyi",
    "protocols/site_agent_pb2_grpc.py",
)


class GenerateError(RuntimeError):
    """grpcio-tools is missing, has the wrong version, or protoc failed."""


def _check_tools() -> None:
    try:
        found = version("grpcio-tools")
    except PackageNotFoundError:
        raise GenerateError(
            f"grpcio-tools is not installed; pip install 'grpcio-tools=={GRPCIO_TOOLS}' "
            "(or pip install -e '.[dev]')"
        ) from None
    if found != GRPCIO_TOOLS:
        raise GenerateError(
            f"grpcio-tools {found} is installed but the committed code is built with "
            f"{GRPCIO_TOOLS}; pip install 'grpcio-tools=={GRPCIO_TOOLS}', or bump "
            "GRPCIO_TOOLS here and the dev pin in pyproject.toml together and regenerate"
        )


def generate(out: Path, root: Path = ROOT) -> list[Path]:
    """Compile ``root/PROTO`` into ``out`` (``out/protocols/...``); return the files."""
    _check_tools()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        PROTO,
    ]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise GenerateError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
    files = [out / name for name in GENERATED]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise GenerateError(f"protoc did not write {', '.join(missing)}")
    return files


def stale(root: Path = ROOT) -> list[str]:
    """The committed generated files that differ from a fresh build (empty: up to date)."""
    with tempfile.TemporaryDirectory(prefix="outcomebench-proto-") as tmp:
        fresh = generate(Path(tmp), root)
        return [
            name
            for name, new in zip(GENERATED, fresh, strict=True)
            if not (root / name).is_file() or (root / name).read_bytes() != new.read_bytes()
        ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m protocols.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--check", action="store_true", help="only check; exit 1 if stale")
    args = p.parse_args(argv)
    try:
        if args.check:
            diff = stale()
            for name in diff:
                print(
                    f"{name}: differs from {PROTO}; run python -m protocols.generate",
                    file=sys.stderr,
                )
            return 1 if diff else 0
        with tempfile.TemporaryDirectory(prefix="outcomebench-proto-") as tmp:
            for name, new in zip(GENERATED, generate(Path(tmp)), strict=True):
                (ROOT / name).write_bytes(new.read_bytes())
                print(f"wrote {name}")
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

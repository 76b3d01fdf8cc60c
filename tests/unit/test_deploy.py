"""The deployment files start the site agent the way deploy/README.md says: their command
lines parse with the agent's own parser and pass the socket group the SuperNode needs."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from site_agent import crypto
from site_agent.cli import _parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _serve_args(argv: list[str]) -> tuple[str, str | None]:
    args = _parser().parse_args(argv)
    assert args.command == "serve"
    return str(args.socket), args.socket_group


def test_systemd_unit_serves_a_group_socket() -> None:
    unit = (DEPLOY / "systemd" / "outcomebench-site-agent.service").read_text()
    [line] = re.findall(r"^ExecStart=(.*)$", unit, flags=re.MULTILINE)
    argv = shlex.split(line)
    assert argv[0].endswith("/outcomebench-site")
    socket, group = _serve_args(argv[1:])
    assert socket.startswith("/run/outcomebench/") and group == "outcomebench-sock"
    assert "ExecStartPre=+/usr/bin/chgrp outcomebench-sock /run/outcomebench" in unit


def test_container_and_compose_serve_a_group_socket() -> None:
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "container" / "Containerfile").read_text(),
                    flags=re.MULTILINE)
    assert cmd is not None
    assert _serve_args(json.loads(cmd.group(1)))[1] == "outcomebench-sock"
    compose = yaml.safe_load((DEPLOY / "container" / "compose.yaml").read_text())
    assert _serve_args(compose["services"]["site-agent"]["command"])[1] == "outcomebench-sock"


def test_fingerprint_matches_openssl_form(tmp_path: Path) -> None:
    key = crypto.load_or_create_key(tmp_path)
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert crypto.fingerprint(key) == "SHA256:" + hashlib.sha256(der).hexdigest()
    assert crypto.fingerprint(key.public_key()) == crypto.fingerprint(key)
    openssl = subprocess.run(["openssl", "version"], capture_output=True, check=False)
    if openssl.returncode != 0:
        pytest.skip("openssl not installed: compared with the documented formula only")
    pem = crypto.public_pem(key).encode()
    der_cli = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem,
                             capture_output=True, check=True).stdout
    assert hashlib.sha256(der_cli).hexdigest() in crypto.fingerprint(key)


def test_pubkey_prints_the_fingerprint_it_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from site_agent.cli import main  # noqa: PLC0415

    from .site_agent.privacy_helpers import make_site  # noqa: PLC0415

    config = make_site(tmp_path / "clinic")
    assert main(["pubkey", "--config", str(config)]) == 0
    out = capsys.readouterr()
    pub = serialization.load_pem_public_key(out.out.encode())
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    assert f"fingerprint SHA256:{hashlib.sha256(der).hexdigest()}" in out.err

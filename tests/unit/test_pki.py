"""coordinator/pki.py (run as ``python -m deploy.pki``): the network CA, the SuperLink
certificate, node-auth and site keys. One test runs ``python -m deploy.pki`` from the
checkout, the way operators do.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID

import coordinator.pki

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki() -> ModuleType:
    return coordinator.pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_signs_server_cert_with_sans(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    assert pki.main(["init", "--dir", str(d), "--hosts", "superlink.example.org,10.1.2.3"]) == 0
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((d / "superlink.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((d / "ca.key.pem").read_bytes(), None)
    server_key = serialization.load_pem_private_key((d / "superlink.key.pem").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_key.curve, ec.SECP384R1)
    assert isinstance(server_key, ec.EllipticCurvePrivateKey)

    # The CA is a self-signed CA and signed the server certificate.
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.public_key() == ca_key.public_key()
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    assert server.public_key() == server_key.public_key()
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(eku)
    assert server.signature_hash_algorithm is not None
    assert isinstance(server.signature_hash_algorithm, hashes.SHA384)

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("10.1.2.3") in ips
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}

    # The coordinator's publication key: the format of coordinator/crypto.py.
    network = serialization.load_pem_private_key((d / "network.key.pem").read_bytes(), None)
    network_pub = serialization.load_pem_public_key((d / "network.pub.pem").read_bytes())
    assert isinstance(network, Ed25519PrivateKey)
    assert isinstance(network_pub, Ed25519PublicKey)
    assert network.public_key() == network_pub
    assert (d / "network.key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_permissions(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "new" / "pki"
    old = os.umask(0o022)
    try:
        pki.init(d)
    finally:
        os.umask(old)
    assert mode(d) == 0o700
    for name in ("ca.key.pem", "superlink.key.pem", "network.key.pem"):
        assert mode(d / name) == 0o600, name
    for name in ("ca.crt", "superlink.crt", "network.pub.pem"):
        assert mode(d / name) == 0o644, name


def test_init_refuses_to_overwrite(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert pki.main(["init", "--dir", str(d)]) == 1
    # Even one existing file blocks the whole init, and nothing is half-written.
    (d / "ca.key.pem").unlink()
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.init(d)
    assert not (d / "ca.key.pem").exists()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == {
        k: v for k, v in before.items() if k != "ca.key.pem"
    }


def test_init_rejects_bad_hosts(pki: ModuleType, tmp_path: Path) -> None:
    for bad in ("*.example.org", "bad host", "-x.org", "ex_ample.org"):
        with pytest.raises(pki.PkiError, match="--hosts"):
            pki.init(tmp_path / "pki", [bad])
    assert not (tmp_path / "pki").exists()


def test_add_site_node_keys(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init(d)
    assert pki.main(["add-site", "--dir", str(d), "--site", "clinic-north"]) == 0
    site = d / "sites" / "clinic-north"
    assert mode(d / "sites") == 0o700
    assert mode(site) == 0o700
    assert mode(site / "node-key") == 0o600
    assert mode(site / "node-key.pub") == 0o644
    assert (site / "README").is_file()

    # Public key: OpenSSH, as `flwr supernode register` reads it.
    text = (site / "node-key.pub").read_bytes()
    assert text.startswith(b"ecdsa-sha2-nistp384 ")
    public = serialization.load_ssh_public_key(text)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    # Private key: OpenSSH, as flower-supernode --auth-supernode-private-key loads it.
    private = serialization.load_ssh_private_key((site / "node-key").read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public

    # No release-signing key here: the site agent makes its own.
    assert not (d / "site-keys").exists()
    assert not list(site.glob("*sign*"))

    # Refuses to overwrite.
    key = (site / "node-key").read_bytes()
    assert pki.main(["add-site", "--dir", str(d), "--site", "clinic-north"]) == 1
    assert (site / "node-key").read_bytes() == key


def test_add_site_registers_signing_key(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init(d)
    signing = Ed25519PrivateKey.generate().public_key()
    pem = signing.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub = tmp_path / "clinic-south.pem"
    pub.write_bytes(pem)
    args = ["add-site", "--dir", str(d), "--site", "clinic-south", "--signing-pub", str(pub)]
    assert pki.main(args) == 0
    registered = d / "site-keys" / "clinic-south.pub.pem"
    assert registered.read_bytes() == pem
    assert mode(d / "site-keys") == 0o700
    assert serialization.load_pem_public_key(registered.read_bytes()) == signing
    assert (d / "sites" / "clinic-south" / "node-key").is_file()
    # The pool --keys directory holds exactly the registered site keys.
    assert [p.name for p in (d / "site-keys").iterdir()] == ["clinic-south.pub.pem"]
    # A second registration is refused (the node keys already exist and are kept).
    node_key = (d / "sites" / "clinic-south" / "node-key").read_bytes()
    assert pki.main(args) == 1
    assert (d / "sites" / "clinic-south" / "node-key").read_bytes() == node_key


def test_add_site_signing_key_later(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init(d)
    pki.add_site(d, "clinic-east")
    node_key = (d / "sites" / "clinic-east" / "node-key").read_bytes()
    pub = tmp_path / "east.pem"
    pub.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    written = pki.add_site(d, "clinic-east", pub)
    assert written == [d / "site-keys" / "clinic-east.pub.pem"]
    assert (d / "sites" / "clinic-east" / "node-key").read_bytes() == node_key


def test_add_site_refusals(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    with pytest.raises(pki.PkiError, match="init"):
        pki.add_site(d, "clinic-north")
    pki.init(d)
    for bad in ("Clinic", "../x", ".hidden", "a/b", "", "network"):
        with pytest.raises(pki.PkiError, match="--site"):
            pki.add_site(d, bad)
    # Not an Ed25519 key: refused, and nothing written.
    ec_pub = tmp_path / "ec.pem"
    ec_pub.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(pki.PkiError, match="Ed25519"):
        pki.add_site(d, "clinic-west", ec_pub)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(pki.PkiError, match="PEM"):
        pki.add_site(d, "clinic-west", garbage)
    assert not (d / "sites").exists()
    assert not (d / "site-keys").exists()


def test_register_command_and_connection(pki: ModuleType, tmp_path: Path) -> None:
    d = tmp_path / "pki"
    pki.init(d)
    with pytest.raises(pki.PkiError, match="add-site"):
        pki.register_command(d, "clinic-north", "net", flwr="flwr")
    pki.add_site(d, "clinic-north")
    assert pki.register_command(d, "clinic-north", "net", flwr="flwr") == [
        "flwr",
        "supernode",
        "register",
        str(d / "sites" / "clinic-north" / "node-key.pub"),
        "net",
        "--name",
        "clinic-north",
    ]
    toml = pki.connection_toml(d, "net", "127.0.0.1:9092")
    assert toml.splitlines() == [
        "[superlink.net]",
        'address = "127.0.0.1:9092"',
        f'root-certificates = "{(d / "ca.crt").resolve()}"',
    ]
    with pytest.raises(pki.PkiError, match="--address"):
        pki.connection_toml(d, "net", "127.0.0.1")
    # register needs a Flower configuration holding the connection; it does not make one.
    with pytest.raises(pki.PkiError, match=r"config\.toml"):
        pki.register(d, "clinic-north", "net", flwr="flwr", flwr_home=tmp_path / "none")


def test_runs_as_module_from_checkout(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ""}
    d = tmp_path / "pki"
    done = subprocess.run(
        [sys.executable, "-m", "deploy.pki", "init", "--dir", str(d)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1, localhost" in done.stdout
    assert (d / "ca.crt").is_file()

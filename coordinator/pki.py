"""The network's PKI: a CA, the SuperLink's TLS certificate, SuperNode authentication
keys and the coordinator's publication key. Private keys are written owner-only and
never overwritten."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from coordinator.crypto import generate_keypair

__all__ = ["NodeKeys", "Pki", "add_node", "init_pki"]


@dataclass(frozen=True, slots=True)
class Pki:
    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    network_key: Path
    network_pub: Path


@dataclass(frozen=True, slots=True)
class NodeKeys:
    private: Path  # OpenSSH (what `flower-supernode --auth-supernode-private-key` reads)
    public: Path  # OpenSSH (what `flwr supernode register` reads)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_pki(root: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365) -> Pki:
    """Create the CA, the SuperLink's certificate (SANs for ``hosts``) and the network's
    Ed25519 publication key under ``root``."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "outcomebench network CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pki = Pki(
        root=root,
        ca_cert=root / "ca.crt",
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        network_key=root / "network.key.pem",
        network_pub=root / "network.pub.pem",
    )
    _write_private(root / "ca.key", _pem(ca_key))
    _write_private(pki.server_key, _pem(server_key))
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    generate_keypair(root, "network")
    (root / "site-keys").mkdir(exist_ok=True)
    return pki


def add_node(root: Path, site_id: str) -> NodeKeys:
    """A SuperNode authentication key pair (EC P-384) for ``site_id``."""
    directory = root / "nodes"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(private=directory / f"{site_id}.key", public=directory / f"{site_id}.pub")
    _write_private(
        keys.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    keys.public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return keys

"""The coordinator's cryptography, in one place: Ed25519 keys, study and manifest
signatures, and checking site release signatures against registered site keys."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.release import Envelope

__all__ = ["generate_keypair", "load_private", "load_public", "raw_public", "sign", "verify_with"]


def generate_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key.pem`` (owner-only) and ``name.pub.pem``; refuse to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.key.pem", directory / f"{name}.pub.pem"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    except BaseException:
        with contextlib.suppress(OSError):
            private.unlink()
        raise
    return private, public


def load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, kind: str, payload: bytes) -> Envelope:
    return Envelope(
        kind=kind,
        payload=payload,
        public_key=raw_public(key.public_key()),
        signature=key.sign(payload),
    )


def verify_with(env: Envelope, key: Ed25519PublicKey) -> bool:
    """Signed by exactly ``key`` and the signature holds."""
    if raw_public(key) != env.public_key:
        return False
    try:
        key.verify(env.signature, env.payload)
    except InvalidSignature:
        return False
    return True

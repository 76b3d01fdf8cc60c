"""The site's cryptography, in one place: its Ed25519 signing key and checking the
coordinator's study signatures."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols.release import Envelope

__all__ = [
    "KEY_FILE",
    "create_key",
    "key_path",
    "load_key",
    "load_or_create_key",
    "public_pem",
    "raw_public",
    "sign",
    "sign_detached",
    "signed_by",
    "trusted",
    "verify",
    "verify_detached",
]

KEY_FILE = "site_signing_key.pem"


def key_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def load_key(state_dir: Path) -> Ed25519PrivateKey:
    """The site's signing key; never creates one. FileNotFoundError when it is missing,
    ValueError when the file is not an Ed25519 private key.

    The agent creates its key only together with a fresh ledger (see
    :class:`site_agent.privacy.ledger.Ledger`), so a deleted key is reported rather than
    silently replaced by a new one that matches neither the ledger's anchor nor the
    network's registration."""
    path = key_path(state_dir)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return loaded


def create_key(state_dir: Path) -> Ed25519PrivateKey:
    """Create the site's signing key (owner-only) unless it exists; returns the key.

    Creation is atomic: the key is written and synced under a private temporary name,
    then hard-linked into place, which fails if another process got there first. So
    racing processes agree on one key and a crash never leaves a partial key file.
    """
    path = key_path(state_dir)
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = state_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process won: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink()
    return load_key(state_dir)


def load_or_create_key(state_dir: Path) -> Ed25519PrivateKey:
    """A key in ``state_dir``, created on first use: for tools and tests that need a
    throwaway key. The site agent never calls it (it uses :func:`load_key`)."""
    return create_key(state_dir)


def sign_detached(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    return key.sign(payload)


def verify_detached(public_key: bytes, signature: bytes, payload: bytes) -> bool:
    """``signature`` is a valid Ed25519 signature of ``payload`` by the raw ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SHA-256 of the public key's DER form, as ``openssl pkey -pubin -outform DER |
    sha256sum`` prints it: what a site reads to the network to confirm its key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def sign(key: Ed25519PrivateKey, kind: str, payload: bytes) -> Envelope:
    return Envelope(
        kind=kind, payload=payload, public_key=raw_public(key), signature=key.sign(payload)
    )


def verify(env: Envelope) -> bool:
    """The signature is valid for the envelope's own public key."""
    try:
        Ed25519PublicKey.from_public_bytes(env.public_key).verify(env.signature, env.payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def signed_by(env: Envelope, key_file: Path) -> bool:
    """Signed by the Ed25519 public key in ``key_file`` (PEM), and the signature holds."""
    return trusted(env, [key_file])


def public_key_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable Ed25519 public key file (PEM), or None: so that a
    mistyped --key is named as such instead of as an untrusted signature."""
    try:
        pub = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        return f"{path}: no such key file; pass the network's public key (PEM) with --key"
    except OSError as exc:
        return f"{path}: cannot read the key file ({exc.strerror})"
    except ValueError:
        return f"{path}: not a PEM public key; pass the network's public key file (*.pub.pem)"
    if not isinstance(pub, Ed25519PublicKey):
        return f"{path}: not an Ed25519 public key; pass the network's public key (*.pub.pem)"
    return None


def trusted(env: Envelope, key_files: Iterable[Path]) -> bool:
    """Signed by one of the trusted public keys (PEM files), and the signature verifies."""
    for path in key_files:
        try:
            pub = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(pub, Ed25519PublicKey) and raw_public(pub) == env.public_key:
            return verify(env)
    return False

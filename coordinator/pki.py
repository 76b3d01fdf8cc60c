"""The network's keys and certificates: ``python -m deploy.pki COMMAND`` (or
``python -m coordinator.pki``); also used by the local network and the demo.

Commands
  init        the network CA, the SuperLink TLS certificate (signed by the CA) and the
              coordinator's Ed25519 publication key
  add-site    a site's SuperNode authentication key pair (EC P-384, OpenSSH format), and
              optionally register the site's release-signing public key (--signing-pub)
  register    register a site's SuperNode public key with the SuperLink
              (``flwr supernode register``)
  connection  print the ``$FLWR_HOME/config.toml`` section for a TLS connection

Layout of PKI_DIR (directories 0700, private keys 0600, nothing is ever overwritten)::

  ca.crt  ca.key.pem                 network CA (keep ca.key.pem offline after init)
  superlink.crt  superlink.key.pem   SuperLink TLS server certificate and key
  network.key.pem  network.pub.pem   coordinator's Ed25519 publication key
  sites/<site>/node-key              SuperNode auth private key (OpenSSH, EC P-384)
  sites/<site>/node-key.pub          its public key, ``ecdsa-sha2-nistp384 ...``
  sites/<site>/README                what goes where
  site-keys/<site>.pub.pem           site release-signing keys (``pool --keys``)

This module only needs ``cryptography``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "NETWORK_KEY",
    "NETWORK_PUB",
    "NODE_KEY",
    "NODE_PUB",
    "SERVER_CERT",
    "SERVER_KEY",
    "SITES_DIR",
    "SITE_KEYS_DIR",
    "PkiError",
    "add_site",
    "connection_toml",
    "init",
    "main",
    "register",
    "register_command",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key.pem"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key.pem"
NETWORK_KEY = "network.key.pem"
NETWORK_PUB = "network.pub.pem"
SITES_DIR = "sites"
SITE_KEYS_DIR = "site-keys"
NODE_KEY = "node-key"
NODE_PUB = "node-key.pub"
SITE_README = "README"

CA_DAYS = 3650
SERVER_DAYS = 825
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# The Flower CLI and daemons must stay offline (docs/FLOWER.md).
FLWR_OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

_PRIVATE = 0o600
_PUBLIC = 0o644
_DIR = 0o700
# Same rule as site_agent/config.py (site ids become file names here).
_SITE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_RESERVED_SITE_IDS = frozenset({"network"})  # network.pub.pem would look like a site key
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_CONNECTION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class PkiError(Exception):
    """A refusal or failure with a message for the operator."""


# --- files ------------------------------------------------------------------------------


def _ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) owner-only; an existing directory is kept as is."""
    if path.is_symlink():
        raise PkiError(f"{path}: is a symbolic link; refusing to use it")
    if path.exists():
        if not path.is_dir():
            raise PkiError(f"{path}: exists and is not a directory")
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            print(
                f"warning: {path} is accessible to other users (mode {mode:04o}); "
                f"consider chmod 700",
                file=sys.stderr,
            )
        return
    if not path.parent.exists():
        _ensure_dir(path.parent)
    path.mkdir(mode=_DIR)
    path.chmod(_DIR)  # mkdir's mode is reduced by the umask, never widened: set it exactly


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise PkiError(f"refusing to overwrite existing files: {names}")


class _NewFiles:
    """Write new files only (O_EXCL); if anything fails, remove what was written."""

    def __init__(self) -> None:
        self.written: list[Path] = []

    def write(self, path: Path, data: bytes, mode: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise PkiError(f"refusing to overwrite existing file: {path}") from None
        self.written.append(path)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # exact mode whatever the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def rollback(self) -> None:
        for path in reversed(self.written):
            with contextlib.suppress(OSError):
                path.unlink()
        self.written.clear()


@contextlib.contextmanager
def _new_files() -> Iterator[_NewFiles]:
    files = _NewFiles()
    try:
        yield files
    except BaseException:
        files.rollback()
        raise


# --- keys and certificates --------------------------------------------------------------


def _pem_private(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries: 127.0.0.1 and localhost always, then ``hosts`` (IPs or DNS names)."""
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in (*DEFAULT_HOSTS, *hosts):
        host = raw.strip().lower()
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            ip = None
        key = str(ip) if ip is not None else host.rstrip(".")
        if key in seen:
            continue
        seen.add(key)
        if ip is not None:
            names.append(x509.IPAddress(ip))
            continue
        labels = key.split(".")
        if len(key) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise PkiError(
                f"--hosts: {raw!r} is neither an IP address nor a DNS name "
                "(ASCII letters, digits and '-' per label; no wildcards)"
            )
        names.append(x509.DNSName(key))
    return names


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, organization: str, now: dt.datetime
) -> x509.Certificate:
    name = _name(f"{organization} CA", organization)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: list[x509.GeneralName],
    organization: str,
    now: dt.datetime,
) -> x509.Certificate:
    first = sans[0]
    common_name = str(first.value)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"SuperLink {common_name}", organization))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def _ssh_fingerprint(public_openssh: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf KEY.pub`` prints it."""
    blob = base64.b64decode(public_openssh.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _spki_sha256(key: Ed25519PublicKey) -> str:
    """SHA-256 of the DER public key: ``openssl pkey -pubin -outform DER | sha256sum``."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


# --- commands ---------------------------------------------------------------------------


def init(
    pki_dir: Path, hosts: Sequence[str] = (), organization: str = "outcomebench network"
) -> list[Path]:
    """Create the CA, the SuperLink certificate and the publication key; return the files."""
    sans = _parse_hosts(hosts)
    if not organization.strip():
        raise PkiError("--org must not be empty")
    targets = [
        pki_dir / CA_KEY,
        pki_dir / CA_CERT,
        pki_dir / SERVER_KEY,
        pki_dir / SERVER_CERT,
        pki_dir / NETWORK_KEY,
        pki_dir / NETWORK_PUB,
    ]
    _refuse_existing(targets)
    _ensure_dir(pki_dir)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, organization, now)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, sans, organization, now)
    network_key = Ed25519PrivateKey.generate()
    pem = serialization.Encoding.PEM
    contents = [
        (_pem_private(ca_key), _PRIVATE),
        (ca_cert.public_bytes(pem), _PUBLIC),
        (_pem_private(server_key), _PRIVATE),
        (server_cert.public_bytes(pem), _PUBLIC),
        (_pem_private(network_key), _PRIVATE),
        (_pem_public(network_key.public_key()), _PUBLIC),
    ]
    with _new_files() as files:
        for path, (data, mode) in zip(targets, contents, strict=True):
            files.write(path, data, mode)
    return targets


def _check_site_id(site: str) -> None:
    if not _SITE_ID.match(site):
        raise PkiError(
            f"--site {site!r}: use 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (the site id of site.yaml)"
        )
    if site in _RESERVED_SITE_IDS:
        raise PkiError(f"--site {site!r} is reserved")


def _site_readme(site: str) -> str:
    return f"""\
Site {site}: SuperNode node-authentication keys (EC NIST P-384, OpenSSH format)

  {NODE_KEY}      private key. Copy it to the site's SuperNode host as
                /etc/outcomebench/node-key (owner outcomebench-node, mode 0600) and
                delete the copy here once it is installed. flower-supernode reads it
                with --auth-supernode-private-key. Never give it to the site agent user.
  {NODE_PUB}  public key (ecdsa-sha2-nistp384 ...). The network registers it with
                python -m deploy.pki register --dir PKI_DIR --site {site} --connection NAME
                (flwr supernode register {NODE_PUB} NAME --name {site});
                the SuperLink (--enable-supernode-auth) rejects unregistered keys.

Also give the site the network CA certificate ({CA_CERT}, for --root-certificates) and
the coordinator's publication key ({NETWORK_PUB}, for the privacy policy's trusted keys).

The site's release-signing key (Ed25519) is NOT made here: the site agent creates it in
its state directory (site_signing_key.pem) and `outcomebench-site pubkey --config
site.yaml` prints its public key. Confirm its fingerprint with the site out of band, then
register it with
  python -m deploy.pki add-site --dir PKI_DIR --site {site} --signing-pub PATH
which copies it to {SITE_KEYS_DIR}/{site}.pub.pem (the coordinator's `pool --keys` dir).
"""


def add_site(pki_dir: Path, site: str, signing_pub: Path | None = None) -> list[Path]:
    """Write the site's node-auth keys (unless present and ``signing_pub`` is given) and
    register ``signing_pub``; return the files written."""
    _check_site_id(site)
    if not (pki_dir / CA_CERT).is_file():
        raise PkiError(f"{pki_dir}: no {CA_CERT}; run `init --dir {pki_dir}` first")
    site_dir = pki_dir / SITES_DIR / site
    node_files = [site_dir / NODE_KEY, site_dir / NODE_PUB, site_dir / SITE_README]
    present = [p for p in node_files[:2] if p.exists() or p.is_symlink()]
    make_node_keys = not present
    if present and signing_pub is None:
        _refuse_existing(present)
    if present and len(present) < 2:
        raise PkiError(f"{site_dir}: incomplete node key pair; remove it and run add-site again")
    signing: tuple[Path, bytes] | None = None
    if signing_pub is not None:
        signing = (pki_dir / SITE_KEYS_DIR / f"{site}.pub.pem", _read_signing_pub(signing_pub))
        _refuse_existing([signing[0]])
    if make_node_keys:
        _refuse_existing(node_files)
        _ensure_dir(pki_dir / SITES_DIR)
        _ensure_dir(site_dir)
    if signing is not None:
        _ensure_dir(signing[0].parent)
    written: list[Path] = []
    with _new_files() as files:
        if make_node_keys:
            key = ec.generate_private_key(ec.SECP384R1())
            private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            files.write(node_files[0], private, _PRIVATE)
            files.write(node_files[1], public + f" outcomebench-site:{site}\n".encode(), _PUBLIC)
            files.write(node_files[2], _site_readme(site).encode(), _PUBLIC)
        if signing is not None:
            files.write(signing[0], signing[1], _PUBLIC)
        written = list(files.written)
    return written


def _read_signing_pub(path: Path) -> bytes:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"--signing-pub {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PkiError(f"--signing-pub {path}: not an Ed25519 public key")
    return _pem_public(key)


def _flwr_executable() -> str:
    beside = Path(sys.executable).parent / "flwr"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise PkiError("flwr not found: install the project (pip install -e .) or pass --flwr")
    return found


def register_command(
    pki_dir: Path, site: str, connection: str, flwr: str | None = None, json: bool = False
) -> list[str]:
    """The ``flwr supernode register`` command line for ``site``."""
    _check_site_id(site)
    if not _CONNECTION.match(connection):
        raise PkiError(f"--connection {connection!r}: letters, digits, '_' and '-' only")
    public = pki_dir / SITES_DIR / site / NODE_PUB
    if not public.is_file():
        raise PkiError(f"{public}: no such key; run `add-site --site {site}` first")
    command = [
        flwr or _flwr_executable(),
        "supernode",
        "register",
        str(public),
        connection,
        "--name",
        site,
    ]
    return [*command, "--format", "json"] if json else command


def register(
    pki_dir: Path,
    site: str,
    connection: str,
    flwr: str | None = None,
    flwr_home: Path | None = None,
    json: bool = False,
) -> int:
    """Run ``flwr supernode register`` offline; return its exit code."""
    command = register_command(pki_dir, site, connection, flwr, json)
    env = dict(os.environ)
    env.update(FLWR_OFFLINE_ENV)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    config = Path(env.get("FLWR_HOME") or Path.home() / ".flwr") / "config.toml"
    if not config.is_file():
        raise PkiError(
            f"{config}: no Flower configuration; add the connection first "
            f"(python -m deploy.pki connection --dir {pki_dir} --name {connection} "
            "--address HOST:PORT)"
        )
    return subprocess.run(command, env=env, check=False).returncode


def connection_toml(pki_dir: Path, name: str, address: str) -> str:
    """The ``[superlink.NAME]`` section of ``$FLWR_HOME/config.toml`` (TLS, CA of PKI_DIR)."""
    if not _CONNECTION.match(name):
        raise PkiError(f"--name {name!r}: letters, digits, '_' and '-' only")
    if not re.match(r"^[A-Za-z0-9.\[\]:_-]+:[0-9]{1,5}$", address):
        raise PkiError(f"--address {address!r}: expected HOST:PORT")
    ca = (pki_dir / CA_CERT).resolve()
    if not ca.is_file():
        raise PkiError(f"{ca}: no such file; run `init --dir {pki_dir}` first")
    # Flower 1.42 refuses a relative root-certificates path.
    return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deploy.pki",
        description="Keys and certificates of an outcomebench network (Flower 1.42).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("init", help="network CA, SuperLink certificate, publication key")
    sp.add_argument("--dir", required=True, type=Path, metavar="PKI_DIR")
    sp.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        metavar="H1,H2",
        help="SuperLink host names and IPs for the certificate's SANs (127.0.0.1 and "
        "localhost are always included; default %(default)s)",
    )
    sp.add_argument("--org", default="outcomebench network", help="organisation in the names")

    sp = sub.add_parser(
        "add-site",
        help="a site's SuperNode auth keys; --signing-pub registers its release key",
    )
    sp.add_argument("--dir", required=True, type=Path, metavar="PKI_DIR")
    sp.add_argument("--site", required=True, metavar="SITE_ID")
    sp.add_argument(
        "--signing-pub",
        type=Path,
        default=None,
        metavar="PATH",
        help="the site's Ed25519 release-signing public key (PEM, from `outcomebench-site "
        "pubkey`): copied to PKI_DIR/site-keys/SITE_ID.pub.pem. With existing node "
        "keys, only this is done.",
    )

    sp = sub.add_parser("register", help="flwr supernode register (the site's node key)")
    sp.add_argument("--dir", required=True, type=Path, metavar="PKI_DIR")
    sp.add_argument("--site", required=True, metavar="SITE_ID")
    sp.add_argument(
        "--connection", required=True, metavar="NAME", help="[superlink.NAME] in config.toml"
    )
    sp.add_argument(
        "--flwr-home",
        type=Path,
        default=None,
        metavar="DIR",
        help="Flower's config directory (default: $FLWR_HOME, else ~/.flwr)",
    )
    sp.add_argument("--flwr", default=None, metavar="PATH", help="the flwr executable")
    sp.add_argument("--json", action="store_true", help="flwr's JSON output")

    sp = sub.add_parser("connection", help="print the config.toml section for a SuperLink")
    sp.add_argument("--dir", required=True, type=Path, metavar="PKI_DIR")
    sp.add_argument("--name", required=True, metavar="NAME")
    sp.add_argument("--address", required=True, metavar="HOST:PORT")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    pki_dir: Path = args.dir
    try:
        if args.command == "init":
            for path in init(pki_dir, args.hosts.split(","), args.org):
                print(path)
            cert = x509.load_pem_x509_certificate((pki_dir / SERVER_CERT).read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            print(f"SuperLink certificate names: {', '.join(str(n.value) for n in san)}")
            print(f"Move {pki_dir / CA_KEY} offline once all certificates are issued.")
        elif args.command == "add-site":
            written = add_site(pki_dir, args.site, args.signing_pub)
            for path in written:
                print(path)
            node_pub = pki_dir / SITES_DIR / args.site / NODE_PUB
            if node_pub in written:
                print(f"node key fingerprint: {_ssh_fingerprint(node_pub.read_bytes())}")
            if args.signing_pub is not None:
                key = serialization.load_pem_public_key(written[-1].read_bytes())
                if isinstance(key, Ed25519PublicKey):
                    print(f"signing key SHA-256 (DER): {_spki_sha256(key)}")
        elif args.command == "register":
            return register(
                pki_dir, args.site, args.connection, args.flwr, args.flwr_home, args.json
            )
        else:
            print(connection_toml(pki_dir, args.name, args.address), end="")
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

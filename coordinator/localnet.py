"""A whole network on loopback: SuperLink (TLS, node authentication, a database), one
site agent service and one SuperNode per clinic, and the study run through ``flwr run``.

Every process is started here and stopped here, by PID. Telemetry, update checks and
runtime dependency installation are off in every one of them. Used by the demo, the
whole-network tests and deploy/local.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from coordinator import pki as netpki

__all__ = ["LocalNetwork", "NetworkError", "RunOutcome", "flower_env", "free_port"]

CONNECTION = "outcomebench-local"


class NetworkError(RuntimeError):
    """A daemon did not start, or a run did not finish; the message says which and why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            # Ray (simulation engine) reports usage statistics online unless told not to.
            "RAY_USAGE_STATS_ENABLED": "0",
            # The SuperLink starts `flower-superexec` by name: find it beside this
            # interpreter even when the venv was not activated.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def installed_bin(name: str) -> str:
    """The program installed beside this interpreter, so a venv's own flwr is used."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_flwr(args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float) -> str:
    """``flwr ARGS`` (the CLI), its stdout; NetworkError with the output's tail if it fails."""
    done = subprocess.run(
        [installed_bin("flwr"), *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise NetworkError(
            f"flwr {' '.join(args[:2])} failed ({done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-800:]}"
        )
    return done.stdout


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    handle: TextIO


@dataclass(frozen=True, slots=True)
class RunOutcome:
    run_id: int | None
    status: str  # Flower's real status: e.g. finished:completed, finished:failed
    round: Mapping[str, Any]  # the ServerApp's round record (contributed / missing)
    seconds: float


@dataclass
class LocalNetwork:
    root: Path
    sites: Sequence[Path]  # site.yaml of each clinic (with privacy policies)
    port: int = field(default_factory=free_port)
    procs: list[_Proc] = field(default_factory=list)
    pki_dir: Path | None = None
    sockets: dict[str, Path] = field(default_factory=dict)
    site_ids: list[str] = field(default_factory=list)

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    # -- processes --------------------------------------------------------------------

    def _start(self, name: str, argv: Sequence[str]) -> _Proc:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        handle = log.open("w")
        popen = subprocess.Popen(
            list(argv),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
        )
        proc = _Proc(name=name, popen=popen, log=log, handle=handle)
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process started here (newest first), then SIGKILL stragglers."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                proc.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)
            # Children of a daemon (ServerApp, ClientApp processes) share its session.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.handle.close()
        self.procs.clear()
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Daemons start helpers (ServerApp, SuperExec, Ray workers) in sessions of their
        own; every one inherits our FLWR_HOME, so that finds them. SIGKILL by PID."""
        marker = f"FLWR_HOME={self.flwr_home}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry.name), signal.SIGKILL)

    def kill(self, name: str) -> None:
        """SIGKILL one process (fault tests)."""
        for proc in self.procs:
            if proc.name == name and proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)

    def __enter__(self) -> LocalNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_port(self, port: int, proc: _Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise NetworkError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.2)
        raise NetworkError(f"{proc.name} did not listen on 127.0.0.1:{port}; see {proc.log}")

    def _wait_file(self, path: Path, proc: _Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return
            if proc.popen.poll() is not None:
                raise NetworkError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}")
            time.sleep(0.1)
        raise NetworkError(f"{proc.name} did not create {path}; see {proc.log}")

    # -- the network ------------------------------------------------------------------

    def start(self, *, register: Sequence[str] | None = None) -> None:
        """PKI, site agents, SuperLink, registrations, SuperNodes. ``register`` limits
        which sites get registered (all by default), for tests of unregistered nodes."""
        self.pki_dir = pki = self.root / "pki"
        netpki.init(pki)
        for config in self.sites:
            self.start_agent(config)
        link = self._start(
            "superlink",
            [
                installed_bin("flower-superlink"),
                "--ssl-ca-certfile",
                str(pki / netpki.CA_CERT),
                "--ssl-certfile",
                str(pki / netpki.SERVER_CERT),
                "--ssl-keyfile",
                str(pki / netpki.SERVER_KEY),
                "--enable-supernode-auth",
                "--database",
                str(self.root / "superlink.db"),
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        self._connect(link, f'root-certificates = "{pki / netpki.CA_CERT}"')
        for site_id in self.site_ids:
            netpki.add_site(pki, site_id)
            if register is None or site_id in register:
                public = pki / netpki.SITES_DIR / site_id / netpki.NODE_PUB
                self.flwr(["supernode", "register", str(public), CONNECTION, "--name", site_id])
            self.start_supernode(site_id)

    def start_simulation(self) -> None:
        """A SuperLink in simulation mode (Flower's simulation engine runs the nodes), on
        loopback without TLS: it serves this machine only."""
        link = self._start(
            "superlink-simulation",
            [
                installed_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--database",
                str(self.root / "superlink-simulation.db"),
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        self._connect(link, "insecure = true")

    def _connect(self, link: _Proc, security: str) -> None:
        """Write the flwr CLI's connection to this SuperLink and wait until it listens."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
        )
        self._wait_port(self.port, link)

    def start_agent(self, config: Path) -> None:
        doc = yaml.safe_load(config.read_text())
        site_id = str(doc["site"]["id"])
        sock = self.root / "sockets" / site_id / "agent.sock"
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = self._start(
            f"agent-{site_id}",
            [
                installed_bin("outcomebench-site"),
                *("serve", "--config", str(config), "--socket", str(sock)),
            ],
        )
        self._wait_file(sock, proc)
        self.sockets[site_id] = sock
        if site_id not in self.site_ids:
            self.site_ids.append(site_id)

    def start_supernode(self, site_id: str, *, tls: bool = True) -> _Proc:
        if self.pki_dir is None:
            raise NetworkError("start the network first")
        argv = [
            installed_bin("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key",
            str(self.pki_dir / netpki.SITES_DIR / site_id / netpki.NODE_KEY),
            "--node-config",
            f'agent-socket="{self.sockets[site_id]}" site-id="{site_id}"',
            "--port",
            str(free_port()),
        ]
        argv += (
            ["--root-certificates", str(self.pki_dir / netpki.CA_CERT)] if tls else ["--insecure"]
        )
        return self._start(f"supernode-{site_id}", argv)

    def flwr(self, args: Sequence[str], timeout: float = 120.0) -> str:
        return run_flwr(args, env=self.env, cwd=self.root, timeout=timeout)

    def online_nodes(self) -> int:
        out = json.loads(self.flwr(["supernode", "ls", CONNECTION, "--format", "json"]))
        nodes = out.get("nodes", []) if isinstance(out, dict) else []
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def wait_online(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(NetworkError, ValueError):
                if self.online_nodes() >= n:
                    return
            time.sleep(1.0)
        raise NetworkError(f"fewer than {n} SuperNodes came online within {timeout:g} s")

    def run_study(
        self,
        app_dir: Path,
        run_config: Mapping[str, Any],
        timeout: float = 600.0,
        federation_config: str | None = None,
    ) -> RunOutcome:
        """``flwr run`` the app and wait for Flower's real status (``flwr run`` itself
        reports success even when the ServerApp fails)."""
        start = time.monotonic()
        items = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        extra = ["--federation-config", federation_config] if federation_config else []
        out = self.flwr(
            ["run", str(app_dir), CONNECTION, "--run-config", items, "--format", "json", *extra]
        )
        run_id = _run_id(out)
        status = "unknown"
        while time.monotonic() - start < timeout:
            runs = json.loads(
                self.flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"])
            )
            status = _status(runs, run_id)
            if status.startswith("finished"):
                break
            time.sleep(1.0)
        else:
            raise NetworkError(f"run {run_id} did not finish within {timeout:g} s")
        # Keep the run's own log (ServerApp output) beside the daemons' logs.
        with contextlib.suppress(NetworkError, subprocess.TimeoutExpired):
            log = self.flwr(["log", str(run_id), CONNECTION, "--show"], timeout=30)
            (self.root / "logs" / f"run-{run_id}.log").write_text(log)
        out_dir = Path(str(run_config["out"]))
        record_path = Path(f"{out_dir}.round.json")
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        return RunOutcome(
            run_id=run_id, status=status, round=record, seconds=time.monotonic() - start
        )


def _run_id(out: str) -> int:
    try:
        doc = json.loads(out)
        return int(doc["run-id"] if "run-id" in doc else doc["run_id"])
    except (ValueError, KeyError, TypeError):
        raise NetworkError(f"flwr run gave no run id: {out[-400:]}") from None


def _status(runs: Any, run_id: int) -> str:
    for run in runs.get("runs", []) if isinstance(runs, dict) else []:
        if int(run.get("run-id", run.get("run_id", -1))) == run_id:
            return str(run.get("status", "unknown"))
    return "unknown"


@contextlib.contextmanager
def network(root: Path, sites: Sequence[Path]) -> Iterator[LocalNetwork]:
    net = LocalNetwork(root=root, sites=sites)
    try:
        net.start()
        yield net
    finally:
        net.stop()

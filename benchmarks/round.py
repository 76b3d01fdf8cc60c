"""Benchmark: one study round over Flower, against Flower's own minimal query app.

Deployment engine (loopback, TLS + node authentication), for each ``--sites`` N: one
``coordinator.localnet.LocalNetwork`` with N synthetic clinics (small: ``--clients``
100-300 clients each, so the sites' data work is small), and once all N SuperNodes are
online, on that same network, ``--repeat`` R timed runs (after ``--warmup`` untimed ones)
of each of, interleaved:

- ``minimal``: ``benchmarks/minimal_query_app`` with ``grid.send_and_receive`` (Flower's
  own loop, which polls every 3 s in deployment): one ``query`` message to every node,
  the ClientApp replies at once. This is the baseline of the target.
- ``minimal-0.5``: the same app pushing and pulling every 0.5 s, as our ServerApp does
  (a stricter baseline: same polling, nothing else of ours).
- ``ours-fresh``: the project's app (``coordinator.demo.app_dir()``: our ServerApp, the
  bridge ClientApp, the site agents), each run a new study id, so every site computes
  and signs a fresh release.
- ``ours-cached``: the study of the latest fresh run again (new bundle directory): the
  sites answer from their ledger's release cache.

Per run: ``wall`` is from just before ``flwr run`` until the run's finished status is
seen (polled every 0.2 s in-process over Flower's Control API, the call ``flwr ls``
makes; the CLI itself takes seconds per call); ``submit`` is the ``flwr run`` CLI alone
(FAB build + upload); ``queue`` and ``app`` are the SuperLink's own timestamps
(pending -> running: the ServerApp being spawned; running -> finished); ``round`` is
measured inside the ServerApp (``duration_s`` of ``<out>.round.json``, or of the minimal
app's record); ``peak`` is the largest sum of RSS over every process this script started
(daemons, ServerApp and ClientApp processes), sampled every 0.3 s during the run. The
verdict: median wall of ``ours-fresh`` / median wall of ``minimal``, target at most 1.3.

Simulation engine (``--sim-nodes``, default 200): a simulation SuperLink started here
exactly as ``flwr run . local`` would start it (same argv, on free ports via
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``, so this script
owns its PID), then ``flwr run APP local --federation-config num-supernodes=200``:

- the minimal query app, R runs: wall time and peak RSS / PSS summed over the process
  tree (SuperLink, SuperExec, flwr-simulation, Ray's GCS, raylet and workers);
- if ``coordinator.demo.simulation_app_dir`` and ``site_agent.simulated`` exist (the
  simulation ClientApp that answers from synthetic clinics in-process, without site
  agents), our ServerApp with it, one run with a fresh study (``--skip-sim-ours`` skips).

Every process is stopped by PID at the end (also on errors): LocalNetwork.stop for the
network; the simulation SuperLink by SIGTERM, then anything this script saw in its
process tree that is still alive (same PID and start time) by SIGKILL. The exit status
is 0 whether the target passes or not, non-zero on errors (a run not completed counts).

Usage::

    python benchmarks/round.py                         # 3 and 10 sites, R=3, 200 nodes
    python benchmarks/round.py --sites 3 --repeat 1 --skip-simulation   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import yaml

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray reports usage to its servers unless told not to
}
os.environ.update(QUIET_ENV)

# The Flower CLI internals and the project are imported after the environment is quiet.
from flwr.cli.flower_config import read_superlink_connection  # noqa: E402
from flwr.cli.utils import init_http_client_from_connection  # noqa: E402
from flwr.common.serde import run_from_proto  # noqa: E402
from flwr.proto.control_pb2 import ListRunsRequest  # noqa: E402

from coordinator import crypto as coord_crypto  # noqa: E402
from coordinator import demo  # noqa: E402
from coordinator.localnet import (  # noqa: E402
    CONNECTION,
    LocalNetwork,
    free_port,
    installed_bin,
    run_flwr,
)
from coordinator.pki import NETWORK_KEY, SITE_KEYS_DIR  # noqa: E402
from site_agent import crypto as site_crypto  # noqa: E402
from site_agent.config import load_site_config  # noqa: E402
from site_agent.privacy import load_engine  # noqa: E402

TARGET_RATIO = 1.3
MINIMAL_APP = Path(__file__).resolve().parent / "minimal_query_app"
SIM_CONNECTION = "local"
SIM_CONTROL = "bench-control"
POLL_S = 0.2
SAMPLE_S = 0.3
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024

VARIANTS = {
    "minimal": "Flower minimal query app, send_and_receive (3 s poll)",
    "minimal-0.5": "Flower minimal query app, push/pull every 0.5 s",
    "ours-fresh": "outcomebench round, fresh study (sites compute + sign)",
    "ours-cached": "outcomebench round, same study again (cached releases)",
}


class BenchError(RuntimeError):
    pass


# -- processes: the tree this script started, its memory, its clean-up ----------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time in clock ticks) for every live (not zombie) process."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if fields[0] not in {"Z", "X"}:
            table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(table: Mapping[int, tuple[int, int]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _name(pid: int) -> str:
    """The program a process runs, e.g. flower-superexec or raylet."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode(errors="replace")).name for a in argv[:2] if a]
    if len(words) == 2 and words[0].startswith("python"):
        return words[1]
    return words[0] if words else "?"


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


class TreeSampler:
    """Samples every process descended from this script (not the script itself): the
    sum of RSS (what was asked for; shared pages count once per process) and of PSS
    (shared pages split between processes). Remembers every PID it saw, with its start
    time, so that stragglers can be stopped by PID."""

    def __init__(self, interval: float = SAMPLE_S) -> None:
        self.interval = interval
        self.seen: dict[int, int] = {}
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.last_rss = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        table = _proc_table()
        pids = _descendants(table, os.getpid())
        rss = sum(_rss(p) for p in pids)
        pss = sum(_pss(p) for p in pids)
        with self._lock:
            for pid in pids:
                self.seen[pid] = table[pid][1]
            self.last_rss = rss
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)

    def reset(self) -> None:
        with self._lock:
            self.peak_rss = self.peak_pss = self.peak_procs = 0

    def peaks(self) -> tuple[float, float, int]:
        with contextlib.suppress(Exception):
            self.sample()
        with self._lock:
            return self.peak_rss / MIB, self.peak_pss / MIB, self.peak_procs

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sweep(self) -> list[str]:
        """SIGKILL every process seen here that still runs (same PID and start time):
        stragglers whose parents were stopped. Returns "PID name" of each."""
        table = _proc_table()
        killed = []
        for pid, started in sorted(self.seen.items()):
            if pid != os.getpid() and table.get(pid, (0, -1))[1] == started:
                name = _name(pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(f"{pid} {name}")
        return killed

    def alive(self) -> list[int]:
        table = _proc_table()
        return [p for p, s in self.seen.items() if table.get(p, (0, -1))[1] == s]


# -- Flower's Control API in-process (what `flwr ls` calls) -----------------------------


class Control:
    """Run status and timestamps from the SuperLink, without a CLI process per poll."""

    def __init__(self, flwr_home: Path, connection: str, extra_env: Mapping[str, str]) -> None:
        os.environ["FLWR_HOME"] = str(flwr_home)
        os.environ.update(extra_env)
        with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ..."
            self.client = init_http_client_from_connection(read_superlink_connection(connection))

    def run(self, run_id: int) -> Any:
        res = self.client.ListRuns(ListRunsRequest(run_id=run_id))
        if run_id not in res.run_dict:
            raise BenchError(f"run {run_id} unknown to the SuperLink")
        return run_from_proto(res.run_dict[run_id])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _status(run: Any) -> str:
    sub = run.status.sub_status
    return f"{run.status.status}:{sub}" if sub else str(run.status.status)


def _span(a: str, b: str) -> float:
    if not a or not b:
        return math.nan
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


# -- one timed run -------------------------------------------------------------------------


@dataclass
class RunResult:
    engine: str
    nodes: int
    variant: str
    label: str  # "w1" for warm-up runs, "1".."R" for measured ones
    run_id: int | None = None
    status: str = "not run"
    ok: bool = False
    wall_s: float = math.nan
    submit_s: float = math.nan
    queue_s: float = math.nan
    app_s: float = math.nan
    round_s: float = math.nan
    peak_rss_mib: float = math.nan
    peak_pss_mib: float = math.nan
    procs: int = 0
    load: float = math.nan  # the machine's 1-minute load average when the run finished
    note: str = ""

    @property
    def warmup(self) -> bool:
        return self.label.startswith("w")


def timed_run(
    result: RunResult,
    flwr: Callable[[Sequence[str]], str],
    control: Control,
    sampler: TreeSampler,
    app: Path,
    connection: str,
    config: Mapping[str, Any],
    record: Path,
    check: Callable[[Mapping[str, Any]], str],
    extra: Sequence[str] = (),
    timeout: float = 900.0,
) -> RunResult:
    """``flwr run`` the app, wait for its finished status, fill ``result`` in."""
    items = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
    sampler.reset()
    start = time.monotonic()
    out = flwr(["run", str(app), connection, "--run-config", items, "--format", "json", *extra])
    result.submit_s = time.monotonic() - start
    try:
        doc = json.loads(out)
        result.run_id = int(doc["run-id"])
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"flwr run gave no run id: {out[-400:]}") from None
    while True:
        run = control.run(result.run_id)
        result.status = _status(run)
        if result.status.startswith("finished"):
            result.wall_s = time.monotonic() - start
            break
        if time.monotonic() - start > timeout:
            result.note = f"not finished after {timeout:g} s"
            return result
        time.sleep(POLL_S)
    result.load = os.getloadavg()[0]
    result.peak_rss_mib, result.peak_pss_mib, result.procs = sampler.peaks()
    result.queue_s = _span(run.pending_at, run.running_at)
    result.app_s = _span(run.running_at, run.finished_at)
    doc = json.loads(record.read_text()) if record.is_file() else {}
    result.round_s = float(doc.get("duration_s", math.nan))
    problem = check(doc)
    result.ok = result.status == "finished:completed" and not problem
    result.note = problem
    return result


def _check_ours(n: int) -> Callable[[Mapping[str, Any]], str]:
    def check(doc: Mapping[str, Any]) -> str:
        if not doc:
            return "no round record"
        got = len(doc.get("contributed", []))
        if not doc.get("published") or got != n:
            reasons = "; ".join(f"{m['source']}: {m['reason']}" for m in doc["missing"][:3])
            return f"{got}/{n} contributed, published={doc.get('published')} {reasons}"
        return ""

    return check


def _check_minimal(n: int) -> Callable[[Mapping[str, Any]], str]:
    def check(doc: Mapping[str, Any]) -> str:
        if not doc:
            return "no round record"
        good = int(doc.get("replies", 0)) - int(doc.get("errors", 0))
        return "" if good == n == int(doc.get("asked", -1)) else f"{good}/{n} replies"

    return check


# -- sites -----------------------------------------------------------------------------------


def make_sites(root: Path, n: int, seed: int, clients: tuple[int, int]) -> list[Path]:
    """The demo's clinics, small and with a budget large enough for every run of the
    benchmark (the demo's allows 4 studies)."""
    return demo.prepare_sites(root, n, seed, clients=clients, budget_rho=1000.0)


def site_keys_inprocess(configs: Iterable[Path], keys_dir: Path) -> None:
    """What ``outcomebench-site pubkey`` + demo.register_signing_keys do, in this process
    (200 CLI processes would take minutes)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    for config in configs:
        cfg = load_site_config(config)
        if cfg.privacy_policy is None:
            raise BenchError(f"{config}: no privacy policy")
        key = load_engine(config).signing_key()  # as `pubkey`: creates a fresh site's ledger
        (keys_dir / f"{cfg.site_id}.pub.pem").write_text(site_crypto.public_pem(key))


def new_study(directory: Path, n: int, study_id: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = demo.write_study(directory, n)
    doc = yaml.safe_load(path.read_text())
    doc["study"]["id"] = study_id
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# -- deployment engine -----------------------------------------------------------------------


@dataclass
class Section:
    title: str
    info: list[str] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    error: str = ""


def _save_run_log(flwr: Callable[..., str], run_id: int | None, conn: str, logs: Path) -> None:
    if run_id is None:
        return
    with contextlib.suppress(Exception):
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"run-{run_id}.log").write_text(flwr(["log", str(run_id), conn, "--show"]))


def deployment(n: int, args: argparse.Namespace, work: Path) -> Section:
    sec = Section(f"deployment engine, {n} sites (loopback, TLS + node authentication)")
    root = work / f"deploy-{n}"
    configs = make_sites(root, n, args.seed, args.clients)
    net = LocalNetwork(root=root / "network", sites=configs)
    sampler = TreeSampler()
    control: Control | None = None
    try:
        t0 = time.monotonic()
        net.start()
        pki = net.root / "pki"
        demo.register_signing_keys(configs, pki / SITE_KEYS_DIR)
        net.wait_online(n, timeout=120 + 10 * n)
        sec.info.append(f"network up, {n}/{n} SuperNodes online in {time.monotonic() - t0:.1f} s")
        sampler.start()
        time.sleep(2.0)
        sampler.reset()
        idle = sampler.peaks()[0]
        sec.info.append(
            f"idle: {idle:.0f} MiB RSS summed over {sampler.peak_procs} processes "
            f"(SuperLink, {n} SuperNodes, {n} site agents)"
        )
        control = Control(net.flwr_home, CONNECTION, {})
        ours = demo.app_dir()
        latest_study: Path | None = None
        labels = [f"w{i + 1}" for i in range(args.warmup)] + [
            str(i + 1) for i in range(args.repeat)
        ]
        for label in labels:
            for variant in VARIANTS:
                res = RunResult("deployment", n, variant, label)
                sec.runs.append(res)
                run_dir = root / "runs" / f"{variant}-{label}"
                if variant.startswith("minimal"):
                    record = run_dir / "minimal.json"
                    config: dict[str, Any] = {
                        "timeout": 120.0,
                        "min-nodes": n,
                        "wait-timeout": 60.0,
                        "poll-s": 0.5 if variant == "minimal-0.5" else 0.0,
                        "out": str(record),
                    }
                    app, check = MINIMAL_APP, _check_minimal(n)
                else:
                    if variant == "ours-fresh" or latest_study is None:
                        latest_study = new_study(run_dir, n, f"bench-n{n}-{label}")
                    bundle = run_dir / "bundle"
                    record = Path(f"{bundle}.round.json")
                    config = {
                        "study": str(latest_study),
                        "keys": str(pki / SITE_KEYS_DIR),
                        "out": str(bundle),
                        "signing-key": str(pki / NETWORK_KEY),
                        "timeout": 120.0,
                        "wait-for-nodes": n,
                        "wait-timeout": 60.0,
                    }
                    app, check = ours, _check_ours(n)
                timed_run(res, net.flwr, control, sampler, app, CONNECTION, config, record, check)
                print(_row(res), file=sys.stderr, flush=True)
                if not res.ok:
                    _save_run_log(net.flwr, res.run_id, CONNECTION, net.root / "logs")
    except Exception as exc:
        sec.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if control is not None:
            control.close()
        sampler.stop()
        net.stop()
        _sweep(sec, sampler, "stopped the network's processes by PID (LocalNetwork.stop)")
    return sec


def _sweep(sec: Section, sampler: TreeSampler, what: str) -> None:
    """After the daemons were stopped: kill by PID what they left behind, and check."""
    time.sleep(1.0)
    killed = sampler.sweep()
    deadline = time.monotonic() + 10
    while (left := sampler.alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    sec.info.append(
        f"{what}; {len(killed)} straggler(s) then killed by PID"
        + (f" {killed}" if killed else "")
        + (f"; STILL RUNNING: {left}" if left else "; nothing left running")
    )
    if left:
        sec.error = sec.error or f"processes left running: {left}"


# -- simulation engine -----------------------------------------------------------------------


class SimLink:
    """A simulation SuperLink started as ``flwr run . local`` starts one (argv from
    flwr/cli/local_superlink.py), but by this script, on free ports, so it owns the PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.http_port = free_port()
        self.control_port = free_port()
        # Ray's Unix socket paths must stay under 107 bytes: a short directory of its own.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="obr-ray-", dir="/tmp"))
        self.extra_env = {
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "RAY_TMPDIR": str(self.ray_tmp),
        }
        self.env = {
            **os.environ,
            **QUIET_ENV,
            **self.extra_env,
            "FLWR_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }
        self.popen: subprocess.Popen[bytes] | None = None
        self.log = root / "superlink.log"

    def start(self, timeout: float = 60.0) -> float:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SIM_CONNECTION}"\n\n'
            f'[superlink.{SIM_CONNECTION}]\naddress = ":local:"\n\n'
            # For this script's own Control API client: the CLI resolves ":local:" from
            # the port environment variables, but flwr.cli.constant read them at import.
            f'[superlink.{SIM_CONTROL}]\naddress = "127.0.0.1:{self.http_port}"\n'
            "insecure = true\n"
        )
        db = self.home / "local-superlink" / "state.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            installed_bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.http_port),
            "--database",
            str(db),
            "--disable-runtime-dependency-installation",
        ]
        t0 = time.monotonic()
        with self.log.open("w") as log:
            self.popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.root,
                start_new_session=True,
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.monotonic() - t0 < timeout:
            if self.popen.poll() is not None:
                raise BenchError(f"simulation SuperLink exited; see {self.log}")
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.http_port}/health"
                with opener.open(url, timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            time.sleep(0.2)
        raise BenchError(f"simulation SuperLink not healthy within {timeout:g} s")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def flwr(self, args: Sequence[str], timeout: float = 300.0) -> str:
        if not self.alive():  # else `flwr ... local` would start a SuperLink of its own
            raise BenchError("the simulation SuperLink is not running")
        return run_flwr(args, env=self.env, cwd=self.root, timeout=timeout)

    def stop(self, grace: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _simulation_app(root: Path) -> tuple[Path | None, str]:
    """Our ServerApp + the simulation ClientApp, if the project has one yet."""
    maker = getattr(demo, "simulation_app_dir", None)
    if maker is None:
        return None, "coordinator.demo.simulation_app_dir is missing"
    try:
        importlib.import_module("site_agent.simulated")
    except ImportError as exc:
        return None, f"site_agent.simulated cannot be imported ({exc})"
    return Path(maker(root)), ""


def simulation(nodes: int, args: argparse.Namespace, work: Path) -> Section:
    sec = Section(f"simulation engine, {nodes} virtual nodes (Ray backend)")
    root = work / f"sim-{nodes}"
    root.mkdir(parents=True, exist_ok=True)
    link = SimLink(root)
    sampler = TreeSampler()
    control: Control | None = None
    extra = ["--federation-config", f"num-supernodes={nodes}"]
    try:
        sampler.start()
        up = link.start()
        time.sleep(1.0)
        idle = sampler.peaks()[0]
        sec.info.append(
            f"simulation SuperLink healthy in {up:.1f} s (flwr run . local would start it "
            f"the same way); idle {idle:.0f} MiB RSS"
        )
        control = Control(link.home, SIM_CONTROL, link.extra_env)
        for i in range(args.repeat):
            res = RunResult("simulation", nodes, "minimal", str(i + 1))
            sec.runs.append(res)
            record = root / "runs" / f"minimal-{i + 1}.json"
            config = {
                "timeout": 600.0,
                "min-nodes": nodes,
                "wait-timeout": 120.0,
                "poll-s": 0.0,
                "out": str(record),
            }
            timed_run(
                res,
                link.flwr,
                control,
                sampler,
                MINIMAL_APP,
                SIM_CONNECTION,
                config,
                record,
                _check_minimal(nodes),
                extra,
            )
            print(_row(res), file=sys.stderr, flush=True)
            if not res.ok:
                _save_run_log(link.flwr, res.run_id, SIM_CONNECTION, root / "logs")
        app, why = (
            (None, "skipped (--skip-sim-ours)") if args.skip_sim_ours else (_simulation_app(root))
        )
        if app is None:
            sec.info.append(f"our ServerApp on the simulation engine: not measured: {why}")
        else:
            t0 = time.monotonic()
            configs = make_sites(root, nodes, args.seed, args.clients)
            site_keys_inprocess(configs, root / "keys")
            coord_crypto.generate_keypair(root / "pki", "network")
            sec.info.append(
                f"{nodes} synthetic clinics + their signing keys prepared in "
                f"{time.monotonic() - t0:.1f} s (not timed below)"
            )
            res = RunResult("simulation", nodes, "ours-fresh", "1")
            sec.runs.append(res)
            bundle = root / "runs" / "ours-1" / "bundle"
            config = {
                "study": str(new_study(root / "runs" / "ours-1", nodes, f"bench-sim{nodes}")),
                "keys": str(root / "keys"),
                "out": str(bundle),
                "signing-key": str(root / "pki" / NETWORK_KEY),
                "timeout": 1800.0,
                "wait-for-nodes": nodes,
                "wait-timeout": 120.0,
                "sim-sites": str(root / "sites"),
            }
            timed_run(
                res,
                link.flwr,
                control,
                sampler,
                app,
                SIM_CONNECTION,
                config,
                Path(f"{bundle}.round.json"),
                _check_ours(nodes),
                extra,
                timeout=2400,
            )
            print(_row(res), file=sys.stderr, flush=True)
            if not res.ok:
                _save_run_log(link.flwr, res.run_id, SIM_CONNECTION, root / "logs")
    except Exception as exc:
        sec.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if control is not None:
            control.close()
        sampler.stop()
        link.stop()
        pid = link.popen.pid if link.popen else "-"
        _sweep(sec, sampler, f"stopped the simulation SuperLink (PID {pid}) by SIGTERM")
        link.cleanup()
    return sec


# -- report ----------------------------------------------------------------------------------


def _f(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


HEADER = (
    f"{'engine':<10} {'N':>4} {'variant':<12} {'run':>3} {'wall s':>7} {'submit':>6} "
    f"{'queue':>6} {'app s':>6} {'round':>6} {'peak RSS':>9} {'PSS':>6} {'procs':>5} "
    f"{'load':>5}  status"
)


def _row(r: RunResult) -> str:
    status = (
        r.status
        + ("" if r.ok or r.status == "not run" else " !")
        + (f" ({r.note})" if r.note else "")
    )
    return (
        f"{r.engine:<10} {r.nodes:>4} {r.variant:<12} {r.label:>3} {_f(r.wall_s):>7} "
        f"{_f(r.submit_s):>6} {_f(r.queue_s):>6} {_f(r.app_s):>6} {_f(r.round_s):>6} "
        f"{_f(r.peak_rss_mib, 0):>9} {_f(r.peak_pss_mib, 0):>6} {r.procs:>5} {_f(r.load):>5}  "
        f"{status}"
    )


def _median(runs: Sequence[RunResult], attr: str) -> float:
    vals = [getattr(r, attr) for r in runs if r.ok and not r.warmup]
    return statistics.median(vals) if vals else math.nan


def report(sections: Sequence[Section], args: argparse.Namespace) -> bool:
    ok = True
    print()
    print("=" * 100)
    print(
        f"round latency benchmark  (flwr {importlib.metadata.version('flwr')}, "
        f"{os.cpu_count()} cores, load avg {args.load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; "
        f"clinics of {args.clients[0]}-{args.clients[1]} clients; R={args.repeat}, "
        f"warm-up {args.warmup})"
    )
    print(
        "wall: flwr run -> finished status seen (0.2 s poll); submit: the flwr run CLI; "
        "queue/app: SuperLink pending->running->finished; round: inside the ServerApp; "
        "peak RSS/PSS: MiB summed over every process started here; load: 1-min load average"
    )
    for sec in sections:
        print()
        print(f"## {sec.title}")
        for line in sec.info:
            print(f"   {line}")
        if sec.runs:
            print(HEADER)
            for r in sec.runs:
                print(_row(r))
        if any(not r.ok for r in sec.runs):
            ok = False
        if sec.error:
            ok = False
            print(f"   ERROR: {sec.error}")
        measured = [r for r in sec.runs if not r.warmup]
        if not measured:
            continue
        print()
        print(
            f"   {'variant':<12} {'median wall':>11} {'median app':>10} {'median round':>12} "
            f"{'max peak RSS':>12}  what"
        )
        by: dict[str, list[RunResult]] = {}
        for r in measured:
            by.setdefault(r.variant, []).append(r)
        for variant, runs in by.items():
            peaks = [r.peak_rss_mib for r in runs if r.ok]
            print(
                f"   {variant:<12} {_f(_median(runs, 'wall_s')):>11} "
                f"{_f(_median(runs, 'app_s')):>10} {_f(_median(runs, 'round_s'), 2):>12} "
                f"{_f(max(peaks) if peaks else math.nan, 0):>12}  "
                f"{VARIANTS.get(variant, variant)}"
            )
        if "ours-fresh" in by and "minimal" in by and sec.runs[0].engine == "deployment":
            print()
            for variant, against in (
                ("ours-fresh", "minimal"),
                ("ours-fresh", "minimal-0.5"),
                ("ours-cached", "minimal"),
            ):
                a, b = (
                    _median(by.get(variant, []), "wall_s"),
                    _median(by.get(against, []), "wall_s"),
                )
                ratio = a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
                verdict = (
                    "-" if math.isnan(ratio) else ("PASS" if ratio <= TARGET_RATIO else "FAIL")
                )
                target = " (the target)" if (variant, against) == ("ours-fresh", "minimal") else ""
                print(
                    f"   ratio {variant} / {against}: {_f(ratio, 2)}x  {verdict} vs "
                    f"{TARGET_RATIO}x{target}"
                )
    print()
    return ok


def _clients(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", default="3,10", help="site counts for the deployment engine")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per variant (R)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--clients", type=_clients, default=(100, 300), help="clinic size range")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sim-nodes", type=int, default=200)
    p.add_argument("--skip-simulation", action="store_true")
    p.add_argument(
        "--skip-sim-ours", action="store_true", help="only the minimal app on the simulation engine"
    )
    p.add_argument("--skip-deployment", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/outcomebench-bench"))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    sites = [int(s) for s in args.sites.split(",") if s.strip()]
    args.load_start = os.getloadavg()[0]
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="round-", dir=args.workdir))
    print(f"work directory {work}", file=sys.stderr)
    print(HEADER, file=sys.stderr)
    plan: list[tuple[str, Callable[[], Section]]] = []
    if not args.skip_deployment:
        plan += [(f"deployment, {n} sites", partial(deployment, n, args, work)) for n in sites]
    if not args.skip_simulation:
        plan.append(
            (f"simulation, {args.sim_nodes} nodes", partial(simulation, args.sim_nodes, args, work))
        )
    sections: list[Section] = []
    try:
        for title, measure in plan:
            try:
                sections.append(measure())
            except Exception as exc:  # set-up failed before any process was started
                traceback.print_exc()
                sections.append(Section(title, error=f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sections.append(Section("interrupted", error="KeyboardInterrupt"))
    ok = report(sections, args)
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and files kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

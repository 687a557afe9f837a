"""The job runner against a real two-node Ray cluster on this machine: `ray start --head` + `ray start --address`.

Each node is its own `ray start --block` process (own raylet, object store, agents and temp dir, one CPU); the
driver is this process. Everything binds to and talks over loopback only:

* Ray rewrites 127.0.0.1 to the machine's routable address (`--node-ip-address` and `--address` alike) unless
  it runs in its single-host mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with node IP 127.0.0.1 the GCS, raylets
  and agents then listen on 127.0.0.1 only. `ray start --address` refuses to run in that mode, so the second node
  starts through `ray start`'s own entry point with only that guard lifted (`_WORKER_NODE_START`).
* Ray 2.60 enables token auth when ~/.ray/auth_token exists (any earlier local `ray.init()` writes one), but only
  for `ray start --head` and address-less `ray.init()`: the second node and `ray.init(address=...)` stay in
  'disabled' mode and are refused (InvalidAuthToken). Every process here gets RAY_AUTH_MODE=token and its own
  RAY_AUTH_TOKEN (which takes precedence); the shared ~/.ray/auth_token is neither used nor written.
* Every process of the cluster inherits a unique tag in its environment: teardown stops the two `ray start`
  processes and then kills whatever still carries the tag, never another session's Ray (`ray stop` would).
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TAG_VAR = "STLLM_TEST_RAY_CLUSTER"
OBJECT_STORE_BYTES = 200 * 1024 * 1024
N_GOOD = 4

pytestmark = pytest.mark.timeout(300)

# `ray start`, minus its refusal to add a node in single-host mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): only
# the CLI module sees the flag on; address resolution (ray._private.services) keeps 127.0.0.1 as it is.
_WORKER_NODE_START = """\
import sys, types
import ray._private.ray_constants as constants
from ray.scripts import scripts
scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), "ENABLE_RAY_CLUSTER": True})
sys.exit(scripts.main())
"""


# ---------------------------------------------------------------- processes and sockets, from /proc


def _tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries our tag (the cluster's processes and their workers)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _inet_sockets() -> dict[int, tuple[str, str, str]]:
    """inode -> (state, local address, remote address) for every TCP socket (IPv4 and IPv6)."""

    def addr(text: str) -> str:
        host, port = text.split(":")
        raw = bytes.fromhex(host)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc prints 32-bit host order
        ip = ipaddress.ip_address(raw)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        return f"{ip}:{int(port, 16)}"

    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[int(f[9])] = (f[3], addr(f[1]), addr(f[2]))
    return out


def _tcp_sockets(pids: list[int]) -> list[tuple[int, str, str, str]]:
    """(pid, state, local, remote) of the listening and connected TCP sockets of `pids`."""
    sockets, found = _inet_sockets(), []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                state, local, remote = sockets.get(int(link[8:-1]), ("", "", ""))
                if state in ("0A", "01"):
                    found.append((pid, "listen" if state == "0A" else "connected", local, remote))
    return found


def _off_loopback(sockets: list[tuple[int, str, str, str]]) -> list[str]:
    def loopback(address: str) -> bool:
        return ipaddress.ip_address(address.rsplit(":", 1)[0]).is_loopback

    return [f"pid {pid} ({_comm(pid)}) {state} {local} {remote if state == 'connected' else ''}"
            for pid, state, local, remote in sockets
            if not loopback(local) or (state == "connected" and not loopback(remote))]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
    except OSError:
        return "?"


# ---------------------------------------------------------------- the cluster


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports below 50000 that no TCP socket on this machine uses, on any address."""
    used = {int(local.rsplit(":", 1)[1]) for _, local, _ in _inet_sockets().values()}
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(20000, 50000)
        if port in used or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _node_ports(ports: list[int]) -> list[str]:
    """Every fixed port of a node (the defaults, e.g. 52365, would clash with other sessions' Ray)."""
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
             "dashboard-agent-listen-port", "runtime-env-agent-port"]
    # Worker ports 0: each worker gets a free port from the OS instead of the shared 10002-19999 range.
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)] + [
        "--min-worker-port=0", "--max-worker-port=0"]


class TwoNodeCluster:
    """`ray start --head` and a second `ray start --address` on 127.0.0.1, one CPU each."""

    def __init__(self) -> None:
        # Short: Unix socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.tag = uuid.uuid4().hex
        self.token = secrets.token_hex(32)
        self.procs: list[subprocess.Popen[bytes]] = []
        ports = _free_ports(16)
        self.gcs_port = ports[0]
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-host mode: node IP 127.0.0.1, servers bind it only
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM stops a node now, not after a 30 s drain
            "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOSCALER_METRIC_PORT": str(ports[1]),  # default 44217, shared by every session's head
            TAG_VAR: self.tag,
        })
        self.head_args = [
            "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={ports[2]}",
            f"--dashboard-port={ports[3]}", "--include-dashboard=false", *_node_ports(ports[4:10]),
        ]
        self.worker_args = [f"--address={self.address}", *_node_ports(ports[10:16])]

    def _start(self, name: str, launcher: list[str], args: list[str]) -> None:
        cmd = [*launcher, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE_BYTES}", f"--temp-dir={self.root / name}",
               "--disable-usage-stats", *args]
        with (self.root / f"{name}.log").open("wb") as log:
            self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.root, stdout=log,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True))

    def start(self, timeout_s: float = 90.0) -> None:
        # The venv's `ray` (sys.executable's neighbour): workers then run the venv's Python and find the project.
        self._start("head", [str(Path(sys.executable).with_name("ray"))], self.head_args)
        self.wait_nodes(1, timeout_s)
        self._start("worker", [sys.executable, "-c", _WORKER_NODE_START], self.worker_args)
        self.wait_nodes(2, timeout_s)

    def alive_nodes(self) -> list[str]:
        """Hex ids of the nodes the GCS lists as alive (asked directly: this process need not be connected)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        info = GcsClient(address=self.address).get_all_node_info(timeout=5)
        return [node_id.hex() for node_id, n in info.items() if n.state == GcsNodeInfo.GcsNodeState.ALIVE]

    def wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    pytest.fail(f"`ray start` exited with {p.returncode}\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1):
                    pass  # the GCS listens: a client will not sit out its 5 s connect timeout
                if len(self.alive_nodes()) >= n:
                    return
            except Exception:  # noqa: BLE001 — not up yet
                pass
            time.sleep(0.5)
        pytest.fail(f"the cluster did not reach {n} alive nodes in {timeout_s:.0f} s\n{self.logs()}")

    def node_logs(self, name: str) -> Path:
        return self.root / name / "session_latest" / "logs"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")))

    def stop(self) -> tuple[list[str], list[str]]:
        """Stop both nodes, worker first: SIGTERM to each `ray start --block`, which stops its node's processes.

        Returns the tagged processes that outlived their node by 10 s (then killed) and any that survive even
        SIGKILL — the second list must be empty.
        """
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()  # its children share its fate (Ray sets PR_SET_PDEATHSIG); the sweep below catches the rest
                p.wait(10)
        killed = self._wait_untagged(10.0)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"{pid} {_comm(pid)}" for pid in killed], [f"{pid} {_comm(pid)}" for pid in self._wait_untagged(10)]

    def _wait_untagged(self, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while (pids := _tagged_pids(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return pids


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoNodeCluster]:
    """A running two-node cluster, this process set up as its driver (token, loopback); all gone afterwards."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    def reset_auth() -> None:  # the auth mode and token are cached in-process; Ray's own test helpers do this
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    ray.shutdown()  # run_job connects only when Ray is not initialised
    cluster = TwoNodeCluster()
    # RAY_USAGE_STATS_ENABLED=0 also keeps Ray Data from polling Prometheus (localhost:9090) from a thread
    # that outlives the test.
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, cluster.env[key])
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # The same single-host mode for the driver (the flag is read at import): without it, ray.init rewrites
    # address="127.0.0.1:<port>" to the machine's routable address, where nothing listens.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    reset_auth()
    try:
        cluster.start()
        yield cluster
    finally:
        ray.shutdown()
        killed, alive = cluster.stop()
        monkeypatch.undo()
        reset_auth()
        if killed:
            print("processes killed after outliving their node:", *killed, sep="\n  ")
        if not alive:
            shutil.rmtree(cluster.root, ignore_errors=True)
    assert not alive, f"Ray processes left running (logs in {cluster.root}):\n" + "\n".join(alive)


def _task_names(logs: Path) -> set[str]:
    """Names of the tasks and actors whose workers ran on one node (the markers Ray writes to worker logs)."""
    names = set()
    for f in logs.glob("worker-*"):
        for line in f.read_text(errors="replace").splitlines():
            for prefix in (":task_name:", ":actor_name:"):
                if line.startswith(prefix):
                    names.add(line[len(prefix):].strip())
    return names


def test_run_job_on_two_node_cluster(ray_cluster: TwoNodeCluster, tmp_path: Path) -> None:
    import ray

    from pipeline.demo.clips import make_corrupt_video, make_test_video
    from pipeline.jobs import load_job
    from pipeline.runner import run_job
    from pipeline.store.files import read_parquet

    clips = tmp_path / "clips"
    clips.mkdir()
    good = [make_test_video(clips / f"clip{i}.mp4", "h264", seed=i) for i in range(N_GOOD)]
    bad = make_corrupt_video(clips / "corrupt.mp4", "random")
    out = tmp_path / "out"
    job = load_job(None, [
        f"source.uri={clips}", f"output.parquet={out / 'parquet'}", f"output.lancedb={out / 'lancedb'}",
        f"output.manifest_dir={out / 'runs'}",
        # The model actor (1 CPU, it also embeds) fills one node (1 CPU each): decoding must run on the other.
        "runtime.decode_cpus=0.5", "runtime.model_cpus=1.0",
        "runtime.decode_concurrency=2", "runtime.model_pool_size=1",
    ])

    t0 = time.perf_counter()
    manifest = run_job(job, address=ray_cluster.address, progress=False)
    wall = time.perf_counter() - t0

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2, nodes
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    assert sorted(n["NodeID"] for n in nodes) == sorted(ray_cluster.alive_nodes())
    assert ray.cluster_resources().get("CPU") == 2.0
    assert ray.get_runtime_context().gcs_address == ray_cluster.address

    # Loopback only: every listening or connected TCP socket of the cluster's processes and of this driver.
    sockets = _tcp_sockets([*_tagged_pids(ray_cluster.tag), os.getpid()])
    assert ("listen", f"127.0.0.1:{ray_cluster.gcs_port}") in {(s[1], s[2]) for s in sockets}, sockets
    assert len({pid for pid, *_ in sockets}) >= 6, sockets  # GCS, 2 raylets, agents, workers, driver
    assert not _off_loopback(sockets), "\n".join(_off_loopback(sockets))

    c = manifest["counts"]
    got = (c["listed"], c["skipped"], c["indexed"], c["errors"], c["model_calls"])
    assert got == (N_GOOD + 1, 0, N_GOOD, 1, N_GOOD), manifest
    assert (out / "runs" / f"{manifest['run_id']}.json").exists()
    rows = read_parquet(str(out / "parquet" / "videos"))
    assert rows is not None and rows.num_rows == N_GOOD
    assert sorted(rows.column("uri").to_pylist()) == sorted(str(p) for p in good)
    assert all(rows.column("caption").to_pylist())
    errors = read_parquet(str(out / "parquet" / "errors"))
    assert errors is not None and errors.column("uri").to_pylist() == [str(bad)]

    # Really multi-node: each node's own worker logs name the stages its workers ran.
    per_node = {name: _task_names(ray_cluster.node_logs(name)) for name in ("head", "worker")}
    print(f"run_job: {wall:.1f} s; stages per node: {per_node}")
    for name, names in per_node.items():
        assert any(s in n for n in names for s in ("DecodeStage", "ModelStage")), (name, per_node)
    ran = set().union(*per_node.values())
    for stage in ("DecodeStage", "ModelStage"):
        assert any(stage in n for n in ran), (stage, per_node)

"""Real Ray clusters of a test's own on this machine, started with the ``ray start`` CLI.

Each node is one ``ray start --block`` process in a session of its own, with its own temp dir
(short, under /tmp: Unix socket paths are limited to 107 bytes) and its own ports, so it never
meets another Ray on the machine (the session-wide ``ray_local`` fixture, other test runs). Nodes
are stopped by pid: the ``ray start`` process and every process under it (gcs, raylet,
dashboard, workers, and the nodes a fake autoscaler started), collected by parentage from the
pids this module started, never matched by name (Ray's own stop command would end every Ray
process on the machine).

The test process never connects a driver to these clusters: it talks to them over HTTP (the job
API, the state API), so the session-wide ``ray_local`` driver is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.conftest import free_port

BIN = Path(sys.executable).parent  # the venv's ray and python: the jobs' `python` resolves here


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env | (extra or {})  # Ray's defaults otherwise: token authentication on (use_cluster_token)


def use_cluster_token() -> None:
    """The test clusters run with Ray's defaults, as a user's do: token authentication on, the token
    in ``~/.ray/auth_token`` (made here with Ray's own generator where it is missing, as ``ray start
    --head`` would). This process's clients (the state API, ``raydpo submit`` in-process) then send
    it the way ``raydpo submit`` does (``jobs.submit.use_cluster_token``)."""
    from ray._private.authentication.authentication_token_setup import _get_default_token_path, generate_and_save_token

    from jobs import submit

    if not _get_default_token_path().exists():
        generate_and_save_token()
    submit.use_cluster_token()


def can_unshare() -> bool:
    """Whether this process may start one in a mount namespace of its own with a tmpfs mounted."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt || mount -t tmpfs tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def node_ports() -> list[str]:
    """The ports one node listens on, all free ones (two raylets on one machine must not share)."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0"]  # 0: workers take ports the OS picks


class LocalCluster:
    """A head started with ``ray start --head`` (dashboard on 127.0.0.1) and worker nodes joined
    with ``ray start --address``; :meth:`stop` ends every process it started, by pid."""

    def __init__(self, head_cpus: int, object_store_bytes: int = 200 * 2**20, gcs_port: int | None = None,
                 head_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        use_cluster_token()
        self.root = Path(tempfile.mkdtemp(prefix="rdp-", dir="/tmp"))
        self.gcs_port, self.dashboard_port = gcs_port or free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.object_store_bytes = object_store_bytes
        self.env = _env(env)
        self.nodes: list[subprocess.Popen] = []  # the running ones; a killed node leaves this list
        self.started = 0  # nodes ever started: each gets its own name and temp dir
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(head_cpus),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             *(head_args or [])])

    def _start(self, name: str, args: list[str], wrap: list[str] | None = None) -> None:
        temp = self.root / name
        temp.mkdir()
        self.started += 1
        log = open(self.root / f"{name}.log", "ab")
        self.nodes.append(subprocess.Popen(
            [*(wrap or []), str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp),
             "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats", *node_ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def add_node(self, cpus: int, resources: dict[str, float] | None = None, private: bool = False) -> Path | None:
        """A node joining the head. With ``private`` (where ``unshare -m`` is allowed: root, or a
        user namespace), the node runs in a mount namespace of its own with an empty tmpfs over
        the folder returned: a folder it does not share with the head, as a node-local disk."""
        name = f"node{self.started}"
        folder = self.root / f"{name}-local" if private and can_unshare() else None
        wrap = []
        if folder is not None:
            folder.mkdir()
            wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && exec "$@"', str(folder)]
        self._start(name, ["--address", self.address, "--num-cpus", str(cpus),
                           *(["--resources", json.dumps(resources)] if resources else [])], wrap)
        return folder

    def kill_node(self, index: int) -> int:
        """SIGKILL node ``index`` of :attr:`nodes` (0 is the head) and every process under it, as
        a machine that crashed: no drain, no goodbye to the head. It leaves :attr:`nodes`.
        Returns how many processes it had."""
        node = self.nodes.pop(index)
        try:
            top = psutil.Process(node.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        node.wait(30)
        return len(procs)

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, raise_on_missing_output=False)
                if n.state == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout_s: float = 180.0) -> list:
        """The alive nodes, once there are ``n`` (the dashboard answers only once the head is up)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a `ray start` exited ({proc.returncode}):\n{self.logs()}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) == n:
                    return nodes
            except Exception:  # the dashboard is not up yet
                nodes = []
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(nodes)} of {n} nodes alive after {timeout_s}s:\n{self.logs()}")
            time.sleep(1.0)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.root.glob("*.log"))

    def processes(self) -> list[psutil.Process]:
        """Every process this cluster runs: the trees under the `ray start` processes it started."""
        found: dict[int, psutil.Process] = {}
        for proc in self.nodes:
            try:
                top = psutil.Process(proc.pid)
                for p in [top, *top.children(recursive=True)]:
                    found[p.pid] = p
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to what is left after 5 s (a test
        cluster keeps nothing worth a slow shutdown)."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive + self.processes():  # and any started meanwhile
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in self.nodes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


IDLE_TIMEOUT_MIN = 0.1  # 6 s: how long an autoscaled node stays idle before the autoscaler removes it


def fake_cluster_config(gcs_address: str, head_cpus: int) -> dict:
    """A cluster launcher config for Ray's fake multi-node provider (``fake_multinode``, what
    ``ray.cluster_utils.AutoscalingCluster`` configures), which starts and stops real raylets on
    this machine: a head and a ``trainer`` node type (1 CPU, 1 ``trainer_node``) from 0 to 2 nodes.

    ``AutoscalingCluster`` itself is not used: its ``start`` and ``shutdown`` call Ray's
    machine-wide stop, and the example config it reads is not in the wheel. The head is started as
    it does (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config``), with its own temp dir and
    ports, and stopped by pid with the nodes the autoscaler started."""
    return {
        "cluster_name": "raydpo-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "trainer": {"resources": {"CPU": 1, "trainer_node": 1, "object_store_memory": 150 * 2**20},
                        "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def autoscaling_cluster(folder: Path, head_cpus: int = 2) -> LocalCluster:
    """A head with the fake provider's autoscaler (``fake_cluster_config``), its config written
    to ``folder``; the autoscaler looks at the cluster's load every second."""
    gcs_port = free_port()  # chosen first: the config tells the provider's nodes where to join
    config = folder / "cluster.json"
    config.write_text(json.dumps(fake_cluster_config(f"127.0.0.1:{gcs_port}", head_cpus)))
    return LocalCluster(head_cpus=head_cpus, gcs_port=gcs_port, head_args=["--autoscaling-config", str(config)],
                        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})

"""``raydpo submit`` on one real Ray cluster on this machine: a head (``ray start --head``) with
Ray's fake multi-node autoscaler (``trainer`` nodes, 0 to 2, started and stopped as real raylets),
and a node b joined by hand (``ray start --address``, a custom resource, each node with its own temp
dir and ports). A node-loss job runs on the head and node b; its re-run resumes on trainer nodes the
autoscaler starts for it, then removes.

The test process only talks to that cluster over HTTP (job API, state API) and reads the MLflow
store the jobs write, so the session-wide ``ray_local`` driver is untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.jobs.strike import Strike, checkpoints, wait_until
from tests.ray_cluster import IDLE_TIMEOUT_MIN, autoscaling_cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The head (2 CPUs, the dashboard on 127.0.0.1, the fake autoscaler, no trainer node yet) and
    a node with ``node_b`` that, where the machine allows mount namespaces, has a folder of its own
    (``.private``); stopped by pid with every node the autoscaler started."""
    cluster = autoscaling_cluster(tmp_path_factory.mktemp("autoscaler"))
    try:
        cluster.private = cluster.add_node(2, {"node_b": 1}, private=True)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        cluster.stop()


def shrunk(tmp: Path) -> list[str]:
    """The quickstart, shrunk: 2 workers that must sit on different nodes, a checkpoint every 2
    steps. No ``tracking.uri``: the jobs keep their MLflow store in ``output_dir`` (``kept_store``)."""
    return [f"output_dir={tmp / 'out'}", "tracking.experiment=test",  # no tracking.uri: see kept_store
            f"reference.cache_dir={tmp / 'ref-cache'}", "tracking.log_model=false",
            "data.synthetic.rows=200", "data.eval_fraction=0.0", "train.max_steps=4", "train.num_workers=2",
            "train.batch_size=16", "train.micro_batch_size=8", "train.placement_strategy=STRICT_SPREAD",
            "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=0"]


def submit(config: Path | str, address: str, sets: list[str], capsys) -> tuple[int, str, str]:
    """``raydpo submit CONFIG --address A --follow --set ...`` in-process: exit code, submission id, output."""
    from jobs.submit import main

    code = main([str(config), "--address", address, "--follow", *(f"--set={s}" for s in sets)])
    out = capsys.readouterr().out
    match = re.search(r"\[raydpo\] submitted (\S+):", out)
    return code, match.group(1) if match else "", out


def kept_store(out_dir: Path, console: str) -> str:
    """The MLflow store of a submitted job with no ``tracking.uri`` (and no MLFLOW_TRACKING_URI on
    the cluster): MLflow's default would lie in Ray's copy of the working folder, deleted with Ray's
    session, so the job keeps it in ``output_dir`` and says so on its console."""
    uri = f"sqlite:///{out_dir / 'mlflow.db'}"
    assert f"deletes with its session: this run logs to {uri} (output_dir) instead" in console, console[-3000:]
    return uri


def train_worker_nodes(address: str, submission_id: str) -> set[str]:
    """The nodes the job's Ray Train workers ran on (Ray's state API keeps dead actors)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)],
                         detail=True, raise_on_missing_output=False)
    return {a.node_id for a in actors}


def test_a_bad_config_fails_before_anything_is_submitted(capsys):
    """Exit 2 naming the key, without reaching for the cluster (port 1 answers nothing)."""
    from jobs.submit import main

    assert main(["configs/quickstart.yaml", "--address", "http://127.0.0.1:1", "--set", "train.placement_strategy=RANDOM"]) == 2
    assert "train.placement_strategy" in capsys.readouterr().err


class TrainWorkersWatch:
    """How many Ray Train workers are alive, asked once a second (Ray's state API keeps no
    history of that): (wall time, count) pairs."""

    def __init__(self, address: str) -> None:
        self.address, self.seen = address, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from ray.util.state import list_actors

        while not self.stop.is_set():
            try:
                alive = list_actors(address=self.address, raise_on_missing_output=False,
                                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                self.seen.append((time.time(), len(alive)))
            except Exception:  # the dashboard busy: try again
                pass
            self.stop.wait(1.0)

    def __enter__(self) -> "TrainWorkersWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.mark.slow
def test_train_loses_a_node_then_resumes_on_autoscaled_nodes(cluster, tmp_path, capsys):
    """A node lost mid-run (every process of node b SIGKILLed once the first checkpoint is in
    ``train.storage_path``, as a machine that crashed): the job exits FAILED (1), saying that a
    worker's node was lost and which checkpoint a re-run resumes from. The same run re-submitted
    (the config now from outside the project, travelling in the job's environment) asks for
    workers on ``trainer_node``s, which no node has: the autoscaler starts two trainer nodes, the
    job resumes there from that checkpoint and succeeds (0), and once their workers are gone the
    idle nodes are removed. Both jobs put their 2 workers on two nodes, pass the shared-storage
    check, and report to one MLflow run. The autoscaling timings are printed (``-s``) for
    docs/benchmarks.md: by the wall clock, from Ray's state API where it keeps them (node start
    and end, the placement group's request), else from polling once a second (the workers' end)."""
    from ray.util.state import list_nodes, list_placement_groups

    from raydpo.train.policy import checkpoint_location

    steps = 12  # one epoch of 200 pairs: the node goes at step 4's checkpoint, 8 steps before the end
    sets = [*shrunk(tmp_path), f"train.storage_path={tmp_path / 'checkpoints'}", f"train.max_steps={steps}",
            "train.checkpoint_every=4"]
    storage = checkpoint_location(str(tmp_path / "checkpoints"), tmp_path / "out")
    run_folder = Path(storage[0]) / storage[1]
    lost: list[int] = []
    registered: list[int] = []

    def lose_node_b(running: Callable[[], bool]) -> None:
        # Once Ray Train has registered the checkpoint of step 4: the one the re-run resumes from.
        wait_until(lambda: bool(checkpoints(tmp_path / "out", run_folder)), "the first checkpoint", running)
        registered[:] = checkpoints(tmp_path / "out", run_folder)
        lost.append(cluster.kill_node(1))

    try:
        with Strike(lose_node_b):
            code, first, out = submit("configs/quickstart.yaml", cluster.dashboard, sets, capsys)
    finally:  # the machine back, a new node b, whatever else failed: the module's other tests need two nodes
        if lost:
            cluster.wait_for_nodes(1)  # the head has seen node b go
            cluster.private = cluster.add_node(2, {"node_b": 1}, private=True)
            cluster.wait_for_nodes(2)
    assert lost and lost[0] > 0, out[-3000:]
    assert code == 1, out[-3000:]
    assert f"job {first}: FAILED" in out
    assert "2 node(s); dashboard http://127.0.0.1:" in out  # the job's own console: where the dashboard is
    assert "shared storage: output_dir, train.storage_path, reference.cache_dir seen from 2 nodes" in out
    assert "raydpo: training stopped: a training worker was lost, its process or its node (rank" in out, out[-3000:]
    assert f"re-run the same command to resume from the latest checkpoint in {'/'.join(storage)}" in out
    assert not (tmp_path / "out" / "ray").exists()  # the checkpoints are in the storage path only
    assert f"Ray dashboard: {cluster.dashboard}/#/jobs/{first}" in out and "MLflow: " in out
    first_nodes = train_worker_nodes(cluster.dashboard, first)
    head = {n.node_id for n in cluster.alive_nodes() if n.is_head_node}
    assert len(first_nodes) == 2 and len(first_nodes & head) == 1  # the head, and the lost node b

    config = tmp_path / "my-quickstart.yaml"
    shutil.copy(ROOT / "configs/quickstart.yaml", config)
    t0 = time.time()
    with TrainWorkersWatch(cluster.dashboard) as watch:
        code, second, out = submit(config, cluster.dashboard, [*sets, "train.resources={trainer_node: 1}"], capsys)
        job_end = time.time()
        assert code == 0, out[-3000:]
        assert f"job {second}: SUCCEEDED" in out and "(resumed)" in out
        assert f"step {steps}/{steps} loss" in out
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until the idle trainer nodes are removed
            nodes = [n for n in list_nodes(address=cluster.dashboard, detail=True, raise_on_missing_output=False)
                     if "trainer_node" in n.resources_total]
            if nodes and all(n.state == "DEAD" for n in nodes):
                break
            time.sleep(1.0)

    # Started, used and removed: one worker on each trainer node; the head and node b untouched.
    assert len(nodes) == 2 and all(n.state == "DEAD" for n in nodes), nodes
    assert train_worker_nodes(cluster.dashboard, second) == {n.node_id for n in nodes}
    assert len(cluster.alive_nodes()) == 2
    groups = [g for g in list_placement_groups(address=cluster.dashboard, detail=True, raise_on_missing_output=False)
              if any("trainer_node" in b["unit_resources"] for b in g.bundles)]
    asked = min(int(g.stats["creation_request_received_ns"]) for g in groups) / 1e9  # int64: a string in JSON
    last_work = max(t for t, n in watch.seen if n)
    done = next(t for t, n in watch.seen if t > last_work)  # the trainer nodes' last work ended
    up = sorted(n.start_time_ms / 1000 for n in nodes)
    removed = max(n.end_time_ms / 1000 for n in nodes)
    assert asked < up[0] and done < removed
    timings = {"workers_asked_for": asked - t0, "first_node_up": up[0] - t0, "second_node_up": up[1] - t0,
               "workers_done": done - t0, "nodes_removed": removed - t0, "job_end": job_end - t0,
               "scale_up": up[1] - asked, "scale_down_after_idle": removed - done, "idle_timeout": IDLE_TIMEOUT_MIN * 60}
    print("\nautoscaling timings (s; events from submit):", json.dumps({k: round(v, 1) for k, v in timings.items()}))

    uri = kept_store(tmp_path / "out", out)
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raydpo.job"] == "train"
    assert run.data.params["train.placement_strategy"] == "STRICT_SPREAD"
    logged = Counter(m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss"))
    # Steps up to the registered checkpoint trained once (the second job started there), every step at least once.
    assert registered and registered[-1] % 4 == 0, registered
    assert sorted(logged) == list(range(1, steps + 1)), logged
    assert all(logged[s] == 1 for s in range(1, registered[-1] + 1)), (registered, logged)
    assert (tmp_path / "out" / "final" / "config.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_the_job(cluster, tmp_path, capsys):
    """Ctrl-C while following stops the job on the cluster; the exit code is STOPPED's (130). It
    does so even where a library left its own SIGINT handler in the process (Ray Train's fit does:
    one that ignores Ctrl-C stands in for it here)."""
    import _thread

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    before = {j.submission_id for j in client.list_jobs()}
    interrupted: list[str] = []

    def interrupt_once_running() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                jobs = client.list_jobs()
            except Exception:  # the dashboard slow to answer on a loaded machine: ask again
                time.sleep(0.5)
                continue
            running = [j.submission_id for j in jobs if j.submission_id not in before and j.status == JobStatus.RUNNING]
            if running:
                interrupted.append(running[0])
                _thread.interrupt_main()  # what Ctrl-C does
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=interrupt_once_running, daemon=True)
    left_behind = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        watcher.start()
        code, sid, out = submit("configs/quickstart.yaml", cluster.dashboard, shrunk(tmp_path), capsys)
        watcher.join(timeout=10)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # submit put the caller's back
    finally:
        signal.signal(signal.SIGINT, left_behind)
    assert interrupted == [sid]
    assert code == 130, out[-3000:]
    assert client.get_job_status(sid) == JobStatus.STOPPED and f"job {sid}: STOPPED" in out


@pytest.mark.slow
def test_a_folder_one_node_does_not_see_fails_naming_the_key(cluster, tmp_path, capsys):
    """An output_dir in node b's private folder: the head writes to its own disk there, node b
    sees an empty tmpfs. The job fails before any work (no MLflow run), naming output_dir and
    the node that does not see it."""
    if cluster.private is None:
        pytest.skip("needs a mount namespace (unshare -m) to give one node a folder of its own")
    code, sid, out = submit("configs/quickstart.yaml", cluster.dashboard,
                            [*shrunk(tmp_path), f"output_dir={cluster.private / 'out'}"], capsys)
    assert code == 1, out[-3000:]
    assert f"output_dir: {cluster.private / 'out'} is not on storage every node sees (1 of 2 nodes do not" in out
    assert "MLflow run" not in out and not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "not-the-cluster-token"], ids=["no_token", "wrong_token"])
def test_a_missing_or_wrong_token_is_one_line_and_exit_2(cluster, tmp_path, token):
    """The cluster runs with Ray's defaults: token authentication on. ``raydpo submit``, as its own
    process on a machine that has no token (another home folder, no ``RAY_AUTH_*`` set) or a
    wrong one (``RAY_AUTH_TOKEN``): one line saying what to set, exit 2, no traceback, no job."""
    from ray.job_submission import JobSubmissionClient

    before = len(JobSubmissionClient(cluster.dashboard).list_jobs())
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    if token:
        env["RAY_AUTH_TOKEN"] = token
    proc = subprocess.run([sys.executable, "-m", "jobs.submit", "configs/quickstart.yaml", "--address",
                           cluster.dashboard, *(f"--set={s}" for s in shrunk(tmp_path))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("raydpo:")]
    assert len(said) == 1, proc.stderr[-3000:]
    assert ("refused the token sent" if token else "no token was found on this machine") in said[0]
    assert "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH" in said[0]
    assert len(JobSubmissionClient(cluster.dashboard).list_jobs()) == before

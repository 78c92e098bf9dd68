"""Faults on a real local Ray: real processes killed by pid mid-run, and what survived.

One uninterrupted run is the baseline (``clean``). One output folder then goes through a chain of
faults, each a fixture that continues where the one before left it, so the suite pays for five
training runs instead of two per fault, and the last run must still end on the clean run's weights:

    disk_full      the checkpoint of step 8 meets a full disk (a real ENOSPC, from /dev/full)
    preempted      the re-run, through ``main`` in this process, gets SIGTERM after step 9
    driver_killed  the newest checkpoint (SIGTERM's) is damaged (its state file cut short); the next
                   re-run's driver, a subprocess as a user runs it, skips it saying why, resumes from
                   the one before, and gets SIGKILL after step 13
    worker_killed  the last re-run (in process) loses its Ray Train worker to SIGKILL a step later

Before ``preempted``, the folder's checkpoints are offered to configs that would train differently:
each is refused before any work; ``preempted`` itself resumes with harmless changes (``HARMLESS``).

Every run trains 16 steps of 32 pairs (one epoch of 12 steps and 4 of the next) on the tiny
quickstart model, checkpointing every 4. Where a fault must land before a run ends, the test
freezes the training worker (SIGSTOP) first, so a fast machine cannot finish before it; the fault
itself is real. A reference actor killed mid-precompute is a test of its own. Each fault's cost
is printed as ``[faults] ...`` (``-s``) for docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from raydpo.config import load_config
from tests.conftest import fresh_store
from tests.jobs.strike import (DEADLINE_S, Strike, by_step, checkpoint_folders, checkpoints, first_step_of,
                               freeze, pid_gone, trained_rows, wait_for_step, wait_until)

pytestmark = pytest.mark.slow  # a chain of five training runs struck by real faults (minutes)
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY, PER_EPOCH, BATCH = 16, 4, 12, 32  # 400 pairs // 32 = 12 steps an epoch
COMMON = ["data.synthetic.rows=400", f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
          "train.epochs=2", "train.log_every=1", "data.eval_fraction=0.0", "reference.window=32",
          "tracking.log_model=false", "tracking.system_metrics=false", "tracking.experiment=faults"]


def say(message: str) -> None:
    print(f"[faults] {message}", flush=True)


@dataclass
class Shared:
    root: Path  # the module's folder: one MLflow store and one reference cache for every run

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def overrides(self, out: Path, *more: str) -> list[str]:
        return [f"output_dir={out}", f"tracking.uri={self.uri}", f"reference.cache_dir={self.root / 'ref-cache'}",
                *COMMON, *more]

    def config(self, out: Path, *more: str):
        return load_config(ROOT / "configs/quickstart.yaml", self.overrides(out, *more))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def loss_history(uri: str, run_id: str) -> dict[int, float]:
    """step -> loss; a step logged again by a resumed run keeps its last value."""
    out: dict[int, float] = {}
    for m in sorted(MlflowClient(uri).get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


class Driver:
    """``python -m jobs.train_dpo`` as a user runs it, joined to the session's Ray (RAY_ADDRESS),
    in a session of its own; anything it started is killed by pid when it is done."""

    def __init__(self, shared: Shared, out: Path, *more: str) -> None:
        import psutil
        import ray

        self.log = out.parent / f"driver-{time.monotonic_ns()}"
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        args = [a for kv in shared.overrides(out, *more) for a in ("--set", kv)]
        self.t0 = time.monotonic()
        with open(f"{self.log}.out", "w") as stdout, open(f"{self.log}.err", "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.train_dpo", str(ROOT / "configs/quickstart.yaml"), *args],
                cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        self.process = psutil.Process(self.proc.pid)
        self.children: set[int] = set()

    def alive(self) -> bool:
        import psutil

        if self.proc.poll() is not None:
            return False
        try:
            self.children |= {c.pid for c in self.process.children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        return True

    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()

    def signal(self, sig: int) -> None:
        self.alive()  # its descendants, before they could be orphaned
        os.kill(self.proc.pid, sig)

    def wait(self) -> int:
        return self.proc.wait(DEADLINE_S)

    def left_behind(self) -> list[int]:
        """Its descendants still running (then killed by pid)."""
        import psutil

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)
        left = [pid for pid in sorted(self.children) if not pid_gone(pid)]
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        return left


@dataclass
class Clean:
    shared: Shared
    out: Path
    run_id: str
    seconds: float  # wall time of the whole run
    step_s: float  # seconds a training step took
    loss: dict[int, float]
    rows: dict[int, dict]


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory) -> Clean:
    """The uninterrupted run every fault is compared with."""
    from jobs.train_dpo import run

    shared = Shared(tmp_path_factory.mktemp("faults"))
    fresh_store(shared.root / "mlflow.db")
    out = shared.root / "clean"
    t0 = time.monotonic()
    outcome = run(shared.config(out))
    seconds = time.monotonic() - t0
    rows = by_step(out)
    step_s = (rows[STEPS]["time"] - rows[1]["time"]) / (STEPS - 1)
    say(f"clean run: {seconds:.1f}s wall, {step_s:.2f}s a step")
    return Clean(shared, out, outcome.run_id, seconds, step_s, loss_history(shared.uri, outcome.run_id), rows)


@dataclass
class Chain:
    """The output folder the faults strike one after another, and what each left."""

    out: Path
    run_id: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each run
    notes: dict[str, object] = field(default_factory=dict)


def step_times(out: Path, pid: int | None = None) -> dict[int, float]:
    """step -> when it was trained (Unix seconds), by worker ``pid`` or by any."""
    return {line["step"]: line["time"] for line in trained_rows(out) if pid is None or line["pid"] == pid}


@pytest.fixture(scope="module")
def disk_full(clean) -> Chain:
    """A fresh run whose checkpoint of step 8 meets a full disk: its staging folder holds
    ``loop_state.json`` as a link to /dev/full, where every write fails with ENOSPC, a real
    ``No space left on device`` from the kernel (no privilege needed, unlike mounting a small
    filesystem). The checkpoint of step 4 was written before."""
    from jobs.train_dpo import run

    chain = Chain(clean.shared.root / "chain")
    staging = chain.out / ".staging" / "step_00000008" / "rank0"  # each rank stages its own files
    staging.mkdir(parents=True)
    (staging / "loop_state.json").symlink_to("/dev/full")
    t0 = time.monotonic()
    with pytest.raises(Exception) as failure:
        run(clean.shared.config(chain.out))
    chain.seconds["disk_full"] = time.monotonic() - t0
    chain.notes["times_disk_full"] = step_times(chain.out)
    chain.notes["error"], chain.notes["error_type"] = str(failure.value), type(failure.value).__name__
    chain.notes["checkpoints_after_disk_full"] = checkpoints(chain.out)
    chain.notes["folders_after_disk_full"] = checkpoint_folders(chain.out)
    chain.notes["status_after_disk_full"] = MlflowClient(clean.shared.uri).get_run(
        (chain.out / "mlflow_run_id").read_text().strip()).info.status
    chain.run_id = (chain.out / "mlflow_run_id").read_text().strip()
    shutil.rmtree(chain.out / ".staging")  # space freed: the next run can write checkpoints
    return chain


# Changes a resumed run may make (config.RESUME_HARMLESS): they alter neither which pairs are
# trained nor how, so the chain still ends on the clean run's weights.
HARMLESS = ["train.eval_every=3", "reference.batch_tokens=8192"]


def resume_with_changed_configs(shared: Shared, chain: Chain) -> None:
    """Before the chain's first re-run, the same output folder (its checkpoint of step 4) re-run
    with configs that would train differently: each fails before any work (before Ray is asked
    for anything), in-process and as the command line. What each said goes into the notes."""
    import contextlib
    import io

    from jobs.train_dpo import main, run
    from raydpo.config import ConfigError

    try:
        run(shared.config(chain.out, "train.batch_size=8", "train.micro_batch_size=8", "loss.beta=0.2"))
    except ConfigError as e:
        chain.notes["changed_config_error"] = str(e)
    config = chain.out.parent / "changed.yaml"  # the same settings from another file: only values count
    config.write_text((ROOT / "configs/quickstart.yaml").read_text())
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        chain.notes["changed_rows_rc"] = main(
            [str(config), *(f"--set={kv}" for kv in shared.overrides(chain.out, "data.synthetic.rows=401"))])
    chain.notes["changed_rows_stderr"] = stderr.getvalue()


@pytest.fixture(scope="module")
def preempted(clean, disk_full) -> Chain:
    """The same command re-run through ``jobs.train_dpo.main`` in this process, which is then the
    driver, with harmless changes of its config (``HARMLESS``), after configs that change the
    training were refused. After step 9 its worker is frozen, the process gets a real SIGTERM (a
    spot instance's notice, ``ray job stop``), and once the stop request is in the driver's
    stop-signal actor, the worker is thawed."""
    import contextlib
    import io

    import ray

    from jobs.train_dpo import main
    from raydpo.train.loop import stop_signal_name

    chain = disk_full
    old = {line["pid"] for line in trained_rows(chain.out)}
    struck: dict[str, object] = {}

    def sigterm(running: Callable[[], bool]) -> None:
        worker = wait_for_step(chain.out, 9, old, running)["pid"]
        try:
            struck["resumed_from"] = first_step_of(worker, chain.out)["step"] - 1
            struck["after_step"] = freeze(worker, chain.out)
            struck["worker"], struck["t"] = worker, time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            stop = ray.get_actor(stop_signal_name(str(chain.out), ray.get_runtime_context().get_job_id()))
            wait_until(lambda: ray.get(stop.requested.remote()), "the stop request", running)
        finally:
            os.kill(worker, signal.SIGCONT)

    resume_with_changed_configs(clean.shared, chain)
    stderr = io.StringIO()
    with Strike(sigterm) as strike, contextlib.redirect_stderr(stderr):
        rc = main([str(ROOT / "configs/quickstart.yaml"),
                   *(a for kv in clean.shared.overrides(chain.out, *HARMLESS) for a in ("--set", kv))])
    chain.seconds["preempted"] = strike.seconds
    n = chain.notes
    n["resumed_after_disk_full_from"] = struck["resumed_from"]
    n["sigterm_after_step"] = struck["after_step"]
    n["times_preempted"] = step_times(chain.out, int(struck["worker"]))
    n["sigterm_to_exit_s"] = time.monotonic() - float(struck["t"])
    n["sigterm_rc"], n["sigterm_stderr"] = rc, stderr.getvalue()
    found = re.search(r"preempted \(SIGTERM\) at step (\d+): checkpointed; re-run the same command to resume",
                      stderr.getvalue())
    n["sigterm_stopped_at"] = int(found.group(1)) if found else None
    n["sigterm_checkpoints"] = checkpoints(chain.out)
    n["sigterm_status"] = MlflowClient(clean.shared.uri).get_run(chain.run_id).info.status
    return chain


def damage_newest_checkpoint(out: Path) -> dict[str, object]:
    """Cut the newest registered checkpoint's state file (DDP's ``engine_state.pt``) to half its
    size, as a copy or a disk that failed part-way leaves it; returns what was done."""
    run = out / "ray" / "train"
    names = [r["checkpoint_dir_name"] for r in
             json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]]
    state = run / names[-1] / "engine_state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    return {"run": run, "name": names[-1], "step": checkpoints(out)[-1], "previous": names[-2],
            "previous_step": checkpoints(out)[-2], "size": len(data) // 2, "was": len(data)}


@pytest.fixture(scope="module")
def driver_killed(clean, preempted) -> Chain:
    """The newest checkpoint (the one SIGTERM wrote) damaged, the same command again: it must skip
    that checkpoint, saying which and why, and resume from the one before. After step 13 its
    worker is frozen and its driver gets SIGKILL. Ray then ends the dead driver's actors: the
    frozen worker must go without another step."""
    chain = preempted
    old = {line["pid"] for line in trained_rows(chain.out)}
    chain.notes["damaged"] = damage_newest_checkpoint(chain.out)
    driver = Driver(clean.shared, chain.out)
    worker = None
    try:
        worker = wait_for_step(chain.out, 13, old, driver.alive)["pid"]
        chain.notes["resumed_after_sigterm_from"] = first_step_of(worker, chain.out)["step"] - 1
        chain.notes["sigkill_after_step"] = freeze(worker, chain.out)
        chain.notes["checkpoints_at_sigkill"] = checkpoints(chain.out)
        chain.notes["times_driver_killed"], t_kill = step_times(chain.out, worker), time.monotonic()
        driver.signal(signal.SIGKILL)
        chain.notes["sigkill_rc"] = driver.wait()
        wait_until(lambda: pid_gone(worker), "the end of the dead driver's worker")
        chain.notes["worker_gone_after_s"] = time.monotonic() - t_kill
    finally:
        if worker is not None and not pid_gone(worker):
            os.kill(worker, signal.SIGCONT)
        chain.notes["sigkill_left_behind"] = driver.left_behind()
        chain.notes["driver_stdout"] = driver.stdout()
    chain.seconds["driver_killed"] = time.monotonic() - driver.t0
    return chain


@pytest.fixture(scope="module")
def worker_killed(clean, driver_killed) -> Chain:
    """The same command once more, in process, with ``train.max_failures=1``; one step after the
    one where the driver was killed, its Ray Train worker is frozen and SIGKILLed."""
    from jobs.train_dpo import run

    chain = driver_killed
    old = {line["pid"] for line in trained_rows(chain.out)}
    target = min(int(chain.notes["sigkill_after_step"]) + 1, STEPS - 1)
    struck: dict[str, object] = {}

    def sigkill(running: Callable[[], bool]) -> None:
        line = wait_for_step(chain.out, target, old, running)
        struck["resumed_from"] = first_step_of(line["pid"], chain.out)["step"] - 1
        struck["after_step"] = freeze(line["pid"], chain.out)
        struck["checkpoints"] = checkpoints(chain.out)
        struck["pid"], struck["times"] = line["pid"], step_times(chain.out, line["pid"])
        os.kill(line["pid"], signal.SIGKILL)

    with Strike(sigkill) as strike:
        outcome = run(clean.shared.config(chain.out, "train.max_failures=1"))
    chain.seconds["worker_killed"] = strike.seconds
    chain.notes["worker"] = struck
    chain.notes["outcome_run_id"] = outcome.run_id
    # What each fault cost: how much later than in the run it struck the chain finished the
    # step it had reached (the next run started at once, as a supervisor that re-runs would).
    n, now = chain.notes, step_times(chain.out)
    disk, term, driver, killed = n["times_disk_full"], n["times_preempted"], n["times_driver_killed"], struck["times"]
    stopped, s_term, s_kill, s_worker = (int(n["sigterm_stopped_at"]), int(n["sigterm_after_step"]),
                                         int(n["sigkill_after_step"]), int(struck["after_step"]))
    say(f"disk full at the checkpoint of step 8: step 8 done {term[8] - disk[8]:.1f}s later")
    say(f"SIGTERM after step {s_term}: checkpointed step {stopped}, exited {n['sigterm_to_exit_s']:.1f}s after the "
        f"signal; step {stopped + 1} done {driver[stopped + 1] - term[stopped] - clean.step_s:.1f}s later")
    say(f"driver SIGKILL after step {s_kill}: its worker gone {n['worker_gone_after_s']:.1f}s later; step {s_kill} "
        f"done {killed[s_kill] - driver[s_kill]:.1f}s later")
    say(f"worker SIGKILL after step {s_worker}: step {s_worker} done {now[s_worker] - killed[s_worker]:.1f}s later")
    say(f"wall time of the chain's runs: {', '.join(f'{k} {v:.1f}s' for k, v in chain.seconds.items())}")
    return chain


def test_a_full_disk_fails_naming_the_folder_and_keeps_the_previous_checkpoint(disk_full):
    """The error is the workers' own, not Ray's wrapping of their traceback: the step, the folder,
    the cause, and the checkpoint a re-run resumes from. The checkpoint of step 4 is still the
    latest, and the next run resumes from it (the chain's last run ends on the clean weights)."""
    notes = disk_full.notes
    assert notes["error_type"] == "CheckpointWriteError"
    error = notes["error"]
    assert f"the checkpoint of step 8 could not be written to {disk_full.out / '.staging' / 'step_00000008' / 'rank0'}" in error
    assert "[Errno 28] No space left on device" in error
    assert "the previous checkpoint (step 4) is intact" in error and "re-run the same command" in error
    assert notes["checkpoints_after_disk_full"][-1] == notes["folders_after_disk_full"][-1] == 4  # nothing of step 8
    assert notes["status_after_disk_full"] == "FAILED"


def test_the_run_after_a_full_disk_resumes_from_the_previous_checkpoint(preempted):
    """Space freed, the same command resumes from the checkpoint the error named, though its
    config changed harmlessly (evaluation cadence, reference batching)."""
    assert preempted.notes["resumed_after_disk_full_from"] == 4


def test_resume_with_a_changed_config_fails_naming_the_keys(preempted):
    """Re-running an output_dir that holds checkpoints with a change that alters the trajectory
    (batch size, loss, data) fails before any work, naming each key with its old and new value
    and how to start fresh; a key that only changes how the same update is computed (micro-batch
    size) is not named. The command line exits 2 saying the same."""
    error = str(preempted.notes.get("changed_config_error"))
    assert "train.batch_size: 32 -> 8" in error and "loss.beta: 0.5 -> 0.2" in error
    assert "micro_batch_size" not in error and "new output_dir" in error
    assert preempted.notes["changed_rows_rc"] == 2
    assert "data.synthetic.rows: 400 -> 401" in str(preempted.notes["changed_rows_stderr"])


def test_sigterm_checkpoints_at_the_next_step_and_a_rerun_resumes_there(preempted, driver_killed):
    """SIGTERM of the driver: the workers stop at the next step boundary with a checkpoint there,
    the driver says so and exits 143, the MLflow run is KILLED; the next run resumes from it."""
    notes = preempted.notes
    stderr = str(notes["sigterm_stderr"])
    assert notes["sigterm_rc"] == 143, stderr[-3000:]
    stopped = notes["sigterm_stopped_at"]  # from "preempted (SIGTERM) at step N: checkpointed; re-run ..."
    assert stopped is not None, stderr[-3000:]
    assert notes["sigterm_after_step"] <= stopped < STEPS
    assert notes["sigterm_checkpoints"][-1] == stopped  # a checkpoint at the step it reached
    assert notes["sigterm_status"] == "KILLED"
    # The next run found it as its newest checkpoint (then damaged on purpose: see the next test).
    assert driver_killed.notes["damaged"]["step"] == stopped


def test_a_damaged_newest_checkpoint_is_skipped_saying_why_and_the_one_before_resumed(driver_killed):
    """Its state file cut short, the newest checkpoint fails its manifest: the re-run says which
    and why (the file, its size against the manifest's), moves it to ``damaged/`` and resumes from
    the one before, once (the chain's last run still ends on the clean run's weights). Until now:
    a traceback naming no file, and deleting the checkpoint left Ray Train's snapshot pointing at it."""
    damaged, stdout = driver_killed.notes["damaged"], str(driver_killed.notes["driver_stdout"])
    run, name = damaged["run"], damaged["name"]
    assert (f"checkpoint {run}/{name} (step {damaged['step']}) is damaged: engine_state.pt is {damaged['size']} "
            f"bytes, its manifest says {damaged['was']}; moved to {run}/damaged/{name}") in stdout, stdout[-3000:]
    assert (f"resuming from {run}/{damaged['previous']} (step {damaged['previous_step']}), the newest intact "
            "checkpoint") in stdout
    assert damaged["previous_step"] < damaged["step"]
    assert driver_killed.notes["resumed_after_sigterm_from"] == damaged["previous_step"]
    assert not (run / name).exists() and (run / "damaged" / name / "engine_state.pt").exists()


def test_a_killed_driver_is_resumed_by_the_same_command_to_the_same_weights(clean, worker_killed):
    """SIGKILL of ``raydpo train``: Ray ends its workers and nothing it started is left; the same
    command resumes from the latest checkpoint Ray Train registered, in the same MLflow run, and
    ends on the clean run's weights (this folder also went through the chain's other faults)."""
    notes = worker_killed.notes
    assert notes["sigkill_rc"] == -signal.SIGKILL
    assert notes["sigkill_left_behind"] == []
    latest = notes["checkpoints_at_sigkill"][-1]
    # The checkpoint of step 12 is registered only if Ray Train polled the worker after writing it.
    assert latest in (int(notes["resumed_after_sigterm_from"]), 12)
    assert notes["worker"]["resumed_from"] == latest
    assert notes["outcome_run_id"] == worker_killed.run_id  # one MLflow run since the chain's first start
    want, got = final_weights(clean.out), final_weights(worker_killed.out)
    assert want.keys() == got.keys()
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= 1e-6, worst


def test_a_killed_train_worker_is_replaced_and_the_curve_is_the_clean_one(clean, worker_killed):
    """SIGKILL of the Ray Train worker: the group restarts from the latest checkpoint
    (train.max_failures) and the run finishes. Every step's loss equals the clean run's, and every
    step trained the clean run's rows (same positions, same token ids): none twice, none skipped."""
    struck = worker_killed.notes["worker"]
    restart = struck["checkpoints"][-1]
    assert restart < struck["after_step"]  # the new worker went back: steps were lost, and redone
    assert loss_history(clean.shared.uri, worker_killed.run_id) == clean.loss
    rows = by_step(worker_killed.out)
    assert sorted(rows) == sorted(clean.rows) == list(range(1, STEPS + 1))
    for step, line in rows.items():
        assert (line["rows"], line["digest"]) == (clean.rows[step]["rows"], clean.rows[step]["digest"]), step
        assert len(line["rows"]) == BATCH
        if step > restart:
            assert line["pid"] != struck["pid"], step  # trained again by the new worker
    for epoch in (0, 1):
        seen = [r for line in rows.values() if line["epoch"] == epoch for r in line["rows"]]
        assert len(seen) == len(set(seen)) == BATCH * min(PER_EPOCH, STEPS - epoch * PER_EPOCH)


def test_a_reference_actor_killed_mid_precompute_is_replaced_and_the_cache_is_the_clean_one(clean, tmp_path):
    """SIGKILL of the reference actor after it wrote its first cache block: Ray Data restarts it
    and retries its windows (its defaults for a pool's actors), the precompute finishes, and the
    cache holds exactly the clean run's sequences with equal values."""
    from jobs.precompute import run
    from tests.jobs.test_precompute import values

    cache = tmp_path / "cache"
    struck: dict[str, object] = {}

    def sigkill(running: Callable[[], bool]) -> None:
        wait_until(lambda: any(cache.glob("*/loads/*.json")) and any(cache.glob("*/blocks/*.parquet")),
                   "the actor's first block", running)
        pid = json.loads(next(cache.glob("*/loads/*.json")).read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)
        struck["blocks"] = len(list(cache.glob("*/blocks/*.parquet")))
        os.kill(pid, signal.SIGKILL)

    store = fresh_store(tmp_path / "mlflow.db")
    cfg = load_config(ROOT / "configs/quickstart.yaml", clean.shared.overrides(
        tmp_path / "out", f"reference.cache_dir={cache}", f"tracking.uri=sqlite:///{store}"))
    with Strike(sigkill):
        stats = run(cfg)
    clean_stats = MlflowClient(clean.shared.uri).get_run(clean.run_id).data.metrics
    want = values(str(next((clean.shared.root / "ref-cache").glob("v*"))))
    got = values(stats.cache_dir)
    total_blocks = -(-int(clean_stats["reference/sequences_computed"]) // 32)
    assert 0 < int(struck["blocks"]) < total_blocks  # it died mid-precompute
    assert stats.model_loads == 2  # the killed actor and its replacement
    assert stats.sequences_computed == len(want)  # a window killed before it returned ran again, once
    assert got.keys() == want.keys()
    assert got == want  # same model, windows and batches: the same floats
    say(f"reference actor SIGKILL after {struck['blocks']} of {total_blocks} blocks: the stage took "
        f"{stats.seconds:.1f}s against {clean_stats['reference/seconds']:.1f}s in the clean run")

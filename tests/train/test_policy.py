"""How ``train_policy`` reads Ray Train's failures: a lost worker is told apart from a bug in the loop."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

from raydpo.train.policy import lost_workers
from tests.conftest import free_port

# A gloo group of two of its own (not torch's default group, which another test in this process
# may hold): this process is rank 0, a subprocess rank 1.
PEER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False)
    group = dist.ProcessGroupGloo(store, 1, 2)
    group.allreduce([torch.ones(1)]).wait()  # one collective together, then the process dies without a word
    os._exit(1)
""")


def gloo_error_after_the_peer_died() -> RuntimeError:
    """The error a real gloo all-reduce raises in this process (rank 0) once its peer (rank 1,
    a subprocess) has died: what a surviving training worker sees when a node goes."""
    import torch

    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(port)])
    try:
        group = dist.ProcessGroupGloo(store, 0, 2)
        group.allreduce([torch.ones(1)]).wait()
        peer.wait(60)
        with pytest.raises(RuntimeError) as e:
            group.allreduce([torch.ones(1)]).wait()
        return e.value
    finally:
        if peer.poll() is None:
            peer.kill()


def test_a_collective_broken_by_a_dead_peer_is_a_lost_worker():
    """Ray Train may report the surviving rank's broken collective before the dead worker: the
    job must still say a worker was lost (a re-run resumes), not show a gloo traceback."""
    from ray.train import WorkerGroupError

    error = gloo_error_after_the_peer_died()
    lost = lost_workers(WorkerGroupError("rank 0 failed", {0: error}))
    assert list(lost) == [0] and lost[0].startswith("its connection to a peer dropped: "), (lost, str(error))


def test_an_error_in_the_loop_is_not_a_lost_worker():
    from ray.train import WorkerGroupError

    assert lost_workers(WorkerGroupError("rank 0 failed", {0: ValueError("loss is nan at step 3")})) == {}


def _load_fails_on_damaged_bytes(config: dict) -> None:
    """A training worker whose checkpoint load failed on the checkpoint's bytes (loop.load_checkpoint)."""
    from raydpo.train.checkpoints import DamagedCheckpoint

    raise DamagedCheckpoint(config["folder"], "rng_rank0.pt could not be read (EOFError: Ran out of input)")


def test_a_workers_damaged_checkpoint_is_found_in_ray_trains_error(ray_local, tmp_path):
    """What ``train_policy`` reads out of a real Ray Train failure to move the checkpoint aside
    and start again from the one before."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydpo.train.policy import damaged_checkpoint

    folder = f"{tmp_path}/ray/train/checkpoint_2026-12-07_10-00-00.000000"
    trainer = TorchTrainer(_load_fails_on_damaged_bytes, train_loop_config={"folder": folder},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="train"))
    sigint = signal.getsignal(signal.SIGINT)  # fit() leaves a handler of its own (train_policy puts it back too)
    try:
        with pytest.raises(ray.train.WorkerGroupError) as raised:
            trainer.fit()
    finally:
        signal.signal(signal.SIGINT, sigint)
    found = damaged_checkpoint(raised.value)
    assert found is not None, raised.value
    assert (found.folder, found.why) == (folder, "rng_rank0.pt could not be read (EOFError: Ran out of input)")
    assert damaged_checkpoint(ray.train.WorkerGroupError("rank 0 failed", {0: ValueError("loss is nan")})) is None


def test_eval_shards_are_cut_before_the_workers_hold_every_cpu(ray_local):
    """2 workers of 1 CPU on a 2-CPU node: the eval split must not need a CPU once they run (Ray
    Data cuts blocks with 1-CPU tasks, which would wait forever, the workers with them). The
    shards are cut when FixedShards is built, in the driver; configure and reading need no task."""
    import threading

    import ray

    from raydpo.train.loop import FixedShards

    ds = ray.data.range(101, override_num_blocks=7).map_batches(lambda b: b)  # lazy: a split must run tasks
    shards = FixedShards({"eval": ds}, world_size=2)
    every_cpu = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(every_cpu.ready(), timeout=60)  # what the training workers hold while they run
    got: list[list[int]] = []
    try:
        def read() -> None:
            for worker in shards.configure({"eval": ds}, 2, None, None):
                got.append([int(i) for batch in worker["eval"].iter_batches() for i in batch["id"]])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=60)
        assert not reader.is_alive(), "reading the eval shards waited for a CPU the workers hold"
    finally:
        ray.util.remove_placement_group(every_cpu)
    assert [len(rows) for rows in got] == [50, 50]  # equal shards: 1 of 101 rows left out
    assert not set(got[0]) & set(got[1])  # disjoint

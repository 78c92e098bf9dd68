"""The generator pool on a real local Ray: shards sample as one generator does, and an actor
killed by its pid (before or during a call, or before a sync) is replaced with the pool's policy,
giving the same samples."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from actors.generator import GeneratorPool, make_generator
from raydpo.config import GeneratorConfig
from raydpo.online.samples import SamplingSettings
from tests.actors.test_generator import policy, prompts_of

SAMPLING = SamplingSettings(k=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5)


def kill(pool: GeneratorPool, i: int) -> None:
    import ray

    os.kill(ray.get(pool.actors[i].pid.remote()), signal.SIGKILL)


@pytest.mark.slow  # generator actors killed by pid and replaced, the samples compared
def test_the_pool_survives_killed_actors_with_the_same_samples(ray_local, tmp_path):
    v0, v1 = policy(tmp_path / "v0", 0), policy(tmp_path / "v1", 1)
    prompts = prompts_of(v0) * 3
    one = make_generator("transformers", str(v1))
    one.load_weights(str(v1), 1)

    pool = GeneratorPool(GeneratorConfig(backend="transformers", num_actors=2, num_cpus=0.5), str(v0))
    kill(pool, 0)  # dead before its sync: replaced, then synced
    pool.sync(str(v1), 1)
    clean = pool.generate(prompts, SAMPLING)
    # Shards are seeded by their prompts' positions: the pool samples what one generator samples.
    first = one.generate(prompts[: len(prompts) // 2], SAMPLING)
    assert [s.completions for s in clean[: len(first)]] == [s.completions for s in first]
    assert {s.version for s in clean} == {1}

    kill(pool, 1)  # dead between calls
    assert [s.completions for s in pool.generate(prompts, SAMPLING)] == [s.completions for s in clean]

    got: list = []
    worker = threading.Thread(target=lambda: got.append(pool.generate(prompts, SAMPLING)))
    worker.start()
    time.sleep(0.2)
    kill(pool, 0)  # during the call (or just before it: the outcome must be the same)
    worker.join(timeout=300)
    assert got and [s.completions for s in got[0]] == [s.completions for s in clean]
    assert {s.version for s in got[0]} == {1}  # the new actor holds the pool's policy
    pool.shutdown()


def test_a_pool_gives_up_after_its_restarts(ray_local, tmp_path):
    import ray

    v0 = policy(tmp_path / "v0", 0)
    pool = GeneratorPool(GeneratorConfig(backend="transformers", num_actors=1, num_cpus=0.5), str(v0))
    pool.MAX_RESTARTS = 0
    kill(pool, 0)
    with pytest.raises(ray.exceptions.RayActorError):
        pool.generate(prompts_of(v0), SAMPLING)
    pool.shutdown()

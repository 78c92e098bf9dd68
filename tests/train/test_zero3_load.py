"""ZeRO-3 weights in and out one parameter at a time (raydpo.train.zero3, Engine.weights,
adapters.save_streamed, raydpo.safetensors_stream), on 2 CPU ranks over gloo.

- a partitioned load holds only partitions, and gathered they are the folder's tensors exactly
  (float32, and cast to bf16 for DeepSpeed's bf16 mode);
- the streamed save of a trained ZeRO-3 model loads back with ``from_pretrained`` equal to the
  gathered state, under the tensor names ``save_pretrained`` writes, in several shards with the
  index;
- the safetensors stream alone: files that ``safetensors`` itself reads, a plan that cuts shards
  where asked.
"""
from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from raydpo.safetensors_stream import SafetensorsFolder, TensorSpec, shard_plan, write_checkpoint

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _rank_main(rank: int, port: int, job: str, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        globals()[f"_job_{job}"](rank, Path(folder), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _engine(folder: Path, bf16: bool, lr: float = 0.0):
    """The product's path: one DeepSpeed config for the partitioned load and the engine."""
    from raydpo.train.engine import OptimConfig, build_engine, deepspeed_config, deepspeed_ready
    from raydpo.train.zero3 import load_partitioned

    ds_config = deepspeed_config(micro_batch_size=1, grad_accum_steps=1, zero_stage=3, bf16=bf16, max_grad_norm=1.0)
    deepspeed_ready(torch.device("cpu"))
    model = load_partitioned(str(folder), "bfloat16" if bf16 else "float32", ds_config)
    partitioned = {n: (p.numel(), p.ds_numel) for n, p in model.named_parameters()}
    engine = build_engine("deepspeed", model, OptimConfig(lr=lr, max_grad_norm=1.0), grad_accum_steps=1,
                          micro_batch_size=1, zero_stage=3, bf16=bf16, ds_config=ds_config)
    return model, engine, partitioned


def _job_load(rank: int, folder: Path, out: Path) -> None:
    for bf16 in (False, True):
        model, engine, partitioned = _engine(folder, bf16)
        state = engine.full_state_dict()
        if rank == 0:
            torch.save({"state": state, "partitioned": partitioned}, out / f"load_bf16={bf16}.pt")
        else:
            assert state == {}


def _job_save(rank: int, folder: Path, out: Path) -> None:
    from raydpo.models import load_tokenizer
    from raydpo.train.adapters import save_streamed

    model, engine, _ = _engine(folder, bf16=False, lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]]) + rank
    engine.backward(engine.module(input_ids=ids, labels=ids).loss)  # one step: weights unlike the folder's
    engine.step()
    # Shards of at most 40 kB: the tiny model's 4 x 64 x 64 float32 matrices are 16 kB each.
    written = save_streamed(model, engine, load_tokenizer(str(folder)), out / "final", max_shard_bytes=40_000)
    state = engine.full_state_dict()
    if rank == 0:
        assert written == out / "final"
        torch.save(state, out / "gathered.pt")
    else:
        assert written is None


def _job_lora(rank: int, folder: Path, out: Path) -> None:
    """LoRA on a partitioned model: PEFT wraps the partitioned layers, DeepSpeed partitions the new
    adapters; the final folder (merged on rank 0 from the gathered state) is written as the loop does."""
    from raydpo.logprobs import PolicyScorer
    from raydpo.models import load_tokenizer
    from raydpo.train.adapters import LoraSettings, ModelPrep, prepare_model, save_final
    from raydpo.train.engine import OptimConfig, build_engine, deepspeed_config, deepspeed_ready
    from raydpo.train.zero3 import load_partitioned

    ds_config = deepspeed_config(micro_batch_size=1, grad_accum_steps=1, zero_stage=3, bf16=False, max_grad_norm=1.0)
    deepspeed_ready(torch.device("cpu"))
    lm = prepare_model(load_partitioned(str(folder), "float32", ds_config),
                       ModelPrep(lora=LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj",))))
    scorer = PolicyScorer(lm)
    engine = build_engine("deepspeed", scorer, OptimConfig(lr=1e-2, max_grad_norm=1.0), grad_accum_steps=1,
                          micro_batch_size=1, zero_stage=3, ds_config=ds_config)
    scorer.register_zero3()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]]) + rank
    engine.backward(engine.module.lm(input_ids=ids, labels=ids).loss)
    engine.step()
    state = engine.full_state_dict()
    if rank == 0:
        save_final(lm, state, load_tokenizer(str(folder)), out / "final", prefix="lm.")


def _run(job: str, folder: Path, out: Path) -> None:
    # As tests/train/test_engine.py: a forkserver imports the heavy modules once and forks clean workers.
    multiprocessing.forkserver.set_forkserver_preload(["torch", "torch.distributed", "transformers", "deepspeed",
                                                       __name__])
    mp.start_processes(_rank_main, args=(_free_port(), job, str(folder), str(out)), nprocs=WORLD, join=True,
                       start_method="forkserver")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raydpo.models import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2, num_heads=4)


def test_partitioned_load_gathers_to_the_folders_tensors(tiny: Path, tmp_path: Path) -> None:
    _run("load", tiny, tmp_path)
    stored = _folder_tensors(tiny)
    assert "lm_head.weight" not in stored  # the tiny model ties its head: the file has it once
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        got = torch.load(tmp_path / f"load_bf16={bf16}.pt", weights_only=True)
        # Every parameter was partitioned as it was made: this rank held none of them whole.
        assert all(numel < full for numel, full in got["partitioned"].values()), got["partitioned"]
        state = got["state"]
        assert set(state) == set(stored) | {"lm_head.weight"}
        for name, tensor in state.items():
            want = stored["model.embed_tokens.weight" if name == "lm_head.weight" else name].to(dtype)
            assert tensor.dtype == dtype and torch.equal(tensor, want), name


def test_streamed_save_loads_back_equal_to_the_gathered_state(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    _run("save", tiny, tmp_path)
    final = tmp_path / "final"
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # shards, cut where asked
    # The names save_pretrained writes: the tied head is left out, as in the folder loaded.
    assert set(index["weight_map"]) == set(_folder_tensors(tiny))
    assert not any(torch.equal(gathered[k], v) for k, v in _folder_tensors(tiny).items() if v.dim() == 2)  # trained
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    assert set(loaded) == set(gathered)
    for name, tensor in gathered.items():
        assert torch.equal(loaded[name], tensor), name
    config = json.loads((final / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "float32"
    assert (final / "tokenizer.json").exists()


def test_lora_on_a_partitioned_model_trains_and_merges(tiny: Path, tmp_path: Path) -> None:
    """Only the adapters train: the merged folder differs from the initial one in q_proj alone."""
    from transformers import AutoModelForCausalLM

    _run("lora", tiny, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.float32).state_dict()
    initial = _folder_tensors(tiny)
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
    for name, tensor in initial.items():
        assert torch.equal(merged[name], tensor) != ("q_proj" in name), name


def test_safetensors_stream_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.randn(4, 4, generator=g),
               "scalar": torch.tensor(2.5)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    files = write_checkpoint(tmp_path, specs, iter(tensors.items()), max_shard_bytes=64)
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    back = _folder_tensors(tmp_path)  # safetensors' own reader
    folder = SafetensorsFolder(tmp_path)  # and ours
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor) and back[name].dtype == tensor.dtype
        assert torch.equal(folder.read(name), tensor)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)


def test_shard_plan_keeps_order_and_bounds() -> None:
    specs = [TensorSpec(n, torch.float32, (k,)) for n, k in (("a", 10), ("b", 10), ("c", 30), ("d", 1))]
    plan = shard_plan(specs, max_shard_bytes=80)  # 40, 40, 120, 4 bytes
    assert [[s.name for s in shard] for shard in plan] == [["a", "b"], ["c"], ["d"]]


def test_stream_refuses_a_tensor_unlike_its_spec(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float32, (2,))]
    with pytest.raises(ValueError, match="expected a"):
        write_checkpoint(tmp_path, specs, iter([("a", torch.zeros(3))]))

"""Tests for raydpo.train.adapters: gradient checkpointing, LoRA (real PEFT) and the final HF folder.

Everything runs on a tiny random Llama in the pytest process; DeepSpeed runs single-process on
its CPU accelerator (a 1-process gloo group). The engine trains a small wrapper holding the HF
model as ``lm``, as the training loop does, so state-dict keys carry the ``lm.`` prefix.
"""
from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from raydpo.models import build_tiny_model, build_tiny_tokenizer
from raydpo.train.adapters import LoraSettings, ModelPrep, prepare_model, save_final
from raydpo.train.engine import Engine, OptimConfig, build_engine

TOKENIZER = build_tiny_tokenizer()
VOCAB = len(TOKENIZER)
LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear")
# Large enough that a few steps move the adapters (lora_B starts at 0) well past round-off.
OPTIM = OptimConfig(lr=1e-2, total_steps=3, schedule="constant", max_grad_norm=1.0)


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    """The project's tiny Llama (tied head), small enough for several DeepSpeed engines per test."""
    return build_tiny_model(VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_positions=64, seed=seed)


def _ids(seed: int = 1, rows: int = 4, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


class Scorer(torch.nn.Module):
    """Stands in for the loop's wrapper: the HF (or PEFT) model is its attribute ``lm``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, labels=ids).loss


def _train(prep: ModelPrep, kind: str = "ddp", zero_stage: int = 2, steps: int = 3) -> tuple[Engine, torch.nn.Module]:
    """A few steps of ``kind`` on prepare_model(tiny Llama); returns the engine and the HF/PEFT model."""
    lm = prepare_model(_tiny_llama(), prep)
    engine = build_engine(kind, Scorer(lm), OPTIM, grad_accum_steps=1, micro_batch_size=4, zero_stage=zero_stage)
    for step in range(steps):
        with engine.autocast():
            loss = engine.module(_ids(seed=step).to(engine.device))
        engine.backward(loss)
        engine.step()
    return engine, engine.model.lm


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing: less memory, same gradients.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(lora: LoraSettings | None) -> None:
    ids = _ids()
    plain = prepare_model(_tiny_llama(), ModelPrep(gradient_checkpointing=False, lora=lora))
    checkpointed = prepare_model(_tiny_llama(), ModelPrep(gradient_checkpointing=True, lora=lora))
    if lora is not None:
        # lora_B starts at zero, which would make every lora_A gradient zero: perturb both alike.
        for model in (plain, checkpointed):
            torch.manual_seed(3)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1)
    base = checkpointed.get_base_model() if lora is not None else checkpointed
    assert base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing") else base.is_gradient_checkpointing
    assert base.config.use_cache is False

    expected, got = _grads(plain, ids), _grads(checkpointed, ids)
    assert got.keys() == expected.keys() and expected
    if lora is not None:
        assert all("lora_" in n for n in got)
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# LoRA: only adapters train; the final folder is a merged plain model plus the adapter.
# ---------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_the_optimizer_holds_only_them() -> None:
    engine, lm = _train(ModelPrep(lora=LORA), steps=1)
    assert isinstance(lm, peft.PeftModel)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: every projection of every layer, but not the output head.
    assert sum(".lora_A." in n for n in trainable) == 2 * 7
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    in_optimizer = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in lm.parameters() if p.requires_grad}

    # The step moved the adapters and left every base weight alone.
    init = prepare_model(_tiny_llama(), ModelPrep(lora=LORA)).state_dict()
    after = lm.state_dict()
    for name, value in after.items():
        if ".lora_B." in name:
            assert not torch.equal(value, init[name]), name
        elif ".lora_" not in name:
            assert torch.equal(value, init[name]), name


@pytest.mark.parametrize(
    ("kind", "zero_stage"), [("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)], ids=["ddp", "zero2", "zero3"]
)
def test_lora_final_folder_is_merged_and_loads_without_peft(kind: str, zero_stage: int, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine, lm = _train(ModelPrep(gradient_checkpointing=True, lora=LORA), kind=kind, zero_stage=zero_stage)
    state = engine.full_state_dict()
    # The trained PEFT model, rebuilt from the engine's weights (ZeRO-3's live parameters are
    # empty partitions); before save_final, which consumes the state dict.
    trained = prepare_model(_tiny_llama(), ModelPrep(lora=LORA))
    trained.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
    ids = _ids(seed=9)
    expected = _logits(trained, ids)
    out = save_final(lm, state, TOKENIZER, tmp_path / "final", prefix="lm.")

    # A plain model folder: the base model's own weight names, no PEFT config at the top.
    assert not (out / "adapter_config.json").exists()
    saved = load_file(out / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model.") for k in saved)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not isinstance(merged, peft.PeftModel)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    # Same function as the trained PEFT model.
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)

    # The adapter alone, on the untouched base, through PEFT.
    adapter = peft.PeftModel.from_pretrained(_tiny_llama(), out / "adapter")
    torch.testing.assert_close(_logits(adapter, ids), expected, atol=1e-5, rtol=0)
    assert not any(p.device.type == "meta" for p in lm.parameters())  # the live model was not touched
    assert lm.get_base_model().config.use_cache is False


def test_lora_deepspeed_zero2_matches_ddp() -> None:
    ddp, _ = _train(ModelPrep(lora=LORA))
    ds, _ = _train(ModelPrep(lora=LORA), kind="deepspeed", zero_stage=2)
    expected, got = ddp.full_state_dict(), ds.full_state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Full fine-tuning: the final folder.
# ---------------------------------------------------------------------------------------------


def test_zero3_final_folder_loads_plain_and_equals_ddp(tmp_path: Path) -> None:
    """ZeRO-3's live parameters are empty partitions: the folder comes from the gathered dict."""
    from transformers import AutoModelForCausalLM

    folders = {}
    for kind, stage in (("ddp", 2), ("deepspeed", 3)):
        engine, lm = _train(ModelPrep(gradient_checkpointing=True), kind=kind, zero_stage=stage, steps=1)
        folders[kind] = save_final(lm, engine.full_state_dict(), TOKENIZER, tmp_path / kind, prefix="lm.")
        assert lm.config.use_cache is False  # the live model keeps its training setting ...
    ddp = AutoModelForCausalLM.from_pretrained(folders["ddp"])
    zero3, info = AutoModelForCausalLM.from_pretrained(folders["deepspeed"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert zero3.config.use_cache is True  # ... while the saved one has its cache back
    init = _tiny_llama().state_dict()
    assert any(not torch.equal(ddp.state_dict()[k], init[k]) for k in init), "one step changed nothing"
    for name, value in ddp.state_dict().items():
        assert zero3.state_dict()[name].dtype == torch.float32
        torch.testing.assert_close(zero3.state_dict()[name], value, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert (folders["deepspeed"] / "tokenizer.json").exists()


def test_save_final_rejects_a_wrong_prefix(tmp_path: Path) -> None:
    engine, lm = _train(ModelPrep(), steps=1)
    with pytest.raises(ValueError, match="prefix"):
        save_final(lm, engine.full_state_dict(), TOKENIZER, tmp_path / "final", prefix="policy.")

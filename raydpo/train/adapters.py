"""Memory-saving changes to the policy before training, and saving it after.

``prepare_model(model, prep)`` runs once per worker, after loading the model and before the
engine is built (the engine's optimizer only holds the parameters left trainable here):

* gradient (activation) checkpointing: each decoder layer's activations are recomputed in
  backward instead of kept, trading one extra forward for memory linear in the layer count;
* LoRA through PEFT: the base weights are frozen and small low-rank adapters are trained.

``save_final(model, state_dict, tokenizer, out_dir)`` writes the trained policy as a plain
Hugging Face folder; ``save_streamed(model, engine, tokenizer, out_dir)`` writes a model without
adapters the same way from the engine's weights one tensor at a time (ZeRO-3 gathers each alone),
never holding the whole model. A LoRA policy is merged into its base weights there (so serving and the
next round's reference need no PEFT), and its adapter is also written alone to
``{out_dir}/adapter``.

PEFT is imported only when LoRA is asked for (``pip install 'raydpo[lora]'``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from raydpo.config import TrainConfig
from raydpo.safetensors_stream import TensorSpec, write_checkpoint

__all__ = ["LoraSettings", "ModelPrep", "prepare_model", "save_final", "save_streamed", "write_hf_folder", "hf_specs"]

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA hyperparameters (``train.lora``; the defaults live in ``raydpo.config``).

    Attributes:
        r: rank of the update ``B @ A``.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input.
        target_modules: ``"all-linear"`` (every linear layer but the output head) or module
            names such as ``("q_proj", "v_proj")``.
    """

    r: int
    alpha: float
    dropout: float
    target_modules: str | tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept the config's list (``LoraSettings(**cfg.train.lora.model_dump())``) but hold a
        # tuple, so the settings stay immutable and hashable.
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


@dataclass(frozen=True)
class ModelPrep:
    """What :func:`prepare_model` changes; the default changes nothing."""

    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None

    @classmethod
    def from_train(cls, train: TrainConfig) -> ModelPrep:
        lora = LoraSettings(**train.lora.model_dump()) if train.lora else None
        return cls(gradient_checkpointing=train.gradient_checkpointing, lora=lora)


def _peft_config(lora: LoraSettings) -> Any:
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
    )


def prepare_model(model: torch.nn.Module, prep: ModelPrep) -> torch.nn.Module:
    """Apply ``prep`` to a freshly loaded HF causal LM; returns the model to train.

    With LoRA that is a ``peft.PeftModel`` wrapping ``model`` (only adapter weights have
    ``requires_grad``); otherwise ``model`` itself. Call it before ``build_engine``.

    Checkpointing uses the non-reentrant torch implementation: it gives the same gradients,
    works under DDP (reentrant checkpointing breaks DDP's one-reduction-per-parameter rule)
    and with frozen parameters. The KV cache is turned off because it is useless in training
    and incompatible with recomputation.
    """
    if prep.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if prep.lora is None:
        return model
    import peft

    if prep.gradient_checkpointing:
        # Frozen embeddings give activations without requires_grad. Non-reentrant checkpointing
        # copes, but a reentrant checkpoint (a model that overrides our kwargs) would then drop
        # every adapter gradient; this hook makes the embedding output require grad so both work.
        model.enable_input_require_grads()
    return peft.get_peft_model(model, _peft_config(prep.lora))


def _strip(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if not prefix:
        return state_dict
    missing = [k for k in state_dict if not k.startswith(prefix)]
    if missing:
        raise ValueError(f"state_dict keys without the prefix {prefix!r}: {missing[:3]}")
    return {k[len(prefix):]: v for k, v in state_dict.items()}


def save_final(
    model: torch.nn.Module,
    state_dict: dict[str, Tensor],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "",
) -> Path:
    """Write the trained policy to ``out_dir`` as a plain HF folder (weights + tokenizer).

    Call on rank 0 only, with what the engine's (collective) ``full_state_dict()`` returned:
    under ZeRO-3 ``model``'s own parameters are empty partitions, so the weights always come
    from ``state_dict`` and ``model`` only lends its class and configs. ``prefix`` is stripped
    from the keys first (``"lm."`` when the engine trained a wrapper holding the model as ``lm``).

    A ``peft.PeftModel`` is rebuilt from ``state_dict`` on a weightless (meta-device) skeleton,
    saved as an adapter to ``out_dir/adapter`` (``PeftModel.from_pretrained`` loads it), then
    merged with PEFT's ``merge_and_unload`` and saved to ``out_dir``, which
    ``AutoModelForCausalLM.from_pretrained`` loads without PEFT. The live model is not touched,
    but ``state_dict`` is consumed: its tensors become the merged model's (merging adds the
    adapters into the base weights in place), which saves a second full copy of the weights in
    host memory. Do not use it afterwards.
    """
    out = Path(out_dir)
    state = _strip(state_dict, prefix)
    if _is_peft(model):
        merged = _merged_copy(model, state, out / ADAPTER_DIR)
        merged.config.use_cache = True
        merged.save_pretrained(out, safe_serialization=True)
    else:
        # prepare_model turned the KV cache off for training; a loaded policy should have it.
        use_cache = model.config.use_cache
        model.config.use_cache = True
        try:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
    tokenizer.save_pretrained(out)
    return out


def hf_specs(model: torch.nn.Module) -> list[TensorSpec]:
    """The tensors ``model.save_pretrained`` writes: its state dict's names less the tied aliases,
    removed by transformers' own rule, each with its full dtype and shape (a ZeRO-3 parameter's
    ``ds_shape``, not its empty placeholder's)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    meta = {name: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype, device="meta")
            for name, t in model.state_dict(keep_vars=True).items()}
    # With meta tensors, transformers finds the aliases by the model's own parameter objects.
    kept = remove_tied_weights_from_state_dict(meta, model)
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in kept.items()]


def save_streamed(model: torch.nn.Module, engine: Any, tokenizer: Any, out_dir: str | os.PathLike,
                  *, max_shard_bytes: int = 2 * 2**30) -> Path | None:
    """COLLECTIVE (every rank): ``model`` (an HF causal LM the engine trains, without adapters) as
    a plain HF folder at ``out_dir``, written by rank 0 from ``engine.weights``: each tensor is
    gathered (ZeRO-3), copied to the host, written into its safetensors file and dropped, so no
    rank holds a second copy of the model. Returns the folder on rank 0, None elsewhere."""
    if _is_peft(model):
        raise ValueError("save_streamed writes a plain model; a PEFT model is merged by save_final")
    specs = hf_specs(model)
    weights = engine.weights(model, [s.name for s in specs])
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in weights:  # the gathers are collectives: every rank runs them, in order
            pass
        return None
    return write_hf_folder(model, specs, weights, tokenizer, out_dir, max_shard_bytes=max_shard_bytes)


def write_hf_folder(model: torch.nn.Module, specs: list[TensorSpec], weights: Iterable[tuple[str, Tensor]],
                    tokenizer: Any, out_dir: str | os.PathLike, *, max_shard_bytes: int = 2 * 2**30) -> Path:
    """``model``'s plain HF folder from ``weights`` (CPU tensors in the order of ``specs``, which
    :func:`hf_specs` made), written as they come: what ``save_pretrained`` writes (the same
    tensor names, tied aliases left out; its config with the KV cache on; the generation config),
    in safetensors files of at most ``max_shard_bytes`` with the index json when there are several,
    and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # prepare_model turned the KV cache off for training; a loaded policy should have it
    config.dtype = str(model.dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    write_checkpoint(out, specs, weights, max_shard_bytes)
    tokenizer.save_pretrained(out)
    return out


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def hf_weights(model: torch.nn.Module, state_dict: dict[str, Tensor], *, prefix: str = "") -> dict[str, Tensor]:
    """The weights a plain HF model of ``model`` takes, by their HF names: ``state_dict`` (what
    the engine's ``full_state_dict()`` returned, keys under ``prefix``) with a PEFT model's
    adapters merged in, as :func:`save_final` writes them; what a generator receives in a sync.
    Consumes ``state_dict`` as :func:`save_final` does."""
    state = _strip(state_dict, prefix)
    return _merged_copy(model, state, None).state_dict() if _is_peft(model) else state


def _merged_copy(model: Any, state: dict[str, Tensor], adapter_dir: Path | None) -> torch.nn.Module:
    """A merged plain model holding ``state``'s weights; writes the adapter to ``adapter_dir``
    on the way (unless None)."""
    import peft

    base = model.get_base_model()
    # A meta-device skeleton allocates nothing; load_state_dict(assign=True) then adopts the
    # state dict's tensors (and dtype) as parameters, so no weight is copied or initialised.
    with torch.device("meta"):
        skeleton = type(base)(copy.deepcopy(base.config))  # a copy: the live model keeps its config
        fresh = peft.get_peft_model(skeleton, model.peft_config[model.active_adapter])
    result = fresh.load_state_dict(state, strict=False, assign=True)
    # Tied weights (lm_head = embed_tokens) may be listed once: tie_weights() re-links them.
    fresh.get_base_model().tie_weights()
    still_meta = [n for n, p in fresh.named_parameters() if p.device.type == "meta"]
    if result.unexpected_keys or still_meta:
        raise ValueError(
            f"state_dict does not match the PEFT model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {still_meta[:3]} (wrong prefix?)"
        )
    if adapter_dir is not None:
        fresh.save_pretrained(adapter_dir, safe_serialization=True)
    return fresh.merge_and_unload()

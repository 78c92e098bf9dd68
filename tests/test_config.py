"""Tests of ``raydpo.config``: typed YAML, validated once before Ray starts; every error names its
key path; ``--set dotted.key=value`` overrides parsed as YAML scalars."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from raydpo.config import Config, ConfigError, flatten, load_config, parse_overrides
from raydpo.losses import LOSSES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def base_tree() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_quickstart_loads() -> None:
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.model.tiny.hidden_size == 64
    assert cfg.data.synthetic is not None and cfg.data.synthetic.rows == 4000
    assert cfg.loss.type == "sigmoid" and cfg.loss.beta == 0.5
    assert cfg.train.lr == pytest.approx(3.0e-3)
    assert cfg.train.batch_size == 32 and cfg.train.micro_batch_size == 32
    assert cfg.train.eval_every == 50
    assert cfg.output_dir == "outputs/quickstart"


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    tree = base_tree()
    tree["train"]["bogus"] = 1
    msg = error_of(write(tmp_path, tree))
    assert "train.bogus" in msg


def test_unknown_nested_key_names_its_path(tmp_path: Path) -> None:
    tree = base_tree()
    tree["model"]["tiny"]["hiden_size"] = 8
    assert "model.tiny.hiden_size" in error_of(write(tmp_path, tree))


def test_unknown_top_level_key(tmp_path: Path) -> None:
    tree = base_tree()
    tree["trian"] = {"lr": 1.0}
    assert "trian" in error_of(write(tmp_path, tree))


def test_wrong_type_names_its_path(tmp_path: Path) -> None:
    tree = base_tree()
    tree["loss"]["beta"] = "large"
    msg = error_of(write(tmp_path, tree))
    assert "loss.beta" in msg
    assert "train.beta" not in msg


def test_out_of_range_names_its_path(tmp_path: Path) -> None:
    tree = base_tree()
    tree["train"]["num_workers"] = 0
    assert "train.num_workers" in error_of(write(tmp_path, tree))


def test_every_bad_key_is_named(tmp_path: Path) -> None:
    tree = base_tree()
    tree["train"]["bogus"] = 1
    tree["loss"]["beta"] = "x"
    msg = error_of(write(tmp_path, tree))
    assert "train.bogus" in msg and "loss.beta" in msg


def test_missing_required_value_names_it(tmp_path: Path) -> None:
    tree = base_tree()
    del tree["model"]["name_or_path"]
    assert "model.name_or_path" in error_of(write(tmp_path, tree))


def test_data_without_sources_fails(tmp_path: Path) -> None:
    tree = base_tree()
    del tree["data"]["synthetic"]
    msg = error_of(write(tmp_path, tree))
    assert "data" in msg and "data.train" in msg


def test_parse_overrides_yaml_typing() -> None:
    out = parse_overrides(["train.lr=0.1", "loss.type=ipo", "train.bf16=true", "train.max_steps=null",
                           "train.epochs=3", "data.train=[a.jsonl, b.jsonl]", "tracking.run_name=x=y"])
    assert out == {
        "train.lr": 0.1,
        "loss.type": "ipo",
        "train.bf16": True,
        "train.max_steps": None,
        "train.epochs": 3,
        "data.train": ["a.jsonl", "b.jsonl"],
        "tracking.run_name": "x=y",  # only the first "=" separates
    }
    assert isinstance(out["train.epochs"], int)


@pytest.mark.parametrize("bad", ["train.lr", "=3", "noequals"])
def test_parse_overrides_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides([bad])


def test_parse_overrides_exponent_without_dot_is_a_float() -> None:
    assert parse_overrides(["train.lr=1e-4"]) == {"train.lr": 0.0001}


def test_load_config_exponent_override_still_validates_as_float() -> None:
    """Whatever the YAML scalar, the typed field ends up a float (pydantic parses "1e-4")."""
    assert load_config(QUICKSTART, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_load_config_applies_overrides() -> None:
    cfg = load_config(QUICKSTART, ["train.lr=0.1", "loss.type=ipo", "model.tiny.num_layers=3", "train.max_steps=7"])
    assert cfg.train.lr == 0.1
    assert cfg.loss.type == "ipo"
    assert cfg.model.tiny.num_layers == 3
    assert cfg.train.max_steps == 7
    assert cfg.loss.beta == 0.5  # untouched keys keep the YAML's value


def test_override_of_unknown_key_fails_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        load_config(QUICKSTART, ["train.bogus=1"])


def test_override_with_wrong_type_fails_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"loss\.beta"):
        load_config(QUICKSTART, ["loss.beta=abc"])


def test_override_below_a_scalar_fails() -> None:
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(QUICKSTART, ["output_dir.x=1"])


def test_unknown_loss_lists_known_ones() -> None:
    msg = error_of(QUICKSTART, ["loss.type=bogus"])
    assert "bogus" in msg and "loss" in msg
    for name in ("sigmoid", "ipo", "hinge", "simpo"):
        assert name in msg
    assert set(LOSSES) >= {"sigmoid", "ipo", "hinge", "simpo"}


def test_unknown_loss_in_weights_fails() -> None:
    msg = error_of(QUICKSTART, ["loss.weights={sigmoid: 1.0, nope: 0.5}"])
    assert "nope" in msg and "sigmoid" in msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.batch_size=30"],  # micro 32 does not divide 30
        ["train.num_workers=3"],  # 32 pairs over 3 workers
        ["train.num_workers=2"],  # 16 per worker, micro 32
    ],
)
def test_batch_size_must_divide_names_train_batch_size(overrides: list[str]) -> None:
    assert "train.batch_size" in error_of(QUICKSTART, overrides)


def test_divisible_batch_size_loads() -> None:
    cfg = load_config(QUICKSTART, ["train.num_workers=2", "train.micro_batch_size=8", "train.batch_size=48"])
    assert cfg.train.batch_size == 48


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Independent of ``model_dump``: walk the pydantic objects' declared fields."""
    if isinstance(node, BaseModel):
        out: dict[str, object] = {}
        for name in type(node).model_fields:
            out.update(_leaves(getattr(node, name), f"{prefix}.{name}" if prefix else name))
        return out
    return {prefix: node}


def test_flatten_gives_every_value_as_a_dotted_key() -> None:
    cfg = load_config(QUICKSTART)
    flat = flatten(cfg)
    assert flat == _leaves(cfg)
    assert flat["loss.beta"] == 0.5
    assert flat["model.tiny.hidden_size"] == 64
    assert flat["data.synthetic.rows"] == 4000
    assert flat["train.lr"] == pytest.approx(3.0e-3)
    assert flat["tracking.experiment"] == "raydpo-quickstart"
    assert not any(isinstance(v, (dict, BaseModel)) for v in flat.values())
    n_train = len(type(cfg.train).model_fields)
    assert sum(k.startswith("train.") for k in flat) == n_train


def test_load_config_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    assert "not valid YAML" in error_of(p)
    p.write_text("- a list\n")
    assert "mapping" in error_of(p)


def test_train_job_rejects_bad_config_before_ray(tmp_path: Path) -> None:
    """``python -m jobs.train_dpo BAD`` exits 2 with the key path on stderr, and never starts Ray."""
    tree = base_tree()
    tree["train"]["bogus"] = 1
    tree["output_dir"] = str(tmp_path / "out")
    path = write(tmp_path, tree)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train_dpo", str(path), "--set", "loss.beta=abc"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,  # a hang guard, not a timing
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.bogus" in proc.stderr and "loss.beta" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()  # setup() never ran


# ---------------------------------------------------------------------------------------------
# Precision: no combination trains bf16/fp16 weights under AdamW (updates would round away).
# ---------------------------------------------------------------------------------------------


def _line_for(msg: str, key: str) -> str:
    """The error line that starts with ``key:`` (each error line names its key first)."""
    lines = [line.strip() for line in msg.splitlines() if line.strip().startswith(f"{key}:")]
    assert lines, msg
    return lines[0]


def test_bf16_weights_with_ddp_fail_pointing_at_train_bf16() -> None:
    line = _line_for(error_of(QUICKSTART, ["model.dtype=bfloat16", "train.engine=ddp"]), "model.dtype")
    assert "train.bf16: true" in line and "master weights" in line


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
@pytest.mark.parametrize("bf16", [False, True])
def test_fp16_weights_never_train(engine: str, bf16: bool) -> None:
    msg = error_of(QUICKSTART, ["model.dtype=float16", f"train.engine={engine}", f"train.bf16={str(bf16).lower()}"])
    assert "float16" in _line_for(msg, "model.dtype")


def test_bf16_weights_with_deepspeed_need_train_bf16() -> None:
    line = _line_for(error_of(QUICKSTART, ["model.dtype=bfloat16", "train.engine=deepspeed"]), "model.dtype")
    assert "train.bf16: true" in line
    cfg = load_config(QUICKSTART, ["model.dtype=bfloat16", "train.engine=deepspeed", "train.bf16=true"])
    assert cfg.model.dtype == "bfloat16" and cfg.train.bf16


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_train_bf16_with_float32_weights_loads(engine: str) -> None:
    cfg = load_config(QUICKSTART, [f"train.engine={engine}", "train.bf16=true", "model.dtype=float32"])
    assert cfg.model.dtype == "float32" and cfg.train.bf16


ONLINE = ROOT / "configs" / "quickstart_online.yaml"


@pytest.mark.parametrize("overrides, bf16, model, reference, autocast, generator", [
    ([], False, "float32", "float32", None, "float32"),  # CPUs: plain float32 everywhere
    (["train.use_gpu=true"], True, "float32", "float32", "bfloat16", "bfloat16"),  # DDP: autocast
    (["train.use_gpu=true", "train.engine=deepspeed"], True, "bfloat16", "bfloat16", None, "bfloat16"),
    (["train.bf16=true"], True, "float32", "float32", "bfloat16", "bfloat16"),  # asked for on CPUs
    (["train.use_gpu=true", "train.bf16=false"], False, "float32", "float32", None, "float32"),
    (["train.use_gpu=true", "train.engine=deepspeed", "model.dtype=float32"], True, "float32", "bfloat16", None,
     "bfloat16"),  # DeepSpeed computes in bf16 whatever dtype it loads
    (["train.use_gpu=true", "reference.dtype=bfloat16"], True, "float32", "bfloat16", None, "bfloat16"),
    (["train.use_gpu=true", "reference.autocast=null"], True, "float32", "float32", None, "bfloat16"),
    (["train.use_gpu=true", "online.generator.dtype=float32"], True, "float32", "float32", "bfloat16", "float32"),
])
def test_precision_autos_resolve_to_the_trainers(overrides, bf16, model, reference, autocast, generator) -> None:
    """train.bf16 follows train.use_gpu; model.dtype is bfloat16 for DeepSpeed's bf16 mode; the
    reference and the generators compute at the trainer's precision; an explicit value wins."""
    cfg = load_config(ONLINE, overrides)
    assert (cfg.train.bf16, cfg.model.dtype, cfg.reference.dtype, cfg.reference.autocast,
            cfg.online.generator.dtype) == (bf16, model, reference, autocast, generator)
    if "reference." not in " ".join(overrides):  # the reference at the trainer's precision
        assert cfg.reference.precision() == cfg.precision()


@pytest.mark.parametrize("overrides, dtype", [
    ([], "float32"),  # CPUs
    (["online.judge.num_gpus=0.5"], "bfloat16"),  # GPUs: it only scores, no master weights to keep
    (["online.judge.num_gpus=1", "online.judge.dtype=float32"], "float32"),  # an explicit value wins
])
def test_the_judge_model_is_bf16_on_gpus_and_float32_on_cpus(overrides, dtype) -> None:
    judge = ["online.judge.type=reward_model", "online.judge.model=some/reward-model"]
    assert load_config(ONLINE, judge + overrides).online.judge.model_dtype == dtype


def test_resolved_precision_revalidates_to_itself_and_resumes() -> None:
    """The resolved values are what a run saves (flatten) and what its resume compares: the same
    config resolves the same, and validating a saved config gives it back unchanged."""
    from raydpo.config import trajectory_changes, unflatten, validate

    for overrides in ([], ["train.use_gpu=true"], ["train.use_gpu=true", "train.engine=deepspeed"]):
        saved = flatten(load_config(ONLINE, overrides))
        assert trajectory_changes(saved, flatten(load_config(ONLINE, overrides))) == []
        assert flatten(validate(unflatten(saved))) == saved
    # A run saved before these keys had autos (float32, no bf16, no reference.autocast key) resumes on CPUs.
    before = flatten(load_config(ONLINE))
    del before["reference.autocast"], before["online.judge.dtype"]
    assert trajectory_changes(before, flatten(load_config(ONLINE))) == []
    # Turning bf16 on changes what is trained: named, not resumed silently.
    assert "train.bf16: False -> True" in trajectory_changes(before, flatten(load_config(ONLINE, ["train.bf16=true"])))


def test_reference_autocast_is_for_float32_weights() -> None:
    line = _line_for(error_of(ONLINE, ["reference.dtype=bfloat16", "reference.autocast=bfloat16"]),
                     "reference.autocast")
    assert "float32" in line


@pytest.mark.parametrize("overrides", [
    ["online.generator.tensor_parallel_size=2", "online.generator.num_gpus=1"],
    ["online.generator.tensor_parallel_size=2", "online.generator.num_gpus=0.5"],
    ["online.generator.num_gpus=2"],  # two GPUs for one rank: tensor_parallel_size says how many it uses
    ["online.generator.tensor_parallel_size=2", "online.generator.num_gpus=4"],
])
def test_tensor_parallel_size_must_match_num_gpus(overrides: list[str]) -> None:
    line = _line_for(error_of(ONLINE, overrides), "online.generator.tensor_parallel_size")
    assert "num_gpus" in line


@pytest.mark.parametrize("overrides", [
    ["online.generator.tensor_parallel_size=2", "online.generator.num_gpus=2"],
    ["online.generator.tensor_parallel_size=2", "online.generator.num_gpus=0"],  # vLLM-CPU
    ["online.generator.num_gpus=1"],
    ["online.generator.num_gpus=0.5", "online.generator.engine={gpu_memory_utilization: 0.45}"],
    ["online.generator.num_gpus=0.5", "online.generator.backend=transformers"],  # no vLLM: no memory share
])
def test_generator_gpus_that_fit(overrides: list[str]) -> None:
    load_config(ONLINE, overrides)


@pytest.mark.parametrize("memory, expect", [
    (None, "give each engine its share"),  # vLLM's default would take 0.92 of the GPU in each engine
    (0.6, "(0, 0.5]"),  # more than the actor's share
    ("half", "(0, 0.5]"),
])
def test_shared_gpu_needs_a_memory_share_that_fits(memory, expect: str) -> None:
    engine = "{}" if memory is None else f"{{gpu_memory_utilization: {memory}}}"
    msg = error_of(ONLINE, ["online.generator.num_gpus=0.5", f"online.generator.engine={engine}"])
    assert expect in _line_for(msg, "online.generator.engine.gpu_memory_utilization")


def test_offload_optimizer_needs_deepspeed() -> None:
    assert _line_for(error_of(QUICKSTART, ["train.offload_optimizer=true"]), "train.offload_optimizer")
    cfg = load_config(QUICKSTART, ["train.engine=deepspeed", "train.zero_stage=3", "train.offload_optimizer=true"])
    assert cfg.train.offload_optimizer


# ---------------------------------------------------------------------------------------------
# Memory: gradient checkpointing and LoRA.
# ---------------------------------------------------------------------------------------------


def test_memory_settings_default_off() -> None:
    cfg = load_config(QUICKSTART)
    assert cfg.train.gradient_checkpointing is False
    assert cfg.train.lora is None
    assert cfg.train.offload_optimizer is False


def test_lora_section(tmp_path: Path) -> None:
    tree = base_tree()
    tree["train"]["gradient_checkpointing"] = True
    tree["train"]["lora"] = {"r": 8}
    cfg = load_config(write(tmp_path, tree))
    assert cfg.train.gradient_checkpointing
    assert cfg.train.lora is not None and cfg.train.lora.r == 8
    assert cfg.train.lora.target_modules == "all-linear"
    tree["train"]["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert load_config(write(tmp_path, tree)).train.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("lora", "key"),
    [
        ({"rank": 8}, "train.lora.rank"),
        ({"r": 0}, "train.lora.r"),
        ({"dropout": 1.0}, "train.lora.dropout"),
        ({"target_modules": []}, "train.lora.target_modules"),
        ({"target_modules": "q_proj"}, "train.lora.target_modules"),
    ],
)
def test_bad_lora_names_its_key(tmp_path: Path, lora: dict, key: str) -> None:
    tree = base_tree()
    tree["train"]["lora"] = lora
    assert key in error_of(write(tmp_path, tree))


def test_lora_section_becomes_lora_settings() -> None:
    """The job turns ``train.lora`` into the adapters' settings object with no renaming."""
    from raydpo.train.adapters import LoraSettings

    cfg = load_config(QUICKSTART, ["train.lora.r=4", "train.lora.target_modules=[q_proj]"])
    settings = LoraSettings(**cfg.train.lora.model_dump())
    assert settings == LoraSettings(r=4, alpha=32.0, dropout=0.05, target_modules=("q_proj",))


def test_a_chat_template_that_does_not_compile_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.chat_template: .*chat template line 1: unexpected '}'"):
        load_config(QUICKSTART, ['data.chat_template="{% for m in messages %}{{ m.content }"'])


def test_a_set_value_that_is_not_yaml_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"--set data\.chat_template: the value is not YAML"):
        load_config(QUICKSTART, ["data.chat_template={% for m in messages %}"])


# ---------------------------------------------------------------------------------------------
# Placement and storage on a cluster.
# ---------------------------------------------------------------------------------------------


def test_placement_defaults_place_as_before() -> None:
    """Unset, the new keys ask Ray for what it was asked before: PACK, no accelerator, no custom
    resources, checkpoints in {output_dir}/ray."""
    t = load_config(QUICKSTART).train
    assert (t.placement_strategy, t.accelerator_type, t.resources, t.storage_path) == ("PACK", None, None, None)
    online = load_config(ROOT / "configs/quickstart_online.yaml").online
    for group in (online.generator, online.judge, load_config(QUICKSTART).reference):
        assert (group.accelerator_type, group.resources) == (None, None)


def test_placement_keys_load() -> None:
    online = load_config(ROOT / "configs/quickstart_online.yaml", [
        "train.use_gpu=true", "train.accelerator_type=A100", "train.placement_strategy=STRICT_SPREAD",
        "train.resources={trainer_node: 1}", "train.storage_path=s3://bucket/raydpo",
        "online.generator.num_gpus=1", "online.generator.accelerator_type=L4", "online.generator.resources={gen: 0.5}",
        "online.judge.num_gpus=0.5", "online.judge.accelerator_type=H100",
        "reference.num_gpus=1", "reference.accelerator_type=L4", "reference.resources={ref: 1}"])
    assert online.train.placement_strategy == "STRICT_SPREAD" and online.train.resources == {"trainer_node": 1.0}
    assert online.train.storage_path == "s3://bucket/raydpo" and online.train.accelerator_type == "A100"
    assert online.online.generator.resources == {"gen": 0.5} and online.online.judge.accelerator_type == "H100"
    assert online.reference.accelerator_type == "L4" and online.reference.resources == {"ref": 1.0}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.placement_strategy=RANDOM"], "train.placement_strategy"),
        (["train.accelerator_type=A100"], "train.accelerator_type"),  # without train.use_gpu
        (["train.use_gpu=true", "train.accelerator_type=A 100"], "train.accelerator_type"),
        (["train.resources={CPU: 2}"], "train.resources"),  # CPUs: train.cpus_per_worker
        (["train.resources={'accelerator_type:A100': 1}"], "train.resources"),
        (["train.resources={gpu_node: -1}"], "train.resources"),
        (["train.resources={gpu_node: many}"], "train.resources.gpu_node"),
        (["train.storage_path=''"], "train.storage_path"),
    ],
)
def test_bad_placement_names_its_key(overrides: list[str], key: str) -> None:
    assert _line_for(error_of(QUICKSTART, overrides), key)


@pytest.mark.parametrize("group", ["online.generator", "online.judge", "reference"])
def test_actor_group_accelerator_needs_gpus(group: str) -> None:
    online = ROOT / "configs/quickstart_online.yaml"
    assert _line_for(error_of(online, [f"{group}.accelerator_type=A100"]), f"{group}.accelerator_type")
    assert _line_for(error_of(online, [f"{group}.resources={{GPU: 1}}"]), f"{group}.resources")


def test_a_run_from_before_the_placement_keys_resumes() -> None:
    """A run saved before ``train.storage_path`` existed (no such key) resumes with it unset,
    not with another storage; placement keys are harmless to change."""
    from raydpo.config import trajectory_changes

    saved = flatten(load_config(QUICKSTART))
    del saved["train.storage_path"]
    assert trajectory_changes(saved, flatten(load_config(QUICKSTART))) == []
    moved = flatten(load_config(QUICKSTART, ["train.storage_path=/nfs/ckpt"]))
    assert trajectory_changes(saved, moved) == ["train.storage_path: '<unset>' -> '/nfs/ckpt'"]
    placed = flatten(load_config(QUICKSTART, ["train.placement_strategy=SPREAD", "train.resources={n: 1}"]))
    assert trajectory_changes(saved, placed) == []


def test_training_workers_get_the_malloc_setting_and_train_env() -> None:
    """glibc's mmap threshold (4 MiB unless set; null leaves glibc's own) plus train.env, which wins."""
    from raydpo.train.policy import worker_env

    assert worker_env(load_config(QUICKSTART).train) == {"MALLOC_MMAP_THRESHOLD_": "4194304"}
    assert worker_env(load_config(QUICKSTART, ["train.malloc_mmap_threshold=null"]).train) == {}
    both = load_config(QUICKSTART, ["train.malloc_mmap_threshold=1048576", "train.env={NCCL_DEBUG: INFO}"])
    assert worker_env(both.train) == {"MALLOC_MMAP_THRESHOLD_": "1048576", "NCCL_DEBUG": "INFO"}
    # A CPU setting: GPU workers keep glibc's own, and still get train.env.
    gpu = load_config(QUICKSTART, ["train.use_gpu=true", "train.malloc_mmap_threshold=1048576",
                                   "train.env={NCCL_DEBUG: INFO}"])
    assert worker_env(gpu.train) == {"NCCL_DEBUG": "INFO"}
    mine = load_config(QUICKSTART, ["train.env={MALLOC_MMAP_THRESHOLD_: '65536'}"])
    assert worker_env(mine.train) == {"MALLOC_MMAP_THRESHOLD_": "65536"}


def test_a_byte_order_mark_is_no_error_and_offsets_count_it(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a BOM: it loads; a bad byte after it is reported
    at its offset in the file (the BOM's 3 bytes included), as a hex editor shows it."""
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + QUICKSTART.read_bytes())
    assert load_config(p).model.name_or_path == "tiny"
    p.write_bytes(b"\xef\xbb\xbfa: \xc3\n")
    assert error_of(p) == f"{p}, line 1, column 7: byte 0xc3 (offset 6) is not UTF-8; save the file as UTF-8"


@pytest.mark.parametrize(("text", "message"), [
    ("a: 1\n---\nb: 2\n", "line 2, column 1: not valid YAML: but found another document"),
    ("a: \x01\n", "line 1: not valid YAML: character #x0001 is not allowed"),
    ("a: !!python/object:os.system x\n", "line 1, column 4: not valid YAML: could not determine a constructor"),
    ("a: *nowhere\n", "line 1, column 4: not valid YAML: found undefined alias 'nowhere'"),
])
def test_yaml_errors_name_the_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert error_of(p).startswith(f"{p}, {message}")


def test_float_settings_must_be_finite() -> None:
    """A NaN passes no bound check, and an infinite beta would train on silently."""
    assert "loss.beta: Input should be a finite number" in error_of(QUICKSTART, ["loss.beta=.inf"])
    assert "loss.simpo_gamma: Input should be a finite number" in error_of(QUICKSTART, ["loss.simpo_gamma=.nan"])


def test_an_alias_bomb_fails_without_being_expanded(tmp_path: Path) -> None:
    """"Billion laughs": nine levels of ten aliases each would expand to 10**9 values (and hang the
    loader, then the duplicate-key walk); the expansion is measured, not made. A merged mapping
    (``<<:``), the alias a config really uses, still loads."""
    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb.write_text("\n".join(levels) + "\n")
    assert error_of(bomb) == f"{bomb}: expands to more than 100,000 values through YAML aliases (*name): not a config"

    merged = tmp_path / "merged.yaml"
    merged.write_text(QUICKSTART.read_text().replace("train:\n", "train:\n  <<: {keep_checkpoints: 5}\n", 1))
    assert load_config(merged).train.keep_checkpoints == 5


def test_loss_settings_are_the_fields_of_loss_params() -> None:
    """``raydpo.losses.LossParams`` declares the hyper-parameters once: the ``loss`` section has
    exactly its fields (but the trainer's running ``bco_delta``), with its defaults."""
    import dataclasses

    from raydpo.config import TRAINER_KEPT_LOSS_PARAMS, LossConfig
    from raydpo.losses import LossParams

    names = {f.name for f in dataclasses.fields(LossParams)} - TRAINER_KEPT_LOSS_PARAMS
    assert set(LossConfig.model_fields) - {"type", "weights", "reference_free"} == names
    assert LossConfig().params() == LossParams()
    set_ = LossConfig(beta=0.3, label_smoothing=0.2, simpo_gamma=1.5, orpo_lambda=0.4, discopop_tau=0.2, dpop_lambda=5.0)
    assert set_.params() == LossParams(beta=0.3, label_smoothing=0.2, simpo_gamma=1.5, orpo_lambda=0.4,
                                       discopop_tau=0.2, dpop_lambda=5.0)


@pytest.mark.parametrize(("override", "message"), [
    ("loss.beta=0", "loss.beta: Input should be greater than 0"),
    ("loss.label_smoothing=0.5", "loss.label_smoothing: Input should be less than 0.5"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing: Input should be greater than or equal to 0"),
    ("loss.orpo_lambda=-1", "loss.orpo_lambda: Input should be greater than or equal to 0"),
    ("loss.discopop_tau=0", "loss.discopop_tau: Input should be greater than 0"),
    ("loss.dpop_lambda=-1", "loss.dpop_lambda: Input should be greater than or equal to 0"),
])
def test_loss_bounds(override: str, message: str) -> None:
    assert message in error_of(QUICKSTART, [override])


def test_resume_harmless_keys_are_those_of_before() -> None:
    """The placement keys of the actor groups come from their one declaration (``_ActorGroup``);
    the set of harmless keys is what it was when they were listed by hand."""
    from raydpo.config import RESUME_HARMLESS

    assert len(RESUME_HARMLESS) == len(set(RESUME_HARMLESS))
    assert set(RESUME_HARMLESS) == {
        "tracking.", "output_dir", "data.max_drop_fraction",
        "reference.num_actors", "reference.num_cpus", "reference.num_gpus", "reference.accelerator_type",
        "reference.resources", "reference.batch_tokens",
        "reference.window", "reference.max_padding", "reference.cache_dir",
        "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.max_failures", "train.fail_at_step", "train.cpus_per_worker", "train.use_gpu",
        "train.accelerator_type", "train.resources", "train.placement_strategy", "train.malloc_mmap_threshold",
        "train.env",
        "train.micro_batch_size", "train.gradient_checkpointing", "train.logprob_chunk_tokens",
        "online.rounds", "online.generator.num_actors", "online.generator.num_cpus", "online.generator.num_gpus",
        "online.generator.sync_timeout_s", "online.generator.env", "online.judge.num_actors",
        "online.judge.num_cpus", "online.judge.num_gpus", "online.judge.batch_size",
        "online.generator.accelerator_type", "online.generator.resources", "online.judge.accelerator_type",
        "online.judge.resources",
    } | {"online.generator.sync", "online.generator.sync_bucket_mib"}  # added since: the same weights either way


def test_the_pairing_rule_has_one_name() -> None:
    """``online.pairs`` takes the names of ``data.ranked_pairs``; the old online name is an error
    that names the key and the new value, never a silent alias."""
    online = ROOT / "configs" / "quickstart_online.yaml"
    assert load_config(online, ["online.pairs=all_margin"]).online.pairs == "all_margin"
    message = error_of(online, ["online.pairs=all_with_margin"])
    assert "online.pairs: " in message and "write online.pairs: all_margin" in message


def test_reference_max_padding_is_a_key_of_before() -> None:
    """The reference packs as the trainer does: no padding to cap. The key says so, by name."""
    line = _line_for(error_of(QUICKSTART, ["reference.max_padding=1.1"]), "reference")
    assert "reference.max_padding: the reference packs" in line

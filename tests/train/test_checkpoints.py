"""Damaged checkpoints (raydpo.train.checkpoints, loop.load_checkpoint): each test damages a real
checkpoint of its own, written by a real engine (DDP, DeepSpeed ZeRO-2) through the loop's own
manifest writer, and checks what the verification, the driver's repair of Ray Train's run folder
(read back by Ray Train's own CheckpointManager) and the worker's load make of it. No Ray cluster."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raydpo.errors import InputError
from raydpo.train import checkpoints
from raydpo.train.checkpoints import MANIFEST, SNAPSHOT, DamagedCheckpoint, NothingToResume, repair_run, verify
from raydpo.train.engine import OptimConfig, build_engine
from raydpo.train.loop import TrainedRows, _rng_state, _write_manifest, load_checkpoint
from raydpo.train.step import RunningMean


def _engine(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32))
    return build_engine(kind, model, OptimConfig(lr=1e-3, total_steps=4), grad_accum_steps=1, micro_batch_size=2)


def _write(engine, folder: Path, step: int, manifest: bool = True) -> Path:
    """What loop._save_checkpoint writes into its staging folder, on one rank."""
    folder.mkdir(parents=True)
    engine.save(str(folder))
    torch.save(_rng_state(), folder / "rng_rank0.pt")
    state = {"step": step, "bco": {"mean": 0.0, "count": 0}} | ({"manifest": MANIFEST} if manifest else {})
    (folder / "loop_state.json").write_text(json.dumps(state))
    if manifest:
        _write_manifest(folder, step)
    return folder


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """A DDP engine and its checkpoint (engine_state.pt, loop_state.json, rng_rank0.pt, manifest)."""
    engine = _engine("ddp")
    return engine, _write(engine, tmp_path_factory.mktemp("ddp") / "template", 3)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """A DeepSpeed ZeRO-2 checkpoint: latest, zero_to_fp32.py, global_step0/ with the model states
    and rank 0's optimizer partition."""
    engine = _engine("deepspeed")
    return engine, _write(engine, tmp_path_factory.mktemp("zero2") / "template", 3)


def _copy(template: Path, to: Path) -> Path:
    shutil.copytree(template, to)
    return to


def _local(path: Path):
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem(), str(path)


def _flip(path: Path, at: float = 0.5) -> None:
    """One bit changed in the middle of a file: its size stays the same."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


# --- the manifest, per damage -------------------------------------------------------------------------

def test_the_manifest_lists_every_file_with_its_size_and_hash(ddp, zero2):
    for _, folder in (ddp, zero2):
        manifest = json.loads((folder / MANIFEST).read_text())
        files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
        assert sorted(manifest["files"]) == sorted(files) and manifest["step"] == 3
        for name, entry in manifest["files"].items():
            assert entry["size"] == files[name].stat().st_size
            assert entry["sha256"] == checkpoints.sha256_of(files[name].open("rb").read)
        assert verify(*_local(folder)).damage is None
    assert any(name.startswith("global_step") and name.endswith("optim_states.pt")
               for name in json.loads((zero2[1] / MANIFEST).read_text())["files"])


def _largest(folder: Path) -> Path:
    return max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)


DAMAGE = {  # what is done to the checkpoint -> what verify must say
    "zero-byte state": (lambda f: _largest(f).write_bytes(b""), "is 0 bytes, its manifest says"),
    "truncated state": (lambda f: _largest(f).write_bytes(_largest(f).read_bytes()[:1000]),
                        "is 1000 bytes, its manifest says"),
    "bit flip in the state": (lambda f: _flip(_largest(f)), "content is not what was written"),
    "bit flip in loop_state.json": (lambda f: _flip(f / "loop_state.json", 0.2), "loop_state.json's content"),
    "deleted state": (lambda f: _largest(f).unlink(), "is missing"),
    "deleted RNG file": (lambda f: (f / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "deleted manifest": (lambda f: (f / MANIFEST).unlink(), f"its manifest {MANIFEST} is missing"),
    "truncated manifest": (lambda f: (f / MANIFEST).write_text((f / MANIFEST).read_text()[:50]),
                           f"its manifest {MANIFEST} is unreadable"),
    "manifest of another shape": (lambda f: (f / MANIFEST).write_text('{"files": [1, 2]}'),
                                  f"its manifest {MANIFEST} is unreadable"),
    "nothing left": (lambda f: [p.unlink() for p in list(f.rglob("*")) if p.is_file()],
                     f"neither {MANIFEST} nor loop_state.json"),
}


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_damage_is_found_and_named(engine, damage, ddp, zero2, tmp_path):
    folder = _copy((ddp if engine == "ddp" else zero2)[1], tmp_path / "ckpt")
    largest = _largest(folder).relative_to(folder).as_posix()
    do, said = DAMAGE[damage]
    do(folder)
    why = verify(*_local(folder)).damage
    assert why is not None and said in why, why
    if "state" in damage and "loop_state" not in damage:
        assert why.startswith(largest), why  # names the file


def test_a_checkpoint_changed_after_it_was_found_intact_is_checked_again(ddp, tmp_path):
    """The job's check and train_policy's hash a checkpoint once, unless a file changed in between."""
    folder = _copy(ddp[1], tmp_path / "ckpt")
    assert verify(*_local(folder)).damage is None
    _flip(folder / "engine_state.pt")
    assert "engine_state.pt's content is not what was written" in verify(*_local(folder)).damage


def test_a_stray_file_is_ignored_and_the_checkpoint_still_loads(ddp, tmp_path):
    """A file the manifest does not list is read by no loader: the checkpoint is intact."""
    engine, template = ddp
    folder = _copy(template, tmp_path / "ckpt")
    (folder / "notes.txt").write_text("left by someone")
    (folder / "rng_rank7.pt").write_bytes(b"junk")
    assert verify(*_local(folder)) == checkpoints.Verdict(None)
    assert load_checkpoint(engine, RunningMean(), folder, "ckpt") == 3


def test_a_checkpoint_of_an_older_raydpo_is_trusted_unverified(ddp, tmp_path):
    """No manifest, and a loop_state.json that does not promise one: written before manifests."""
    folder = _write(ddp[0], tmp_path / "ckpt", 5, manifest=False)
    assert verify(*_local(folder)) == checkpoints.Verdict(None, unverified=True)


# --- the worker's load -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["ddp", "zero2"])
@pytest.mark.parametrize("damage,file", [
    ("deleted RNG file", "rng_rank0.pt"), ("truncated state", "the engine's state"),
    ("zero-byte state", "the engine's state"), ("deleted state", "the engine's state"),
])
def test_a_load_that_fails_on_damaged_bytes_names_the_checkpoint_and_file(engine, damage, file, ddp, zero2, tmp_path):
    """What a worker raises where a damaged checkpoint reaches it (one without a manifest, or one
    damaged after the driver's check): a DamagedCheckpoint naming the checkpoint and the file; a
    missing RNG file is damage, not skipped."""
    eng, template = ddp if engine == "ddp" else zero2
    folder = _copy(template, tmp_path / "ckpt")
    DAMAGE[damage][0](folder)
    with pytest.raises(DamagedCheckpoint) as raised:
        load_checkpoint(eng, RunningMean(), folder, "storage/ckpt")
    assert str(raised.value).startswith(f"checkpoint storage/ckpt is damaged: {file}"), str(raised.value)
    assert isinstance(raised.value, InputError)


def test_a_damaged_loop_state_is_damage(ddp, tmp_path):
    engine, template = ddp
    folder = _copy(template, tmp_path / "ckpt")
    (folder / "loop_state.json").write_text('{"step": 3')
    with pytest.raises(DamagedCheckpoint, match="loop_state.json could not be read"):
        load_checkpoint(engine, RunningMean(), folder, "ckpt")


def test_a_damaged_checkpoint_pickles_as_ray_sends_it():
    import pickle

    error = pickle.loads(pickle.dumps(DamagedCheckpoint("/s/checkpoint_1", "rng_rank1.pt is missing")))
    assert (error.folder, error.why) == ("/s/checkpoint_1", "rng_rank1.pt is missing")


def test_read_failures_are_told_from_other_failures(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(100)}, path)
    for damaged in (b"", path.read_bytes()[:200]):
        (tmp_path / "y.pt").write_bytes(damaged)
        with pytest.raises(Exception) as raised:
            torch.load(tmp_path / "y.pt", weights_only=True)
        assert checkpoints.is_read_failure(raised.value), raised.value
    assert not checkpoints.is_read_failure(torch.OutOfMemoryError("CUDA out of memory"))
    assert not checkpoints.is_read_failure(RuntimeError("Error(s) in loading state_dict for Llama: size mismatch"))


# --- the driver's repair of Ray Train's run folder ----------------------------------------------------

def _run_folder(tmp_path: Path, template: Path, steps: list[int]) -> tuple[Path, list[str]]:
    """A Ray Train run folder as Ray Train 2.60 leaves it: checkpoint folders named by time and
    its snapshot (its own model) registering them in order, the last the latest."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (_CheckpointManagerState,
                                                                                _TrainingResultState)

    run = tmp_path / "ray" / "train"
    names = [f"checkpoint_2026-12-07_10-00-{i:02d}.000000" for i in range(len(steps))]
    results = []
    for name, step in zip(names, steps):
        folder = _copy(template, run / name)
        state = json.loads((folder / "loop_state.json").read_text()) | {"step": step}
        (folder / "loop_state.json").write_text(json.dumps(state))
        manifest = json.loads((folder / MANIFEST).read_text())
        if "loop_state.json" in manifest["files"]:
            checkpoints.write_manifest(folder, step, manifest["files"] | checkpoints.describe(folder, ["loop_state.json"]))
        results.append(_TrainingResultState(checkpoint_dir_name=name, metrics={"step": step, "loss": 0.5}))
    snapshot = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=[2 * i + 1 for i in range(len(results))],
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=2 * len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run / SNAPSHOT).write_text(snapshot.model_dump_json())
    return run, names


def _ray_resumes_from(run: Path) -> int | None:
    """The step Ray Train's own CheckpointManager would hand the workers (it reads the snapshot
    and raises CheckpointManagerInitializationError on a checkpoint that no longer exists)."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    manager = CheckpointManager(CheckpointConfig(num_to_keep=2),
                                StorageContext(storage_path=str(run.parent), experiment_dir_name=run.name))
    latest = manager.latest_checkpoint_result
    return None if latest is None else json.loads((Path(latest.checkpoint.path) / "loop_state.json").read_text())["step"]


def test_an_intact_run_is_left_as_ray_train_wrote_it(ddp, tmp_path):
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    before = (run / SNAPSHOT).read_bytes()
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[-1]
    assert said == [] and (run / SNAPSHOT).read_bytes() == before
    assert _ray_resumes_from(run) == 8


@pytest.mark.parametrize("damage", ["truncated state", "bit flip in the state", "deleted RNG file", "deleted manifest"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_resumed(damage, ddp, tmp_path):
    run, names = _run_folder(tmp_path, ddp[1], [4, 8, 12])
    DAMAGE[damage][0](run / names[-1])
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[1]
    assert f"checkpoint {run}/{names[2]} (step 12) is damaged: " in said[0] and DAMAGE[damage][1] in said[0]
    assert said[0].endswith(f"moved to {run}/damaged/{names[2]}")
    assert said[-1] == f"[raydpo] resuming from {run}/{names[1]} (step 8), the newest intact checkpoint"
    assert not (run / names[2]).exists() and (run / "damaged" / names[2]).is_dir()
    assert DAMAGE[damage][1] in (run / "damaged" / f"{names[2]}.txt").read_text()
    assert _ray_resumes_from(run) == 8
    kept = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in kept["checkpoint_results"]] == names[:2]
    assert kept["checkpoint_report_indices"] == [1, 3] and kept["current_report_index"] == 6  # Ray's own, kept
    assert kept["checkpoint_results"][1]["metrics"] == {"step": 8, "loss": 0.5}


def test_the_two_newest_damaged_resume_from_the_third(zero2, tmp_path):
    run, names = _run_folder(tmp_path, zero2[1], [4, 8, 12])
    _flip(_largest(run / names[2]))
    (run / names[1] / "latest").unlink()
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[0]
    assert len(said) == 3 and "latest is missing" in said[1]
    assert _ray_resumes_from(run) == 4


def test_a_deleted_checkpoint_folder_is_dropped_from_the_snapshot(ddp, tmp_path):
    """Until now: CheckpointManagerInitializationError, and the user could only start over."""
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    shutil.rmtree(run / names[1])
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[0]
    assert "is gone: skipped" in said[0]
    assert _ray_resumes_from(run) == 4


def test_an_older_deleted_checkpoint_is_dropped_too(ddp, tmp_path):
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    shutil.rmtree(run / names[0])
    assert repair_run(str(run.parent), run.name, lambda _: None) == names[1]
    assert _ray_resumes_from(run) == 8


@pytest.mark.parametrize("damage", ["truncated", "not JSON", "another shape", "deleted"])
def test_a_damaged_or_deleted_snapshot_is_rebuilt_from_the_intact_folders(damage, ddp, tmp_path):
    run, names = _run_folder(tmp_path, ddp[1], [4, 8, 12])
    snapshot = run / SNAPSHOT
    {"truncated": lambda: snapshot.write_text(snapshot.read_text()[:100]),
     "not JSON": lambda: snapshot.write_bytes(b"\xff\xfe\x00garbage"),
     "another shape": lambda: snapshot.write_text('{"checkpoint_results": 3}'),
     "deleted": snapshot.unlink}[damage]()
    (run / names[2] / "rng_rank0.pt").write_bytes(b"")
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[1]
    if damage != "deleted":
        assert "Ray Train's snapshot" in said[0] and (run / "damaged" / SNAPSHOT).exists()
    assert _ray_resumes_from(run) == 8
    assert [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]] == names[:2]


def test_every_checkpoint_damaged_is_a_users_error_and_never_a_fresh_start(ddp, tmp_path):
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    for name in names:
        (run / name / "engine_state.pt").write_bytes(b"")
    with pytest.raises(NothingToResume) as raised:
        repair_run(str(run.parent), run.name, lambda _: None)
    message = str(raised.value)
    assert isinstance(raised.value, InputError) and "\n" not in message
    assert f"no intact checkpoint to resume from in {run}" in message and f"delete {run}" in message
    with pytest.raises(NothingToResume):  # the same command again: still no silent start from scratch
        repair_run(str(run.parent), run.name, lambda _: None)
    shutil.rmtree(run)  # what the message says to do
    assert repair_run(str(run.parent), run.name, lambda _: None) is None


def test_a_fresh_run_has_nothing_to_resume(tmp_path):
    assert repair_run(str(tmp_path), "train", lambda _: None) is None


def test_a_failed_load_reported_by_a_worker_is_treated_as_damage(ddp, tmp_path):
    """An unverified (pre-manifest) checkpoint whose load failed in a worker: the driver's next
    repair moves it aside with the worker's reason."""
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    (run / names[1] / MANIFEST).unlink()
    state = json.loads((run / names[1] / "loop_state.json").read_text())
    del state["manifest"]
    (run / names[1] / "loop_state.json").write_text(json.dumps(state))
    said: list[str] = []
    assert repair_run(str(run.parent), run.name, said.append) == names[1]
    assert "has no manifest" in said[0] and "resuming from it unverified" in said[0]
    why = "the engine's state could not be read (RuntimeError: PytorchStreamReader failed)"
    assert repair_run(str(run.parent), run.name, lambda _: None, {names[1]: why}) == names[0]
    assert why in (run / "damaged" / f"{names[1]}.txt").read_text()
    assert _ray_resumes_from(run) == 4


# --- the trained-rows record ------------------------------------------------------------------------

def test_damaged_trained_rows_lines_are_dropped_on_the_cut_back(tmp_path, capfd):
    """A line of damaged bytes, and the last line of a worker killed mid-write: dropped, and said."""
    path = tmp_path / "trained_rows" / "rank0.jsonl"
    path.parent.mkdir()
    lines = [json.dumps({"step": s, "rows": [s]}) for s in range(1, 6)]
    path.write_bytes("\n".join(lines[:2]).encode() + b"\n\xff\xfe{garbage\n" + "\n".join(lines[2:]).encode()
                     + b'\n{"step": 6, "ro')
    TrainedRows(str(tmp_path), 0, start_step=4).close()
    assert path.read_text().splitlines() == lines[:4]
    assert "2 damaged line(s) dropped" in capfd.readouterr().out


# --- the job's check before any work (jobs.stages.check_resume) ----------------------------------------

def test_the_jobs_check_sets_damage_aside_and_refuses_an_unreadable_saved_config(ddp, tmp_path, capsys):
    """``raydpo train``'s check before Ray starts: a damaged newest checkpoint is set aside there,
    saying why; every checkpoint damaged fails there; and the run's saved config (what a resume is
    checked against), cut short, fails naming it, as long as there is progress to resume."""
    from jobs.stages import RUN_CONFIG, check_resume, save_run_config
    from raydpo.config import ConfigError, load_config
    from raydpo.train.policy import has_checkpoints

    def resumable(out: Path) -> bool:  # jobs.train_dpo's
        return has_checkpoints(str(out / "ray"), "train")

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    run, names = _run_folder(tmp_path, ddp[1], [4, 8])
    save_run_config(cfg, tmp_path)
    (run / names[1] / "engine_state.pt").write_bytes(b"")
    check_resume(cfg, tmp_path, resumable)
    assert f"{names[1]} (step 8) is damaged: engine_state.pt is 0 bytes" in capsys.readouterr().out
    assert _ray_resumes_from(run) == 4

    saved = tmp_path / RUN_CONFIG
    saved.write_text(saved.read_text()[:100])
    with pytest.raises(ConfigError, match=f"{saved} is damaged \\(JSONDecodeError: .*delete it to resume"):
        check_resume(cfg, tmp_path, resumable)

    (run / names[0] / "rng_rank0.pt").unlink()
    with pytest.raises(NothingToResume, match=f"no intact checkpoint to resume from in {run}"):
        check_resume(cfg, tmp_path, resumable)
    shutil.rmtree(tmp_path / "ray")  # as the message says: then the damaged saved config no longer matters
    check_resume(cfg, tmp_path, resumable)

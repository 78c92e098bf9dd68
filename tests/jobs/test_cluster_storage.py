"""Where a run's folders and checkpoints live on a cluster: which folders every node must see,
the decision on what the nodes saw, Ray Train's storage location, and what ``raydpo submit``
leaves out of its upload. The probe itself runs for real in tests/jobs/test_submit.py (two nodes,
one of them with a folder of its own)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs/quickstart.yaml"


def test_the_folders_every_node_must_see(tmp_path):
    """output_dir always; train.storage_path and reference.cache_dir only as paths (a URI is
    reached from anywhere) and the cache only where the run reads one."""
    from jobs.stages import run_folders

    cfg = load_config(QUICKSTART, [f"output_dir={tmp_path / 'out'}", f"reference.cache_dir=file://{tmp_path / 'ref'}",
                                   "train.storage_path=~/ckpt"])
    assert run_folders(cfg) == {"output_dir": tmp_path / "out", "reference.cache_dir": tmp_path / "ref",
                                "train.storage_path": Path("~/ckpt").expanduser()}
    remote = load_config(QUICKSTART, ["reference.cache_dir=s3://bucket/ref", "train.storage_path=gs://bucket/ckpt",
                                      f"output_dir={tmp_path}"])
    assert run_folders(remote) == {"output_dir": tmp_path}
    free = load_config(QUICKSTART, ["loss.reference_free=true", f"output_dir={tmp_path}"])
    assert set(run_folders(free)) == {"output_dir"}


def test_a_folder_a_node_does_not_see_is_an_error_naming_its_key(tmp_path):
    from jobs.stages import unshared_folders

    folders = {"output_dir": tmp_path / "out", "reference.cache_dir": tmp_path / "ref"}
    seen = {"output_dir": {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": False},
            "reference.cache_dir": {"10.0.0.1 (aaaa)": True, "10.0.0.2 (bbbb)": True}}
    (error,) = unshared_folders(folders, seen)
    assert error.startswith(f"output_dir: {tmp_path / 'out'} is not on storage every node sees (1 of 2 nodes do not: "
                            "10.0.0.2 (bbbb))")
    assert "NFS" in error and "s3://" not in error  # output_dir is a path; the cache may be a URI
    seen["reference.cache_dir"]["10.0.0.2 (bbbb)"] = False
    assert [e.split(":")[0] for e in unshared_folders(folders, seen)] == ["output_dir", "reference.cache_dir"]
    assert "s3://" in unshared_folders(folders, seen)[1]
    everyone = {k: dict.fromkeys(v, True) for k, v in seen.items()}
    assert unshared_folders(folders, everyone) == [] and unshared_folders(folders, {}) == []


def test_one_node_is_not_probed(ray_local, tmp_path):
    """On one node there is nothing to compare: no marker is written, nothing is reported."""
    from jobs.stages import probe_folders

    assert probe_folders({"output_dir": tmp_path / "out"}) == ({}, [])
    assert not (tmp_path / "out").exists()


def test_checkpoints_go_to_storage_path_one_folder_per_output_dir(tmp_path):
    """Unset: {out}/ray/train as before. Set: one folder per output folder (and per online round)
    under the storage path, the same on a re-run."""
    from raydpo.train.policy import checkpoint_location, has_checkpoints

    assert checkpoint_location(None, tmp_path / "out") == (str(tmp_path / "out" / "ray"), "train")
    store, name = checkpoint_location(str(tmp_path / "store"), tmp_path / "out")
    assert store == str(tmp_path / "store") and name.startswith("out-")
    assert checkpoint_location(str(tmp_path / "store"), tmp_path / "out") == (store, name)
    assert checkpoint_location("s3://bucket/ckpt/", tmp_path / "rounds/001/train")[0] == "s3://bucket/ckpt"
    assert checkpoint_location("s3://b", tmp_path / "rounds/001/train") != checkpoint_location("s3://b", tmp_path / "rounds/002/train")
    assert not has_checkpoints(store, name)  # nothing there yet, not even the folder
    (Path(store) / name / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    assert has_checkpoints(store, name)


def test_a_changed_config_does_not_resume_checkpoints_kept_in_storage(tmp_path):
    """The job's own check looks in {output_dir}/ray; checkpoints under train.storage_path count too."""
    from jobs.stages import check_resume, save_run_config
    from raydpo.train import checkpoints
    from raydpo.train.policy import checkpoint_location, has_checkpoints

    out = tmp_path / "out"
    out.mkdir()
    common = [f"output_dir={out}", f"train.storage_path={tmp_path / 'store'}"]
    cfg = load_config(QUICKSTART, common)
    save_run_config(cfg, out)
    store, name = checkpoint_location(cfg.train.storage_path, out)
    checkpoint = Path(store) / name / "checkpoint_2026-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "loop_state.json").write_text(json.dumps({"step": 2, "manifest": checkpoints.MANIFEST}))
    checkpoints.write_manifest(checkpoint, 2, checkpoints.describe(checkpoint, ["loop_state.json"]))  # intact
    only_local = lambda o: has_checkpoints(str(o / "ray"), "train")  # noqa: E731  (what jobs/train_dpo.py asks)
    check_resume(cfg, out, only_local)  # the same config resumes
    with pytest.raises(ConfigError, match=r"train.lr: 0.003 -> 0.01"):
        check_resume(load_config(QUICKSTART, [*common, "train.lr=0.01"]), out, only_local)
    with pytest.raises(ConfigError, match="train.storage_path"):  # moving the storage would start over
        check_resume(load_config(QUICKSTART, [f"output_dir={out}"]), out, only_local)
    assert json.loads((out / "run_config.json").read_text())["train.storage_path"] == str(tmp_path / "store")


def test_large_files_stay_behind(tmp_path):
    """Files over the limit are listed (and left out of the upload); excluded folders are not walked."""
    from jobs.submit import large_files

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.jsonl").write_bytes(b"x" * 2048)
    (tmp_path / "data" / "small.jsonl").write_bytes(b"x" * 10)
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "huge.so").write_bytes(b"x" * 4096)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "model.safetensors").write_bytes(b"x" * 4096)
    assert large_files(tmp_path, limit=1024) == ["data/big.jsonl"]


def test_the_job_and_how_its_config_travels(tmp_path):
    """A config in the project travels with the working_dir (a relative path); one from elsewhere in
    an environment variable, written to a fresh folder by the entrypoint. An online config runs
    the iterative job."""
    import subprocess

    from jobs.submit import CONFIG_ENV, entrypoint, job_module

    assert job_module(load_config(QUICKSTART)) == "jobs.train_dpo"
    assert job_module(load_config(ROOT / "configs/quickstart_online.yaml")) == "jobs.iterative_dpo"
    command, env = entrypoint(QUICKSTART, ["train.lr=0.01", "output_dir=/tmp/a b"], "jobs.train_dpo", [])
    assert command == "python -m jobs.train_dpo configs/quickstart.yaml --set train.lr=0.01 --set 'output_dir=/tmp/a b'"
    assert env == {}
    mine = tmp_path / "my run.yaml"
    mine.write_text("model: {name_or_path: tiny}\n")
    command, env = entrypoint(mine, [], "jobs.train_dpo", [])
    assert env == {CONFIG_ENV: mine.read_text()}
    # The shell part as the job runs it (here with `cat` for python): the file arrives whole, under its name.
    shown = subprocess.run(command.replace("exec python -m jobs.train_dpo", "exec cat"), shell=True, env=env,
                           capture_output=True, text=True, check=True)
    assert shown.stdout == mine.read_text()

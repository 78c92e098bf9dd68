"""The stages the jobs share: what ``prepare`` hands to every actor."""
from __future__ import annotations

from pathlib import Path

from raydpo.config import validate
from raydpo.models import write_tiny


def test_a_relative_model_folder_becomes_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in folders of their own: a relative path would be taken for a hub id there."""
    from jobs import stages

    write_tiny(tmp_path / "models" / "m", hidden_size=32, num_layers=1, num_heads=2)
    monkeypatch.chdir(tmp_path)
    cfg = validate({"model": {"name_or_path": "models/m"}, "data": {"synthetic": {"rows": 10}},
                    "output_dir": str(tmp_path / "out")})
    prepared = stages.prepare(cfg)
    assert Path(prepared.model_path).is_absolute() and Path(prepared.model_path) == tmp_path / "models" / "m"


def test_a_submitted_job_keeps_a_local_mlflow_store_in_output_dir(tmp_path, monkeypatch):
    """A job that Ray's job API runs in its copy of the working folder (deleted with Ray's session)
    moves a local store there to ``{output_dir}/mlflow.db``; a server, a store elsewhere and a job
    not submitted keep what was set. (The unset default is checked on a real cluster:
    tests/jobs/test_submit.py.)"""
    import json

    from jobs.stages import kept_tracking
    from raydpo.config import TrackingConfig

    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    out = tmp_path / "shared" / "out"
    relative = TrackingConfig(uri="sqlite:///mlflow.db", experiment="t")
    assert kept_tracking(relative, out) == relative  # not a submitted job: as set
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}}))
    assert kept_tracking(relative, out).uri == f"sqlite:///{out / 'mlflow.db'}"
    assert kept_tracking(relative.model_copy(update={"uri": "mlruns"}), out).uri == f"sqlite:///{out / 'mlflow.db'}"
    for kept in ("http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'elsewhere.db'}"):
        assert kept_tracking(relative.model_copy(update={"uri": kept}), out).uri == kept
    assert kept_tracking(relative, copy / "out") == relative  # output_dir goes with the copy too: nothing better


def test_a_job_starts_ray_with_memory_kill_retries_bounded(tmp_path):
    """Ray core retries a task its memory monitor killed for ever unless the driver bounds it
    before ``ray.init``: the job's ``start_ray`` does, so the data stages retry a bounded number of
    times. A fresh process: a test session's own Ray is started already."""
    import os
    import subprocess
    import sys

    from raydpo.data.pipeline import OOM_RETRIES_ENV, TASK_RETRIES

    code = ("import os, ray\n"
            "from jobs.stages import start_ray\n"
            "from raydpo.data.pipeline import stage_retries\n"
            "start_ray(verbose=False)\n"
            f"print(os.environ[{OOM_RETRIES_ENV!r}], stage_retries())\n"
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in (OOM_RETRIES_ENV, "RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [str(TASK_RETRIES), str(TASK_RETRIES)]

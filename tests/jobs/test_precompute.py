"""``raydpo precompute`` on a real local Ray: hits, misses, resume, corruption, and the JSON it prints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raydpo.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def overrides(out: Path, cache: Path, *more: str, uri: str | None = None) -> list[str]:
    """The quickstart config on 150 pairs, with its own output dir and cache."""
    return [f"output_dir={out}", f"reference.cache_dir={cache}", "data.synthetic.rows=150", "reference.window=64",
            "tracking.experiment=test-precompute", *([f"tracking.uri={uri}"] if uri else []), *more]


def config(out: Path, cache: Path, *more: str, uri: str | None = None):
    return load_config(ROOT / "configs/quickstart.yaml", overrides(out, cache, *more, uri=uri))


def values(cache_path: str) -> dict[bytes, float]:
    """Every cached log-prob of one cache key's directory (``RefStats.cache_dir``)."""
    from raydpo.data.refcache import Cache, CacheKey

    key = CacheKey(**json.loads(Path(cache_path, "key.json").read_text()))  # whatever key made it
    cache = Cache(str(Path(cache_path).parent), key)
    assert cache.path == cache_path
    table, corrupt, foreign = cache.read_index()
    assert (corrupt, foreign) == (0, 0)
    return dict(zip(table["key"].to_pylist(), table["logp"].to_pylist()))


@pytest.fixture(scope="module")
def clean(ray_local, tmp_path_factory):
    """One uninterrupted precompute: its stats and every cached value."""
    from jobs.precompute import run

    tmp = tmp_path_factory.mktemp("clean")
    stats = run(config(tmp / "out", tmp / "cache", uri=f"sqlite:///{tmp / 'mlflow.db'}"))
    return stats, values(stats.cache_dir)


def test_second_run_is_a_hit_and_loads_no_model(clean, tmp_path, capsys, mlflow_uri):
    """Run twice through the CLI entry point: the second computes nothing and no actor loads the
    model (each load leaves a record in the cache's ``loads/``), and stdout is one JSON object."""
    from jobs.precompute import main

    args = ["configs/quickstart.yaml", "--json", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"reference.cache_dir={tmp_path / 'cache'}", "--set", "data.synthetic.rows=150",
            "--set", f"tracking.uri={mlflow_uri}", "--set", "tracking.experiment=t"]
    outputs = []
    for _ in range(2):
        assert main([str(ROOT / args[0]), *args[1:]]) == 0
        stdout = capsys.readouterr().out
        assert stdout.count("\n") == 1
        outputs.append(json.loads(stdout))
    first, second = outputs
    for key in ("cache_key", "rows", "hits", "misses", "seconds", "tokens_per_s"):
        assert key in first and key in second
    assert first["rows"] == second["rows"] == clean[0].rows > 100
    assert (first["hits"], first["misses"], first["model_loads"]) == (0, first["rows"], 1)
    assert (second["hits"], second["misses"], second["model_loads"]) == (second["rows"], 0, 0)
    assert second["sequences_computed"] == 0 and second["cache_key"] == first["cache_key"]
    loads = list(Path(first["cache_dir"], "loads").iterdir())
    assert len(loads) == 1  # the first run's one actor; the second loaded nothing
    assert first["padding_waste"] <= 1.05
    runs = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("t").experiment_id])
    assert sorted(r.data.metrics["reference/hits"] for r in runs) == [0, second["rows"]]
    assert values(first["cache_dir"]).keys() == clean[1].keys()


def test_new_pairs_miss_and_unchanged_pairs_hit(clean, tmp_path):
    """150 pairs cached, then 200 pairs of the same generator: the first 150 hit, 50 are computed."""
    import shutil

    from jobs.precompute import run

    stats, _ = clean
    cache = tmp_path / "cache"
    shutil.copytree(Path(stats.cache_dir).parent, cache)
    more = run(config(tmp_path / "out", cache, "data.synthetic.rows=200", uri=f"sqlite:///{tmp_path / 'm.db'}"))
    assert more.cache_dir.endswith(Path(stats.cache_dir).name)  # same model, tokenizer, settings
    assert more.rows == 200 and more.hits == stats.rows and more.misses == 200 - stats.rows
    assert more.cache_key != stats.cache_key  # the data's fingerprint is part of it
    assert more.model_loads == 1


@pytest.mark.parametrize("override", ["model.tiny.seed=1", "data.max_length=40", "data.max_prompt_length=20",
                                      "data.truncation=keep_start", "reference.dtype=bfloat16",
                                      "data.chat_template='{{ messages[0].content }}'"])
def test_any_change_of_model_settings_or_dtype_is_another_key(tmp_path, override):
    from jobs.stages import cache_for, prepare

    keys = []
    for i, extra in enumerate(([], [override])):
        cfg = config(tmp_path / f"out{i}", tmp_path / "cache", *extra)
        keys.append(cache_for(cfg, prepare(cfg).model_path).path)
    assert keys[0] != keys[1]


def test_same_inputs_in_another_output_dir_are_the_same_key(tmp_path):
    from jobs.stages import cache_for, prepare

    paths = {cache_for(cfg, prepare(cfg).model_path).path
             for cfg in (config(tmp_path / "a", tmp_path / "c"), config(tmp_path / "b", tmp_path / "c"))}
    assert len(paths) == 1


@pytest.mark.slow  # `raydpo precompute` twice as its own process, one struck by SIGTERM
def test_a_precompute_stopped_by_sigterm_resumes_to_the_clean_values(clean, tmp_path):
    """``raydpo precompute`` as a user runs it (a job of its own on this cluster) gets a real
    SIGTERM once its actor has written a cache block (the actor is frozen first, so the signal
    lands mid-precompute on any machine): it exits 143 saying so, the MLflow run is KILLED, and
    the same command keeps the finished blocks, computes the rest, and every value equals the
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from jobs.precompute import run

    stats, want = clean
    uri, cache = f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "cache"
    small_windows = "reference.window=16"  # about 19 blocks, so the stop lands before the last
    args = overrides(tmp_path / "out", cache, small_windows, uri=uri)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.precompute", str(ROOT / "configs/quickstart.yaml"),
                             *(a for kv in args for a in ("--set", kv))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    actor = None
    try:
        deadline = time.monotonic() + 300
        while not list(cache.glob("v*-*/blocks/*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "no block written"
            time.sleep(0.01)
        actor = json.loads(next(cache.glob("v*-*/loads/*.json")).read_text())["pid"]  # the block's writer
        os.kill(actor, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if actor is not None:
            try:
                os.kill(actor, signal.SIGCONT)
            except ProcessLookupError:  # ended with its job
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "raydpo: preempted (SIGTERM) outside training" in stderr and "re-run the same command" in stderr
    run_id = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("test-precompute").experiment_id])[0]
    assert run_id.info.status == "KILLED"
    cfg = config(tmp_path / "out", cache, small_windows, uri=uri)
    partial = values(stats.cache_dir.replace(str(Path(stats.cache_dir).parent), str(cache)))
    assert 0 < len(partial) < len(want)
    resumed = run(cfg)
    # Only the missing sequences are computed. (A pair counts as a hit only when both of its
    # sequences are cached, and windows sort sequences by length: after a few blocks, maybe none.)
    assert resumed.misses > 0 and resumed.sequences_computed == len(want) - len(partial)
    got = values(resumed.cache_dir)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)


def test_a_corrupt_block_is_recomputed_not_read(clean, tmp_path):
    import shutil

    from jobs.precompute import run

    stats, want = clean
    cache = tmp_path / "cache"
    shutil.copytree(Path(stats.cache_dir).parent, cache)
    blocks = sorted((cache / Path(stats.cache_dir).name / "blocks").glob("*.parquet"))
    blocks[0].write_bytes(blocks[0].read_bytes()[:-100])  # torn: the footer is gone
    again = run(config(tmp_path / "out", cache, uri=f"sqlite:///{tmp_path / 'm.db'}"))
    assert again.corrupt_blocks == 1 and again.misses > 0 and again.model_loads == 1
    got = values(again.cache_dir)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)


def test_cache_key_holds_every_tokenization_setting(tmp_path):
    """The cache key holds the TokenizeSettings object whole, so a field added to it reaches the
    key by itself: changing any one field gives another cache directory, and the config can set
    every field (by the same name)."""
    import dataclasses

    from jobs.stages import cache_for
    from raydpo.data.refcache import CacheKey
    from raydpo.data.tokenize import TokenizeSettings
    from raydpo.models import write_tiny

    fields = dataclasses.fields(TokenizeSettings)
    other = {"max_length": 77, "max_prompt_length": 33, "truncation": "keep_start"}
    assert {f.name for f in fields} <= set(other), "a new TokenizeSettings field: give it a changed value here"
    base = CacheKey("files:abc", "tok", TokenizeSettings(), "float32")
    for f in fields:
        changed = dataclasses.replace(base, settings=dataclasses.replace(TokenizeSettings(), **{f.name: other[f.name]}))
        assert changed.dir_key != base.dir_key, f.name

    model = write_tiny(tmp_path / "tiny")
    cfg = config(tmp_path / "out", tmp_path / "cache", *(f"data.{k}={v}" for k, v in other.items()))
    key = cache_for(cfg, str(model)).key
    assert key.settings == TokenizeSettings(**other)  # every field from the config, none hand-copied

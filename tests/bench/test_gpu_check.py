"""``bench/gpu_check.py``'s dry run (``--device cpu --tiny``) in a process where Ray, DeepSpeed and
vLLM cannot be imported, as on the GPU machine: every variant the CPU can run has its numbers, nccl
is recorded as skipped, and the variants ran the same model on the same data."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ABSENT = ("ray", "deepspeed", "vllm")  # not installed on the GPU machine

# The script under runpy, with the absent packages blocked (``import ray`` raises ImportError, and
# transformers' availability checks say "not installed"); afterwards, none of them was imported.
RUNNER = f"""
import runpy, sys
for name in {ABSENT!r}:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
loaded = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in {ABSENT!r} and mod is not None)
assert not loaded, loaded
"""

STEPS = ("step_bf16_packed", "step_bf16_padded", "step_fp32_packed", "step_fp32_padded")


def dry_run(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--device", "cpu", "--tiny", *args], cwd=ROOT,
                          env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_dry_run_measures_every_cpu_variant_without_ray_deepspeed_or_vllm(tmp_path):
    report = dry_run(tmp_path)
    assert {"env", "model", "data", "shape", "flops_formula", "variants", "ratios", "wall_s"} <= report.keys()
    variants = report["variants"]
    assert list(variants) == ["matmul_peak", "step_bf16_packed", "step_bf16_padded", "collectives_nccl",
                              "collectives_gloo", "step_fp32_packed", "step_fp32_padded"]
    assert variants["collectives_nccl"]["status"] == "skipped" and "CUDA" in variants["collectives_nccl"]["reason"]
    failed = {name: v.get("error") for name, v in variants.items() if name != "collectives_nccl" and v["status"] != "ok"}
    assert not failed, failed
    assert variants["matmul_peak"]["bf16_peak_flops"] > 0 and variants["matmul_peak"]["fp32_peak_flops"] > 0
    assert report["env"]["flash_attn"] and report["env"]["torch"]

    tokens = report["data"]["tokens_per_step"]
    timed = report["shape"]["timed_steps"]
    steps = {name: variants[name] for name in STEPS} | {"ddp": variants["collectives_gloo"]["ddp_step"]}
    for name, step in steps.items():
        assert step["timed_steps"] == timed and len(step["step_seconds"]) == timed, name
        assert step["tokens_per_step"] == tokens and step["tokens_per_s"] > 0 and 0 < step["mfu"], name
        assert all(math.isfinite(x) for x in step["losses"] + step["grad_norms"]), name
        assert isinstance(step["attn_implementation"], str), name
    # One packed row has no padding; the padded batch pads every sequence to the longest.
    assert steps["step_fp32_packed"]["computed_tokens_per_step"] == tokens
    assert steps["step_fp32_padded"]["computed_tokens_per_step"] > tokens
    # Same weights, same pairs: the layouts agree in float32, bf16 agrees to its rounding, and DDP
    # over one process changes nothing.
    first = {name: step["losses"][0] for name, step in steps.items()}
    assert abs(first["step_fp32_packed"] - first["step_fp32_padded"]) < 1e-5
    assert abs(first["step_bf16_packed"] - first["step_fp32_packed"]) < 1e-2
    assert max(abs(a - b) for a, b in zip(steps["ddp"]["losses"], steps["step_bf16_packed"]["losses"])) < 1e-6
    assert variants["collectives_gloo"]["backend"] == "gloo"
    assert variants["collectives_gloo"]["all_reduce"]["bytes"] == 4 * report["model"]["params"]
    assert set(report["ratios"]) == {"packed_over_padded_bf16", "packed_over_padded_fp32", "bf16_over_fp32_packed",
                                     "ddp_over_plain_bf16_packed"}
    assert report["ratios"]["bf16_over_fp32_packed"] == steps["step_bf16_packed"]["tokens_per_s"] / steps["step_fp32_packed"]["tokens_per_s"]


def test_spent_budget_skips_every_variant_and_still_writes_the_json(tmp_path):
    variants = dry_run(tmp_path, "--budget-s", "0")["variants"]
    assert {v["status"] for v in variants.values()} == {"skipped"}
    assert "budget" in variants["matmul_peak"]["reason"]

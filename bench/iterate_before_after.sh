#!/usr/bin/env bash
# The online quickstart's wall time at two commits, side by side on the same machine:
# `raydpo iterate configs/quickstart_online.yaml` (its shipped settings; only the output folder,
# the MLflow store and the reference cache are fresh per run), alternating BEFORE and the working
# tree N times each, so a load that comes and goes hits both alike.
#
#   bash bench/iterate_before_after.sh BEFORE_REV [N] [--set key=value ...]
#
# Prints one line per run (commit, wall seconds, the job's own seconds) and leaves each run's
# output folder under $OUT (default /tmp/raydpo-iterate-bench) for bench/rounds_table.py.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BEFORE="$1"; N="${2:-2}"; shift $(( $# > 1 ? 2 : 1 ))
OUT="${OUT:-/tmp/raydpo-iterate-bench}"
PY="${PY:-$HERE/.venv/bin/python}"
rm -rf "$OUT" && mkdir -p "$OUT"
git -C "$HERE" worktree add -f --detach "$OUT/before-tree" "$BEFORE" >/dev/null 2>&1
trap 'git -C "$HERE" worktree remove --force "$OUT/before-tree" >/dev/null 2>&1 || true' EXIT

run() {  # $1 label, $2 source tree, $3 run index, then the --set arguments
    local label="$1" tree="$2" index="$3" dir="$OUT/$1-$3"
    shift 3
    mkdir -p "$dir"
    # From the tree's own folder: its jobs/, actors/ and raydpo/ come first on sys.path.
    (cd "$tree" && /usr/bin/time -f "%e" -o "$dir/wall" "$PY" -m jobs.cli iterate configs/quickstart_online.yaml \
        --set "output_dir=$dir/out" --set "tracking.uri=sqlite:///$dir/mlflow.db" \
        --set "reference.cache_dir=$dir/cache" "$@" > "$dir/log" 2>&1)
    local job
    job=$(grep -o 'rounds finished in [0-9.]*s' "$dir/log" | grep -o '[0-9.]*' || echo "?")
    echo "$label run $index: wall $(cat "$dir/wall") s, job ${job} s ($dir)"
}

for i in $(seq 1 "$N"); do
    run before "$OUT/before-tree" "$i" "$@"
    run after "$HERE" "$i" "$@"
done

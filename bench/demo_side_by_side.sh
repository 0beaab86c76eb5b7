#!/usr/bin/env bash
# bench/demo_side_by_side.sh OLD_COMMIT [NEW_COMMIT]
#
# `make demo` of two commits on fresh clones, back to back on this machine, sharing one models
# folder whose Gemma 3 270M is already imported (GEMMA_MODELS_DIR, default .cache/models of this
# checkout): the wall time of each `make demo` (virtual env, Airflow database and the whole DAG) and
# of its `airflow dags test` alone, the ratio, and each run's stage seconds from its log. Writes
# bench/results/demo-side-by-side-cpu.json. Nothing else should run on the machine meanwhile.
set -euo pipefail
old=${1:?usage: bench/demo_side_by_side.sh OLD_COMMIT [NEW_COMMIT]}
new=${2:-HEAD}
repo=$(git rev-parse --show-toplevel)
work=${SIDE_BY_SIDE_DIR:-/tmp/demo-side-by-side}
export GEMMA_MODELS_DIR=${GEMMA_MODELS_DIR:-$repo/.cache/models}
test -d "$GEMMA_MODELS_DIR" || { echo "GEMMA_MODELS_DIR=$GEMMA_MODELS_DIR does not exist: run make demo once first" >&2; exit 2; }
rm -rf "$work" && mkdir -p "$work"
results=()
for commit in "$old" "$new"; do
  sha=$(git -C "$repo" rev-parse "$commit")
  dir="$work/${sha:0:7}"
  git clone -q "$repo" "$dir" && git -C "$dir" checkout -q "$sha"
  echo "== make demo at ${sha:0:7} in $dir" >&2
  start=$(date +%s.%N)
  (cd "$dir" && make demo) > "$dir.make.log" 2>&1
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  dag=$(grep -o "airflow dags test exited 0 after [0-9]* s" "$dir.make.log" | grep -o "[0-9]* s" | tr -d ' s')
  stages=$(grep -ho '"seconds": [0-9.]*, "stage_dir": "[^"]*/\(snapshot\|preprocess\|sweep\|finetune\|generate\|export\|report\|promote\)"' \
           "$dir/airflow_home/demo.log" | sed -E 's/"seconds": ([0-9.]*), "stage_dir": ".*\/([a-z]*)"/"\2": \1/' | paste -sd, -)
  echo "   make demo ${wall} s, airflow dags test ${dag} s" >&2
  results+=("{\"commit\": \"$sha\", \"make_demo_s\": $wall, \"dags_test_s\": $dag, \"stage_seconds\": {$stages}}")
done
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs)
out="$repo/bench/results/demo-side-by-side-cpu.json"
python3 - "$out" "$cpu" "$(nproc)" "${results[@]}" <<'EOF'
import json, sys, datetime
out, cpu, cores, old, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
data = {"benchmark": "demo side by side", "machine": {"cpu": cpu, "cores": cores},
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "old": old, "new": new,
        "ratio_make_demo": round(new["make_demo_s"] / old["make_demo_s"], 3),
        "ratio_dags_test": round(new["dags_test_s"] / old["dags_test_s"], 3)}
open(out, "w").write(json.dumps(data, indent=2) + "\n")
print(json.dumps(data, indent=2))
EOF

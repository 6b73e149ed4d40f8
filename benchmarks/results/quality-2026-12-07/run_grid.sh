#!/bin/bash
# The measured grid of this report, one run at a time on core 1 (core 0 belongs to others).
# SRC: a frozen copy of the tree to run (default: this checkout); every run lands in OUT/<task>/runs/
# as it ends, and finished runs are reused, so re-running this script resumes.
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
COMMON="--steps 150 --batch-size 8 --n-test 200 --n-dev 50 --tune-examples 50 --no-progress"
LRS="--lrs lora=1e-3,iapt=1e-3,iapt_anchors_only=1e-3"
run() {  # run <log name> <task> <seeds> <methods> [extra]
  echo "$(date -u +%FT%T) start $1" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c 1 "$PY" benchmarks/quality.py --task "$2" --seeds "$3" --methods "$4" \
     $COMMON $LRS ${5:-} --out "$OUT/$2") > "$OUT/log-$1.txt" 2>&1
  echo "$(date -u +%FT%T) end $1 rc=$?" >> "$OUT/grid.log"
}
# What ran from this script (its later lines were replaced by run_grid2.sh once anchors only
# was seen to learn nothing at 1e-3; its region_record anchors-only run at 1e-3 was stopped).
run caps-s0 caps 0 lora,iapt,iapt_anchors_only
run region_record-s0 region_record 0 lora,iapt

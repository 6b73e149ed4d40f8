#!/bin/bash
# Fourth part: equal effort. Every trained method gets the same LR grid on every generative task
# (default × {1, 3}: 1e-3 and 3e-3 for LoRA and IAPT), chosen on dev (50 examples, seed 0; exact
# match, ties to the default), then the winner at seeds 0 and 1. Runs already on disk are reused
# (the seed-0 runs at 1e-3 only get their dev score; region_record's IAPT at 3e-3 is the
# iapt_lr3e-3 run of run_grid3.sh, the same configuration). Then region_country, the third task.
# CORE: the core to pin to (one run per core).
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
CORE=${CORE:-1}
COMMON="--steps 150 --batch-size 8 --n-test 200 --n-dev 50 --tune-examples 50 --no-progress"
run() {  # run <log name> <task> <seeds> <methods> [extra...]
  local name=$1 task=$2 seeds=$3 methods=$4; shift 4
  echo "$(date -u +%FT%T) start $name" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task "$task" --seeds "$seeds" \
     --methods "$methods" $COMMON "$@" --out "$OUT/$task") > "$OUT/log-$name.txt" 2>&1
  echo "$(date -u +%FT%T) end $name rc=$?" >> "$OUT/grid.log"
}
run sweep-caps caps 0,1 lora,iapt --tune --tune-factors 1,3
run sweep-region_record region_record 0,1 lora,iapt --tune --tune-factors 1,3
run zero_shot-region_country region_country 0 zero_shot
run sweep-region_country region_country 0,1 lora,iapt --tune --tune-factors 1,3
run anchors-region_country region_country 0,1 iapt_anchors_only --lrs iapt_anchors_only=0.03

#!/bin/bash
# Third part: one recipe change on the task where IAPT trailed LoRA most at seed 0
# (region_record: 0.110 vs 0.195 exact match): the library defaults at 3× the learning rate.
# WAIT_PID: run_grid2.sh, to let it finish first (one run at a time on core 1).
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
COMMON="--steps 150 --batch-size 8 --n-test 200 --n-dev 50 --tune-examples 50 --no-progress"
if [ -n "${WAIT_PID:-}" ]; then
  while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done
fi
run() {  # run <log name> <task> <seeds> <methods> [extra...]
  local name=$1 task=$2 seeds=$3 methods=$4; shift 4
  echo "$(date -u +%FT%T) start $name" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c 1 "$PY" benchmarks/quality.py --task "$task" --seeds "$seeds" \
     --methods "$methods" $COMMON "$@" --out "$OUT/$task") > "$OUT/log-$name.txt" 2>&1
  echo "$(date -u +%FT%T) end $name rc=$?" >> "$OUT/grid.log"
}
run lr3e-3-region_record-s0 region_record 0 iapt_lr3e-3
run lr3e-3-region_record-s1 region_record 0,1 iapt_lr3e-3

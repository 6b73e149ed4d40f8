#!/bin/bash
# Second part of the grid (run_grid.sh's first two invocations ran before it): anchors only gets
# its learning rate chosen on caps dev from {1e-3, 3e-2} (its anchors live at the residual
# stream's scale, so Adam's ~lr-sized steps barely move them at 1e-3); region_record then uses
# the LR chosen on caps. WAIT_PID: a run of run_grid.sh to let finish up to its IAPT run.
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
COMMON="--steps 150 --batch-size 8 --n-test 200 --n-dev 50 --tune-examples 50 --no-progress"
if [ -n "${WAIT_PID:-}" ]; then
  while [ ! -f "$OUT/region_record/runs/iapt-lr0.001-s0.json" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done
  kill "$WAIT_PID" 2>/dev/null  # its remaining run (anchors only at 1e-3) is replaced below
  sleep 5
fi
run() {  # run <log name> <task> <seeds> <methods> [extra...]
  local name=$1 task=$2 seeds=$3 methods=$4; shift 4
  echo "$(date -u +%FT%T) start $name" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c 1 "$PY" benchmarks/quality.py --task "$task" --seeds "$seeds" \
     --methods "$methods" $COMMON "$@" --out "$OUT/$task") > "$OUT/log-$name.txt" 2>&1
  echo "$(date -u +%FT%T) end $name rc=$?" >> "$OUT/grid.log"
}
LRS="--lrs lora=1e-3,iapt=1e-3"
run anchors-caps-sweep caps 0 iapt_anchors_only --tune --tune-factors 1,30
AO=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['methods']['iapt_anchors_only']['lr'])" "$OUT/caps/results.json")
echo "$(date -u +%FT%T) anchors-only LR chosen on caps dev: $AO" >> "$OUT/grid.log"
run anchors-region_record-s0 region_record 0 iapt_anchors_only --lrs iapt_anchors_only=$AO
run caps-s1 caps 1 lora,iapt $LRS
run anchors-caps-s1 caps 0,1 iapt_anchors_only --tune --tune-factors 1,30
run zero_shot-caps caps 0 zero_shot
run zero_shot-region_record region_record 0 zero_shot
run region_record-s1 region_record 1 lora,iapt $LRS
run anchors-region_record-s1 region_record 0,1 iapt_anchors_only --lrs iapt_anchors_only=$AO

#!/bin/bash
# Fifth part: the classification tasks at the generative tasks' candidate recipe (IAPT at lr 3e-3,
# both seeds) and anchors only on both (its LR from caps dev, 3e-2), in the settings of
# quality-2026-12-01 (rotten_tomatoes: 1,000 test, 200 dev; subjectivity: 500 test). The
# 2026-12-01 runs of LoRA, IAPT at 1e-3 and zero-shot are copied in as they were (same settings,
# same split) and reused. CORE: the core to pin to.
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
CORE=${CORE:-0}
COMMON="--steps 150 --batch-size 8 --max-length 56 --max-text-tokens 28 --no-progress"
run() {  # run <log name> <task> <seeds> <methods> [extra...]
  local name=$1 task=$2 seeds=$3 methods=$4; shift 4
  echo "$(date -u +%FT%T) start $name" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task "$task" --seeds "$seeds" \
     --methods "$methods" $COMMON "$@" --out "$OUT/$task") > "$OUT/log-$name.txt" 2>&1
  echo "$(date -u +%FT%T) end $name rc=$?" >> "$OUT/grid.log"
}
RT="--n-test 1000 --n-dev 200 --tune-examples 200"
SJ="--n-test 500 --n-dev 0"
run lr3e-3-rotten_tomatoes rotten_tomatoes 0,1 iapt $RT --lrs iapt=0.003
run lr3e-3-subjectivity subjectivity 0,1 iapt $SJ --lrs iapt=0.003
run anchors-rotten_tomatoes rotten_tomatoes 0,1 iapt_anchors_only $RT --lrs iapt_anchors_only=0.03
run anchors-subjectivity subjectivity 0,1 iapt_anchors_only $SJ --lrs iapt_anchors_only=0.03

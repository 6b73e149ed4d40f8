# Shared by the run_grid*.sh scripts: SRC (a frozen copy of the tree), OUT (this folder), PY, CORE and
# run <log name> <task> <seeds> <methods> [quality.py options...], one run at a time per core, into
# <task>/ (or $OUT_TASK/).
SRC=${SRC:-$(cd "$(dirname "$0")/../../.." && pwd)}
OUT=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-/work/main/.venv/bin/python}
GEN="--steps 150 --batch-size 8 --n-test 200 --n-dev 50 --tune-examples 50 --no-progress"
CLS="--steps 150 --batch-size 8 --max-length 56 --max-text-tokens 28 --no-progress"
RT="$CLS --n-test 1000 --n-dev 200 --tune-examples 200"
run() {
  local name=$1 task=$2 seeds=$3 methods=$4; shift 4
  echo "$(date -u +%FT%T) start $name" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task "$task" --seeds "$seeds" \
     --methods "$methods" "$@" --out "$OUT/${OUT_TASK:-$task}") > "$OUT/log-$name.txt" 2>&1
  echo "$(date -u +%FT%T) end $name rc=$?" >> "$OUT/grid.log"
}
wait_for() {  # wait_for <pid>: one run at a time on the core
  while [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; do sleep 15; done
}
chosen_lr() {  # chosen_lr <task> <method>: the LR its dev sweep chose
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['tuning'][sys.argv[2]]['chosen'])" \
    "$OUT/$1/results.json" "$2"
}
cli_spell() {  # cli_spell <log name>: iapt-train with its defaults (model, data, steps, batch size, output folder)
  local data="$OUT/spell/cli/data" adapter="$OUT/spell/cli/adapter"
  echo "$(date -u +%FT%T) start $1" >> "$OUT/grid.log"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task spell $GEN --export "$data" \
   && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" -m iapt_fast.train --model "$HOME/.cache/iapt_fast/SmolLM2-135M-Instruct" \
        --train-file "$data/spell-train.jsonl" --max-steps 150 --batch-size 8 --output-dir "$adapter" --no-progress \
   && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task spell $GEN --score-adapter "$adapter" \
        --out "$OUT/spell/cli") > "$OUT/log-$1.txt" 2>&1
  echo "$(date -u +%FT%T) end $1 rc=$?" >> "$OUT/grid.log"
}

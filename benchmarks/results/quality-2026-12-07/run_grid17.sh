#!/bin/bash
# Seventeenth part (core 0): the defaults now train W_pool at 3x the LR, so the CLI run on the
# held-out task is repeated with them: model, data, steps, batch size, output folder and nothing
# else (the former defaults' run is in spell/cli-pool1).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
cli_spell() {
  local data="$OUT/spell/cli/data" adapter="$OUT/spell/cli/adapter"
  (cd "$SRC" && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task spell $GEN --export "$data" \
   && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" -m iapt_fast.train --model "$HOME/.cache/iapt_fast/SmolLM2-135M-Instruct" \
        --train-file "$data/spell-train.jsonl" --max-steps 150 --batch-size 8 --output-dir "$adapter" --no-progress \
   && OMP_NUM_THREADS=1 taskset -c "$CORE" "$PY" benchmarks/quality.py --task spell $GEN --score-adapter "$adapter" \
        --out "$OUT/spell/cli")
}
echo "$(date -u +%FT%T) start cli-spell-defaults" >> "$OUT/grid.log"
cli_spell > "$OUT/log-cli-spell-defaults.txt" 2>&1
echo "$(date -u +%FT%T) end cli-spell-defaults rc=$?" >> "$OUT/grid.log"

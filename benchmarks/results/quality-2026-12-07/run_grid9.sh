#!/bin/bash
# Ninth part (core 0, after run_grid5.sh): the ablations on the generative task `caps`, two seeds,
# each one change to the library defaults at the IAPT LR chosen by caps' dev sweep; then the
# held-out task `spell` (never used to choose anything) with every method at its caps-chosen LR.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${WAIT_PID:-}"
LR=$(chosen_lr caps iapt); LORA=$(chosen_lr caps lora)
echo "$(date -u +%FT%T) caps dev chose iapt lr $LR, lora lr $LORA" >> "$OUT/grid.log"
for m in iapt_pool_lr iapt_anchor_lr iapt_t8 iapt_top_half iapt_t16_m39 iapt_bilevel iapt_cosine iapt_text_init; do
  run "$m-caps" caps 0,1 "$m" $GEN --lrs "$m=$LR"
done
run zero_shot-spell spell 0 zero_shot $GEN
run spell spell 0,1 lora,iapt,iapt_anchors_only $GEN --lrs "lora=$LORA,iapt=$LR,iapt_anchors_only=0.03"

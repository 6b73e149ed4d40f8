#!/bin/bash
# Seventh part (core 0, after run_grid5.sh): the ablations on the classification task
# rotten_tomatoes, two seeds, at the IAPT LR chosen by caps' dev sweep (the candidate default).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${WAIT_PID:-}"
LR=$(chosen_lr caps iapt)
for m in iapt_t8 iapt_anchor_lr iapt_top_half; do
  run "$m-rotten_tomatoes" rotten_tomatoes 0,1 "$m" $RT --lrs "$m=$LR"
done

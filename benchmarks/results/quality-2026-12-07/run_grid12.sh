#!/bin/bash
# Twelfth part (core 0): the ablations on a classification task, two seeds each at the default
# LR 3e-3, one change each — the same list that ran on caps (run_grid9.sh), on rotten_tomatoes.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
for m in iapt_t8 iapt_t16_m39 iapt_bilevel iapt_text_init iapt_top_half iapt_cosine iapt_anchor_lr; do
  run "$m-rotten_tomatoes" rotten_tomatoes 0,1 "$m" $RT --lrs "$m=0.003"
done

#!/bin/bash
# Eleventh part (core 1, once run_grid10.sh was done): does the sharper pooling help the held-out
# spelling task too (seeds 0, 1 at the default LR)? Then two of run_grid9.sh's caps ablations
# from its end, so that both cores work on the list (a finished run is reused, never rerun).
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
run iapt_pool_lr-spell spell 0,1 iapt_pool_lr $GEN --lrs iapt_pool_lr=0.003
for m in iapt_cosine iapt_text_init; do
  run "$m-caps" caps 0,1 "$m" $GEN --lrs "$m=0.003"
done

#!/bin/bash
# Thirteenth part (core 1): a moderate pooling sharpness (W_pool at 3× the LR) — does it keep the
# 10× scale's gain on region_record without its cost on caps and rotten_tomatoes? Two seeds on
# every task the 10× scale ran on. Then run_grid12.sh's list from its end (finished runs are reused).
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
run iapt_pool_lr3-region_record region_record 0,1 iapt_pool_lr3 $GEN --lrs iapt_pool_lr3=0.003 --dev-too
run iapt_pool_lr3-caps caps 0,1 iapt_pool_lr3 $GEN --lrs iapt_pool_lr3=0.003
run iapt_pool_lr3-rotten_tomatoes rotten_tomatoes 0,1 iapt_pool_lr3 $RT --lrs iapt_pool_lr3=0.003
run iapt_pool_lr3-spell spell 0,1 iapt_pool_lr3 $GEN --lrs iapt_pool_lr3=0.003
for m in iapt_anchor_lr iapt_cosine iapt_top_half; do
  run "$m-rotten_tomatoes-c1" rotten_tomatoes 0,1 "$m" $RT --lrs "$m=0.003"
done

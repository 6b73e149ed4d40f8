#!/bin/bash
# Eighth part (core 1, after run_grid4.sh's region_record sweep): region_record is where IAPT
# trails LoRA, so the recipe search runs there first — seed 0, scored on dev and test: both
# methods one step further up the LR grid (1e-2), and at IAPT's chosen 3e-3 the changes that
# could close the gap (W_pool at 10× the LR, the anchors at 3e-2, T = 8). Then region_country.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
# (run_grid4.sh was stopped after its region_record sweep; its region_country runs moved here.)
run lr1e-2-region_record region_record 0 lora,iapt $GEN --lrs lora=0.01,iapt=0.01 --dev-too
for m in iapt_pool_lr iapt_anchor_lr iapt_t8; do
  run "$m-region_record" region_record 0 "$m" $GEN --lrs "$m=0.003" --dev-too
done
run zero_shot-region_country region_country 0 zero_shot $GEN
run sweep-region_country region_country 0,1 lora,iapt $GEN --tune --tune-factors 1,3
run anchors-region_country region_country 0,1 iapt_anchors_only $GEN --lrs iapt_anchors_only=0.03

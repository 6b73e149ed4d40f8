#!/bin/bash
# Nineteenth part: the defaults' pooling (W_pool at 3x the LR) at the top of the LR grid on
# region_record, where IAPT's dev score kept rising with the LR (W_pool at the LR: 0.210 at 3e-3,
# 0.243 at 1e-2 chosen on dev). Seed 0 on core 0 (scored on dev too), seed 1 on core 1; their own
# folder, so that region_record/'s table keeps the defaults at 3e-3.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
OUT_TASK=region_record-pool3-lr1e-2
run "iapt_pool_lr3-lr1e-2-region_record-s$CORE" region_record "$CORE" iapt_pool_lr3 $GEN --lrs iapt_pool_lr3=0.01 --dev-too

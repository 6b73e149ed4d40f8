#!/bin/bash
# Tenth part (core 1, after run_grid8.sh). W_pool at 10x the LR was the best single change on
# region_record at seed 0 (dev 0.30, test 0.285): its second seed first. Then region_record's
# LR grid extended to 1e-2 for both methods (IAPT's dev score still rose at 3e-3): the dev
# choice gets its second seed.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${WAIT_PID:-}"
run iapt_pool_lr-region_record-s1 region_record 0,1 iapt_pool_lr $GEN --lrs iapt_pool_lr=0.003 --dev-too
run sweep3-region_record region_record 0,1 lora,iapt $GEN --tune --tune-factors 1,3,10

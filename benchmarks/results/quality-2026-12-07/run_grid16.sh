#!/bin/bash
# Sixteenth part: the sharper pooling (W_pool at 10x the LR) on the two tasks it had not run on,
# so that the three pooling scales (1, 3, 10) are measured on all six tasks before the default is
# chosen (issue rule: the best recipe across all tasks, no classification regression beyond the
# intervals). Core 0: region_country; core 1: subjectivity. AFTER: a pid to wait for.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${AFTER:-}"
SJ="$CLS --n-test 500 --n-dev 0"
if [ "$CORE" = 0 ]; then
  run iapt_pool_lr-region_country region_country 0,1 iapt_pool_lr $GEN --lrs iapt_pool_lr=0.003
else
  run iapt_pool_lr-subjectivity subjectivity 0,1 iapt_pool_lr $SJ --lrs iapt_pool_lr=0.003
fi

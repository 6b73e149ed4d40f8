#!/bin/bash
# Third part: one recipe change on the task where IAPT trailed LoRA most at seed 0
# (region_record: 0.110 vs 0.195 exact match): the library defaults at 3× the learning rate.
# WAIT_PID: run_grid2.sh, to let it finish first (one run at a time on core 1).
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
if [ -n "${WAIT_PID:-}" ]; then
  while kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done
fi
run lr3e-3-region_record-s0 region_record 0 iapt_lr3e-3 $GEN
run lr3e-3-region_record-s1 region_record 0,1 iapt_lr3e-3 $GEN

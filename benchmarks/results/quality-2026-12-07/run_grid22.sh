#!/bin/bash
# T = 8 at the defaults' parameter budget on region_record, two seeds (after run_grid20.sh on the core).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${AFTER:-}"
run iapt_d_t8_m43-region_record region_record 0,1 iapt_d_t8_m43 $GEN --lrs iapt_d_t8_m43=0.003 --dev-too

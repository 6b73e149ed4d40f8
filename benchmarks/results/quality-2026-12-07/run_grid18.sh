#!/bin/bash
# Eighteenth part: is the spell gap (held out, both methods at the fixed 3e-3) a matter of the LR?
# Both methods once more at 1e-2, two seeds, reported beside 3e-3 (no choice is made on the
# held-out task; their own folder spell-lr1e-2/, so that spell/'s table keeps its fixed LR).
# Core 0: LoRA; core 1: the defaults (iapt_pool_lr3).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
OUT_TASK=spell-lr1e-2
if [ "$CORE" = 0 ]; then
  run lr1e-2-lora-spell spell 0,1 lora $GEN --lrs lora=0.01
else
  run lr1e-2-iapt_pool_lr3-spell spell 0,1 iapt_pool_lr3 $GEN --lrs iapt_pool_lr3=0.01
fi

#!/bin/bash
# spell at 300 steps (twice the report's budget) for LoRA and the IAPT defaults, two seeds each, same
# LR (3e-3): is the gap a speed of learning or a limit? Own folder: spell-300steps/.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${AFTER:-}"
GEN=${GEN/--steps 150/--steps 300}
OUT_TASK=spell-300steps
M=$([ "$CORE" = 0 ] && echo lora || echo iapt_pool_lr3)
run "$M-spell-300steps" spell 0,1 $M $GEN --lrs $M=0.003

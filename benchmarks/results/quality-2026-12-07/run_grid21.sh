#!/bin/bash
# One change each to the defaults on the held-out spell task (where the gap to LoRA is widest),
# two seeds: T at the same parameter budget, the anchors' start, bi-level training.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${AFTER:-}"
for M in iapt_d_t8_m43 iapt_d_t16_m39 iapt_d_bilevel iapt_d_text_init; do
  run $M-spell spell 0,1 $M $GEN --lrs $M=0.003
done

#!/bin/bash
# Ninth part (core 0, after run_grid5.sh). The default LR became 3e-3 (the best mean dev score over
# caps, region_record and rotten_tomatoes, for IAPT as for LoRA), so: IAPT at 3e-3 on caps; the
# held-out task `spell` (never used to choose anything) with LoRA and IAPT at 3e-3, anchors only,
# and `iapt-train` with its defaults; then the ablations on caps at 3e-3, two seeds each.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
wait_for "${WAIT_PID:-}"
run lr3e-3-caps caps 0,1 iapt $GEN --lrs iapt=0.003
# The best single change on region_record at seed 0 (W_pool at 10x the LR) must not cost the
# classification task anything before it can become a default: rotten_tomatoes, both seeds.
run iapt_pool_lr-rotten_tomatoes rotten_tomatoes 0,1 iapt_pool_lr $RT --lrs iapt_pool_lr=0.003
run zero_shot-spell spell 0 zero_shot $GEN
run spell spell 0,1 lora,iapt,iapt_anchors_only $GEN --lrs "lora=0.003,iapt=0.003,iapt_anchors_only=0.03"
cli_spell cli-spell  # the CLI with its defaults: model, data, steps, batch size, output folder and nothing else
for m in iapt_pool_lr iapt_anchor_lr iapt_t8 iapt_top_half iapt_bilevel iapt_t16_m39 iapt_text_init iapt_cosine; do
  run "$m-caps" caps 0,1 "$m" $GEN --lrs "$m=0.003"
done

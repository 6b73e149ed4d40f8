#!/bin/bash
# Fourth part: equal effort. Every trained method gets the same LR grid on every generative task
# (default × {1, 3}: 1e-3 and 3e-3 for LoRA and IAPT), chosen on dev (50 examples, seed 0; exact
# match, ties to the default), then the winner at seeds 0 and 1. Runs already on disk are reused
# (the seed-0 runs at 1e-3 only get their dev score; region_record's IAPT at 3e-3 is the
# iapt_lr3e-3 run of run_grid3.sh, the same configuration). Then region_country, the third task.
# CORE: the core to pin to (one run per core).
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
run sweep-caps caps 0,1 lora,iapt $GEN --tune --tune-factors 1,3
run sweep-region_record region_record 0,1 lora,iapt $GEN --tune --tune-factors 1,3
run zero_shot-region_country region_country 0 zero_shot $GEN
run sweep-region_country region_country 0,1 lora,iapt $GEN --tune --tune-factors 1,3
run anchors-region_country region_country 0,1 iapt_anchors_only $GEN --lrs iapt_anchors_only=0.03

#!/bin/bash
# Fourteenth part (core 1, once run_grid13.sh's cosine runs on rotten_tomatoes are done; its
# last entry, top_half, is core 0's already): bi-level training was the best single change on
# rotten_tomatoes (0.811, 0.827 vs the defaults' 0.798, 0.813), and cost 2 points on caps; does it
# help where IAPT trails LoRA most? region_record, two seeds, scored on dev too.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
run iapt_bilevel-region_record region_record 0,1 iapt_bilevel $GEN --lrs iapt_bilevel=0.003 --dev-too

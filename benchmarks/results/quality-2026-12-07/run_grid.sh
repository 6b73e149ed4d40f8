#!/bin/bash
# The measured grid of this report, one run at a time on core 1 (core 0 belongs to others).
# SRC: a frozen copy of the tree to run (default: this checkout); every run lands in OUT/<task>/runs/
# as it ends, and finished runs are reused, so re-running this script resumes.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
# What ran from this script (its later lines were replaced by run_grid2.sh once anchors only
# was seen to learn nothing at 1e-3; its region_record anchors-only run at 1e-3 was stopped).
LRS="--lrs lora=1e-3,iapt=1e-3,iapt_anchors_only=1e-3"
run caps-s0 caps 0 lora,iapt,iapt_anchors_only $GEN $LRS
run region_record-s0 region_record 0 lora,iapt $GEN $LRS

#!/bin/bash
# Fifth part: the classification tasks at the generative tasks' candidate recipe (IAPT at lr 3e-3,
# both seeds) and anchors only on both (its LR from caps dev, 3e-2), in the settings of
# quality-2026-12-01 (rotten_tomatoes: 1,000 test, 200 dev; subjectivity: 500 test). The
# 2026-12-01 runs of LoRA, IAPT at 1e-3 and zero-shot are copied in as they were (same settings,
# same split) and reused. CORE: the core to pin to.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
SJ="$CLS --n-test 500 --n-dev 0"  # RT: grid_lib.sh
run lr3e-3-rotten_tomatoes rotten_tomatoes 0,1 iapt $RT --lrs iapt=0.003
run lr3e-3-subjectivity subjectivity 0,1 iapt $SJ --lrs iapt=0.003
run anchors-rotten_tomatoes rotten_tomatoes 0,1 iapt_anchors_only $RT --lrs iapt_anchors_only=0.03
run anchors-subjectivity subjectivity 0,1 iapt_anchors_only $SJ --lrs iapt_anchors_only=0.03

#!/bin/bash
# Anchors from T × "." on the held-out classification task, two seeds (completes run_grid20.sh's row).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
SJ="$CLS --n-test 500 --n-dev 0"
run iapt_dot_anchor-subjectivity subjectivity 0,1 iapt_dot_anchor $SJ --lrs iapt_dot_anchor=0.003

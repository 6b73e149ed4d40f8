#!/bin/bash
# The defaults with anchors from T × "." (a start at the frozen model's loss) on every task, two seeds.
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
SJ="$CLS --n-test 500 --n-dev 0"
M=iapt_dot_anchor
if [ "$CORE" = 0 ]; then
  run $M-region_record region_record 0,1 $M $GEN --lrs $M=0.003 --dev-too
  run $M-caps caps 0,1 $M $GEN --lrs $M=0.003
  run $M-rotten_tomatoes rotten_tomatoes 0,1 $M $RT --lrs $M=0.003
else
  run $M-spell spell 0,1 $M $GEN --lrs $M=0.003
  run $M-region_country region_country 0,1 $M $GEN --lrs $M=0.003
  run $M-subjectivity subjectivity 0,1 $M $SJ --lrs $M=0.003
fi

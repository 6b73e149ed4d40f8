#!/bin/bash
# Second part of the grid (run_grid.sh's first two invocations ran before it): anchors only gets
# its learning rate chosen on caps dev from {1e-3, 3e-2} (its anchors live at the residual
# stream's scale, so Adam's ~lr-sized steps barely move them at 1e-3); region_record then uses
# the LR chosen on caps. WAIT_PID: a run of run_grid.sh to let finish up to its IAPT run.
CORE=${CORE:-1}
. "$(dirname "$0")/grid_lib.sh"
if [ -n "${WAIT_PID:-}" ]; then
  while [ ! -f "$OUT/region_record/runs/iapt-lr0.001-s0.json" ] && kill -0 "$WAIT_PID" 2>/dev/null; do sleep 10; done
  kill "$WAIT_PID" 2>/dev/null  # its remaining run (anchors only at 1e-3) is replaced below
  sleep 5
fi
LRS="--lrs lora=1e-3,iapt=1e-3"
run anchors-caps-sweep caps 0 iapt_anchors_only $GEN --tune --tune-factors 1,30
AO=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['methods']['iapt_anchors_only']['lr'])" "$OUT/caps/results.json")
echo "$(date -u +%FT%T) anchors-only LR chosen on caps dev: $AO" >> "$OUT/grid.log"
run anchors-region_record-s0 region_record 0 iapt_anchors_only $GEN --lrs iapt_anchors_only=$AO
run caps-s1 caps 1 lora,iapt $GEN $LRS
run anchors-caps-s1 caps 0,1 iapt_anchors_only $GEN --tune --tune-factors 1,30
run zero_shot-caps caps 0 zero_shot $GEN
run zero_shot-region_record region_record 0 zero_shot $GEN
run region_record-s1 region_record 1 lora,iapt $GEN $LRS
run anchors-region_record-s1 region_record 0,1 iapt_anchors_only $GEN --lrs iapt_anchors_only=$AO

#!/bin/bash
# Seventeenth part (core 0): the defaults now train W_pool at 3x the LR, so the CLI run on the
# held-out task is repeated with them: model, data, steps, batch size, output folder and nothing
# else (the former defaults' run is in spell/cli-pool1).
CORE=${CORE:-0}
. "$(dirname "$0")/grid_lib.sh"
cli_spell cli-spell-defaults

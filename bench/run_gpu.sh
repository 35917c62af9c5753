#!/usr/bin/env bash
# The GPU checks in one call of at most 9 minutes: bench/device_run.py (stages, budgets and outputs in its
# docstring; results to $OUT, else a temporary folder). Before the device call, here:
#   python3 bench/fetch_device_wheels.py     # opacus, dp-accounting, dm-tree, scikit-learn -> .device-wheels/
# then run this script on the device machine with .device-wheels carried.
set -euo pipefail
exec python3 "$(dirname "$0")/device_run.py" "$@"

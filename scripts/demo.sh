#!/usr/bin/env bash
# Set up cl-bidsapp in ./.venv, simulate a small MP2RAGE phantom dataset with known cortical
# lesions, and run the participant level on it with the bundled demo model (CPU only).
# Outputs go to ./demo (override with CL_DEMO_DIR); open demo/out/sub-01.html afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${CL_DEMO_DIR:-demo}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

rm -rf "$DEMO/bids"
.venv/bin/cl-bidsapp-simulate "$DEMO/bids" --n-subjects 2 --voxel-size 2 --seed 1
.venv/bin/cl-bidsapp "$DEMO/bids" "$DEMO/out" participant -w "$DEMO/work" --nprocs 2
echo
echo "Demo finished. Look at:"
echo "  $DEMO/out/sub-01/anat/   lesion maps and the per-lesion table"
echo "  $DEMO/bids/derivatives/reference/   the phantom's true lesions"

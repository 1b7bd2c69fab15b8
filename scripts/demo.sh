#!/usr/bin/env bash
# Set up cl-bidsapp in ./.venv, simulate a small MP2RAGE phantom dataset with known cortical
# lesions, run the participant level on it with the bundled demo model (CPU only), then the
# group level against the phantoms' true lesions (lesion-wise F1 etc.).
# Outputs go to ./demo (override with CL_DEMO_DIR); open demo/out/sub-01.html afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${CL_DEMO_DIR:-demo}
mkdir -p "$DEMO"
DEMO=$(cd "$DEMO" && pwd)   # absolute: a relative or an absolute CL_DEMO_DIR both work below

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test]'

rm -rf "$DEMO/bids"
.venv/bin/cl-bidsapp-simulate "$DEMO/bids" --n-subjects 2 --voxel-size 2 --lesion-mean 12 \
  --seed 1
.venv/bin/cl-bidsapp "$DEMO/bids" "$DEMO/out" participant -w "$DEMO/work" --nprocs 2

# The group level maps lesion frequencies into MNI152NLin2009cAsym and never downloads it. For
# this offline demo a clearly marked stand-in (nilearn's MNI152) is put in a private TemplateFlow
# folder; with real data, seed the real template (docs/group.md).
export TEMPLATEFLOW_HOME=$DEMO/templateflow
.venv/bin/python -m cl_bidsapp.hpc.templates seed "$TEMPLATEFLOW_HOME" --source stand-in
.venv/bin/cl-bidsapp "$DEMO/bids" "$DEMO/out" group -w "$DEMO/work" \
  --reference-masks "$DEMO/bids/derivatives/reference"

echo
echo "Demo finished. Look at:"
echo "  $DEMO/out/sub-01.html, $DEMO/out/sub-02.html   subject reports"
echo "  $DEMO/out/sub-01/anat/   lesion maps and the per-lesion table"
echo "  $DEMO/out/group/group_report.html   group report (lesion-wise F1 against the truth)"
echo "  $DEMO/bids/derivatives/reference/   the phantom's true lesions"
.venv/bin/python - "$DEMO/out/group/group_evaluation.tsv" <<'PY'
import sys
import pandas as pd
table = pd.read_csv(sys.argv[1], sep="\t")
cols = [c for c in ("bids_name", "n_reference", "n_predicted", "f1", "recall", "precision")
        if c in table.columns]
print(table[cols].to_string(index=False))
PY

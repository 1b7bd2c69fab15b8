#!/usr/bin/env bash
# One unattended GPU profile of cl-bidsapp (about 8 minutes on an H100), for a lent device:
#   1. the stage profile (bench_stages.py) of one 1 mm phantom with the full-size network of
#      method.md (random weights) on CUDA, 5 folds with TTA, and that network alone with
#      1 and 5 folds, TTA on and off (whole predictions, after a warm-up);
#   2. the 10-subject batch against bare nnU-Net (bench_vs_nnunet.py: deepbet-cli +
#      nnUNetv2_predict_from_modelfolder per scan vs the app), full-size network (which
#      resamples the 2 mm phantoms to 1 mm, so it does 1 mm work), no TTA, on CUDA, with how
#      busy the network stage kept the GPU.
# Each step has a time limit (200 s, 280 s); a step cut by it still prints what it finished.
# It ends with a table of the figures (also in $OUT/gpu_profile.txt when OUT is set).
#
# Usage:  benchmarks/gpu_profile.sh            # on the GPU machine, from the repository root
#         benchmarks/gpu_profile.sh --smoke    # the same steps shrunk to run on a CPU (~5 min)
# PYTHON=/path/to/python picks the interpreter (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PATH="$(dirname "$PY"):$PATH" PYTHONUNBUFFERED=1
RESULTS=${OUT:-$(mktemp -d /tmp/gpu-profile-XXXX)}
WORK=$(mktemp -d /tmp/gpu-profile-work-XXXX)
mkdir -p "$RESULTS"

if [ "${1:-}" = "--smoke" ]; then
    DEVICE=cpu
    SMOKE_MODEL=$("$PY" -c "from cl_bidsapp.models.testing import make_tiny_model as make
print(make('$WORK/smoke-model', patch=(32, 32, 32), features=(4, 8, 16)))")
    STAGES=(--voxel-size 2 --model "$SMOKE_MODEL" --folds-list 1 2 --tta-list off --full
            --network tiny)
    BATCH=(--model "$SMOKE_MODEL" --batch 2 --voxel-size 2)
    LIMIT_STAGES=900 LIMIT_BATCH=900
else
    DEVICE=cuda
    STAGES=(--voxel-size 1 --stage-model full-size --stage-tta on --folds-list 1 5
            --tta-list off on --full)
    BATCH=(--full-size --batch 10 --sizes 10 --voxel-size 2 --tta off)
    LIMIT_STAGES=200 LIMIT_BATCH=280
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" - <<'EOF'
import os, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, {os.cpu_count()} CPUs")
EOF

echo "== 1. stage profile ($DEVICE)"
timeout "$LIMIT_STAGES" "$PY" benchmarks/bench_stages.py --device "$DEVICE" "${STAGES[@]}" \
    --work "$WORK/stages" 2>"$RESULTS/stages.log" | tee "$RESULTS/stages.txt"
STAGES_RC=${PIPESTATUS[0]}
echo "== 2. batch against bare nnU-Net ($DEVICE)"
timeout "$LIMIT_BATCH" "$PY" benchmarks/bench_vs_nnunet.py --device "$DEVICE" "${BATCH[@]}" \
    --repeats 1 --work "$WORK/batch" 2>"$RESULTS/batch.log" | tee "$RESULTS/batch.txt"
BATCH_RC=${PIPESTATUS[0]}

{
    echo "== summary (device $DEVICE; exit codes: stages $STAGES_RC, batch $BATCH_RC;" \
         "124 = ran out of its time)"
    sed -n '/^Part 1/,$p' "$RESULTS/stages.txt"
    sed -n '/^ *repeat/p;/^subjects/,$p' "$RESULTS/batch.txt"
    echo "target: no CPU stage over 0.30 of the nnU-Net prediction ('/ nnU-Net' column);" \
         "nnU-Net busy near 100% in the batch lines"
} | tee "$RESULTS/gpu_profile.txt"
[ "$STAGES_RC" = 0 ] && [ "$BATCH_RC" = 0 ]

"""Timing of the numerical core on a 1 mm volume (200 x 240 x 200), against a 1 s budget.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_core.py``. Prints one line per step with
seconds and the ratio to the budget (below 1 is within budget). Synthetic data only.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from cl_bidsapp.core.brain import detect_skull_stripped
from cl_bidsapp.core.images import check_image, load_image
from cl_bidsapp.core.lesions import lesion_instances, lesion_table
from cl_bidsapp.core.metrics import lesion_detection, scan_scores

BUDGET_S = 1.0


def probability_map(shape, seed):
    """Smooth noise whose top 0.5 % forms a few thousand blob-shaped 'lesions'."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 1.5)
    field -= field.min()
    field /= field.max()
    return field, float(np.quantile(field, 0.995))


def timed(label, call, *args, **kwargs):
    start = time.perf_counter()
    result = call(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{label:<44s} {seconds:7.3f} s   {seconds / BUDGET_S:5.2f} x budget")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(200, 240, 200))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)

    prob, threshold = probability_map(shape, 0)
    instances = timed("threshold + 26-components + order", lesion_instances, prob, threshold)
    print(f"  ({instances.max()} lesions)")
    timed("lesion table", lesion_table, instances, np.eye(4), prob)
    rng = np.random.default_rng(1)
    folds = [prob + rng.normal(0, 0.01, shape).astype(np.float32) for _ in range(args.folds)]
    timed(f"lesion table + DDU over {args.folds} folds", lesion_table, instances, np.eye(4),
          prob, folds, threshold=threshold)
    truth = lesion_instances(folds[0], threshold) > 0
    timed("lesion detection (TP/FP/US/FN)", lesion_detection, instances > 0, truth)
    timed("all scan scores incl. calibration", scan_scores, instances > 0, truth, prob)

    head = np.where(ndimage.binary_erosion(np.ones(shape, bool), iterations=20),
                    prob * 1000, rng.normal(0, 10, shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sub-01_T1w.nii.gz"
        nib.Nifti1Image(head, np.eye(4)).to_filename(str(path))
        img = timed("load_image (.nii.gz, read fully)", load_image, path)
    img, _ = timed("check_image", check_image, img, path.name)
    timed("detect_skull_stripped", detect_skull_stripped, img)


if __name__ == "__main__":
    main()

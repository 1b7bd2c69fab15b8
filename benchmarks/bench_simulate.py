"""Time the phantom simulator: one subject at 1 mm and at 2 mm, on one core.

Targets (issue 3): under 20 s per 1 mm subject and under 3 s per 2 mm subject. The one-off cost
of building the template anatomy (once per process) is printed separately; "subject" times are
for a complete subject written to disk (simulation + NIfTI/TSV/JSON files).

Run with one thread so the numbers are comparable across machines::

    OMP_NUM_THREADS=1 python benchmarks/bench_simulate.py [--protocol 3T-MP2RAGE] [--repeat 2]

``--deepbet`` also checks that the phantom heads give brain extraction real but feasible work:
deepbet (CPU, ~10 s and ~1.4 GB per image) is run on the UNI and INV2 of a 1 mm MP2RAGE subject
and the T1w of a 1 mm MPRAGE subject, and its mask is compared with the true brain mask (Dice).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGET_S = {1.0: 20.0, 2.0: 3.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="3T-MP2RAGE")
    parser.add_argument("--repeat", type=int, default=2, help="subjects timed per voxel size")
    parser.add_argument("--deepbet", action="store_true",
                        help="also report deepbet's Dice against the true brain mask")
    parser.add_argument("--seed", type=int, default=1, help="seed of the deepbet subjects")
    args = parser.parse_args(argv)

    from cl_bidsapp.simulate import simulate_dataset
    from cl_bidsapp.simulate.template import load_template

    print(f"protocol {args.protocol}, {os.environ['OMP_NUM_THREADS']} thread(s)")
    for voxel in (2.0, 1.0):
        start = time.perf_counter()
        load_template(voxel)
        print(f"template anatomy at {voxel:g} mm (once per process): "
              f"{time.perf_counter() - start:5.2f} s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for voxel in (2.0, 1.0):
            times = []
            for k in range(args.repeat):
                out = Path(tmp) / f"{voxel:g}mm-{k}"
                start = time.perf_counter()
                simulate_dataset(out, n_subjects=1, protocols=(args.protocol,),
                                 voxel_size=voxel, seed=k)
                times.append(time.perf_counter() - start)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
            best = min(times)
            rows.append((voxel, best, TARGET_S[voxel], size))
    print(f"{'voxel':>6} {'best s/subject':>15} {'target s':>9} {'ratio':>6} {'MB/subject':>11}")
    for voxel, best, target, size in rows:
        print(f"{voxel:5g}mm {best:15.2f} {target:9.1f} {best / target:6.2f} {size:11.1f}")
    if args.deepbet:
        deepbet_dice(args.seed)
    return 0


def deepbet_dice(seed: int) -> None:
    """Print deepbet's Dice against the true brain mask on 1 mm phantoms."""
    import warnings

    import nibabel as nib
    import numpy as np
    from deepbet import BrainExtraction

    from cl_bidsapp.simulate import simulate_dataset

    bet = BrainExtraction(no_gpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = simulate_dataset(Path(tmp) / "heads", n_subjects=2,
                                protocols=("3T-MP2RAGE", "3T-MPRAGE"), voxel_size=1.0,
                                seed=seed)
        print(f"{'image':<28} {'Dice':>6} {'deepbet/true volume':>20} {'s':>5}")
        for sub, suffixes in (("sub-01", ("UNIT1", "inv-2_MP2RAGE")), ("sub-02", ("T1w",))):
            ref = root / "derivatives/reference" / sub / "anat" / f"{sub}_desc-brain_mask.nii.gz"
            truth = np.asarray(nib.load(ref).dataobj) > 0
            for suffix in suffixes:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, mask, _ = bet.run(nib.load(root / sub / "anat" / f"{sub}_{suffix}.nii.gz"))
                found = np.asarray(mask.dataobj) > 0
                dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
                print(f"{sub + '_' + suffix:<28} {dice:6.3f} {found.sum() / truth.sum():20.3f} "
                      f"{time.perf_counter() - start:5.1f}")


if __name__ == "__main__":
    sys.exit(main())

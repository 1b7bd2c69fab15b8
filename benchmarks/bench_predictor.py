"""Time the cl-bidsapp predictor against nnU-Net's own predictor, in the same process.

Prints, per setting, the median wall time of:

* ``wrapper``: ``CLPredictor.predict(nibabel image)`` (what the app runs);
* ``nnunet-array``: SimpleITKIO read + ``nnUNetPredictor.predict_single_npy_array`` with
  probabilities returned (nnU-Net's fastest in-process path);
* ``nnunet-file``: ``predict_from_files_sequential`` writing segmentation + probabilities;

and the ratio wrapper / nnunet-array (target <= 1.1). The three run in turn within each
repeat, so load from other jobs falls on all of them alike.

Examples::

    python benchmarks/bench_predictor.py                      # demo model, 2 mm phantom
    python benchmarks/bench_predictor.py --realistic --device cuda --tta both
    python benchmarks/bench_predictor.py --realistic --device cpu --tta off --repeats 1

``--realistic`` builds a randomly initialised network with the seed's likely plans
(method.md: 1 mm, patch 112x128x160, 6-stage PlainConvUNet 32..320) and times it on a 1 mm
skull-stripped brain (MNI152 from nilearn) instead of the demo model.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

log = logging.getLogger("bench_predictor")


def realistic_model(dest: Path, folds=(0,)) -> Path:
    """Random-weight model with the seed's plans (1 mm, 112x128x160, 32..320 features)."""
    from cl_bidsapp.models.testing import make_tiny_model

    return make_tiny_model(dest, name="realistic-random", folds=tuple(folds),
                           spacing=(1.0, 1.0, 1.0),
                           patch=(112, 128, 160), features=(32, 64, 128, 256, 320, 320),
                           strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2],
                                    [1, 2, 2]], is_demo=False)


def brain_1mm() -> nib.Nifti1Image:
    """MNI152 2009 1 mm T1 times its brain mask: a realistic skull-stripped input."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    data = np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0)
    return nib.Nifti1Image(data, t1.affine)


def phantom(voxel_size: float, seed: int = 123) -> nib.Nifti1Image:
    """One simulated 3T MP2RAGE UNI, skull-stripped with the true brain mask."""
    from cl_bidsapp.simulate import simulate_dataset

    out = Path(tempfile.mkdtemp(prefix="bench-phantom-"))
    simulate_dataset(out, 1, protocols=("3T-MP2RAGE",), voxel_size=voxel_size, seed=seed)
    uni = next(out.glob("sub-*/**/anat/*_UNIT1.nii.gz"))
    mask = next((out / "derivatives" / "reference").glob("sub-*/**/anat/*desc-brain_mask.nii.gz"))
    data = np.asarray(nib.load(uni).dataobj, np.float32) * (np.asarray(nib.load(mask).dataobj) > 0)
    return nib.Nifti1Image(data, nib.load(uni).affine)


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, run in turn within every repeat (round robin), so
    that load from other jobs on a shared machine falls on all of them alike."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(model, image: nib.Nifti1Image, device: str, tta: bool, folds, repeats: int,
          with_file: bool) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from cl_bidsapp.models.nnunet_backend import quiet_nnunet
    from cl_bidsapp.models.predictor import CLPredictor, select_device

    work = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
    path = work / "case_0000.nii.gz"
    image.to_filename(path)
    ours = CLPredictor(model, device=device, tta=tta, folds=folds)
    with quiet_nnunet():
        theirs = nnUNetPredictor(tile_step_size=0.5, use_mirroring=tta,
                                 device=select_device(device), allow_tqdm=False,
                                 perform_everything_on_device=select_device(device).type == "cuda")
        theirs.initialize_from_trained_model_folder(str(model.path), use_folds=ours.folds)
        reader = theirs.plans_manager.image_reader_writer_class()

    def run_ours():
        ours.predict(nib.load(path))

    def run_theirs_array():
        with quiet_nnunet():
            data, props = reader.read_images([str(path)])
            theirs.predict_single_npy_array(data, props, save_or_return_probabilities=True)

    def run_theirs_file():
        with quiet_nnunet():
            theirs.predict_from_files_sequential([[str(path)]], [str(work / "out")],
                                                 save_probabilities=True)

    run_ours()  # warm-up: cuDNN autotuning, lazy imports, caches
    fns = {"wrapper": run_ours, "nnunet-array": run_theirs_array}
    if with_file:
        fns["nnunet-file"] = run_theirs_file
    result = time_interleaved(fns, repeats)
    result["ratio"] = result["wrapper"] / result["nnunet-array"]
    result["device"] = str(ours.device) + (f" ({torch.cuda.get_device_name()})"
                                           if ours.device.type == "cuda" else "")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name or path (default: demo)")
    parser.add_argument("--realistic", action="store_true",
                        help="random-weight network with the seed's plans on a 1 mm brain")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tta", choices=["on", "off", "both"], default="both")
    parser.add_argument("--folds", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--voxel-size", type=float, default=2.0,
                        help="phantom voxel size for the demo model (mm)")
    parser.add_argument("--no-file", action="store_true",
                        help="skip nnU-Net's file-based prediction timing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cl_bidsapp.models.registry import resolve_model

    if args.realistic:
        model = resolve_model(str(realistic_model(Path(tempfile.mkdtemp()))))
        image = brain_1mm()
    else:
        model = resolve_model(args.model)
        image = phantom(args.voxel_size)
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.tta]
    print(f"model {model.name} ({model.configuration}), image {image.shape} "
          f"{tuple(round(float(z), 2) for z in image.header.get_zooms())} mm, "
          f"repeats {args.repeats} (median)")
    print(f"{'device':32s} {'TTA':4s} {'wrapper s':>10s} {'nnU-Net s':>10s} {'file s':>8s} "
          f"{'ratio':>6s}")
    for tta in settings:
        r = bench(model, image, args.device, tta, args.folds, args.repeats, not args.no_file)
        print(f"{r['device']:32s} {'on' if tta else 'off':4s} {r['wrapper']:10.2f} "
              f"{r['nnunet-array']:10.2f} {r.get('nnunet-file', float('nan')):8.2f} "
              f"{r['ratio']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

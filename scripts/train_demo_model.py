"""Train the bundled demo model (``cl_bidsapp/data/models/cl-demo-phantom``) on phantoms.

The demo model lets the app run end to end offline, in tests and in CI. It is trained on
simulated 3T MP2RAGE phantoms (:mod:`cl_bidsapp.simulate`) and is meaningless on real scans:
its card says so and the app warns.

Steps, all on the CPU:

1. simulate ``--n-train`` phantoms (3T-MP2RAGE, ``--voxel-size`` mm) with cortical lesions;
2. write an nnU-Net raw dataset: the input is the UNI image times the true brain mask (the
   skull-stripped UNI, as the app feeds the model after brain extraction), labels the CL mask;
3. let nnU-Net fingerprint, plan and preprocess the dataset, replacing the planned network by
   a small one (``--features``, ``--patch``) so the checkpoint stays a few MB;
4. train on all training cases (fold ``all``) with :mod:`cl_bidsapp.models.training`: nnU-Net's
   network, preprocessed data and Dice + CE loss, lesion-centred patches, AdamW;
5. export the slim checkpoint, ``plans.json`` and ``dataset.json`` with a card
   (``write_card``) that records every setting, seed and timing;
6. choose the card's threshold and minimum lesion size on ``--n-val`` validation phantoms
   simulated with another seed;
7. store the out-of-distribution reference in the card: the training and validation phantoms
   go through the app's participant level (``cl-bidsapp-models calibrate``); per encoder stage,
   the training scans' features (mean, shrunk covariance, leave-one-out scale), and a
   threshold from the validation phantoms' scores (docs/ood.md).

Typical run (20-60 minutes on 2 shared cores)::

    OMP_NUM_THREADS=2 python scripts/train_demo_model.py --work /tmp/demo-train

An interrupted run continues with ``--resume``.
Then evaluate on held-out phantoms with ``benchmarks/bench_models.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "cl_bidsapp" / "data" / "models" / "cl-demo-phantom"
DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_CLDemoPhantom"
PLANS_NAME = "nnUNetPlansDemo"
CONFIGURATION = "3d_fullres"
FOLD = "all"

log = logging.getLogger("train_demo_model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder (phantoms, nnU-Net)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder to write")
    p.add_argument("--n-train", type=int, default=30, help="training phantoms")
    p.add_argument("--voxel-size", type=float, default=2.0, help="phantom voxel size, mm")
    p.add_argument("--lesion-mean", type=float, default=12, help="mean lesions per phantom")
    p.add_argument("--lesion-contrast", type=float, default=1.3,
                   help="lesion T1 as a multiple of grey-matter T1")
    p.add_argument("--seed", type=int, default=501, help="simulation and training seed")
    p.add_argument("--features", default="12,24,48,96", help="features per network stage")
    p.add_argument("--patch", type=int, default=32, help="cubic patch edge, voxels")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=4000, help="training iterations")
    p.add_argument("--lr", type=float, default=3e-3, help="initial AdamW learning rate")
    p.add_argument("--oversample", type=float, default=0.66,
                   help="fraction of patches centred near a lesion")
    p.add_argument("--lesion-weight", type=float, default=10.0,
                   help="cross-entropy weight of the lesion class")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--nprocs", type=int, default=1,
                   help="processes for simulating and preprocessing phantoms (about 1.3 GB "
                        "each at 1 mm)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to train and to tune the threshold (cuda: 1 mm phantoms "
                        "become affordable)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="recommended threshold when not tuned (card)")
    p.add_argument("--min-size", type=int, default=3,
                   help="recommended minimum lesion voxels when not tuned (card)")
    p.add_argument("--n-val", type=int, default=4,
                   help="validation phantoms (another seed) to tune threshold and minimum size; "
                        "0 keeps --threshold/--min-size")
    p.add_argument("--version", default="1.0.0", help="model version for the card")
    p.add_argument("--mine-every", type=int, default=0,
                   help="every N iterations, predict each training lesion and centre patches "
                        "more often on those still missed (0: never)")
    p.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (fine-tuning: same network, fresh "
                        "optimiser and schedule)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted training from its checkpoint_latest.pth")
    p.add_argument("--export-only", metavar="CHECKPOINT", default=None,
                   help="skip training; export this checkpoint (e.g. checkpoint_latest.pth)")
    return p.parse_args(argv)


def set_nnunet_environment(work: Path) -> dict:
    """nnU-Net reads its folders from the environment; point them into the work folder."""
    env = {"nnUNet_raw": work / "nnUNet_raw", "nnUNet_preprocessed": work / "nnUNet_preprocessed",
           "nnUNet_results": work / "nnUNet_results"}
    for key, path in env.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(path)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    return env


def simulate_cases(work: Path, args) -> list[tuple[Path, Path]]:
    """Simulate phantoms; return (skull-stripped UNI, CL mask) per subject."""
    from cl_bidsapp.simulate import simulate_dataset

    bids = work / "phantoms"
    if not bids.is_dir():
        simulate_dataset(bids, args.n_train, protocols=("3T-MP2RAGE",),
                         voxel_size=args.voxel_size, lesion_mean=args.lesion_mean,
                         lesion_contrast=args.lesion_contrast, seed=args.seed,
                         nprocs=args.nprocs)
    return masked_uni_cases(bids, work / "masked")


def masked_uni_cases(bids: Path, out: Path) -> list[tuple[Path, Path]]:
    """UNI x true brain mask (the model input) and the CL mask, for every phantom scan."""
    out.mkdir(parents=True, exist_ok=True)
    reference = bids / "derivatives" / "reference"
    cases = []
    for uni_path in sorted(bids.glob("sub-*/**/anat/*_UNIT1.nii.gz")):
        rel = uni_path.relative_to(bids).parent
        stem = uni_path.name[: -len("_UNIT1.nii.gz")]
        mask_path = reference / rel / f"{stem}_desc-brain_mask.nii.gz"
        label_path = reference / rel / f"{stem}_label-CL_mask.nii.gz"
        masked = out / f"{stem}_desc-brain_UNIT1.nii.gz"
        if not masked.exists():
            uni = nib.load(uni_path)
            brain = np.asarray(nib.load(mask_path).dataobj) > 0
            data = np.asarray(uni.dataobj, dtype=np.float32) * brain
            nib.save(nib.Nifti1Image(data, uni.affine), masked)
        cases.append((masked, label_path))
    return cases


def write_raw_dataset(cases, raw_root: Path) -> Path:
    """nnU-Net v2 raw layout: imagesTr/case_XXX_0000.nii.gz, labelsTr/case_XXX.nii.gz."""
    folder = raw_root / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(cases):
        shutil.copyfile(image, folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        lab = nib.load(label)
        data = (np.asarray(lab.dataobj) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, lab.affine), folder / "labelsTr" / f"case_{i:03d}.nii.gz")
    dataset = {"channel_names": {"0": "T1w"}, "labels": {"background": 0, "CL": 1},
               "numTraining": len(cases), "file_ending": ".nii.gz",
               "name": "cl-bidsapp demo phantoms",
               "description": "Simulated 3T MP2RAGE phantoms, skull-stripped UNI, CL masks"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return folder


def small_plans(plans: dict, args) -> dict:
    """Replace nnU-Net's planned 3d_fullres network by the small demo network."""
    features = [int(f) for f in args.features.split(",")]
    n = len(features)
    config = dict(plans["configurations"][CONFIGURATION])
    arch = json.loads(json.dumps(config["architecture"]))
    arch["arch_kwargs"].update({
        "n_stages": n, "features_per_stage": features,
        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1)})
    config.update({"architecture": arch, "patch_size": [args.patch] * 3,
                   "batch_size": args.batch, "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}"})
    new = dict(plans)
    new["plans_name"] = PLANS_NAME
    new["configurations"] = {CONFIGURATION: config}
    return new


def plan_and_preprocess(args) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    pre = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    if not (pre / "nnUNetPlans.json").exists():
        extract_fingerprints([DATASET_ID], num_processes=args.nprocs,
                             check_dataset_integrity=True)
        plan_experiments([DATASET_ID])
    plans = small_plans(json.loads((pre / "nnUNetPlans.json").read_text()), args)
    (pre / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=2))
    # preprocessed data depend on spacing and normalisation only, not on the network
    if not (pre / plans["configurations"][CONFIGURATION]["data_identifier"]).is_dir():
        preprocess([DATASET_ID], plans_identifier=PLANS_NAME, configurations=(CONFIGURATION,),
                   num_processes=(args.nprocs,))
    return plans


def train(args, plans: dict) -> Path:
    """Train with :func:`cl_bidsapp.models.training.train_network`; return the fold folder."""
    from cl_bidsapp.models.training import (TrainingSettings, load_preprocessed_cases,
                                            train_network)

    folder = Path(os.environ["nnUNet_results"]) / DATASET_NAME / f"fold_{FOLD}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.export_only:
        return folder
    config = plans["configurations"][CONFIGURATION]
    cases = load_preprocessed_cases(Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
                                    / config["data_identifier"])
    settings = TrainingSettings(iterations=args.iterations, batch_size=args.batch,
                                patch=args.patch, learning_rate=args.lr,
                                lesion_fraction=args.oversample,
                                lesion_weight=args.lesion_weight, seed=args.seed,
                                threads=args.threads, mine_every=args.mine_every,
                                device=args.device)
    init = None
    if args.init_from:
        import torch

        source = args.init_from.resolve()
        if source.parent == folder.resolve():
            sys.exit(f"--init-from {args.init_from}: this training run writes into that folder; "
                     "copy the checkpoint elsewhere first")
        init = torch.load(source, map_location="cpu", weights_only=False)["network_weights"]
    train_network(config["architecture"], cases, settings, folder / "checkpoint_latest.pth",
                  resume=args.resume, init_weights=init)
    shutil.copyfile(folder / "checkpoint_latest.pth", folder / "checkpoint_final.pth")
    return folder


def export(fold_folder: Path, plans: dict, args, settings: dict,
           checkpoint: str = "checkpoint_final.pth") -> dict:
    """Write the slim model folder and its card."""
    import torch

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / f"fold_{FOLD}").mkdir(parents=True)
    full = torch.load(fold_folder / checkpoint, map_location="cpu", weights_only=False)
    # The network is the one plans.json describes, which nnU-Net's own trainer rebuilds: name
    # that trainer so any nnU-Net installation can load the model.
    slim = {"network_weights": full["network_weights"],
            "init_args": {"configuration": CONFIGURATION, "fold": FOLD},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}
    torch.save(slim, out / f"fold_{FOLD}" / "checkpoint_final.pth")
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    shutil.copyfile(Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / "dataset.json",
                    out / "dataset.json")
    history = full.get("history", {})
    settings["exported_checkpoint"] = checkpoint
    settings["iterations_completed"] = int(full.get("iteration", 0))
    settings["final_train_loss"] = _last(history.get("loss"))
    settings["loss_curve"] = {"iteration": history.get("iteration", [])[::4],
                              "loss": [round(v, 4) for v in history.get("loss", [])[::4]],
                              "batch_dice": [round(v, 3) for v in history.get("dice", [])[::4]]}
    if history.get("seconds"):
        settings["timings"]["train_s"] = history["seconds"][-1]
    return write_demo_card(out, args, settings, args.threshold, args.min_size)


def write_demo_card(out: Path, args, settings: dict, threshold: float, min_size: int) -> dict:
    from cl_bidsapp.models.card import write_card

    return write_card(
        out, name="cl-demo-phantom", version=args.version,
        description="DEMO ONLY: a small nnU-Net v2 trained on simulated 3T MP2RAGE phantoms "
                    "(skull-stripped UNI). For demos, tests and CI; its output on real scans "
                    "is meaningless.",
        licence="Apache-2.0", citation="cl-bidsapp demo model (scripts/train_demo_model.py); "
        "method: Molchanova et al. 2025, arXiv:2507.12092",
        input_contrasts=("UNIT1",), input_image="UNI", skull_stripped=True,
        background_value=0.0, threshold=threshold, min_lesion_size_voxels=min_size,
        trained_on="simulated phantoms (cl_bidsapp.simulate, 3T-MP2RAGE, "
                   f"{args.voxel_size:g} mm)",
        is_demo=True, configuration=CONFIGURATION, trainer="nnUNetTrainer", plans=PLANS_NAME,
        folds=[FOLD], training=settings)


VALIDATION_SEED_OFFSET = 7919
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_SIZES = (1, 2, 3, 4)


def tune_postprocessing(args, work: Path) -> dict:
    """Choose the card's threshold and minimum size on validation phantoms (not training ones).

    Mean lesion-wise F1 over the validation scans for each pair; ties go to the method's
    defaults (0.5, 3 voxels). Predictions use TTA, as the app does by default.
    """
    from cl_bidsapp.core.components import lesion_instances
    from cl_bidsapp.core.metrics import lesion_detection
    from cl_bidsapp.models.predictor import CLPredictor
    from cl_bidsapp.models.registry import resolve_model
    from cl_bidsapp.simulate import simulate_dataset

    seed = args.seed + VALIDATION_SEED_OFFSET
    bids = work / "validation"
    if not bids.is_dir():
        simulate_dataset(bids, args.n_val, protocols=("3T-MP2RAGE",),
                         voxel_size=args.voxel_size, lesion_mean=args.lesion_mean,
                         lesion_contrast=args.lesion_contrast, seed=seed, nprocs=args.nprocs)
    predictor = CLPredictor(resolve_model(str(args.out)), device=args.device, tta=True,
                            threads=args.threads)
    maps = []
    for image_path, label_path in masked_uni_cases(bids, work / "validation-masked"):
        probability = predictor.predict(nib.load(image_path)).probability.get_fdata()
        maps.append((probability, np.asarray(nib.load(label_path).dataobj) > 0))
    grid = []
    for threshold in THRESHOLDS:
        for min_size in MIN_SIZES:
            f1 = [lesion_detection(lesion_instances(p, threshold, min_size) > 0, t).f1
                  for p, t in maps]
            grid.append({"threshold": threshold, "min_size": min_size,
                         "mean_f1": round(float(np.mean(f1)), 4)})
    best = max(grid, key=lambda g: (g["mean_f1"], g["threshold"] == 0.5, g["min_size"] == 3))
    log.info("validation F1 %.3f at threshold %.2f, min size %d", best["mean_f1"],
             best["threshold"], best["min_size"])
    return {"chosen": best, "validation_seed": seed, "n_scans": len(maps), "tta": True,
            "grid": grid}


def calibrate_ood(args, work: Path) -> dict:
    """Write the out-of-distribution reference into the card (training + validation scans).

    The scans go through the app's own participant level (its brain extraction, not the true
    masks the network was trained with): the first encoder stages see the brain's outline, so a
    reference built from true-mask inputs would call every scan the app processes unusual.
    """
    from cl_bidsapp.models.calibration import calibrate
    from cl_bidsapp.models.registry import resolve_model

    model = resolve_model(str(args.out))
    held = work / "validation" if (work / "validation").is_dir() else None
    return calibrate(model, work / "phantoms", held_out=held, device=args.device,
                     work_dir=work / "calibrate",
                     app_args=["--nprocs", str(max(1, args.threads)), "--skip-bids-validation"])


def _device_name(device: str) -> str:
    """``cpu``, or ``cuda (<GPU name>)`` for the card's hardware record."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return device


def _last(values):
    values = [v for v in (values or []) if v is not None]
    return float(values[-1]) if values else None


def main(argv=None) -> int:
    from cl_bidsapp.models.card import sha256_file

    from cl_bidsapp.models.training import training_device

    args = parse_args(argv)
    try:  # before any phantom is simulated
        training_device(args.device)
    except RuntimeError as exc:
        print(f"train_demo_model.py: error: {exc}", file=sys.stderr)
        return 2
    # hashed now, before anything is trained, for the card
    args.init_sha256 = sha256_file(args.init_from) if args.init_from else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = args.work.resolve()
    set_nnunet_environment(work)
    import torch

    started = time.time()
    timings = {}
    cached = (work / "phantoms").is_dir()  # a rerun in the same --work reuses earlier steps
    cases = simulate_cases(work, args)
    timings["simulate_s"] = "cached" if cached else round(time.time() - started, 1)
    log.info("%d training cases", len(cases))
    write_raw_dataset(cases, Path(os.environ["nnUNet_raw"]))
    t = time.time()
    cached = (Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json").exists()
    plans = plan_and_preprocess(args)
    timings["plan_preprocess_s"] = "cached" if cached else round(time.time() - t, 1)
    fold_folder = train(args, plans)
    if args.export_only:  # phantoms and preprocessing came from the cache: no real timings
        timings = {"note": "exported from an earlier training run; see train_s"}
    settings = {
        "script": "scripts/train_demo_model.py",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "simulator": {"protocols": ["3T-MP2RAGE"], "n_subjects": args.n_train,
                      "voxel_size_mm": args.voxel_size, "lesion_mean": args.lesion_mean,
                      "lesion_contrast": args.lesion_contrast, "seed": args.seed},
        "model_input": "UNIT1 x true brain mask, nnU-Net preprocessing (crop, z-score in mask)",
        "network": {"features_per_stage": [int(f) for f in args.features.split(",")],
                    "patch_size": [args.patch] * 3, "batch_size": args.batch,
                    "target_spacing_mm": plans["configurations"][CONFIGURATION]["spacing"]},
        "schedule": {"loop": "cl_bidsapp.models.training.train_network (AdamW, polynomial "
                             "decay, nnU-Net Dice+CE loss, no deep supervision)",
                     "iterations": args.iterations, "initial_lr": args.lr,
                     "lesion_centred_fraction": args.oversample,
                     "hard_lesion_mining_every": args.mine_every,
                     "initial_weights": (f"{args.init_from.name} (sha256 "
                                         f"{args.init_sha256[:12]})"
                                         if args.init_from else "random"),
                     "loss": "Dice (batch) + CE (lesion weight "
                             f"{args.lesion_weight:g})",
                     "augmentation": "flips on 3 axes, intensity scale/shift/noise in brain",
                     "fold": FOLD, "seed": args.seed},
        "hardware": {"device": _device_name(args.device), "threads": args.threads,
                     "machine": platform.machine(),
                     "processor": platform.processor() or "unknown",
                     "note": ("2 shared cores; other jobs competed for them"
                              if args.device == "cpu" else "one GPU")},
        "software": {"nnunetv2": _version("nnunetv2"), "torch": torch.__version__,
                     "python": platform.python_version()},
        "timings": timings,
    }
    card = export(fold_folder, plans, args, settings,
                  checkpoint=args.export_only or "checkpoint_final.pth")
    if args.n_val > 0:
        t = time.time()
        tuning = tune_postprocessing(args, work)
        settings = dict(card["training"], postprocessing_tuning=tuning)
        settings["timings"]["tune_s"] = round(time.time() - t, 1)
        card = write_demo_card(args.out, args, settings, tuning["chosen"]["threshold"],
                               tuning["chosen"]["min_size"])
    t = time.time()
    card = calibrate_ood(args, work)
    log.info("OOD reference: %d training scans, threshold %.3f (%s) in %.0f s",
             card["ood"]["n_scans"], card["ood"]["threshold"], card["ood"]["threshold_from"],
             time.time() - t)
    log.info("wrote %s (%s files, threshold %s, min size %s); total %.1f min", args.out,
             len(card["files"]), card["postprocessing"]["threshold"],
             card["postprocessing"]["min_lesion_size_voxels"], (time.time() - started) / 60)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())

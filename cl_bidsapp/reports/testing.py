"""Participant-level outputs made without nnU-Net, for report tests, benchmarks and demos.

The segmentation model is replaced by a probability map built from a phantom's reference
lesions (smoothed, with a few false positives and fold-to-fold jitter); everything after it is
the app's own code: :func:`cl_bidsapp.core.lesions.lesion_instances` and ``lesion_table``, and
the derivatives writer of the participant workflow (same names, sidecars and record). So report
code can be tested in a second instead of a full participant run.

Needs a dataset written by ``cl-bidsapp-simulate`` (it reads ``derivatives/reference``).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from cl_bidsapp.io import save_nifti, write_json, write_text

logger = logging.getLogger(__name__)

FAKE_RUN_ID = "20260101-000000_0fake000"
DEMO_WARNING = ("The demo model (cl-demo) was trained on simulated phantoms only: its lesions on "
                "real scans mean nothing. Install a real model and pass --model.")


def _source_image(bids_dir: Path, subject: str, session: str | None) -> Path:
    anat = bids_dir / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    for suffix in ("UNIT1", "T1w"):
        found = sorted(anat.glob(f"*_{suffix}.nii.gz"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no UNIT1 or T1w image in {anat}")


def _reference(bids_dir: Path, image: Path, subject: str, session: str | None, kind: str) -> Path:
    prefix = image.name.rsplit("_", 1)[0]
    folder = (bids_dir / "derivatives" / "reference" / f"sub-{subject}"
              / (f"ses-{session}" if session else "") / "anat")
    return folder / f"{prefix}_{kind}.nii.gz"


def _item(image: Path, bids_dir: Path, subject: str, session: str | None) -> dict:
    from cl_bidsapp.bids.entities import parse_name

    suffix = parse_name(image.name).get("suffix", "T1w")
    contrast = "MP2RAGE" if suffix == "UNIT1" else "MPRAGE"
    inv = {k: image.with_name(image.name.replace(f"_{suffix}", f"_inv-{n}_MP2RAGE"))
           for k, n in (("inv1", 1), ("inv2", 2))}
    item = {"subject": subject, "session": session, "contrast": contrast,
            "bids_name": image.name[: -len(".nii.gz")], "rule": suffix,
            "explain": "made by cl_bidsapp.reports.testing", "image": str(image),
            "inv1_phase": None, "inv2_phase": None, "t1map": None}
    for key, path in inv.items():
        item[key] = str(path) if contrast == "MP2RAGE" and path.is_file() else None
    return item


def fake_probability(lesion_mask: np.ndarray, brain_mask: np.ndarray, seed: int = 0,
                     extra_lesions: int = 0) -> np.ndarray:
    """A plausible CL probability map: smoothed reference lesions plus false-positive blobs.

    >>> m = np.zeros((12, 12, 12), bool); m[5:7, 5:7, 5:7] = True
    >>> p = fake_probability(m, np.ones_like(m))
    >>> bool(p[6, 6, 6] > 0.5 > p[0, 0, 0])
    True
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    lesion = lesion_mask > 0
    # every reference voxel stays above 0.5 so small lesions survive; the blur gives soft edges
    prob = np.maximum(ndimage.gaussian_filter(lesion.astype(np.float32), 0.7) * 0.8,
                      lesion * rng.uniform(0.6, 0.97, lesion.shape).astype(np.float32))
    inside = np.argwhere(brain_mask > 0)
    for _ in range(extra_lesions + 2):
        if inside.size == 0:
            break
        centre = inside[rng.integers(len(inside))]
        blob = np.zeros(prob.shape, np.float32)
        blob[tuple(centre)] = 1.0
        blob = ndimage.gaussian_filter(blob, 1.2)
        prob = np.maximum(prob, blob / blob.max() * rng.uniform(0.55, 0.9))
    prob += rng.uniform(0, 0.04, prob.shape).astype(np.float32)
    prob[brain_mask == 0] = 0
    return np.clip(prob, 0, 1).astype(np.float32)


def fake_participant_outputs(output_dir: str | Path, bids_dir: str | Path, subject: str, *,
                             session: str | None = None, folds: Sequence[int] = (0, 1),
                             is_demo: bool = False, extra_lesions: int = 0,
                             warnings: Sequence[str] = (), seed: int = 0,
                             run_id: str = FAKE_RUN_ID, threshold: float = 0.5,
                             min_size: int = 3) -> Path:
    """Write one image's derivatives and record as the participant level would.

    Parameters
    ----------
    output_dir, bids_dir : path
        The output dataset and a phantom dataset written by ``cl-bidsapp-simulate``.
    subject, session : str
        Which image (the subject's first UNIT1, else T1w).
    folds : sequence of int
        Two or more folds give per-lesion fold disagreement (``uncertainty_ddu``).
    is_demo : bool
        Record the model as the demo model.
    extra_lesions : int
        Additional false-positive lesions (for pages with many lesions).
    warnings : sequence of str
        Warnings the record carries (as collected during a run).
    seed, run_id, threshold, min_size
        Randomness, run identifier and lesion rules.

    Returns
    -------
    pathlib.Path
        The record (``sub-XX/log/<bids_name>_record.json``).
    """
    from cl_bidsapp.bids.derivatives import save_settings, source_entities, subject_log_dir
    from cl_bidsapp.config import Settings
    from cl_bidsapp.core.lesions import lesion_instances, lesion_table
    from cl_bidsapp.interfaces.derivatives import SaveDerivatives

    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    image = _source_image(bids_dir, subject, session)
    source = nib.load(image)
    brain = np.asanyarray(nib.load(_reference(bids_dir, image, subject, session,
                                              "desc-brain_mask")).dataobj) > 0
    truth = np.asanyarray(nib.load(_reference(bids_dir, image, subject, session,
                                              "label-CL_mask")).dataobj) > 0
    prob = fake_probability(truth, brain, seed, extra_lesions)
    rng = np.random.default_rng(seed + 1)
    fold_maps = [np.clip(prob + rng.normal(0, 0.12, prob.shape).astype(np.float32) * (prob > .2),
                         0, 1) for _ in folds]
    instances = lesion_instances(prob, threshold, min_size)
    table = lesion_table(instances, source.affine, probability_map=prob,
                         fold_probability_maps=fold_maps if len(folds) >= 2 else None,
                         threshold=threshold, min_size=min_size)
    item = _item(image, bids_dir, subject, session)
    header = source.header.copy()
    with tempfile.TemporaryDirectory(prefix="cl-fake-") as tmp:
        tmp = Path(tmp)
        data = np.asanyarray(source.dataobj).astype(np.float32) * brain

        def save(array, name, dtype):
            img = nib.Nifti1Image(array.astype(dtype), source.affine, header)
            img.set_data_dtype(dtype)
            return str(save_nifti(img, tmp / name))

        table_path = tmp / "lesions.tsv"
        table.to_csv(table_path, sep="\t", index=False, na_rep="n/a", float_format="%.4f")
        model = {"Name": "cl-demo" if is_demo else "fake-model", "Version": "0.0.0",
                 "SHA256": "0" * 64, "IsDemo": is_demo}
        SaveDerivatives(
            output_dir=str(output_dir), bids_dir=str(bids_dir), item=item,
            source_entities=source_entities(image.name), run_id=run_id,
            preproc=save(data, "preproc.nii.gz", np.float32),
            brain_mask=save(brain, "mask.nii.gz", np.uint8),
            probability=save(prob, "prob.nii.gz", np.float32),
            lesion_mask=save(instances > 0, "lesion.nii.gz", np.uint8),
            lesion_dseg=save(instances, "dseg.nii.gz", np.int16),
            lesion_table=str(table_path), n_lesions=int(instances.max(initial=0)),
            total_volume_mm3=float(table["volume_mm3"].sum()) if len(table) else 0.0,
            min_size_voxels=min_size, folds=[str(f) for f in folds], device_used="cpu",
            masking_method="robust-combination" if item["inv2"] else "image",
            skullstrip_method="deepbet", stats={"brain_volume_ml": round(
                float(brain.sum() * np.prod(source.header.get_zooms()[:3]) / 1000), 3)},
            settings={"threshold": threshold, "min_lesion_size": str(min_size), "tta": False,
                      "tile_step_size": 0.5, "device": "cpu", "skull_strip": "auto",
                      "skull_strip_tool": "deepbet", "folds": list(folds)},
            model=model, extra_warnings=list(warnings), prepare_seconds=1.5,
            skullstrip_seconds=8.2, model_input_seconds=0.3, segment_seconds=95.0,
            lesions_seconds=0.8).run()
    settings = Settings(bids_dir=bids_dir, output_dir=output_dir, run_id=run_id, tta=False,
                        model="fake-model")
    save_settings(settings, subject_log_dir(output_dir, subject, run_id))
    _write_description(output_dir, bids_dir)
    from cl_bidsapp.interfaces.derivatives import record_path

    return record_path(output_dir, subject, item["bids_name"])


def fake_failed_image(output_dir: str | Path, bids_dir: str | Path, subject: str, *,
                      session: str | None = None, exit_code: int = 65,
                      message: str = "image has NaN voxels", run_id: str = FAKE_RUN_ID) -> Path:
    """Write the record of an image that failed, with a crash file, as the CLI does."""
    from cl_bidsapp.bids.derivatives import save_settings, subject_log_dir
    from cl_bidsapp.config import Settings
    from cl_bidsapp.interfaces.derivatives import record_path

    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    save_settings(Settings(bids_dir=bids_dir, output_dir=output_dir, run_id=run_id,
                           model="fake-model"), subject_log_dir(output_dir, subject, run_id))
    image = _source_image(bids_dir, subject, session)
    item = _item(image, bids_dir, subject, session)
    crash = subject_log_dir(output_dir, subject, run_id) / f"crash-{item['bids_name']}.txt"
    write_text(crash, f"Node: cl_bidsapp_wf.prepare\nTraceback (most recent call last):\n"
                      f"  File \"prepare.py\", line 1\ncl_bidsapp.errors.InputDataError: "
                      f"{image}: {message}\n")
    record = {
        "bids_name": item["bids_name"], "subject": subject, "session": session,
        "contrast": item["contrast"], "rule": item["rule"], "status": "failed",
        "run_id": run_id, "error": f"{image}: {message}", "exit_code": exit_code,
        "crash_file": crash.relative_to(output_dir).as_posix(),
        "inputs": {k: item.get(k) for k in ("image", "inv1", "inv2")},
    }
    _write_description(output_dir, bids_dir)
    return write_json(record_path(output_dir, subject, item["bids_name"]), record)


def _write_description(output_dir: Path, bids_dir: Path) -> None:
    import json

    from cl_bidsapp.bids.derivatives import write_dataset_files

    raw = json.loads((bids_dir / "dataset_description.json").read_text())
    write_dataset_files(output_dir, raw, bids_dir)

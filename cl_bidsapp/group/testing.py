"""Participant-level outputs written without running the participant level.

For tests, benchmarks and demos of the group level: the files and the record have the names
and fields the participant level writes (see ``cl_bidsapp/interfaces/derivatives.py``), but
the lesions come from whatever the caller passes (e.g. a perturbed ground truth), so a
group-level test takes seconds instead of an nnU-Net run per image.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> item = work_item("sub-01_ses-1_acq-mp2rage_UNIT1")
>>> item.subject, item.session, item.contrast
('01', '1', 'MP2RAGE')
>>> rec = write_table_outputs(out, item, n_lesions=2, seed=0)
>>> rec.relative_to(out).as_posix()
'sub-01/log/sub-01_ses-1_acq-mp2rage_UNIT1_record.json'
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cl_bidsapp import __version__
from cl_bidsapp.bids.derivatives import output_path, source_entities
from cl_bidsapp.bids.discovery import WorkItem
from cl_bidsapp.bids.entities import parse_name
from cl_bidsapp.core.lesions import LESION_TABLE_COLUMNS, lesion_instances, lesion_table
from cl_bidsapp.group.records import record_path
from cl_bidsapp.group.tables import format_value
from cl_bidsapp.io import save_nifti, write_json, write_text

#: Model identity written into fake records (a made-up sha256).
FAKE_MODEL = {"Name": "fake-model", "Version": "1.0", "SHA256": "ab" * 32, "IsDemo": False}


def work_item(bids_name: str, contrast: str | None = None) -> WorkItem:
    """A planned image from its BIDS name (``sub-01[_ses-1]..._UNIT1`` or ``..._T1w``)."""
    entities = parse_name(bids_name + ".nii.gz")
    suffix = entities.pop("suffix")
    entities.pop("extension")
    return WorkItem(subject=entities["sub"], session=entities.get("ses"),
                    contrast=contrast or ("MP2RAGE" if suffix == "UNIT1" else "MPRAGE"),
                    image=None, rule=suffix, explain="test item", entities=entities,
                    source_suffix=suffix)


def _outputs(out_dir: Path, item) -> dict[str, Path]:
    ents = source_entities(item.bids_name + ".nii.gz", item.source_suffix)
    kinds = ("preproc", "brain_mask", "probseg", "lesion_mask", "lesion_dseg", "lesion_table")
    return {k: output_path(out_dir, ents, k) for k in kinds}


def record(item, outputs: dict[str, str], *, lesion_count: int, total_volume_mm3: float,
           brain: dict[str, float] | None = None, model: dict | None = None,
           threshold: float = 0.5, masking_method: str | None = None,
           warnings: Sequence[str] = (), status: str = "ok") -> dict[str, Any]:
    """A record with the fields the participant level writes."""
    if masking_method is None:
        masking_method = "robust-combination" if item.contrast == "MP2RAGE" else "t1w"
    base = {"bids_name": item.bids_name, "subject": item.subject, "session": item.session,
            "contrast": item.contrast, "rule": item.rule, "status": status,
            "run_id": "test-run", "model": dict(model or FAKE_MODEL),
            "settings": {"threshold": threshold, "min_lesion_size": "3", "tta": False},
            "software": {"cl-bidsapp": __version__}}
    if status != "ok":
        return base | {"error": "something went wrong", "exit_code": 65, "crash_file": None}
    return base | {
        "outputs": outputs, "masking_method": masking_method, "skullstrip_method": "deepbet",
        "prestripped": False, "brain": dict(brain or {}),
        "lesions": {"count": int(lesion_count), "total_volume_mm3": round(total_volume_mm3, 3),
                    "min_size_voxels": 3},
        "warnings": list(warnings), "seconds": {}}


def write_table_outputs(out_dir: Path, item, n_lesions: int, seed: int = 0,
                        brain_volume_ml: float = 1200.0, **record_options) -> Path:
    """Record and per-lesion table (with its sidecar) only, no images; return the record path.

    The record names only the table, so the group level does not look for images.
    """
    rng = np.random.default_rng(seed)
    voxels = np.sort(rng.integers(3, 200, n_lesions))[::-1]
    rows = []
    for index, n in enumerate(voxels, start=1):
        centre = rng.uniform(-60, 60, 3)
        rows.append([index, f"CL-{index:03d}", int(n), float(n), *centre.round(3),
                     *(centre + 90).round(3), round(float(rng.uniform(0.5, 0.8)), 4),
                     round(float(rng.uniform(0.8, 1.0)), 4), round(float(rng.uniform()), 4)])
    paths = _outputs(Path(out_dir), item)
    text = "\t".join(LESION_TABLE_COLUMNS) + "\n" + "".join(
        "\t".join(format_value(v) for v in row) + "\n" for row in rows)
    write_text(paths["lesion_table"], text)
    write_json(paths["lesion_table"].with_suffix(".json"), {"index": {"LongName": "Lesion index"}})
    brain = {"brain_volume_ml": brain_volume_ml, "intensity_p01": 100.0,
             "intensity_p25": 900.0, "intensity_p50": 1100.0, "intensity_p75": 1300.0,
             "intensity_p99": 1700.0}
    rel = {"lesion_table": paths["lesion_table"].relative_to(out_dir).as_posix()}
    data = record(item, rel, lesion_count=n_lesions, total_volume_mm3=float(voxels.sum()),
                  brain=brain, **record_options)
    return write_json(record_path(Path(out_dir), item.subject, item.bids_name), data)


def write_image_outputs(out_dir: Path, item, image, brain_mask: np.ndarray,
                        probability: np.ndarray, threshold: float = 0.5,
                        **record_options) -> Path:
    """All derivatives of one image from a probability map; return the record path.

    Parameters
    ----------
    out_dir : Path
        The output folder.
    item : WorkItem
        The planned image (names the files).
    image : nibabel image
        The source image (its grid and intensities; masked by ``brain_mask`` for the model
        input).
    brain_mask, probability : ndarray
        On the image's grid.
    threshold : float
        Lesions are the 26-connected components of ``probability >= threshold``.
    """
    import nibabel as nib

    from cl_bidsapp.core.preproc import brain_statistics, image_like

    out_dir = Path(out_dir)
    paths = _outputs(out_dir, item)
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(image.shape[:3])
    brain = np.asarray(brain_mask) > 0
    instances = lesion_instances(probability, threshold)
    table = lesion_table(instances, image.affine, probability_map=probability)
    save_nifti(image_like(np.where(brain, data, 0), image, np.float32), paths["preproc"])
    save_nifti(image_like(brain.astype(np.uint8), image, np.uint8), paths["brain_mask"])
    save_nifti(image_like(probability.astype(np.float32), image, np.float32), paths["probseg"])
    save_nifti(image_like((instances > 0).astype(np.uint8), image, np.uint8),
               paths["lesion_mask"])
    save_nifti(image_like(instances.astype(np.uint16), image, np.uint16), paths["lesion_dseg"])
    write_text(paths["lesion_table"], table.to_csv(sep="\t", index=False, na_rep="n/a"))
    for path in paths.values():
        name = path.name.replace(".nii.gz", ".json").replace(".tsv", ".json")
        write_json(path.with_name(name), {"Sources": []})
    stats = brain_statistics(nib.Nifti1Image(data, image.affine),
                             image_like(brain.astype(np.uint8), image, np.uint8))
    rel = {k: p.relative_to(out_dir).as_posix() for k, p in paths.items()}
    data = record(item, rel, lesion_count=len(table),
                  total_volume_mm3=float(table["volume_mm3"].sum()), brain=stats,
                  threshold=threshold, **record_options)
    return write_json(record_path(out_dir, item.subject, item.bids_name), data)


def phantom_outputs(bids_dir: Path, out_dir: Path, items: Sequence, seed: int = 0,
                    **record_options) -> None:
    """Outputs for simulated phantoms: the ground truth, perturbed, as the "prediction".

    Per image: one reference lesion is dropped (a false negative), one blob of 3x3x3 voxels is
    added in the brain away from lesions (a false positive), the rest is kept; the probability
    map is 0.9 on predicted lesions and 0.05 elsewhere in the brain. The brain mask is the
    phantom's true one. Needs ``bids_dir/derivatives/reference`` as the simulator writes it.
    """
    import nibabel as nib
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    reference = Path(bids_dir) / "derivatives" / "reference"
    for item in items:
        folder = f"sub-{item.subject}" + (f"/ses-{item.session}" if item.session else "")
        stem = item.bids_name.rsplit("_", 1)[0]
        image = nib.load(str(Path(bids_dir) / folder / "anat" / f"{item.bids_name}.nii.gz"))
        brain = np.asarray(nib.load(str(reference / folder / "anat" /
                                        f"{stem}_desc-brain_mask.nii.gz")).dataobj) > 0
        truth = np.asarray(nib.load(str(reference / folder / "anat" /
                                        f"{stem}_label-CL_mask.nii.gz")).dataobj) > 0
        labels, n = ndimage.label(truth, np.ones((3, 3, 3)))
        predicted = truth.copy()
        if n:
            predicted[labels == rng.integers(1, n + 1)] = False
        far = ndimage.binary_erosion(brain, iterations=4) & ~ndimage.binary_dilation(
            truth, iterations=4)
        candidates = np.argwhere(far)
        if len(candidates):
            i, j, k = candidates[rng.integers(len(candidates))]
            predicted[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = True
        probability = np.where(predicted, 0.9, np.where(brain, 0.05, 0.0)).astype(np.float32)
        write_image_outputs(out_dir, item, image, brain, probability, **record_options)

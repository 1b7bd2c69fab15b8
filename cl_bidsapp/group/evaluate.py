"""Evaluation mode: predictions against manual reference masks, per image and per group.

Per image, the scores are those of :mod:`cl_bidsapp.core.metrics` (the method's definitions):
lesion-wise TP / FP / US / FN counts, F1, recall, precision, US-rate, voxel Dice and nDSC, and
Brier score and ECE of the probability map inside the brain mask. A per-lesion error map
(1 TP, 2 FP, 3 US, 4 FN) is written beside the prediction as
``..._label-CL_desc-errors_dseg.nii.gz``. Over images: the mean with a bootstrap standard
error and the pooled counts, for all images, per training domain and per site.

Reference masks are found in the ``--reference-masks`` folder (a BIDS derivatives folder) by
the entities of the source image, as ``_label-CL_mask``, else ``_label-lesion_mask``, else the
legacy ``_label-lesion_roi``; a mask named only by subject (and session) serves every image of
that session. Masks with a ``space-`` entity are not in the image's space and are ignored.

A reference that cannot be used (unreadable, or on another grid than the prediction) does not
stop the others: the image is flagged ``reference_unusable`` with a message naming both files,
and the group level exits 65 at the end.

>>> reference_key({"sub": "01", "acq": "mp2rage", "suffix": "UNIT1"})
('01', None, None, 'mp2rage', None, None, None, None)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cl_bidsapp.bids.entities import parse_name
from cl_bidsapp.core.metrics import summarise_scans
from cl_bidsapp.group.domain import IN_DOMAIN, OUT_OF_DOMAIN, UNKNOWN

logger = logging.getLogger(__name__)

#: (label, suffix) of reference masks, most preferred first.
REFERENCE_KINDS = (("CL", "mask"), ("lesion", "mask"), ("lesion", "roi"))
_KEY_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run")
SCORE_COLUMNS = ("n_reference", "n_predicted", "tp", "fp", "us", "fn", "f1", "recall",
                 "precision", "us_rate", "dsc", "ndsc", "brier", "ece")
_MEAN_METRICS = ("f1", "recall", "precision", "us_rate", "dsc", "ndsc", "brier", "ece")
_POOLED_COUNTS = ("n_reference", "tp", "fp", "us", "fn")


def reference_key(entities: dict[str, str]) -> tuple:
    """The entities that tie a reference mask to a source image."""
    return tuple(entities.get(k) for k in _KEY_ENTITIES)


def index_reference_masks(root: str | Path) -> dict[tuple, Path]:
    """Reference masks under ``root`` by :func:`reference_key`, the preferred kind for each.

    Parameters
    ----------
    root : path
        The ``--reference-masks`` folder.

    Returns
    -------
    dict
        Key -> mask path. When several masks of the same kind share a key (e.g. two raters'
        ``desc-`` masks), the one without ``desc-`` wins, else the first by name, and a
        warning names the others.
    """
    found: dict[tuple, list[tuple[int, int, str, Path]]] = {}
    for path in sorted(Path(root).rglob("sub-*")):
        if not path.name.endswith((".nii.gz", ".nii")) or not path.is_file():
            continue
        entities = parse_name(path.name)
        kind = (entities.get("label"), entities.get("suffix"))
        if kind not in REFERENCE_KINDS or "space" in entities:
            continue
        rank = (REFERENCE_KINDS.index(kind), 0 if "desc" not in entities else 1)
        found.setdefault(reference_key(entities), []).append((*rank, path.name, path))
    index = {}
    for key, options in found.items():
        options.sort()
        index[key] = options[0][3]
        same = [o[3].name for o in options[1:] if o[:2] == options[0][:2]]
        if same:
            logger.warning("several reference masks for %s: using %s, not %s",
                           options[0][3].name.split("_label-")[0], options[0][3].name,
                           ", ".join(same))
    return index


def match_reference(index: dict[tuple, Path], entities: dict[str, str]) -> Path | None:
    """The reference mask for a source image: same entities, else same subject and session.

    >>> idx = {("01",) + (None,) * 7: Path("sub-01_label-CL_mask.nii.gz")}
    >>> match_reference(idx, {"sub": "01", "acq": "mp2rage"}).name
    'sub-01_label-CL_mask.nii.gz'
    >>> match_reference(idx, {"sub": "02"}) is None
    True
    """
    key = reference_key(entities)
    if key in index:
        return index[key]
    session_only = (key[0], key[1]) + (None,) * (len(key) - 2)
    return index.get(session_only)


def evaluate_image(job: dict[str, Any]) -> dict[str, Any]:
    """Score one prediction against its reference and write the error map (a worker job).

    Parameters
    ----------
    job : dict
        ``bids_name``; paths ``prediction`` (binary lesion mask), ``reference``,
        ``probability`` and ``brain_mask`` (optional, for calibration), ``error_map`` (where
        to write it) and ``sidecar`` (its JSON content); optional for the error analysis:
        ``tissue`` (tissue -> probability map path), ``lesion_dseg`` and ``lesion_table``.

    Returns
    -------
    dict
        ``bids_name``, the scores of :data:`SCORE_COLUMNS`, ``problem`` (None, or why the
        pair could not be scored, naming the files), ``problem_source`` (``"reference"`` or
        ``"prediction"``: which file is at fault), ``lesions`` (the per-lesion rows of
        :func:`cl_bidsapp.group.error_analysis.image_lesion_rows`) and ``notes`` (inputs of
        the error analysis that could not be used).
    """
    from cl_bidsapp.core.images import compare_grids, load_image
    from cl_bidsapp.core.metrics import (brier_score, dice, expected_calibration_error,
                                         lesion_detection, normalised_dice)
    from cl_bidsapp.core.preproc import image_like
    from cl_bidsapp.errors import CLBidsAppError
    from cl_bidsapp.group.error_analysis import image_lesion_rows
    from cl_bidsapp.io import save_nifti, write_json

    result: dict[str, Any] = {"bids_name": job["bids_name"], "problem": None, "lesions": [],
                              "notes": [], "problem_source": None}

    def refuse(source: str, problem: str) -> dict[str, Any]:
        result.update(problem=problem, problem_source=source)
        return result

    try:
        predicted_img = load_image(job["prediction"])
    except CLBidsAppError as exc:
        return refuse("prediction", f"the participant level's lesion mask is unusable: {exc}")
    try:
        reference_img = load_image(job["reference"])
    except CLBidsAppError as exc:
        return refuse("reference", str(exc))
    brain_img = brain_problem = None
    if job.get("brain_mask"):
        try:
            brain_img = load_image(job["brain_mask"])    # read once: grid check, calibration
        except CLBidsAppError as exc:
            brain_problem = exc
        # the participant outputs share one grid: a prediction off it was changed afterwards
        if brain_img is not None and not compare_grids(brain_img, predicted_img)[0]:
            return refuse("prediction", f"prediction {job['prediction']} is not on the grid of "
                                        f"its brain mask {job['brain_mask']}: the participant "
                                        "outputs were changed after the run; run the "
                                        "participant level again")
    same, message = compare_grids(reference_img, predicted_img,
                                  names=(f"reference mask {job['reference']}",
                                         f"prediction {job['prediction']}"))
    if not same:
        return refuse("reference",
                      message + "; resample the reference onto the source image's grid")
    shape = predicted_img.shape[:3]
    predicted = np.asarray(predicted_img.dataobj).reshape(shape)
    reference = np.asarray(reference_img.dataobj).reshape(shape)
    if not np.isfinite(reference).all():
        return refuse("reference", f"reference mask {job['reference']} has NaN or infinite "
                                   "values")
    detection = lesion_detection(predicted, reference)
    result.update(detection.scores())
    result["dsc"] = dice(predicted, reference)
    result["ndsc"] = normalised_dice(predicted, reference)
    result["brier"] = result["ece"] = float("nan")
    probability = brain = None
    try:
        if brain_problem is not None:
            raise brain_problem
        if brain_img is not None:
            brain = np.asarray(brain_img.dataobj).reshape(shape)
        if job.get("probability"):
            probability = np.asarray(load_image(job["probability"]).dataobj,
                                     dtype=np.float32).reshape(shape)
            result["brier"] = brier_score(probability, reference, brain)
            result["ece"] = expected_calibration_error(probability, reference, brain)
    except (CLBidsAppError, ValueError) as exc:
        logger.warning("%s: calibration skipped (%s)", job["bids_name"], exc)
        probability = brain = None
    save_nifti(image_like(detection.error_map, predicted_img, np.uint8), job["error_map"])
    write_json(Path(str(job["error_map"]).replace(".nii.gz", ".json")), job["sidecar"])
    result["lesions"], result["notes"] = image_lesion_rows(
        job, predicted, reference, detection.records, predicted_img, probability, brain)
    return result


def error_map_sidecar(prediction_rel: str, reference: Path) -> dict[str, Any]:
    """JSON sidecar of an error map: what its values mean and where they come from."""
    return {
        "Description": "Lesion-wise evaluation of the predicted cortical-lesion mask against a "
                       "reference mask (method.md definitions, 26-connectivity, TP when "
                       "IoU_adj >= 0.25).",
        "Sources": [f"bids::{prediction_rel}", Path(reference).absolute().as_uri()],
        "Labels": {"0": "background", "1": "TP: true-positive predicted lesion",
                   "2": "FP: false-positive predicted lesion",
                   "3": "US: under-segmented predicted lesion (0 < IoU_adj < 0.25)",
                   "4": "FN: reference lesion that no predicted voxel touches"},
    }


def summarise_evaluation(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Group summaries of per-image scores: for all images, per domain, per site.

    Parameters
    ----------
    scores : pandas.DataFrame
        One row per evaluated image, with :data:`SCORE_COLUMNS` and ``domain`` and ``site``.

    Returns
    -------
    long : pandas.DataFrame
        ``group_by``, ``group``, then the columns of
        :func:`~cl_bidsapp.core.metrics.summarise_scans` (``metric``, ``mean``, ``se``,
        ``n_scans``, ``pooled``).
    wide : pandas.DataFrame
        One row per group, shaped like the method paper's in-domain / out-of-domain table:
        ``n_scans``, pooled lesion counts, ``<metric>_mean`` and ``<metric>_se``, and
        ``f1_pooled``.

    Examples
    --------
    >>> s = pd.DataFrame({"tp": [1, 0], "fp": [0, 1], "us": [0, 0], "fn": [0, 1],
    ...                   "n_reference": [1, 1], "f1": [1.0, 0.0],
    ...                   "domain": ["in-domain", "out-of-domain"], "site": ["A", "B"]})
    >>> long, wide = summarise_evaluation(s)
    >>> print(wide[["group", "n_scans", "f1_mean", "f1_pooled"]].to_string(index=False))
            group  n_scans  f1_mean  f1_pooled
              all        2      0.5        0.5
        in-domain        1      1.0        1.0
    out-of-domain        1      0.0        0.0
                A        1      1.0        1.0
                B        1      0.0        0.0
    """
    groups: list[tuple[str, str, pd.DataFrame]] = [("all", "all", scores)]
    if "domain" in scores and set(scores["domain"].dropna()) - {UNKNOWN}:
        order = [IN_DOMAIN, OUT_OF_DOMAIN, UNKNOWN]
        for domain in order:
            part = scores[scores["domain"] == domain]
            if len(part):
                groups.append(("domain", domain, part))
    if "site" in scores and scores["site"].notna().any():
        for site in sorted(scores["site"].dropna().unique(), key=str):
            groups.append(("site", str(site), scores[scores["site"] == site]))
    long_rows, wide_rows = [], []
    for group_by, label, part in groups:
        summary = summarise_scans(part)
        summary.insert(0, "group", label)
        summary.insert(0, "group_by", group_by)
        long_rows.append(summary)
        by_metric = summary.set_index("metric")
        row: dict[str, Any] = {"group_by": group_by, "group": label, "n_scans": len(part)}
        for count in _POOLED_COUNTS:
            row[count] = (int(by_metric.loc[count, "pooled"]) if count in by_metric.index
                          else None)
        for metric in _MEAN_METRICS:
            known = metric in by_metric.index
            row[f"{metric}_mean"] = by_metric.loc[metric, "mean"] if known else np.nan
            row[f"{metric}_se"] = by_metric.loc[metric, "se"] if known else np.nan
            if metric == "f1":
                row["f1_pooled"] = by_metric.loc[metric, "pooled"] if known else np.nan
        wide_rows.append(row)
    long = pd.concat(long_rows, ignore_index=True) if long_rows else pd.DataFrame()
    return long, pd.DataFrame(wide_rows)


def evaluation_jobs(summaries: Sequence, reference_dir: Path, output_dir: Path
                    ) -> tuple[list[dict[str, Any]], list]:
    """Jobs for :func:`evaluate_image`, and the processed images that have no reference."""
    from cl_bidsapp.bids.derivatives import output_path, source_entities

    from cl_bidsapp.group.error_analysis import index_tissue_maps, match_tissue_maps

    index = index_reference_masks(reference_dir)
    tissue_index = index_tissue_maps(reference_dir)
    logger.info("%d reference mask(s) and tissue maps for %d image(s) in %s", len(index),
                len(tissue_index), reference_dir)
    jobs, unmatched = [], []
    for s in summaries:
        prediction = s.output("lesion_mask")
        if not s.ok or prediction is None:
            continue
        reference = match_reference(index, s.entities)
        if reference is None:
            unmatched.append(s)
            continue
        name = s.bids_name + ".nii.gz"
        error_map = output_path(output_dir, source_entities(name, s.source_suffix), "error_map")
        rel = prediction.relative_to(output_dir).as_posix()
        jobs.append({"bids_name": s.bids_name, "prediction": str(prediction),
                     "reference": str(reference),
                     "probability": _existing(s.output("probseg")),
                     "brain_mask": _existing(s.output("brain_mask")),
                     "error_map": str(error_map),
                     "sidecar": error_map_sidecar(rel, reference),
                     "tissue": match_tissue_maps(tissue_index, s.entities),
                     "lesion_dseg": _existing(s.output("lesion_dseg")),
                     "lesion_table": _existing(s.output("lesion_table"))})
    return jobs, unmatched


def _existing(path: Path | None) -> str | None:
    return str(path) if path is not None and Path(path).is_file() else None

"""Evaluation mode of the group level: hand-built cases worked on paper, through the files.

Each case writes a prediction and a reference as NIfTI files and runs the same job the group
level runs (:func:`cl_bidsapp.group.evaluate.evaluate_image`), so the scores, the error map on
disk and its sidecar are all checked. Expected values are worked out in the comments from the
definitions in ``method.md``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cl_bidsapp.core.metrics import summarise_scans
from cl_bidsapp.group.evaluate import (evaluate_image, index_reference_masks, match_reference,
                                       summarise_evaluation)

SHAPE = (12, 12, 12)


def _save(path: Path, data, affine=None) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.uint8), np.eye(4) if affine is None
                             else affine), str(path))
    return str(path)


def _evaluate(tmp_path, prediction, reference, probability=None, brain=None, ref_affine=None):
    job = {"bids_name": "sub-01_T1w", "prediction": _save(tmp_path / "pred.nii.gz", prediction),
           "reference": _save(tmp_path / "ref.nii.gz", reference, ref_affine),
           "probability": None, "brain_mask": None,
           "error_map": str(tmp_path / "sub-01_label-CL_desc-errors_dseg.nii.gz"),
           "sidecar": {"Description": "test"}}
    if probability is not None:
        path = tmp_path / "prob.nii.gz"
        nib.save(nib.Nifti1Image(probability.astype(np.float32), np.eye(4)), str(path))
        job["probability"] = str(path)
    if brain is not None:
        job["brain_mask"] = _save(tmp_path / "brain.nii.gz", brain)
    result = evaluate_image(job)
    error_map = None
    if Path(job["error_map"]).is_file():
        error_map = np.asarray(nib.load(job["error_map"]).dataobj)
    return result, error_map


def _empty():
    return np.zeros(SHAPE, bool)


def test_a_reference_lesion_split_in_two_counts_two_true_positives(tmp_path):
    ref = _empty(); ref[5, 5, 1:11] = True                 # one lesion of 10 voxels
    pred = _empty(); pred[5, 5, 1:5] = pred[5, 5, 7:11] = True   # two pieces of 4, gap of 2
    # piece 1: K' = the lesion (10), O = piece 2 (4): IoU_adj = 4 / |p1 ∪ (K' \ O)| = 4 / 6
    result, error_map = _evaluate(tmp_path, pred, ref)
    assert result["problem"] is None
    assert (result["tp"], result["fp"], result["us"], result["fn"]) == (2, 0, 0, 0)
    assert result["n_reference"] == 1 and result["n_predicted"] == 2
    assert result["f1"] == 1.0 and result["recall"] == 1.0 and result["precision"] == 1.0
    assert result["dsc"] == pytest.approx(2 * 8 / (8 + 10))
    assert set(np.unique(error_map[pred])) == {1} and not error_map[~pred].any()


def test_one_prediction_over_two_reference_lesions_is_one_true_positive(tmp_path):
    ref = _empty(); ref[5, 5, 1:5] = ref[5, 5, 7:11] = True   # two lesions of 4
    pred = _empty(); pred[5, 5, 1:11] = True                   # one bar of 10 over both
    # K' = both lesions (8 voxels), O empty: IoU_adj = 8 / 10; neither lesion is missed
    result, error_map = _evaluate(tmp_path, pred, ref)
    assert (result["tp"], result["fp"], result["us"], result["fn"]) == (1, 0, 0, 0)
    assert result["n_reference"] == 2
    assert result["f1"] == 1.0 and result["recall"] == 1.0
    assert (error_map[pred] == 1).all()


def test_reference_blobs_touching_at_a_corner_are_one_lesion(tmp_path):
    ref = _empty(); ref[2:4, 2:4, 2:4] = ref[4:6, 4:6, 4:6] = True   # 8 + 8, corner contact
    pred = _empty(); pred[2:4, 2:4, 2:4] = True                      # finds one cube
    # one reference lesion of 16 voxels: IoU_adj = 8 / 16 = 0.5 -> TP; the reference lesion
    # is touched, so its uncovered half is not a false negative
    result, error_map = _evaluate(tmp_path, pred, ref)
    assert result["n_reference"] == 1
    assert (result["tp"], result["fn"]) == (1, 0)
    assert (error_map[pred] == 1).all() and not error_map[ref & ~pred].any()


def test_a_small_prediction_on_a_big_lesion_is_under_segmented(tmp_path):
    ref = _empty(); ref[4:7, 4:7, 4:7] = True            # 27 voxels
    pred = _empty(); pred[6, 6, 6:9] = True               # 3 voxels, one inside
    # IoU_adj = 1 / |p ∪ K'| = 1 / (3 + 27 - 1) = 1 / 29 < 0.25 -> US, and the lesion is touched
    result, error_map = _evaluate(tmp_path, pred, ref)
    assert (result["tp"], result["fp"], result["us"], result["fn"]) == (0, 0, 1, 0)
    assert result["us_rate"] == 1.0
    assert result["f1"] == 0.0                            # 2*0 / (0 + 0 + 1 + 0)
    assert (error_map[pred] == 3).all()


def test_empty_masks(tmp_path):
    lesion = _empty(); lesion[3:5, 3:5, 3:5] = True
    both_empty, error_map = _evaluate(tmp_path, _empty(), _empty())
    assert (both_empty["f1"], both_empty["recall"], both_empty["precision"],
            both_empty["dsc"], both_empty["ndsc"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert not error_map.any()

    missed, error_map = _evaluate(tmp_path, _empty(), lesion)
    # nothing predicted, one lesion missed: precision 0 (FN > 0), recall 0, F1 0
    assert (missed["fn"], missed["f1"], missed["recall"], missed["precision"]) == (1, 0.0, 0.0,
                                                                                     0.0)
    assert (error_map[lesion] == 4).all()

    invented, error_map = _evaluate(tmp_path, lesion, _empty())
    # no reference lesion: recall is 1 by convention, the prediction is a false positive
    assert (invented["fp"], invented["f1"], invented["recall"], invented["precision"]) == (
        1, 0.0, 1.0, 0.0)
    assert (error_map[lesion] == 2).all()


def test_calibration_inside_the_brain(tmp_path):
    ref = _empty(); ref[4:6, 4:6, 4:6] = True
    probability = np.where(ref, 0.9, 0.1)
    brain = np.ones(SHAPE, bool)
    # every voxel is off by 0.1: Brier 0.01; two bins each with a gap of 0.1: ECE 0.1
    result, _ = _evaluate(tmp_path, ref, ref, probability=probability, brain=brain)
    assert result["brier"] == pytest.approx(0.01)
    assert result["ece"] == pytest.approx(0.1)
    without, _ = _evaluate(tmp_path, ref, ref)
    assert math.isnan(without["brier"]) and math.isnan(without["ece"])


def test_error_map_sidecar_is_written_next_to_it(tmp_path):
    ref = _empty(); ref[4:6, 4:6, 4:6] = True
    _evaluate(tmp_path, ref, ref)
    sidecar = tmp_path / "sub-01_label-CL_desc-errors_dseg.json"
    assert json.loads(sidecar.read_text()) == {"Description": "test"}


def test_a_reference_on_another_grid_is_refused_naming_both_files(tmp_path):
    ref = _empty(); ref[4:6, 4:6, 4:6] = True
    shifted = np.eye(4); shifted[:3, 3] = 2.0
    result, error_map = _evaluate(tmp_path, ref, ref, ref_affine=shifted)
    assert "ref.nii.gz" in result["problem"] and "pred.nii.gz" in result["problem"]
    assert "different grids" in result["problem"]
    assert error_map is None                               # nothing half-evaluated


def test_a_prediction_off_its_own_outputs_grid_is_blamed_on_the_prediction(tmp_path):
    ref = _empty(); ref[4:6, 4:6, 4:6] = True
    shifted = np.eye(4); shifted[:3, 3] = 2.0
    brain = _save(tmp_path / "brain.nii.gz", np.ones(SHAPE, bool))
    pred = _save(tmp_path / "pred.nii.gz", ref, shifted)     # edited after the run
    job = {"bids_name": "sub-01_T1w", "prediction": pred, "brain_mask": brain,
           "reference": _save(tmp_path / "ref.nii.gz", ref), "probability": None,
           "error_map": str(tmp_path / "errors.nii.gz"), "sidecar": {}}
    result = evaluate_image(job)
    assert result["problem_source"] == "prediction"
    assert "pred.nii.gz" in result["problem"] and "brain.nii.gz" in result["problem"]
    assert "run the participant level again" in result["problem"]
    # the reference off the grid stays the reference's fault
    result, _ = _evaluate(tmp_path, ref, ref, brain=np.ones(SHAPE, bool), ref_affine=shifted)
    assert result["problem_source"] == "reference"


def test_an_unreadable_reference_is_reported_not_raised(tmp_path):
    pred = _save(tmp_path / "pred.nii.gz", _empty())
    broken = tmp_path / "ref.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    result = evaluate_image({"bids_name": "x", "prediction": pred, "reference": str(broken),
                             "error_map": str(tmp_path / "e.nii.gz"), "sidecar": {}})
    assert "ref.nii.gz" in result["problem"]


def test_reference_masks_are_found_by_entities_and_preferred_by_kind(tmp_path):
    names = ["sub-01/anat/sub-01_label-lesion_roi.nii.gz",
             "sub-01/anat/sub-01_label-CL_mask.nii.gz",
             "sub-02/ses-1/anat/sub-02_ses-1_acq-mp2rage_label-lesion_mask.nii.gz",
             "sub-03/anat/sub-03_space-MNI152NLin2009cAsym_label-CL_mask.nii.gz",
             "sub-04/anat/sub-04_label-GM_probseg.nii.gz"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _save(tmp_path / name, _empty())
    index = index_reference_masks(tmp_path)
    # CL mask wins over the legacy lesion ROI; a session-wide mask serves any acquisition
    assert match_reference(index, {"sub": "01"}).name == "sub-01_label-CL_mask.nii.gz"
    assert match_reference(index, {"sub": "01", "acq": "mprage", "run": "2"}).name == \
        "sub-01_label-CL_mask.nii.gz"
    assert match_reference(index, {"sub": "02", "ses": "1", "acq": "mp2rage"}) is not None
    assert match_reference(index, {"sub": "02", "ses": "1", "acq": "other"}) is None
    # template-space masks and other labels are not references for native-space images
    assert match_reference(index, {"sub": "03"}) is None
    assert match_reference(index, {"sub": "04"}) is None


def test_group_summaries_agree_with_the_per_group_scan_summaries():
    scores = pd.DataFrame({
        "tp": [2, 1, 0, 3], "fp": [0, 1, 2, 0], "us": [0, 0, 1, 1], "fn": [1, 0, 2, 0],
        "n_reference": [3, 1, 2, 3], "n_predicted": [2, 2, 3, 4],
        "f1": [0.8, 0.667, 0.0, 0.857], "dsc": [0.7, 0.5, 0.1, 0.8],
        "site": ["A", "A", "B", "B"],
        "domain": ["in-domain", "in-domain", "out-of-domain", "out-of-domain"]})
    long, wide = summarise_evaluation(scores)
    assert list(wide["group"]) == ["all", "in-domain", "out-of-domain", "A", "B"]
    for label, part in (("A", scores.iloc[:2]), ("out-of-domain", scores.iloc[2:])):
        row = wide[wide["group"] == label].iloc[0]
        expected = summarise_scans(part).set_index("metric")
        assert row["n_scans"] == len(part)
        assert row["f1_mean"] == pytest.approx(expected.loc["f1", "mean"])
        assert row["dsc_se"] == pytest.approx(expected.loc["dsc", "se"], nan_ok=True)
        assert row["tp"] == part["tp"].sum() and row["fn"] == part["fn"].sum()
    # pooled F1 over all four images from the summed counts: 2*6 / (12 + 3 + 2 + 3)
    assert wide.iloc[0]["f1_pooled"] == pytest.approx(12 / 20)
    assert set(long["group_by"]) == {"all", "domain", "site"}


def test_domain_rows_are_left_out_when_the_domain_is_unknown():
    scores = pd.DataFrame({"tp": [1, 0], "fp": [0, 1], "us": [0, 0], "fn": [0, 1],
                           "f1": [1.0, 0.0], "site": [None, None],
                           "domain": ["unknown", "unknown"]})
    _, wide = summarise_evaluation(scores)
    assert list(wide["group"]) == ["all"]

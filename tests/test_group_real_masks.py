"""Evaluation on real MS lesion masks (Lesjak et al. 2018) with perturbed predictions.

The predictions are the consensus masks changed in known ways. Where the answer follows from
the change alone (lesions deleted, blobs added far away), the test says it exactly; where it
does not (dilation, erosion, a shift, a cut), the group level's result is compared with a slow,
literal implementation of the definitions in ``method.md`` written here, one lesion at a time.
Needs ../shared/data (skipped otherwise).
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cl_bidsapp.group.evaluate import evaluate_image

pytestmark = pytest.mark.shared_data

PATIENTS = ("patient01", "patient05")
STRUCTURE = np.ones((3, 3, 3), bool)          # 26-connectivity


@pytest.fixture(scope="module", params=PATIENTS)
def real_mask(request, shared_data):
    path = shared_data / "real-ms" / "masks-1mm" / request.param / "consensus_gt.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    img = nib.load(str(path))
    mask = np.asarray(img.dataobj) > 0
    # keep the lesions and a margin: same shapes, less to read and write
    box = tuple(slice(max(0, int(a.min()) - 8), int(a.max()) + 9) for a in np.nonzero(mask))
    return mask[box].copy(), img.affine


def literal_evaluation(pred: np.ndarray, ref: np.ndarray):
    """TP/FP/US/FN counts and error map straight from the definitions, one lesion at a time."""
    p_lab, n_p = ndimage.label(pred, STRUCTURE)
    r_lab, n_r = ndimage.label(ref, STRUCTURE)
    p_box, r_box = ndimage.find_objects(p_lab), ndimage.find_objects(r_lab)
    counts = {"tp": 0, "fp": 0, "us": 0, "fn": 0}
    error_map = np.zeros(pred.shape, np.uint8)
    for p in range(1, n_p + 1):
        touched = [int(r) for r in np.unique(r_lab[p_box[p - 1]][p_lab[p_box[p - 1]] == p])
                   if r > 0]
        # the box around p and every reference lesion it touches holds all voxels involved
        box = tuple(slice(min(s.start for s in parts), max(s.stop for s in parts))
                    for parts in zip(p_box[p - 1], *[r_box[r - 1] for r in touched]))
        lesion = p_lab[box] == p
        if not touched:
            counts["fp"] += 1
            error_map[box][lesion] = 2
            continue
        k = np.isin(r_lab[box], touched)
        others = k & pred[box] & ~lesion
        iou = (lesion & k).sum() / (lesion | (k & ~others)).sum()
        kind = "tp" if iou >= 0.25 else "us"
        counts[kind] += 1
        error_map[box][lesion] = 1 if kind == "tp" else 3
    for r in range(1, n_r + 1):
        inside = r_lab[r_box[r - 1]] == r
        if not pred[r_box[r - 1]][inside].any():
            counts["fn"] += 1
            error_map[r_box[r - 1]][inside] = 4
    return counts, n_p, n_r, error_map


def _run(tmp_path: Path, pred, ref, affine, name: str):
    paths = {}
    for key, data in (("prediction", pred), ("reference", ref)):
        paths[key] = str(tmp_path / f"{name}_{key}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), paths[key])
    error_path = tmp_path / f"{name}_label-CL_desc-errors_dseg.nii.gz"
    result = evaluate_image({"bids_name": name, **paths, "error_map": str(error_path),
                             "sidecar": {}})
    assert result["problem"] is None
    return result, np.asarray(nib.load(str(error_path)).dataobj)


def _lesions(mask):
    labels, n = ndimage.label(mask, STRUCTURE)
    return labels, n


def test_a_real_mask_against_itself_is_perfect(tmp_path, real_mask):
    ref, affine = real_mask
    _, n = _lesions(ref)
    result, error_map = _run(tmp_path, ref, ref, affine, "same")
    assert (result["tp"], result["fp"], result["us"], result["fn"]) == (n, 0, 0, 0)
    assert result["f1"] == 1.0 and result["dsc"] == 1.0 and result["ndsc"] == 1.0
    assert (error_map[ref] == 1).all() and not error_map[~ref].any()


def test_deleting_real_lesions_gives_exactly_that_many_false_negatives(tmp_path, real_mask):
    ref, affine = real_mask
    labels, n = _lesions(ref)
    rng = np.random.default_rng(3)
    deleted = rng.choice(np.arange(1, n + 1), size=max(1, n // 3), replace=False)
    pred = ref & ~np.isin(labels, deleted)
    result, error_map = _run(tmp_path, pred, ref, affine, "deleted")
    assert result["fn"] == len(deleted)
    assert result["tp"] == n - len(deleted) and result["fp"] == result["us"] == 0
    assert result["recall"] == pytest.approx((n - len(deleted)) / n)
    assert (error_map[np.isin(labels, deleted)] == 4).all()


def test_blobs_far_from_real_lesions_are_false_positives(tmp_path, real_mask):
    ref, affine = real_mask
    _, n = _lesions(ref)
    far = ~ndimage.binary_dilation(ref, STRUCTURE, iterations=3)
    far = ndimage.binary_erosion(far, STRUCTURE, iterations=2)   # room for a 3x3x3 blob
    rng = np.random.default_rng(5)
    pred = ref.copy()
    taken = ndimage.binary_dilation(ref, STRUCTURE)   # a blob here would touch a lesion
    added = 0
    for i, j, k in rng.permutation(np.argwhere(far))[:200]:
        blob = (slice(i - 1, i + 2), slice(j - 1, j + 2), slice(k - 1, k + 2))
        if taken[blob].any():
            continue
        pred[blob] = True
        taken[i - 2:i + 3, j - 2:j + 3, k - 2:k + 3] = True   # keep blobs apart too
        added += 1
        if added == 4:
            break
    result, _ = _run(tmp_path, pred, ref, affine, "blobs")
    assert (result["tp"], result["fp"], result["fn"]) == (n, added, 0)
    assert result["precision"] == pytest.approx(n / (n + added))


@pytest.mark.parametrize("change", ["dilate", "erode", "shift", "cut"])
def test_perturbed_real_predictions_match_the_literal_definitions(tmp_path, real_mask, change):
    ref, affine = real_mask
    if change == "dilate":
        pred = ndimage.binary_dilation(ref, STRUCTURE)
    elif change == "erode":
        pred = ndimage.binary_erosion(ref, np.ones((1, 1, 3), bool))
    elif change == "shift":
        pred = np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    else:   # cut every lesion with a plane: many references split into two predictions
        pred = ref.copy()
        labels, n = _lesions(ref)
        for sl in ndimage.find_objects(labels):
            middle = (sl[2].start + sl[2].stop) // 2
            pred[sl[0], sl[1], middle] = False
    expected, n_p, n_r, expected_map = literal_evaluation(pred, ref)
    result, error_map = _run(tmp_path, pred, ref, affine, change)
    assert {k: result[k] for k in expected} == expected
    assert (result["n_predicted"], result["n_reference"]) == (n_p, n_r)
    if change == "cut":   # the case really exercises split lesions
        assert n_p > n_r
    assert np.array_equal(error_map, expected_map)

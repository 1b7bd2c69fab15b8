"""The seed's evaluation (cl_bidsapp.core.metrics / calibration), cases worked out by hand.

Masks are small boolean volumes; lesions are mostly rows of voxels along the last axis so the
arithmetic stays readable. Notation as in method.md: for a predicted lesion p, K' is the union of
the reference lesions it touches, and IoU_adj = |p ∩ K'| / (|p| + Σ_r (|r| − |P ∩ r|)), which is
|p ∩ K'| / |p ∪ (K' \\ O)| written with counts.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cl_bidsapp.core.metrics import (
    ERROR_FN,
    ERROR_FP,
    ERROR_TP,
    ERROR_US,
    bootstrap_standard_error,
    brier_score,
    dice,
    expected_calibration_error,
    lesion_detection,
    normalised_dice,
    scan_scores,
    summarise_scans,
)


def empty(shape=(6, 6, 16)):
    return np.zeros(shape, dtype=bool)


def row(mask, z0, z1, x=2, y=2):
    """Set voxels (x, y, z0..z1-1) and return the mask."""
    mask[x, y, z0:z1] = True
    return mask


def counts(result):
    return result.tp, result.fp, result.us, result.fn


# --- lesion-wise detection -------------------------------------------------------------------

def test_perfect_match():
    ref = row(row(empty(), 0, 4), 8, 14, x=4)
    result = lesion_detection(ref.copy(), ref)
    assert counts(result) == (2, 0, 0, 0)
    assert (result.f1, result.recall, result.precision, result.us_rate) == (1.0, 1.0, 1.0, 0.0)
    assert (result.error_map == ERROR_TP).sum() == ref.sum()
    assert result.records.iou_adj.tolist() == [1.0, 1.0]


def test_split_lesion_pieces_are_not_penalised_for_each_other():
    # Reference: 12 voxels z = 0..11. Prediction: z = 0..1 (2 voxels) and z = 3..11 (9 voxels),
    # z = 2 uncovered. So |P ∩ r| = 11 and |r| − |P ∩ r| = 1.
    # Big piece: 9 / (9 + 1) = 0.9 -> TP. Small piece: 2 / (2 + 1) = 0.667 -> TP, although its
    # plain IoU 2/12 = 0.17 would make it under-segmented.
    ref = row(empty(), 0, 12)
    pred = row(row(empty(), 0, 2), 3, 12)
    result = lesion_detection(pred, ref)
    assert counts(result) == (2, 0, 0, 0)
    assert result.records.iou_adj.tolist() == pytest.approx([0.9, 2 / 3])
    assert result.records.reference.tolist() == [(1,), (1,)]
    # F1 = 2*2 / (2*2 + 0) = 1; recall = 2 / (2 + 0) = 1.
    assert result.f1 == 1.0 and result.recall == 1.0


def test_merged_prediction_over_two_reference_lesions():
    # References z = 0..4 and z = 6..10 (5 voxels each, separate: z = 5 is empty). One predicted
    # row z = 0..10 (11 voxels) covers both and the gap: IoU_adj = 10 / (11 + 0 + 0) = 0.909.
    # One TP; neither reference is touched by nothing, so FN = 0 and F1 = 2 / 2 = 1.
    ref = row(row(empty(), 0, 5), 6, 11)
    pred = row(empty(), 0, 11)
    result = lesion_detection(pred, ref)
    assert (result.n_predicted, result.n_reference) == (1, 2)
    assert counts(result) == (1, 0, 0, 0)
    assert result.records.iou_adj[0] == pytest.approx(10 / 11)
    assert result.records.reference[0] == (1, 2)
    assert result.f1 == 1.0


def test_merged_prediction_that_covers_one_reference_poorly():
    # References: A z = 0..4 (5 voxels) and B z = 6..14 (9 voxels). Prediction z = 0..6 (7
    # voxels) covers A, the gap and one voxel of B: |p ∩ K'| = 6, |p| = 7, |A| − 5 = 0,
    # |B| − 1 = 8, so IoU_adj = 6 / (7 + 8) = 0.4 -> still a TP, and B is not an FN.
    ref = row(row(empty(), 0, 5), 6, 15)
    pred = row(empty(), 0, 7)
    result = lesion_detection(pred, ref)
    assert result.records.iou_adj[0] == pytest.approx(0.4)
    assert counts(result) == (1, 0, 0, 0)


def test_lesions_touching_at_a_corner_are_one_lesion_on_both_sides():
    # Two cubes that share only a corner are one 26-connected lesion of 16 voxels.
    ref = empty((8, 8, 8))
    ref[1:3, 1:3, 1:3] = True
    ref[3:5, 3:5, 3:5] = True
    result = lesion_detection(ref.copy(), ref)
    assert (result.n_predicted, result.n_reference) == (1, 1)
    assert counts(result) == (1, 0, 0, 0)
    # A prediction of just one of the cubes: 8 / (8 + 16 - 8) = 0.5 -> TP, nothing missed.
    one_cube = empty((8, 8, 8))
    one_cube[1:3, 1:3, 1:3] = True
    result = lesion_detection(one_cube, ref)
    assert counts(result) == (1, 0, 0, 0)
    assert result.records.iou_adj[0] == pytest.approx(0.5)


def test_barely_overlapping_prediction_is_under_segmented():
    # 3x3x3 reference cube; prediction the same cube moved by 2 voxels: overlap 1x3x3 = 9.
    # IoU_adj = 9 / (27 + (27 − 9)) = 0.2 < 0.25 -> US. TP = FP = FN = 0, US = 1:
    # F1 = 0 / (0 + 1) = 0; precision = 0 / 1 = 0; US-rate = 1; recall = 0 / 0 -> 1 by the
    # method's convention (the reference lesion was touched, so it is not a false negative).
    ref = empty((10, 6, 6))
    ref[2:5, 1:4, 1:4] = True
    pred = np.roll(ref, 2, axis=0)
    result = lesion_detection(pred, ref)
    assert counts(result) == (0, 0, 1, 0)
    assert result.records.iou_adj[0] == pytest.approx(0.2)
    assert (result.f1, result.precision, result.us_rate, result.recall) == (0.0, 0.0, 1.0, 1.0)
    assert set(np.unique(result.error_map[pred])) == {ERROR_US}
    assert not result.error_map[ref & ~pred].any()     # a touched reference is not coloured FN
    # Moved by 1 voxel instead: overlap 18, IoU_adj = 18 / (27 + 9) = 0.5 -> TP.
    assert counts(lesion_detection(np.roll(ref, 1, axis=0), ref)) == (1, 0, 0, 0)


def test_iou_of_exactly_a_quarter_is_a_true_positive():
    # One predicted voxel inside a 4-voxel reference: 1 / (1 + 4 − 1) = 0.25 -> TP.
    # Inside a 5-voxel reference: 1 / (1 + 5 − 1) = 0.2 -> US.
    assert counts(lesion_detection(row(empty(), 3, 4), row(empty(), 0, 4))) == (1, 0, 0, 0)
    assert counts(lesion_detection(row(empty(), 3, 4), row(empty(), 0, 5))) == (0, 0, 1, 0)


def test_pure_false_positive():
    # Reference empty, one predicted lesion: F1 = 0 / 1; recall = 0 / 0 -> 1; precision 0 / 1.
    pred = row(empty(), 0, 4)
    result = lesion_detection(pred, empty())
    assert counts(result) == (0, 1, 0, 0)
    assert (result.f1, result.recall, result.precision, result.us_rate) == (0.0, 1.0, 0.0, 0.0)
    assert (result.error_map == ERROR_FP).sum() == 4
    assert dice(pred, empty()) == 0.0 and normalised_dice(pred, empty()) == 0.0


def test_missed_lesion_beside_a_found_one():
    # Two reference lesions; the prediction finds only the first exactly.
    # TP = 1, FN = 1: F1 = 2 / (2 + 1) = 0.667, recall = 1 / 2, precision = 1 / 1.
    ref = row(row(empty(), 0, 4), 8, 14, x=4)
    pred = row(empty(), 8, 14, x=4)
    result = lesion_detection(pred, ref)
    assert counts(result) == (1, 0, 0, 1)
    assert result.f1 == pytest.approx(2 / 3)
    assert (result.recall, result.precision) == (0.5, 1.0)
    missed = ref & ~pred
    assert (result.error_map[missed] == ERROR_FN).all()
    fn_row = result.records[result.records.kind == "FN"].iloc[0]
    assert (fn_row.predicted, fn_row.reference_voxels) == (0, 4)


def test_empty_prediction_with_lesions_in_the_reference():
    # FN = 2, nothing predicted: F1 = 0 / 2 = 0, recall = 0 / 2 = 0, precision 0 (FN > 0).
    ref = row(row(empty(), 0, 4), 8, 14, x=4)
    result = lesion_detection(empty(), ref)
    assert counts(result) == (0, 0, 0, 2)
    assert (result.f1, result.recall, result.precision, result.us_rate) == (0.0, 0.0, 0.0, 0.0)
    assert ((result.error_map == ERROR_FN) == ref).all()


def test_both_empty():
    result = lesion_detection(empty(), empty())
    assert counts(result) == (0, 0, 0, 0)
    assert (result.f1, result.recall, result.precision, result.us_rate) == (1.0, 1.0, 1.0, 0.0)
    assert result.records.empty and not result.error_map.any()
    assert result.error_map.dtype == np.uint8 and result.error_map.shape == empty().shape
    assert dice(empty(), empty()) == 1.0 and normalised_dice(empty(), empty()) == 1.0


def test_one_scan_with_every_kind_of_error():
    # a: exact TP (4 voxels); b: US (1 voxel inside a 5-voxel lesion); c: FP; d: missed.
    ref, pred = empty((10, 10, 10)), empty((10, 10, 10))
    ref[1, 1, 0:4] = pred[1, 1, 0:4] = True          # a
    ref[4, 4, 0:5] = True
    pred[4, 4, 2] = True                             # b
    pred[7, 7, 5:8] = True                           # c
    ref[1, 8, 5:7] = True                            # d
    result = lesion_detection(pred, ref)
    assert counts(result) == (1, 1, 1, 1)
    # F1 = 2 / (2 + 1 + 1 + 1) = 0.4; precision 1/3; recall 1/2; US-rate 1/3.
    assert result.f1 == pytest.approx(0.4)
    assert (result.precision, result.recall, result.us_rate) == pytest.approx((1 / 3, 0.5, 1 / 3))
    em = result.error_map
    assert (em[1, 1, 0], em[4, 4, 2], em[7, 7, 6], em[1, 8, 5]) == (
        ERROR_TP, ERROR_US, ERROR_FP, ERROR_FN)
    assert em[4, 4, 0] == 0                          # uncovered part of a touched reference
    assert sorted(result.records.kind) == ["FN", "FP", "TP", "US"]
    assert result.scores()["n_predicted"] == 3


def test_instance_maps_and_float_masks_are_read_as_masks():
    ref = row(empty(), 0, 4).astype(np.int16) * 7
    pred = row(empty(), 0, 4).astype(np.float32)
    pred[0, 0, 0] = np.nan                           # NaN is not lesion
    assert counts(lesion_detection(pred, ref)) == (1, 0, 0, 0)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shape"):
        lesion_detection(empty((4, 4, 4)), empty((4, 4, 5)))


# --- voxel-wise overlap ----------------------------------------------------------------------

def test_dice_and_normalised_dice_worked_by_hand():
    # N = 1000 voxels, |Y| = 10; prediction has 5 of them plus 5 false voxels.
    ref, pred = np.zeros(1000, bool), np.zeros(1000, bool)
    ref[:10] = True
    pred[5:15] = True
    assert dice(pred, ref) == pytest.approx(2 * 5 / (10 + 10))
    k = (1 - 0.001) * 10 / (0.001 * (1000 - 10))     # about 10: a 1 % load is 10 x r
    assert normalised_dice(pred, ref) == pytest.approx(2 * 5 / (k * 5 + 2 * 5 + 5))


def test_normalised_dice_equals_dice_at_the_reference_lesion_load():
    # |Y| / N = r makes k = 1.
    ref, pred = np.zeros(1000, bool), np.zeros(1000, bool)
    ref[0] = True
    pred[0:3] = True
    assert normalised_dice(pred, ref) == pytest.approx(dice(pred, ref))


def _scan(n_lesion, n_found, n_false, n_all=100_050):
    ref, pred = np.zeros(n_all, bool), np.zeros(n_all, bool)
    ref[:n_lesion] = True
    pred[:n_found] = True
    pred[n_all - n_false:] = True
    return pred, ref


def test_normalised_dice_does_not_depend_on_lesion_load():
    # Two scans found equally well: half of the lesion voxels (TPR 0.5) and 1 in 1000
    # background voxels wrongly (FPR 0.001). Scan A has 50 lesion voxels (100,000 background,
    # 100 FP), scan B 5,050 (95,000 background, 95 FP). Dice punishes the light scan A;
    # nDSC = 2 TPR / ((1 - r) FPR / r + 1 + TPR) is the same for both: 1 / (0.999 + 1.5).
    light, heavy = _scan(50, 25, 100), _scan(5050, 2525, 95)
    assert dice(*light) < 0.5 * dice(*heavy)
    assert normalised_dice(*light) == pytest.approx(1 / (0.999 + 1.5))
    assert normalised_dice(*heavy) == pytest.approx(1 / (0.999 + 1.5))


# --- calibration -----------------------------------------------------------------------------

def test_brier_and_ece_worked_by_hand():
    prob = np.array([0.1, 0.1, 0.9, 0.9])
    ref = np.array([0, 0, 1, 0])
    # Brier: (0.01 + 0.01 + 0.01 + 0.81) / 4 = 0.21.
    assert brier_score(prob, ref) == pytest.approx(0.21)
    # ECE: bin of 0.1 holds half the voxels with lesion fraction 0 -> |0.1 − 0| = 0.1;
    # bin of 0.9 holds half with fraction 0.5 -> 0.4. 0.5 * 0.1 + 0.5 * 0.4 = 0.25.
    assert expected_calibration_error(prob, ref) == pytest.approx(0.25)


def test_a_calibrated_map_has_zero_ece_and_probability_one_is_binned():
    prob = np.array([0.5, 0.5, 1.0, 0.0])
    ref = np.array([1, 0, 1, 0])
    assert expected_calibration_error(prob, ref) == pytest.approx(0.0)
    assert brier_score(prob, ref) == pytest.approx(0.5 / 4)


def test_calibration_is_measured_inside_the_brain_mask():
    prob = np.array([0.1, 0.9, 0.0, 0.0, 0.0, 0.0])
    ref = np.array([0, 0, 0, 0, 0, 0])
    brain = np.array([1, 1, 0, 0, 0, 0], bool)
    # Inside the brain: Brier (0.01 + 0.81) / 2 = 0.41; over all voxels the confident empty
    # background dilutes it to 0.82 / 6.
    assert brier_score(prob, ref, brain_mask=brain) == pytest.approx(0.41)
    assert brier_score(prob, ref) == pytest.approx(0.82 / 6)
    assert expected_calibration_error(prob, ref, brain_mask=brain) == pytest.approx(0.5)


def test_scan_scores_collects_everything_and_leaves_calibration_empty_without_probability():
    ref = row(empty(), 0, 4)
    scores = scan_scores(ref, ref)
    assert {"f1", "recall", "precision", "us_rate", "dsc", "ndsc", "tp", "fn"} <= set(scores)
    assert np.isnan(scores["brier"]) and np.isnan(scores["ece"])
    with_prob = scan_scores(ref, ref, probability=ref * 0.75, brain_mask=np.ones_like(ref))
    assert with_prob["brier"] == pytest.approx(4 * 0.25 ** 2 / ref.size)


# --- over scans ------------------------------------------------------------------------------

def test_bootstrap_standard_error_behaves_like_a_standard_error():
    values = np.random.default_rng(1).normal(0, 1, 200)
    se = bootstrap_standard_error(values)
    # Means of 100 draws from a sample with sd ~1: standard error ~ 1 / sqrt(100) = 0.1.
    assert 0.08 < se < 0.12
    assert bootstrap_standard_error(values) == se                  # seeded: reruns agree
    assert bootstrap_standard_error(values, seed=5) != se
    assert bootstrap_standard_error([0.7] * 10) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(bootstrap_standard_error([0.7]))
    assert np.isnan(bootstrap_standard_error([0.7, np.nan]))      # NaN left out


def test_group_summary_means_and_pooled_counts():
    scans = pd.DataFrame([
        {"tp": 3, "fp": 1, "us": 0, "fn": 0, "f1": 6 / 7, "dsc": 0.8, "brier": 0.01},
        {"tp": 0, "fp": 0, "us": 1, "fn": 2, "f1": 0.0, "dsc": 0.1, "brier": np.nan},
    ])
    summary = summarise_scans(scans).set_index("metric")
    assert summary.loc["f1", "mean"] == pytest.approx(3 / 7)
    # Pooled: TP 3, FP 1, US 1, FN 2 -> F1 = 6 / (6 + 1 + 1 + 2) = 0.6.
    assert summary.loc["f1", "pooled"] == pytest.approx(0.6)
    assert summary.loc["fn", "pooled"] == 2 and summary.loc["tp", "mean"] == 1.5
    assert summary.loc["brier", "n_scans"] == 1 and np.isnan(summary.loc["brier", "se"])
    assert np.isnan(summary.loc["dsc", "pooled"])
    assert summary.loc["dsc", "se"] > 0


# --- real lesion shapes, perturbed -----------------------------------------------------------

@pytest.fixture(scope="module")
def real_masks(shared_data):
    import nibabel as nib

    folder = shared_data / "real-ms" / "masks-1mm"
    paths = sorted(folder.glob("patient*/consensus_gt.nii.gz"))
    if not paths:
        pytest.skip(f"no consensus_gt.nii.gz under {folder}")
    return {p.parent.name: np.asarray(nib.load(p).dataobj) > 0 for p in paths}


PERTURBED = ["patient02", "patient08", "patient15", "patient29"]
CUBE = np.ones((3, 3, 3), bool)


@pytest.mark.shared_data
def test_real_masks_match_themselves(real_masks):
    for name, mask in real_masks.items():
        result = lesion_detection(mask, mask)
        assert counts(result) == (result.n_reference, 0, 0, 0), name
        assert result.f1 == 1.0 and dice(mask, mask) == 1.0 and normalised_dice(mask, mask) == 1.0
        assert ((result.error_map == ERROR_TP) == mask).all(), name


@pytest.mark.shared_data
def test_deleting_k_real_lesions_gives_exactly_k_false_negatives(real_masks):
    rng = np.random.default_rng(0)
    for name, mask in real_masks.items():
        labels, n = ndimage.label(mask, CUBE)
        k = min(3, n)
        gone = rng.choice(np.arange(1, n + 1), size=k, replace=False)
        deleted = np.zeros(n + 1, bool)
        deleted[gone] = True
        deleted = deleted[labels]
        result = lesion_detection(mask & ~deleted, mask)
        assert counts(result) == (n - k, 0, 0, k), name
        assert result.recall == pytest.approx((n - k) / n)
        assert ((result.error_map == ERROR_FN) == deleted).all(), name


@pytest.mark.shared_data
@pytest.mark.parametrize("name", PERTURBED)
def test_dilated_real_predictions_miss_nothing_but_lose_precision(real_masks, name):
    mask = real_masks[name]
    result = lesion_detection(ndimage.binary_dilation(mask, CUBE), mask)
    # Growing every lesion keeps every reference lesion touched and adds nothing elsewhere,
    # but merges neighbours and makes small lesions far too big (under-segmented).
    assert result.fn == 0 and result.fp == 0 and result.recall == 1.0
    assert result.n_predicted <= result.n_reference
    assert result.us > 0 and result.precision < 1.0 and result.f1 < 1.0
    assert dice(ndimage.binary_dilation(mask, CUBE), mask) < 1.0


@pytest.mark.shared_data
@pytest.mark.parametrize("name", PERTURBED)
def test_eroded_real_predictions_miss_exactly_the_lesions_that_vanish(real_masks, name):
    mask = real_masks[name]
    eroded = ndimage.binary_erosion(mask, CUBE)
    labels, n = ndimage.label(mask, CUBE)
    survivors = ndimage.maximum(eroded, labels, index=np.arange(1, n + 1))
    result = lesion_detection(eroded, mask)
    assert result.fp == 0
    assert result.fn == int((survivors == 0).sum()) > 0
    assert result.recall < 1.0 and dice(eroded, mask) < 1.0


@pytest.mark.shared_data
@pytest.mark.parametrize("name", PERTURBED)
def test_shifting_real_predictions_lowers_the_scores_step_by_step(real_masks, name):
    mask = real_masks[name]
    f1, dsc = [], []
    for shift in range(4):
        moved = np.roll(mask, shift, axis=0)
        f1.append(lesion_detection(moved, mask).f1)
        dsc.append(dice(moved, mask))
    assert f1[0] == 1.0 and f1[0] > f1[1] >= f1[2] >= f1[3]
    assert dsc[0] > dsc[1] > dsc[2] > dsc[3]


@pytest.mark.shared_data
@pytest.mark.parametrize("name", PERTURBED)
def test_blobs_added_away_from_real_lesions_are_counted_as_false_positives(real_masks, name):
    mask = real_masks[name]
    n = ndimage.label(mask, CUBE)[1]
    pred = mask.copy()
    near_lesion = ndimage.binary_dilation(mask, CUBE, iterations=3)
    added = 0
    for corner in [(5, 5, 5), (5, 200, 5), (120, 5, 200), (120, 200, 200)]:
        box = tuple(slice(c, c + 3) for c in corner)
        if not near_lesion[box].any():
            pred[box] = True
            added += 1
    assert added > 0
    result = lesion_detection(pred, mask)
    assert counts(result) == (n, added, 0, 0)
    assert result.precision == pytest.approx(n / (n + added))

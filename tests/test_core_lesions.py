"""Probability map -> lesions -> per-lesion table (cl_bidsapp.core.lesions / components)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_spec import spec_path
from cl_bidsapp.core.lesions import (
    LESION_TABLE_COLUMNS,
    check_lesion_table,
    lesion_instances,
    lesion_table,
    lesion_table_sidecar,
    lesion_uncertainty,
    min_size_in_voxels,
)
from cl_bidsapp.errors import InputDataError


def _blank(shape=(12, 12, 12)):
    return np.zeros(shape, dtype=np.float32)


# --- thresholding, connectivity, minimum size -------------------------------------------------

def test_voxels_touching_only_at_a_corner_form_one_lesion():
    prob = _blank()
    prob[2:4, 2:4, 2:4] = 0.9          # 8 voxels
    prob[4, 4, 4] = 0.9                 # touches the cube only at its corner voxel (3, 3, 3)
    instances = lesion_instances(prob)
    assert instances.max() == 1
    assert (instances == 1).sum() == 9


def test_voxels_touching_only_along_an_edge_form_one_lesion():
    prob = _blank()
    prob[2, 2, 2:5] = 0.9
    prob[3, 3, 2:5] = 0.9               # shares edges, not faces, with the first row
    assert lesion_instances(prob).max() == 1


def test_threshold_is_inclusive_and_nan_is_background():
    prob = _blank()
    prob[1, 1, 1:4] = 0.5               # exactly the threshold: kept
    prob[6, 6, 6:9] = 0.4999            # just below: not a lesion
    prob[9, 9, 9:11] = np.nan
    instances = lesion_instances(prob, threshold=0.5)
    assert instances.max() == 1
    assert set(zip(*np.nonzero(instances))) == {(1, 1, 1), (1, 1, 2), (1, 1, 3)}


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5, float("nan")])
def test_thresholds_outside_0_to_1_are_refused(threshold):
    with pytest.raises(ValueError, match="threshold"):
        lesion_instances(_blank(), threshold=threshold)


def test_default_minimum_size_drops_two_voxel_components_and_keeps_three():
    prob = _blank()
    prob[1, 1, 1:3] = 1.0               # 2 voxels: dropped (the method removes <= 2)
    prob[6, 6, 6:9] = 1.0               # 3 voxels: kept
    instances = lesion_instances(prob)
    assert instances.max() == 1 and (instances == 1).sum() == 3
    assert lesion_instances(prob, min_size=1).max() == 2
    assert lesion_instances(prob, min_size=4).max() == 0


def test_lesions_are_numbered_largest_first_then_by_position():
    prob = _blank((10, 10, 10))
    prob[8, 8, 0:3] = 1                 # 3 voxels, late in array order
    prob[0, 0, 5:8] = 1                 # 3 voxels, early in array order
    prob[4:6, 4:6, 4:6] = 1             # 8 voxels
    instances = lesion_instances(prob)
    assert instances.dtype == np.int32
    assert instances[4, 4, 4] == 1      # largest
    assert instances[0, 0, 5] == 2      # equal size: first voxel comes first
    assert instances[8, 8, 0] == 3
    # The order is a property of the lesions, not of the labelling: mirroring the image keeps
    # the size order and only swaps the tie.
    flipped = lesion_instances(prob[::-1, ::-1, ::-1])
    assert flipped[::-1, ::-1, ::-1][4, 4, 4] == 1
    assert flipped[::-1, ::-1, ::-1][8, 8, 0] == 2


@pytest.mark.parametrize("mm3, voxel, expected", [
    (3, (1, 1, 1), 3),
    (3, (0.7, 0.7, 0.7), 9),            # 3 / 0.343 = 8.75 -> 9
    (10, (2, 2, 2), 2),                 # 10 / 8 = 1.25 -> 2
    (0, (1, 1, 1), 1),
    (4.5, (1, 1.5, 1), 3),              # exactly 3 voxels despite float noise
])
def test_minimum_size_in_mm3_converts_to_voxels(mm3, voxel, expected):
    assert min_size_in_voxels(mm3, voxel) == expected


def test_minimum_size_refuses_nonsense_voxels():
    with pytest.raises(ValueError):
        min_size_in_voxels(3, (0, 1, 1))
    with pytest.raises(ValueError):
        min_size_in_voxels(-1, (1, 1, 1))


# --- the per-lesion table --------------------------------------------------------------------

def test_table_measures_lesions_in_world_millimetres():
    # 2 x 2 x 3 mm voxels, x axis flipped, shifted: world = (-2 i + 100, 2 j - 50, 3 k + 10).
    affine = np.array([[-2.0, 0, 0, 100], [0, 2, 0, -50], [0, 0, 3, 10], [0, 0, 0, 1]])
    prob = _blank((10, 10, 10))
    prob[1:3, 4, 6] = [0.6, 0.8]        # 2 voxels: centroid (1.5, 4, 6)
    prob[5, 5, 5:8] = 0.9               # 3 voxels: centroid (5, 5, 6)
    instances = lesion_instances(prob, min_size=1)
    table = lesion_table(instances, affine, probability_map=prob)
    assert list(table.columns) == list(LESION_TABLE_COLUMNS)
    assert table["name"].tolist() == ["CL-001", "CL-002"]
    first, second = table.iloc[0], table.iloc[1]
    assert first.n_voxels == 3 and first.volume_mm3 == pytest.approx(36.0)   # 3 x 12 mm3
    assert (first.centroid_i, first.centroid_j, first.centroid_k) == (5, 5, 6)
    assert (first.centroid_x, first.centroid_y, first.centroid_z) == pytest.approx((90, -40, 28))
    assert second.n_voxels == 2 and second.volume_mm3 == pytest.approx(24.0)
    assert (second.centroid_x, second.centroid_y, second.centroid_z) == pytest.approx(
        (97, -42, 28))
    assert second.prob_mean == pytest.approx(0.7) and second.prob_max == pytest.approx(0.8)
    assert np.isnan(table["uncertainty_ddu"]).all()     # no fold maps given


def test_table_of_a_scan_without_lesions_is_empty_with_all_columns():
    table = lesion_table(np.zeros((4, 4, 4), np.int32), np.eye(4), probability_map=_blank((4, 4, 4)))
    assert len(table) == 0 and list(table.columns) == list(LESION_TABLE_COLUMNS)


def test_table_without_probability_map_leaves_probabilities_empty():
    instances = np.zeros((4, 4, 4), np.int32)
    instances[1, 1, 1:4] = 1
    table = lesion_table(instances, np.eye(4))
    assert table.n_voxels.tolist() == [3] and table.prob_mean.isna().all()


def test_table_refuses_an_instance_map_with_gaps_in_its_numbers():
    instances = np.zeros((4, 4, 4), np.int32)
    instances[0, 0, 0] = 1
    instances[3, 3, 3] = 3
    with pytest.raises(ValueError, match="missing"):
        lesion_table(instances, np.eye(4))


# --- fold disagreement (DDU) -----------------------------------------------------------------

def _two_lesion_ensemble():
    prob = _blank((8, 8, 16))
    prob[1:3, 1:3, 1:5] = 0.9           # lesion A: 16 voxels -> label 1
    prob[5:7, 5:7, 10:12] = 0.9         # lesion B: 8 voxels -> label 2
    return prob, lesion_instances(prob)


def test_folds_that_all_agree_give_zero_disagreement():
    prob, instances = _two_lesion_ensemble()
    table = lesion_table(instances, np.eye(4), prob, fold_probability_maps=[prob] * 5)
    assert table["uncertainty_ddu"].tolist() == [0.0, 0.0]


def test_disagreement_follows_the_definition_worked_by_hand():
    prob, instances = _two_lesion_ensemble()
    fold_1 = prob.copy()                # sees A exactly, misses B        -> IoU A 1,    B 0
    fold_1[5:7, 5:7, 10:12] = 0.2
    fold_2 = prob.copy()                # sees half of A (8 of 16 voxels) -> IoU A 0.5
    fold_2[1:3, 1:3, 3:5] = 0.0         # and B grown by 8 voxels         -> IoU B 8/16
    fold_2[5:7, 5:7, 12:14] = 0.9
    # DDU(A) = 1 - (1 + 0.5) / 2 = 0.25; DDU(B) = 1 - (0 + 0.5) / 2 = 0.75
    ddu = lesion_uncertainty(instances, [fold_1, fold_2])
    assert ddu == pytest.approx([0.25, 0.75])


def test_a_lesion_no_fold_finds_has_full_disagreement_and_best_match_counts():
    prob, instances = _two_lesion_ensemble()
    none = _blank(prob.shape)
    split = prob.copy()                 # A found as two pieces of 8 voxels: best IoU 0.5
    split[1:3, 1:3, 1:5] = 0.0
    split[1:3, 1:3, 1:3] = 0.9
    split[1:3, 1:3, 4:6] = 0.9          # 4 voxels inside A + 4 outside: IoU 4/20
    ddu = lesion_uncertainty(instances, [none, split])
    # A: 1 - (0 + max(8/16, 4/20)) / 2 = 0.75; B: 1 - (0 + 1) / 2 = 0.5
    assert ddu == pytest.approx([0.75, 0.5])
    assert lesion_uncertainty(instances, [none, none]) == pytest.approx([1.0, 1.0])


def test_fold_maps_are_cleaned_like_the_ensemble_before_comparison():
    prob, instances = _two_lesion_ensemble()
    speck = _blank(prob.shape)
    speck[5, 5, 10:12] = 0.9            # 2 voxels inside B: removed by the minimum size of 3
    assert lesion_uncertainty(instances, [speck, speck])[1] == pytest.approx(1.0)
    assert lesion_uncertainty(instances, [speck, speck], min_size=1)[1] == pytest.approx(0.75)


def test_disagreement_needs_two_folds():
    prob, instances = _two_lesion_ensemble()
    with pytest.raises(ValueError, match="two"):
        lesion_uncertainty(instances, [prob])
    one_fold = lesion_table(instances, np.eye(4), prob, fold_probability_maps=[prob])
    assert one_fold["uncertainty_ddu"].isna().all()


# --- checking a table against its map --------------------------------------------------------

def _round_trip(table, tmp_path):
    path = tmp_path / "sub-01_seg-CL_dseg.tsv"
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    return pd.read_csv(path, sep="\t", na_values="n/a"), path


def test_a_table_written_and_read_back_still_matches_its_map(tmp_path):
    prob, instances = _two_lesion_ensemble()
    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    table, path = _round_trip(lesion_table(instances, affine, prob), tmp_path)
    check_lesion_table(table, instances, affine=affine, source=path)


@pytest.mark.parametrize("edit, problem", [
    (lambda t: t.assign(n_voxels=[16, 9]), "lesion 2 has 9 voxels"),
    (lambda t: t.iloc[:1], "in the map but not in the table"),
    (lambda t: pd.concat([t, t.iloc[[1]].assign(index=7)]), "in the table but not in the map"),
    (lambda t: pd.concat([t, t.iloc[[0]]]), "listed more than once"),
    (lambda t: t.assign(index=["one", "two"]), "not whole numbers"),
    (lambda t: t.assign(n_voxels=["16", "lots"]), "not numbers"),
    (lambda t: t.drop(columns="n_voxels"), "'n_voxels' is missing"),
    (lambda t: t.assign(volume_mm3=[16.0, 1.0]), "volume"),
])
def test_hand_edited_tables_are_refused_with_the_reason(edit, problem, tmp_path):
    prob, instances = _two_lesion_ensemble()
    table = edit(lesion_table(instances, np.eye(4), prob))
    with pytest.raises(InputDataError, match=problem) as caught:
        check_lesion_table(table, instances, affine=np.eye(4), source=tmp_path / "t.tsv")
    assert caught.value.exit_code == 65
    assert "t.tsv" in str(caught.value)


def test_a_table_for_another_scan_is_refused():
    prob, instances = _two_lesion_ensemble()
    other = instances.copy()
    other[instances == 2] = 0
    with pytest.raises(InputDataError):
        check_lesion_table(lesion_table(instances, np.eye(4)), other)


# --- the column dictionary shipped in bids_spec ----------------------------------------------

def test_column_dictionary_documents_exactly_the_table_columns_in_order():
    sidecar = json.loads(spec_path("lesion_table.json").read_text())
    assert list(sidecar) == list(LESION_TABLE_COLUMNS)
    assert sidecar == lesion_table_sidecar()
    table = lesion_table(_two_lesion_ensemble()[1], np.eye(4))
    assert list(table.columns) == list(sidecar)
    for column, doc in sidecar.items():
        assert doc["LongName"] and doc["Description"], column
    assert sidecar["volume_mm3"]["Units"] == "mm^3"
    assert {sidecar[c]["Units"] for c in ("centroid_x", "centroid_y", "centroid_z")} == {"mm"}


# --- real lesion shapes ----------------------------------------------------------------------

REAL_PATIENTS = ["patient01", "patient06", "patient29"]   # many / very many / few lesions


@pytest.mark.shared_data
@pytest.mark.parametrize("patient", REAL_PATIENTS)
def test_real_lesion_masks_give_a_consistent_table(shared_data, patient, tmp_path):
    cc3d = pytest.importorskip("cc3d")   # an independent 26-connectivity implementation

    path = shared_data / "real-ms" / "masks-1mm" / patient / "consensus_gt.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    img = nib.load(path)
    mask = np.asarray(img.dataobj) > 0
    instances = lesion_instances(mask, min_size=1)
    _, expected = cc3d.connected_components(mask, connectivity=26, return_N=True)
    assert instances.max() == expected
    table, tsv = _round_trip(lesion_table(instances, img.affine, mask.astype(np.float32)),
                             tmp_path)
    check_lesion_table(table, instances, affine=img.affine, source=tsv)
    assert table.n_voxels.sum() == mask.sum()
    assert table.n_voxels.is_monotonic_decreasing
    assert (table.prob_mean == 1).all()
    # Dropping lesions below 3 voxels removes exactly the 1- and 2-voxel components.
    cleaned = lesion_instances(mask)
    assert cleaned.max() == (table.n_voxels >= 3).sum()

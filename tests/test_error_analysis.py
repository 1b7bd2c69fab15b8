"""Error analysis: lesion properties and strata on hand-built lesions, answers worked on paper.

Shapes are built voxel by voxel so that every expected value follows from the definitions in
:mod:`cl_bidsapp.core.lesion_properties` and :mod:`cl_bidsapp.core.lesion_strata` (worked out
in the comments). The last tests run the evaluation job on files, as the group level does.
"""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cl_bidsapp.core.lesion_properties import (TISSUE_CSF, TISSUE_GM, TISSUE_WM,
                                               lesion_properties, principal_lengths,
                                               surface_distance_map,
                                               tissue_labels)
from cl_bidsapp.core.lesion_strata import (COUNT_COLUMNS, bootstrap_pooled_se,
                                           stratified_detection)
from cl_bidsapp.group.evaluate import evaluate_image

CUBE_ROOT_PI = math.pi ** (1 / 3)


def _one(mask, affine=np.eye(4), **maps):
    labels = np.asarray(mask, dtype=np.int32)
    return lesion_properties(labels, affine, **maps).loc[1]


def test_a_bar_is_long_thin_and_not_spherical():
    mask = np.zeros((5, 5, 14), bool)
    mask[2, 2, 2:12] = True                       # 1 x 1 x 10 voxels of 1 mm
    p = _one(mask)
    # a solid 10 x 1 x 1 rod: variances 100/12, 1/12, 1/12 -> box sides 10, 1, 1
    assert (p.length_major_mm, p.length_middle_mm, p.length_minor_mm) == pytest.approx(
        (10, 1, 1))
    assert (p.elongation, p.flatness, p.roundness) == pytest.approx((10, 1, 0.1))
    # faces: 4 long sides of 10 + 2 ends = 42 mm²; V = 10 mm³
    assert p.surface_area_mm2 == 42
    assert p.sphericity == pytest.approx(CUBE_ROOT_PI * 60 ** (2 / 3) / 42)   # 0.534
    assert p.volume_mm3 == 10 and p.n_voxels == 10


def test_a_plate_is_flat_and_a_cube_is_round():
    plate = np.zeros((8, 8, 3), bool)
    plate[1:6, 1:6, 1] = True                     # 5 x 5 x 1
    p = _one(plate)
    assert (p.length_major_mm, p.length_middle_mm, p.length_minor_mm) == pytest.approx(
        (5, 5, 1))
    assert (p.elongation, p.flatness, p.roundness) == pytest.approx((1, 5, 0.2))
    cube = np.zeros((6, 6, 6), bool)
    cube[1:4, 1:4, 1:4] = True
    c = _one(cube)
    # any voxel cube: (6 V)^(2/3) / S = (6 * 27)^(2/3) / 54 times pi^(1/3) = (pi / 6)^(1/3)
    assert (c.elongation, c.roundness) == pytest.approx((1, 1))
    assert c.sphericity == pytest.approx((math.pi / 6) ** (1 / 3))


def test_anisotropic_voxels_are_measured_in_millimetres():
    block = np.zeros((4, 4, 4), bool)
    block[1:3, 1:3, 1:3] = True                   # 2 x 2 x 2 voxels of 1 x 1 x 3 mm
    p = _one(block, np.diag([1.0, 1.0, 3.0, 1.0]))
    assert p.volume_mm3 == pytest.approx(24)
    assert (p.length_major_mm, p.length_minor_mm, p.elongation) == pytest.approx((6, 2, 3))
    # faces across i and j: 2 x 4 faces of 1 x 3 mm each (24 + 24); across k: 8 faces of 1 mm²
    assert p.surface_area_mm2 == pytest.approx(56)
    assert p.sphericity == pytest.approx(CUBE_ROOT_PI * 144 ** (2 / 3) / 56)


def test_rotating_the_image_changes_no_shape_property_but_moves_the_centroid():
    mask = np.zeros((5, 5, 14), bool)
    mask[2, 2, 2:12] = True
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    rotation = np.array([[c, -s, 0, 5], [s, c, 0, -3], [0, 0, 1, 2], [0, 0, 0, 1.0]])
    straight, turned = _one(mask), _one(mask, rotation)
    for column in ("length_major_mm", "length_minor_mm", "elongation", "surface_area_mm2",
                   "sphericity", "volume_mm3"):
        assert turned[column] == pytest.approx(straight[column]), column
    # centroid voxel (2, 2, 6.5) -> (2c - 2s + 5, 2s + 2c - 3, 6.5 + 2)
    assert (turned.centroid_x, turned.centroid_y, turned.centroid_z) == pytest.approx(
        (2 * c - 2 * s + 5, 2 * s + 2 * c - 3, 8.5))
    assert principal_lengths(np.array([[0, 0, 0]]), rotation) == pytest.approx([1, 1, 1])


def test_cortical_involvement_follows_the_26_neighbour_rule():
    tissue = np.full((10, 10, 10), TISSUE_GM, np.uint8)
    tissue[:, :, 7:] = TISSUE_WM
    tissue[8:, 8:, :3] = TISSUE_CSF
    labels = np.zeros(tissue.shape, np.int32)
    labels[1, 1, 2:5] = 1          # GM; nearest WM at k = 7, two voxels beyond its neighbours
    labels[4, 4, 6] = 2            # GM; its corner neighbour (5, 5, 7) is WM
    labels[2, 6, 5:9] = 3          # 2 GM + 2 WM voxels: spans the boundary
    labels[6, 1, 8:10] = 4         # WM only
    labels[9, 9, 0:2] = 5          # CSF only
    table = lesion_properties(labels, np.eye(4), tissue=tissue)
    assert table["involvement"].tolist() == ["intracortical", "leukocortical",
                                             "leukocortical", "white matter", "other"]
    assert table.loc[3, ["n_voxels_gm", "n_voxels_wm"]].tolist() == [2, 2]
    # the corner contact alone decides lesion 2: with WM one slice further it is intracortical
    tissue[:, :, 7] = TISSUE_GM
    assert lesion_properties(labels, np.eye(4), tissue=tissue).loc[2, "involvement"] == (
        "intracortical")
    assert lesion_properties(labels, np.eye(4)).loc[1, "involvement"] is None


def test_tissue_labels_from_maps():
    gm = np.array([0.6, 0.3, 0.4, 0.2, 0.5])
    wm = np.array([0.3, 0.6, 0.4, 0.1, 0.0])
    csf = np.array([0.1, 0.1, 0.2, 0.1, 0.5])
    # rest = 1 - sum: 0, 0, 0, 0.6, 0 -> GM, WM, GM (tie GM/WM: lower label), none, GM (tie)
    assert tissue_labels(gm, wm, csf).tolist() == [1, 2, 1, 0, 1]
    # GM alone, with a brain mask: inside, WM = 1 - GM; outside the brain nothing
    brain = np.array([1, 1, 1, 0, 1])
    assert tissue_labels(gm=gm, brain=brain).tolist() == [1, 2, 2, 0, 1]
    assert tissue_labels(gm=gm, csf=csf, brain=brain).tolist() == [1, 2, 2, 0, 1]
    assert tissue_labels() is None and tissue_labels(gm=gm) is None


def test_distance_to_the_brain_surface():
    brain = np.zeros((11, 11, 11), bool)
    brain[1:10, 1:10, 1:10] = True                # 9 voxels across, outside at 0 and 10
    distance = surface_distance_map(brain, np.diag([1.0, 1.0, 2.0, 1.0]))
    # centre (5, 5, 5): 5 voxels to the outside along any axis -> 5 mm along i and j, 10 along k
    assert distance[5, 5, 5] == pytest.approx(5)
    assert distance[5, 5, 1] == pytest.approx(2)  # one voxel from the outside along k (2 mm)
    assert distance[0, 5, 5] == 0
    labels = np.zeros(brain.shape, np.int32)
    labels[5, 5, 4:7] = 1                         # deep
    labels[5, 1:3, 5] = 2                         # outermost layer along j: 1 mm
    labels[5, 9:11, 2] = 3                        # reaches outside the brain: 0 mm
    table = lesion_properties(labels, np.diag([1.0, 1.0, 2.0, 1.0]), surface_distance=distance)
    assert table["surface_distance_mm"].tolist() == pytest.approx([5, 1, 0])


def test_probability_inside_each_lesion():
    labels = np.zeros((6, 6, 6), np.int32)
    labels[1, 1, 1:4] = 1
    probability = np.zeros(labels.shape)
    probability[1, 1, 1:4] = [0.2, 0.5, 0.8]
    p = _one(labels, probability=probability)
    assert (p.prob_mean, p.prob_max) == pytest.approx((0.5, 0.8))


def _lesions(rows):
    return pd.DataFrame(rows, columns=["bids_name", "source", "outcome", "size_bin", "site"])


def test_strata_counts_add_up_and_scores_are_pooled():
    lesions = _lesions([
        ("a", "reference", "TP", "<10", "S1"), ("a", "reference", "FN", "<10", "S1"),
        ("a", "predicted", "TP", "<10", "S1"), ("a", "predicted", "FP", ">=100", "S1"),
        ("b", "reference", "US", "30-100", "S2"), ("b", "predicted", "US", "30-100", "S2"),
        ("b", "reference", "TP", "<10", "S2"), ("b", "predicted", "TP", "<10", "S2")])
    images = pd.DataFrame({"bids_name": ["a", "b", "c"], "site": ["S1", "S2", "S2"]})
    table = stratified_detection(lesions, images, "size_bin", "size",
                                 order=("<10", "10-30", "30-100", ">=100")).set_index("group")
    assert list(table.index) == ["<10", "30-100", ">=100"]
    assert table[list(COUNT_COLUMNS)].sum().tolist() == [4, 2, 1, 1, 2, 1, 1]
    # <10: 3 reference lesions, 2 detected, 1 missed; TP 2 -> F1 = 4 / (4 + 0 + 0 + 1)
    assert table.loc["<10", "detection_rate"] == pytest.approx(2 / 3)
    assert table.loc["<10", "f1"] == pytest.approx(0.8)
    # 30-100: one under-segmented pair: detection 0, F1 0 / (0 + 1 + 0) = 0
    assert table.loc["30-100", ["detection_rate", "f1"]].tolist() == [0.0, 0.0]
    # >=100: a false positive only: no reference lesion -> n/a, F1 = 0 / 1
    assert math.isnan(table.loc[">=100", "detection_rate"]) and table.loc[">=100", "f1"] == 0
    assert (table["n_images"] == 3).all()
    by_site = stratified_detection(lesions, images, "site", "site").set_index("group")
    assert by_site["n_images"].to_dict() == {"S1": 1, "S2": 2}
    assert math.isnan(by_site.loc["S1", "f1_se"])          # one image: no standard error


def test_bootstrap_standard_error_of_pooled_scores():
    # two scans that disagree completely: resampled pools range from 0 to 1
    per_scan = np.array([[1, 1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0, 0]])
    se = bootstrap_pooled_se(per_scan)
    assert 0.3 < se["detection_rate"] < 0.7 and 0.3 < se["f1"] < 0.7
    assert bootstrap_pooled_se(per_scan, seed=0) == se      # seeded: reruns agree


# --- the evaluation job on files ------------------------------------------------------------

SHAPE = (16, 16, 16)


def _save(path, data, dtype=np.uint8):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), np.eye(4)), str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    """Reference: A (3x3x3 across the GM/WM boundary), B (4, GM, missed), C (3, GM, found).

    Prediction: P1 (2x2x2 inside A), P2 = C exactly, P3 (2x2x2 in white matter, a false
    positive). Numbered largest first: reference A=1, B=2, C=3; prediction P1=1, P3=2 (same
    size, later first voxel), P2=3.
    """
    gm = np.zeros(SHAPE, np.float32)
    gm[:, :, :8] = 0.9
    wm = np.zeros(SHAPE, np.float32)
    wm[:, :, 8:] = 0.9
    brain = np.zeros(SHAPE, bool)
    brain[1:15, 1:15, 1:15] = True
    ref = np.zeros(SHAPE, bool)
    ref[2:5, 2:5, 6:9] = True                   # A: k = 6, 7 GM and k = 8 WM
    ref[10, 10, 1:5] = True                     # B
    ref[10, 3, 1:4] = True                      # C
    pred = np.zeros(SHAPE, np.uint16)
    pred[2:4, 2:4, 6:8] = 1                     # P1
    pred[11:13, 11:13, 10:12] = 2               # P3
    pred[10, 3, 1:4] = 3                        # P2
    probability = np.where(pred > 0, 0.9, 0.0)
    probability[10, 10, 1:5] = 0.3              # B: seen, below the threshold
    table = tmp_path / "pred_seg-CL_dseg.tsv"
    table.write_text("index\tname\tuncertainty_ddu\n1\tCL-001\t0.1\n2\tCL-002\t0.5\n"
                     "3\tCL-003\tn/a\n")
    job = {"bids_name": "sub-01_T1w", "prediction": _save(tmp_path / "pred.nii.gz", pred > 0),
           "reference": _save(tmp_path / "ref.nii.gz", ref),
           "probability": _save(tmp_path / "prob.nii.gz", probability, np.float32),
           "brain_mask": _save(tmp_path / "brain.nii.gz", brain),
           "error_map": str(tmp_path / "errors.nii.gz"), "sidecar": {},
           "tissue": {"GM": _save(tmp_path / "gm.nii.gz", gm, np.float32),
                      "WM": _save(tmp_path / "wm.nii.gz", wm, np.float32)},
           "lesion_dseg": _save(tmp_path / "pred_dseg.nii.gz", pred, np.uint16),
           "lesion_table": str(table)}
    return job


def _rows(result):
    rows = pd.DataFrame(result["lesions"])
    return rows.set_index(["source", "lesion"])


def test_every_lesion_gets_its_outcome_properties_and_stratum(case):
    result = evaluate_image(case)
    assert result["problem"] is None and result["notes"] == []
    assert (result["tp"], result["fp"], result["us"], result["fn"]) == (2, 1, 0, 1)
    rows = _rows(result)
    assert len(rows) == result["n_reference"] + result["n_predicted"]
    ref, pred = rows.loc["reference"], rows.loc["predicted"]
    assert ref["outcome"].tolist() == ["TP", "FN", "TP"]
    assert pred["outcome"].tolist() == ["TP", "FP", "TP"]
    assert ref["involvement"].tolist() == ["leukocortical", "intracortical", "intracortical"]
    assert pred.loc[2, "involvement"] == "white matter"
    assert ref["n_voxels"].tolist() == [27, 4, 3] and pred["n_voxels"].tolist() == [8, 8, 3]
    # P1 covers 8 of A's 27 voxels: IoU_adj = 8 / 27 -> TP, counted where A belongs
    assert pred.loc[1, "iou_adj"] == pytest.approx(8 / 27)
    assert (pred.loc[1, "size_bin"], pred.loc[1, "stratum_volume_mm3"]) == ("10-30", 27)
    assert pred.loc[1, "stratum_involvement"] == "leukocortical"
    assert pred.loc[2, ["size_bin", "stratum_involvement"]].tolist() == ["<10", "white matter"]
    assert ref.loc[1, "matched"] == "1" and pred.loc[3, "matched"] == "3"
    assert pd.isna(ref.loc[2, "matched"])
    # B is one voxel from the brain's edge (k = 1); A's shallowest voxel is 2 voxels in
    assert ref["surface_distance_mm"].tolist() == pytest.approx([2, 1, 1])
    # a found lesion is counted at the depth of the reference lesion it found, an FP at its own
    assert pred.loc[1, "stratum_surface_distance_mm"] == pytest.approx(2)
    assert pred.loc[2, "stratum_surface_distance_mm"] == pytest.approx(
        pred.loc[2, "surface_distance_mm"])
    # depth bins: everything touches the surface layer except the FP three voxels in
    assert ref["depth_bin"].tolist() == ["<3", "<3", "<3"]
    assert pred["depth_bin"].tolist() == ["<3", "3-6", "<3"]
    # the missed lesion: the model's probability there peaked at 0.3
    assert ref.loc[2, "prob_max"] == pytest.approx(0.3)
    # names and DDU from the participant table; a reference lesion takes its best match's DDU
    assert pred["name"].tolist() == ["CL-001", "CL-002", "CL-003"]
    assert pred.loc[2, "uncertainty_ddu"] == 0.5 and pd.isna(pred.loc[3, "uncertainty_ddu"])
    assert ref.loc[1, "uncertainty_ddu"] == 0.1 and pd.isna(ref.loc[2, "uncertainty_ddu"])


def test_tissue_maps_on_another_grid_leave_involvement_empty_with_a_note(case, tmp_path):
    shifted = np.eye(4)
    shifted[:3, 3] = 1.0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), shifted), str(tmp_path / "wm.nii.gz"))
    case["tissue"] = {"WM": str(tmp_path / "wm.nii.gz")}
    result = evaluate_image(case)
    assert result["problem"] is None
    assert len(result["notes"]) == 1 and "wm.nii.gz" in result["notes"][0]
    assert all(r["involvement"] is None for r in result["lesions"])


def test_a_grey_matter_map_alone_uses_the_brain_mask(case):
    case["tissue"] = {"GM": case["tissue"]["GM"]}
    rows = _rows(evaluate_image(case))
    # inside the brain, not-GM is taken as WM: same answer as with the WM map here
    assert rows.loc["reference", "involvement"].tolist() == ["leukocortical", "intracortical",
                                                             "intracortical"]


def test_without_participant_extras_the_rows_are_still_written(case, tmp_path):
    from cl_bidsapp.group.error_report import LesionRows, write_error_analysis

    for key in ("tissue", "lesion_dseg", "lesion_table", "probability", "brain_mask"):
        case[key] = None
    result = evaluate_image(case)
    rows = _rows(result)
    assert len(rows) == 6
    assert rows["involvement"].isna().all() and rows["prob_max"].isna().all()
    assert rows["surface_distance_mm"].isna().all() and rows["name"].isna().all()
    assert rows["depth_bin"].isna().all()
    assert rows.loc["reference", "size_bin"].tolist() == ["10-30", "<10", "<10"]
    # no tissue maps and no brain mask: the strata are by size only, not empty depth rows
    image = {"bids_name": case["bids_name"], "site": None}
    collected = LesionRows()
    collected.add(image, result["lesions"])
    block = write_error_analysis(tmp_path / "group", [image], collected)
    strata = pd.read_csv(tmp_path / "group" / "group_evaluation_strata.tsv", sep="\t")
    assert set(strata["grouping"]) == {"all", "size"}
    assert [t["title"] for t in block["tables"]] == ["All lesions", "By lesion size (mm³)"]


def test_images_without_any_lesion_still_give_the_tables(tmp_path):
    from cl_bidsapp.group.error_report import LesionRows, write_error_analysis

    images = [{"bids_name": "sub-01_T1w", "site": "A"}, {"bids_name": "sub-02_T1w", "site": "B"}]
    rows = LesionRows()
    for image in images:
        rows.add(image, [])
    block = write_error_analysis(tmp_path, images, rows)
    lesions = pd.read_csv(tmp_path / "group_evaluation_lesions.tsv", sep="\t")
    strata = pd.read_csv(tmp_path / "group_evaluation_strata.tsv", sep="\t",
                         keep_default_na=False, na_values=["n/a"])
    assert len(lesions) == 0 and list(lesions.columns) == rows.columns
    # nothing to count: zero counts, scores n/a (not the per-image convention of 1)
    assert strata["grouping"].tolist() == ["all", "site", "site"]
    assert (strata["n_reference"] == 0).all() and strata["f1"].isna().all()
    assert block["n_lesions"] == 0 and [t["title"] for t in block["tables"]] == [
        "All lesions", "By site"]

"""Error analysis through the group level, on 2 mm phantoms of three protocols (three sites).

Participant outputs are the phantoms' ground truth with known changes
(:func:`cl_bidsapp.group.testing.phantom_outputs`: one lesion dropped, one 3x3x3 blob added
per image), so the per-lesion table's answer is known; the simulator's own lesion table says
which lesions are intracortical and which leukocortical.
"""
from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cl_bidsapp.cli.run import plan
from cl_bidsapp.config import Settings
from cl_bidsapp.core.components import lesion_instances
from cl_bidsapp.core.lesion_strata import COUNT_COLUMNS, DEPTH_BIN_LABELS, depth_bin
from cl_bidsapp.group import run_group_level
from cl_bidsapp.group.testing import phantom_outputs
from cl_bidsapp.simulate import simulate_dataset

PROTOCOLS = ("3T-MP2RAGE", "7T-MP2RAGE", "3T-MPRAGE")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    bids, out = root / "bids", root / "out"
    simulate_dataset(bids, n_subjects=3, protocols=PROTOCOLS, voxel_size=2.0, seed=5,
                     lesion_volume_scale=4.0)
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=root / "work", nprocs=1,
                        models_dir=root / "models", skip_bids_validation=True,
                        reference_masks=bids / "derivatives" / "reference")
    _, items = plan(settings)
    phantom_outputs(bids, out, items, seed=1)
    assert run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False) == 0
    return bids, out / "group"


def _tsv(path):
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"],
                       dtype={"matched": str})


def test_the_lesion_table_has_one_row_per_lesion_of_each_mask(finished):
    _, group = finished
    lesions = _tsv(group / "group_evaluation_lesions.tsv")
    images = _tsv(group / "group_evaluation.tsv").set_index("bids_name")
    sidecar = json.loads((group / "group_evaluation_lesions.json").read_text())
    assert list(lesions.columns) == list(sidecar)
    assert set(lesions["bids_name"]) == set(images.index) and len(images) == 3
    for name, part in lesions.groupby("bids_name"):
        ref, pred = part[part.source == "reference"], part[part.source == "predicted"]
        row = images.loc[name]
        assert len(ref) == row.n_reference and len(pred) == row.n_predicted
        assert (pred.outcome == "TP").sum() == row.tp and (pred.outcome == "FP").sum() == row.fp
        assert (pred.outcome == "US").sum() == row.us and (ref.outcome == "FN").sum() == row.fn
        # the helper drops one lesion and adds one 3x3x3 blob (27 voxels of 8 mm³)
        assert row.fn == 1 and row.fp == 1
        blob = pred[pred.outcome == "FP"].iloc[0]
        assert (blob.n_voxels, blob.volume_mm3, blob.size_bin) == (27, 216, ">=100")
        assert blob.roundness == pytest.approx(1) and pd.isna(blob.matched)
        # the dropped lesion: the helper's probability map is 0.05 in the brain
        assert ref[ref.outcome == "FN"].prob_max.iloc[0] == pytest.approx(0.05)
        assert (part.site == row.site).all() and (part.contrast == row.contrast).all()
    assert (lesions["surface_distance_mm"] >= 0).all()
    assert lesions["sphericity"].between(0, 1).all()
    # depth strata: reference lesions and FPs at their own depth, found ones at their reference's
    own = lesions[(lesions.source == "reference") | (lesions.outcome == "FP")]
    assert (own.stratum_surface_distance_mm == own.surface_distance_mm).all()
    assert lesions.depth_bin.tolist() == [depth_bin(d) for d in
                                          lesions.stratum_surface_distance_mm]
    assert {"<3", ">=6"} <= set(lesions.depth_bin)


def test_reference_involvement_agrees_with_the_simulator(finished):
    bids, group = finished
    lesions = _tsv(group / "group_evaluation_lesions.tsv")
    reference = lesions[lesions.source == "reference"]
    checked = 0
    for name, part in reference.groupby("bids_name"):
        stem = name.rsplit("_", 1)[0]
        folder = bids / "derivatives" / "reference" / stem.split("_")[0] / "anat"
        ids = np.asarray(nib.load(str(folder / f"{stem}_seg-CL_dseg.nii.gz")).dataobj)
        truth = _tsv(folder / f"{stem}_label-CL_lesions.tsv").set_index("lesion_id")
        numbered = lesion_instances(ids > 0, 0.5, min_size=1)
        for row in part.itertuples():
            lesion_id = int(np.unique(ids[numbered == row.lesion])[0])
            assert row.involvement == truth.loc[lesion_id, "type"], (name, row.lesion)
            assert row.n_voxels_wm == truth.loc[lesion_id, "n_voxels_wm"]
            checked += 1
    assert checked == len(reference) and set(reference.involvement) == {"intracortical",
                                                                         "leukocortical"}


def test_strata_add_up_to_the_totals(finished):
    _, group = finished
    strata = _tsv(group / "group_evaluation_strata.tsv")
    sidecar = json.loads((group / "group_evaluation_strata.json").read_text())
    assert list(strata.columns) == list(sidecar)
    assert set(strata.grouping) == {"all", "size", "involvement", "depth", "site"}
    total = strata[strata.grouping == "all"].iloc[0]
    evaluation = _tsv(group / "group_evaluation.tsv")
    assert total[["n_reference", "tp", "fp", "us", "fn"]].tolist() == (
        evaluation[["n_reference", "tp", "fp", "us", "fn"]].sum().tolist())
    for grouping in ("size", "involvement", "depth", "site"):
        part = strata[strata.grouping == grouping]
        assert part[list(COUNT_COLUMNS)].sum().tolist() == total[list(COUNT_COLUMNS)].tolist()
        assert (part.n_reference == part.detected + part.reference_us + part.fn).all()
    sites = strata[strata.grouping == "site"]
    assert sites.group.tolist() == ["site01", "site02", "site03"]
    assert sites.n_images.tolist() == [1, 1, 1]
    assert (strata[strata.grouping == "size"].n_images == 3).all()
    assert strata[strata.grouping == "depth"].group.tolist() == list(DEPTH_BIN_LABELS)
    # the pooled detection rate of all lesions: detected / reference lesions
    assert total.detection_rate == pytest.approx(total.detected / total.n_reference)
    assert 0 < total.f1_se < 0.5


def test_the_report_shows_the_error_analysis_inline(finished):
    _, group = finished
    html = (group / "group_report.html").read_text()
    block = html.split('id="error-analysis"')[1].split("<h2")[0]
    for title in ("By lesion size", "By cortical involvement", "By depth below the brain surface",
                  "By site"):
        assert title in block
    assert re.search(r'<img alt="Detection rate[^"]*" src="data:image/png;base64,', block)
    assert "group_evaluation_lesions.tsv" in block
    assert (group / "figures" / "group_desc-erroranalysis_plot.png").stat().st_size > 5000
    strata = _tsv(group / "group_evaluation_strata.tsv")
    # every stratum is a row of the page's table (label then its image count)
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">(\d+)</td>", block)
    assert len(rows) == len(strata)

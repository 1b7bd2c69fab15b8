"""Input discovery: the work plan for real BIDS layouts and for layouts built here.

The expected plans for ../shared/data/bids-layouts are written out below (documented in
docs/inputs.md); the temporary layouts test the same rules on every machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_bidsapp.bids.discovery import (WorkItem, check_filters, discover, missing_content,
                                       plan_table)
from cl_bidsapp.bids.layout import load_layout
from cl_bidsapp.errors import InputDataError, MissingInputError, UsageError, ValidationFailed
from tests.bids_builders import make_dataset


def _plan(root: Path, **kwargs) -> list[WorkItem]:
    return discover(load_layout(root), **kwargs)


def _summary(items):
    return [(it.subject, it.session, it.contrast, it.image.name if it.image else None,
             it.companions, it.rule) for it in items]


# -- real layouts (bids-examples, OpenNeuro skeleton) ------------------------------------------

EXPECTED = {
    # dataset: (number of items, first item summary)
    "qmri_mp2rage": (1, ("1", None, "MP2RAGE", "sub-1_UNIT1.nii", "INV1+INV2+T1map", "UNIT1")),
    "qmri_mp2rageme": (1, ("1", None, "MP2RAGE", None, "INV1+INV2", "uni-from-inversions")),
    "7t_trt": (22, ("01", "1", "MP2RAGE", "sub-01_ses-1_T1w.nii.gz", "T1map", "t1map-sibling")),
    "ds000117": (16, ("01", "mri", "MPRAGE", "sub-01_ses-mri_acq-mprage_T1w.nii.gz", "-",
                      "acq-label")),
    "ds001": (16, ("01", None, "MPRAGE", "sub-01_T1w.nii.gz", "-", "default")),
    "ds004332": (32, ("01", None, "MPRAGE",
                      "sub-01_task-nodding_acq-mpragePMCoff_rec-wore_T1w.nii", "-",
                      "acq-label")),
    "ds005427-anat-skeleton": (20, ("01", None, "MP2RAGE", "sub-01_T1w.nii.gz", "INV2",
                                    "inv-sibling")),
    "ds114": (20, ("01", "retest", "MPRAGE", "sub-01_ses-retest_T1w.nii.gz", "-", "default")),
    "genetics_ukbb": (14, ("01", None, "MPRAGE", "sub-01_acq-MPRAGE_T1w.nii.gz", "-",
                           "acq-label")),
    "synthetic": (10, ("01", "01", "MPRAGE", "sub-01_ses-01_T1w.nii", "-", "default")),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_layout_plans(bids_layouts, name):
    items = _plan(bids_layouts / name)
    count, first = EXPECTED[name]
    assert len(items) == count
    assert _summary(items)[0] == first


def test_qmri_mp2rage_uses_magnitude_inversions_and_inherited_sidecars(bids_layouts):
    (item,) = _plan(bids_layouts / "qmri_mp2rage")
    assert item.inv1.name == "sub-1_inv-1_part-mag_MP2RAGE.nii"
    assert item.inv2.name == "sub-1_inv-2_part-mag_MP2RAGE.nii"
    assert item.inv1_phase.name == "sub-1_inv-1_part-phase_MP2RAGE.nii"
    # root-level MP2RAGE.json is inherited by both inversions; their own sidecars add TI
    assert item.inv1_metadata["RepetitionTimePreparation"] == 5.5
    assert item.inv1_metadata["InversionTime"] == 0.8
    assert item.inv2_metadata["InversionTime"] == 2.7
    assert item.inv2_metadata["MagneticFieldStrength"] == 7


def test_mp2rageme_picks_first_echo_of_inv2(bids_layouts):
    (item,) = _plan(bids_layouts / "qmri_mp2rageme")
    assert item.inv2.name == "sub-1_echo-1_inv-2_part-mag_MP2RAGE.nii"
    assert item.inv2_phase.name == "sub-1_echo-1_inv-2_part-phase_MP2RAGE.nii"
    assert item.bids_name == "sub-1_UNIT1"


def test_ds005427_every_subject_is_mp2rage_with_inv2(bids_layouts):
    items = _plan(bids_layouts / "ds005427-anat-skeleton")
    assert {it.contrast for it in items} == {"MP2RAGE"}
    assert all(it.inv2 is not None and it.inv1 is None for it in items)
    assert all(it.inv2.name == f"sub-{it.subject}_inv-2_MP2RAGE.nii.gz" for it in items)


def test_ds004332_plans_all_t1w_or_what_the_filter_keeps(bids_layouts):
    root = bids_layouts / "ds004332"
    layout = load_layout(root)
    all_items = discover(layout)
    assert len(all_items) == len(list(root.glob("sub-*/anat/*_T1w.nii")))
    filters = check_filters({"t1w": {"acq": "mpragePMCoff", "reconstruction": "wore"}},
                            set(layout.get_entities()))
    kept = discover(layout, filters=filters)
    assert kept and all("acq-mpragePMCoff_rec-wore" in it.image.name for it in kept)
    assert len(kept) == len(list(root.glob("sub-*/anat/*acq-mpragePMCoff_rec-wore_T1w.nii")))


def test_derivatives_folders_are_never_inputs(bids_layouts):
    items = _plan(bids_layouts / "qmri_mp2rage")
    assert all("derivatives" not in str(it.image) for it in items)


def test_derivatives_dataset_refused(bids_layouts):
    with pytest.raises(InputDataError, match="derivatives dataset"):
        load_layout(bids_layouts / "ds000001-fmriprep")


# -- layouts built here (same rules, every machine) --------------------------------------------

def test_uni_with_both_inversions_same_acq(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/ses-1/anat/sub-01_ses-1_acq-hires_UNIT1.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-hires_inv-1_MP2RAGE.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-hires_inv-2_MP2RAGE.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-lores_inv-2_MP2RAGE.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-hires_inv-2_MP2RAGE.nii.gz",
    ])
    (item,) = _plan(root)
    assert item.contrast == "MP2RAGE" and item.rule == "UNIT1"
    assert item.inv1.name == "sub-01_ses-1_acq-hires_inv-1_MP2RAGE.nii.gz"
    # same session and the same acquisition win over another acquisition or session
    assert item.inv2.name == "sub-01_ses-1_acq-hires_inv-2_MP2RAGE.nii.gz"
    assert item.bids_name == "sub-01_ses-1_acq-hires_UNIT1"


@pytest.mark.parametrize("files, sidecar, rule, contrast", [
    (["sub-01/anat/sub-01_acq-mp2rage_T1w.nii.gz"], None, "acq-label", "MP2RAGE"),
    (["sub-01/anat/sub-01_acq-MPRAGE_T1w.nii.gz"], None, "acq-label", "MPRAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz"], {"ImageType": ["DERIVED", "PRIMARY", "M", "UNI"]},
     "sidecar", "MP2RAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz"], {"RepetitionTimePreparation": 5.0}, "sidecar",
     "MP2RAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz"], {"ProtocolName": "t1_mp2rage_sag_p3_0.75mm"},
     "sidecar", "MP2RAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz"], None,
     "inv-sibling", "MP2RAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T1map.nii.gz"], None,
     "t1map-sibling", "MP2RAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz"], {"ProtocolName": "t1_mprage_sag"}, "default",
     "MPRAGE"),
    # an MPRAGE sidecar may carry RepetitionTimePreparation (its inversion cycle) too
    (["sub-01/anat/sub-01_T1w.nii.gz"],
     {"PulseSequenceType": "MPRAGE", "RepetitionTimePreparation": 2.3, "InversionTime": 0.9},
     "sidecar", "MPRAGE"),
    (["sub-01/anat/sub-01_T1w.nii.gz"],
     {"PulseSequenceType": "MP2RAGE", "RepetitionTimePreparation": 5.0}, "sidecar", "MP2RAGE"),
])
def test_t1w_classification_rules(tmp_path, files, sidecar, rule, contrast):
    content = {f: None for f in files}
    if sidecar is not None:
        content[files[0].replace(".nii.gz", ".json")] = sidecar
    (item,) = _plan(make_dataset(tmp_path / "ds", content))
    assert (item.rule, item.contrast) == (rule, contrast)
    assert item.explain  # the plan says why


def test_root_sidecar_inheritance_classifies(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "T1w.json": {"RepetitionTimePreparation": 5.0, "MagneticFieldStrength": 3},
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-01/anat/sub-01_T1w.json": {"MagneticFieldStrength": 7},
    })
    (item,) = _plan(root)
    assert item.rule == "sidecar"
    assert item.metadata == {"RepetitionTimePreparation": 5.0, "MagneticFieldStrength": 7}


def test_filter_file_forces_classification(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz",
        "sub-02/anat/sub-02_acq-special_T1w.nii.gz",
    ])
    layout = load_layout(root)
    ents = set(layout.get_entities())
    # force sub-01's T1w to MPRAGE despite the INV2 beside it
    items = discover(layout, filters=check_filters(
        {"mprage": {"suffix": "T1w", "subject": "01"}}, ents))
    by_sub = {it.subject: it for it in items}
    assert (by_sub["01"].contrast, by_sub["01"].rule) == ("MPRAGE", "filter-file")
    # declare acq-special T1w images to be UNI
    items = discover(layout, filters=check_filters(
        {"uni": {"suffix": "T1w", "acquisition": "special"}}, ents))
    by_sub = {it.subject: it for it in items}
    assert (by_sub["02"].contrast, by_sub["02"].rule) == ("MP2RAGE", "UNIT1")
    assert by_sub["01"].rule == "inv-sibling"


def test_filter_null_and_any(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_acq-fast_T1w.nii.gz",
    ])
    layout = load_layout(root)
    ents = set(layout.get_entities())
    none = discover(layout, filters=check_filters({"t1w": {"acquisition": None}}, ents))
    assert [it.image.name for it in none] == ["sub-01_T1w.nii.gz"]
    anyacq = discover(layout, filters=check_filters({"t1w": {"acquisition": "*"}}, ents))
    assert [it.image.name for it in anyacq] == ["sub-01_acq-fast_T1w.nii.gz"]


def test_filter_unknown_entity_or_query(tmp_path):
    root = make_dataset(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz"])
    ents = set(load_layout(root).get_entities())
    with pytest.raises(UsageError, match="unknown BIDS entity 'colour'"):
        check_filters({"t1w": {"colour": "red"}}, ents)
    with pytest.raises(UsageError, match="unknown query 'bold'"):
        check_filters({"bold": {"task": "rest"}}, ents)


def test_magnitude_only_inversions_without_uni_are_skipped(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/anat/sub-01_inv-1_MP2RAGE.nii.gz", "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz",
    ])
    assert _plan(root) == []


def test_participant_and_session_selection(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        f"sub-{s}/ses-{e}/anat/sub-{s}_ses-{e}_UNIT1.nii.gz" for s in ("01", "02")
        for e in ("a", "b")])
    items = _plan(root, participant_label=["02"], session_label=["b"])
    assert [(it.subject, it.session) for it in items] == [("02", "b")]


def test_tpl_and_derivatives_folders_ignored(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz",
        "tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_T1w.nii.gz",
    ])
    assert [it.image.name for it in _plan(root)] == ["sub-01_T1w.nii.gz"]


def test_malformed_sidecar_fails_that_image_only(tmp_path):
    root = make_dataset(tmp_path / "ds", {
        "sub-01/anat/sub-01_T1w.nii.gz": None, "sub-01/anat/sub-01_T1w.json": "{not json",
        "sub-02/anat/sub-02_UNIT1.nii.gz": None,
        "sub-02/anat/sub-02_inv-2_MP2RAGE.nii.gz": None,
        "sub-02/anat/sub-02_inv-2_MP2RAGE.json": "[1, 2",
        "sub-03/anat/sub-03_T1w.nii.gz": None,
    })
    items = {it.subject: it for it in _plan(root)}
    assert "sub-01_T1w.json: sidecar is not valid JSON" in items["01"].problem
    assert "sub-02_inv-2_MP2RAGE.json: sidecar is not valid JSON" in items["02"].problem
    assert items["03"].problem is None


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(ValidationFailed, match="dataset_description.json is missing"):
        load_layout(tmp_path)


def test_annexed_inputs_named(tmp_path):
    root = make_dataset(tmp_path / "ds", ["sub-02/anat/sub-02_T1w.nii.gz"])
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (anat / "sub-01_T1w.nii.gz").symlink_to(
        "../../.git/annex/objects/Xx/Yy/MD5E-s1--abc.nii.gz/MD5E-s1--abc.nii.gz")
    (root / "sub-02/anat/sub-02_T1w.nii.gz").write_bytes(b"/annex/objects/MD5E-s1--def\n")
    items = _plan(root)
    with pytest.raises(MissingInputError) as err:
        missing_content(items)
    assert "sub-01_T1w.nii.gz" in str(err.value) and "sub-02_T1w.nii.gz" in str(err.value)
    assert "datalad get" in str(err.value)


def test_plan_table_lists_rule_and_companions(tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz"])
    table = plan_table(_plan(root), root=root)
    header, rule, row = table.splitlines()
    assert header.split() == ["subject", "session", "contrast", "image", "companions", "rule",
                              "inputs"]
    assert row.split() == ["01", "-", "MP2RAGE", "sub-01/anat/sub-01_T1w.nii.gz", "INV2",
                           "inv-sibling", "ok"]
    assert json.dumps(_plan(root)[0].to_dict())  # serialisable for logs


def test_simulated_protocols_are_classified_as_what_they_simulate(tmp_path):
    """The phantom writer's own sidecars: 3T-MPRAGE T1w is MPRAGE, MP2RAGE UNI stays MP2RAGE."""
    from cl_bidsapp.simulate.protocols import get_protocol

    mprage = get_protocol("3T-MPRAGE").sidecar()
    assert "RepetitionTimePreparation" in mprage  # the case that used to be misread
    root = make_dataset(tmp_path / "ds", {
        "sub-01/anat/sub-01_T1w.nii.gz": None,
        "sub-01/anat/sub-01_T1w.json": mprage,
        "sub-02/anat/sub-02_T1w.nii.gz": None,
        "sub-02/anat/sub-02_T1w.json": get_protocol("7T-MP2RAGE").sidecar(),
    })
    contrasts = {item.subject: item.contrast for item in _plan(root)}
    assert contrasts == {"01": "MPRAGE", "02": "MP2RAGE"}

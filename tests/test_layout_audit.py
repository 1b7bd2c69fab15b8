"""Problems found by pointing the app at real BIDS layouts, each with the case that showed it.

- a dataset stored below a folder named like an entity (``/data/ses-2024/study``, or
  ``cl-bidsapp .. out`` run inside ``sub-01/``) broke participant and session selection;
- a session holding only functional data was reported as "not found";
- images whose derivatives get the same names (``echo-1``/``echo-2``, ``.nii`` beside
  ``.nii.gz``, ``UNIT1`` beside ``T1w``) overwrote each other or crashed the run;
- ``--dry-run`` called empty and truncated images "ok".
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cl_bidsapp.bids.checks import unreadable_files
from cl_bidsapp.bids.discovery import check_filters, check_labels, discover
from cl_bidsapp.bids.layout import load_layout
from cl_bidsapp.cli.run import main
from cl_bidsapp.errors import NoFilesSelected
from tests.bids_builders import make_dataset


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def nifti_bytes(shape=(4, 4, 4)) -> bytes:
    img = nib.Nifti1Image(np.ones(shape, dtype=np.float32), np.eye(4))
    return img.to_bytes()


# -- labels and sessions ---------------------------------------------------------------------

@pytest.mark.parametrize("parent", ["ses-2024", "sub-study"])
def test_a_dataset_below_an_entity_named_folder_keeps_label_selection(tmp_path, parent):
    root = make_dataset(tmp_path / parent / "ds", [
        f"sub-{s}/ses-{e}/anat/sub-{s}_ses-{e}_T1w.nii.gz" for s in ("01", "02")
        for e in ("a", "b")])
    layout = load_layout(root)
    check_labels(layout, ["02"], ["b"])
    items = discover(layout, ["02"], ["b"])
    assert [(it.subject, it.session) for it in items] == [("02", "b")]
    with pytest.raises(NoFilesSelected, match="session label.*not found: c"):
        check_labels(layout, None, ["c"])


def test_dotdot_in_bids_dir_keeps_participant_selection(capsys, tmp_path):
    root = make_dataset(tmp_path / "ds", [f"sub-{s}/anat/sub-{s}_T1w.nii.gz"
                                          for s in ("01", "02", "03")])
    code, out, _ = run_cli(capsys, root / "sub-01" / "..", tmp_path / "out", "participant",
                           "--dry-run", "--skip-bids-validation", "--participant-label", "02")
    assert code == 0
    assert "sub-02_T1w" in out and "sub-01_T1w" not in out and "sub-03_T1w" not in out


def test_filter_file_subject_is_matched_on_the_file_name(tmp_path):
    root = make_dataset(tmp_path / "sub-x" / "ds", ["sub-01/anat/sub-01_T1w.nii.gz",
                                                    "sub-02/anat/sub-02_T1w.nii.gz"])
    layout = load_layout(root)
    filters = check_filters({"t1w": {"subject": ["02"]}}, set(layout.get_entities()))
    assert [it.subject for it in discover(layout, filters=filters)] == ["02"]


def test_a_session_with_only_functional_data_is_named_as_such(capsys, tmp_path):
    root = make_dataset(tmp_path / "ds", [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/func/sub-01_ses-2_task-rest_bold.nii.gz"])
    code, _, err = run_cli(capsys, root, tmp_path / "out", "participant", "--dry-run",
                           "--skip-bids-validation", "--session-label", "2")
    assert code == 18
    assert "not found" not in err and "for the selected session(s) 2" in err
    # asked together with a session that has images: the others go on, with a warning
    code, out, err = run_cli(capsys, root, tmp_path / "out", "participant", "--dry-run",
                             "--skip-bids-validation", "--session-label", "1", "2")
    assert code == 0 and "sub-01_ses-1_T1w" in out and "session(s) 2" in err


# -- output names that clash -----------------------------------------------------------------

@pytest.mark.parametrize("files, keep", [
    (["sub-01_echo-1_T1w.nii.gz", "sub-01_echo-2_T1w.nii.gz"], "sub-01_echo-1_T1w.nii.gz"),
    (["sub-01_part-mag_T1w.nii.gz", "sub-01_part-phase_T1w.nii.gz"],
     "sub-01_part-mag_T1w.nii.gz"),
    (["sub-01_T1w.nii", "sub-01_T1w.nii.gz"], "sub-01_T1w.nii.gz"),
])
def test_images_whose_outputs_clash_are_refused_with_a_filter_that_works(tmp_path, files,
                                                                         keep):
    root = make_dataset(tmp_path / "ds", [f"sub-01/anat/{f}" for f in files]
                        + ["sub-02/anat/sub-02_T1w.nii.gz"])
    layout = load_layout(root)
    items = discover(layout)
    clashing = [it for it in items if it.subject == "01"]
    assert len(clashing) == 2
    assert all("same file names" in it.problem for it in clashing)
    assert not [it for it in items if it.subject == "02"][0].problem
    assert all("--participant-label 01 --bids-filter-file" in it.problem for it in clashing)
    example, _ = json.JSONDecoder().raw_decode(clashing[0].problem.split("e.g. ", 1)[1])
    filters = check_filters(example, set(layout.get_entities()))
    kept = [it for it in discover(layout, ["01"], filters=filters)]
    assert [it.image.name for it in kept] == [keep] and not kept[0].problem


def test_uni_beside_t1w_of_the_same_name_is_refused(tmp_path):
    root = make_dataset(tmp_path / "ds", ["sub-01/anat/sub-01_UNIT1.nii.gz",
                                          "sub-01/anat/sub-01_T1w.nii.gz"])
    items = discover(load_layout(root))
    assert len(items) == 2 and all("separate runs" in it.problem for it in items)


def test_a_clash_fails_those_images_cleanly_in_a_real_run(capsys, tmp_path):
    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii": nifti_bytes(),
                                          "sub-01/anat/sub-01_T1w.nii.gz": None})
    before = checksums(root)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(capsys, root, out_dir, "participant", "--skip-bids-validation",
                           "-w", tmp_path / "work", "--nprocs", "1", "--omp-nthreads", "1")
    assert code == 65, err
    assert "unexpected" not in err and "same file names" in err
    assert not list(out_dir.rglob("*.nii.gz"))
    assert checksums(root) == before


# -- dry run ---------------------------------------------------------------------------------

def test_dry_run_warns_about_empty_and_truncated_images(capsys, tmp_path):
    whole = nifti_bytes()
    root = make_dataset(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None,
                                          "sub-02/anat/sub-02_T1w.nii": whole[:400],
                                          "sub-03/anat/sub-03_T1w.nii": whole})
    items = discover(load_layout(root))
    found = {it.subject: reason for it, reason in unreadable_files(items)}
    assert set(found) == {"01", "02"}
    assert "sub-01_T1w.nii.gz: the file is empty (0 bytes)" in found["01"]
    assert "truncated" in found["02"]
    code, out, err = run_cli(capsys, root, tmp_path / "out", "participant", "--dry-run",
                             "--skip-bids-validation")
    assert code == 0 and "sub-03_T1w.nii" in out
    assert "2 of 3 planned image(s) cannot be read" in err and "sub-03" not in err
    assert not (tmp_path / "out").exists()


# -- the real layouts (../shared/data) --------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["ds001", "7t_trt", "qmri_mp2rage", "synthetic"])
def test_real_layout_dry_run_is_clean_and_read_only(capsys, bids_layouts, tmp_path, name):
    root = bids_layouts / name
    before = checksums(root)
    code, out, err = run_cli(capsys, root, tmp_path / "out", "participant", "--dry-run",
                             "--skip-bids-validation")
    assert code == 0 and "subject" in out
    assert "would fail in a real run" in err      # placeholders: no voxel data
    assert not (tmp_path / "out").exists()
    assert checksums(root) == before


@pytest.mark.shared_data
def test_real_layout_session_without_anatomy(capsys, bids_layouts, tmp_path):
    code, _, err = run_cli(capsys, bids_layouts / "7t_trt", tmp_path / "out", "participant",
                           "--dry-run", "--skip-bids-validation", "--participant-label", "01",
                           "--session-label", "2")
    assert code == 18 and "for the selected" in err and "not found" not in err

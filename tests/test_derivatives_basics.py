"""Output dataset basics: names, dataset_description.json, .bidsignore, settings TOML."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from cl_bidsapp.bids.derivatives import (dataset_description, output_path, save_settings,
                                         source_entities, subject_log_dir, write_dataset_files)
from cl_bidsapp.config import Settings
from cl_bidsapp.io import leftover_temporaries

SOURCE = "sub-01_ses-01_acq-mp2rage_UNIT1.nii.gz"


def test_names_follow_design():
    src = source_entities(SOURCE)
    out = Path("/o")
    names = {k: output_path(out, src, k).relative_to(out).as_posix()
             for k in ("preproc", "brain_mask", "probseg", "lesion_mask", "lesion_dseg")}
    assert names == {
        "preproc": "sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_desc-preproc_UNIT1.nii.gz",
        "brain_mask": "sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_desc-brain_mask.nii.gz",
        "probseg": "sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_label-CL_probseg.nii.gz",
        "lesion_mask": "sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_label-CL_mask.nii.gz",
        "lesion_dseg": "sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_seg-CL_dseg.nii.gz",
    }
    assert output_path(out, src, "lesion_table").name == \
        "sub-01_ses-01_acq-mp2rage_seg-CL_dseg.tsv"


def test_names_keep_task_rec_run_entities():
    src = source_entities("sub-02_task-still_acq-mpragePMCoff_rec-wore_run-2_T1w.nii")
    assert output_path(Path("/o"), src, "lesion_mask").name == \
        "sub-02_task-still_acq-mpragePMCoff_rec-wore_run-2_label-CL_mask.nii.gz"
    assert output_path(Path("/o"), src, "preproc").name == \
        "sub-02_task-still_acq-mpragePMCoff_rec-wore_run-2_desc-preproc_T1w.nii.gz"


def test_dataset_description_from_raw():
    raw = {"Name": "MS study", "DatasetDOI": "10.18112/openneuro.ds005427.v1.1.1",
           "License": "CC0"}
    desc = dataset_description(raw, Path("/data/bids"))
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "cl-bidsapp"
    assert desc["SourceDatasets"][0]["DOI"] == "doi:10.18112/openneuro.ds005427.v1.1.1"
    assert desc["License"] == "CC0"
    assert "Container" not in desc["GeneratedBy"][0]


def test_container_recorded(monkeypatch):
    monkeypatch.setenv("CL_BIDSAPP_CONTAINER", "docker")
    monkeypatch.setenv("CL_BIDSAPP_CONTAINER_TAG", "clbidsapp/cl-bidsapp:0.1.0")
    from cl_bidsapp.bids.derivatives import container_info
    assert container_info() == {"Type": "docker", "Tag": "clbidsapp/cl-bidsapp:0.1.0"}


def test_bidsignore_keeps_user_lines(tmp_path):
    (tmp_path / ".bidsignore").write_text("extra/\n")
    write_dataset_files(tmp_path, {"Name": "x"}, Path("/data"))
    lines = (tmp_path / ".bidsignore").read_text().splitlines()
    assert lines[0] == "extra/" and "*.html" in lines and "figures/" in lines
    write_dataset_files(tmp_path, {"Name": "x"}, Path("/data"))
    assert (tmp_path / ".bidsignore").read_text().splitlines() == lines  # idempotent
    assert "preproc" in (tmp_path / "descriptions.tsv").read_text()


def _writer(args):
    out, n = args
    for _ in range(n):
        write_dataset_files(Path(out), {"Name": "x", "License": "CC0"}, Path("/data"))
    return True


def test_concurrent_writers_leave_valid_files(tmp_path):
    with mp.get_context("spawn").Pool(4) as pool:
        assert all(pool.map(_writer, [(str(tmp_path), 40)] * 4))
    desc = json.loads((tmp_path / "dataset_description.json").read_text())
    assert desc["GeneratedBy"][0]["Name"] == "cl-bidsapp"
    assert leftover_temporaries(tmp_path) == []


def test_settings_saved_per_subject(tmp_path):
    s = Settings(bids_dir=Path("/b"), output_dir=tmp_path, threshold=0.5)
    path = save_settings(s, subject_log_dir(tmp_path, "01", s.run_id))
    assert path == tmp_path / "sub-01" / "log" / s.run_id / "cl-bidsapp.toml"
    assert Settings.from_toml(path.read_text()).threshold == 0.5

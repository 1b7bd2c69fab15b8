"""Group tables from participant outputs: every planned image accounted for, lesions streamed.

The outputs are written by :mod:`cl_bidsapp.group.testing` (records and lesion tables as the
participant level writes them, no images), so these tests take a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cl_bidsapp.config import Settings
from cl_bidsapp.core.lesions import LESION_TABLE_COLUMNS
from cl_bidsapp.errors import MissingInputError
from cl_bidsapp.group import run_group_level
from cl_bidsapp.group.records import record_path
from cl_bidsapp.group.testing import record, work_item, write_table_outputs
from cl_bidsapp.io import write_json

LESIONS = {"sub-01_UNIT1": 3, "sub-02_ses-a_acq-mprage_T1w": 0, "sub-02_ses-b_acq-mprage_T1w": 5}


@pytest.fixture()
def dataset(tmp_path):
    """Three processed images, one failed, one never run; participants.tsv with sites."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "participant_id\tsite\tage\nsub-01\tBasel\t40\nsub-02\tLausanne\t35\n"
        "sub-03\tBasel\t50\n")
    items = [work_item(name) for name in LESIONS]
    for seed, item in enumerate(items):
        write_table_outputs(out, item, n_lesions=LESIONS[item.bids_name], seed=seed)
    failed = work_item("sub-03_UNIT1")
    write_json(record_path(out, "03", failed.bids_name), record(
        failed, {}, lesion_count=0, total_volume_mm3=0, status="failed"))
    never = work_item("sub-04_T1w")
    items += [failed, never]
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", nprocs=1)
    return settings, items


def _run(settings, items):
    return run_group_level(settings, items, {"Name": "test"}, frequency_map=False)


def _images(settings):
    return pd.read_csv(settings.output_dir / "group" / "group_images.tsv", sep="\t",
                       keep_default_na=False, dtype=str).set_index("bids_name")


def test_every_planned_image_has_a_row_with_its_status_and_site(dataset):
    settings, items = dataset
    assert _run(settings, items) == 0
    images = _images(settings)
    assert list(images.index) == [it.bids_name for it in items]
    assert dict(images["status"]) == {"sub-01_UNIT1": "ok", "sub-02_ses-a_acq-mprage_T1w": "ok",
                                      "sub-02_ses-b_acq-mprage_T1w": "ok",
                                      "sub-03_UNIT1": "failed", "sub-04_T1w": "missing"}
    assert images.loc["sub-02_ses-b_acq-mprage_T1w", "site"] == "Lausanne"
    assert images.loc["sub-02_ses-b_acq-mprage_T1w", "session_id"] == "ses-b"
    assert images.loc["sub-02_ses-b_acq-mprage_T1w", "acquisition"] == "mprage"
    assert images.loc["sub-01_UNIT1", "contrast"] == "MP2RAGE"
    for name, n in LESIONS.items():
        assert int(images.loc[name, "lesion_count"]) == n
    assert "failed" in images.loc["sub-03_UNIT1", "qc_flags"]
    assert "something went wrong" in images.loc["sub-03_UNIT1", "qc_reasons"]
    assert "missing_outputs" in images.loc["sub-04_T1w", "qc_flags"]
    assert "sub-04/log/sub-04_T1w_record.json" in images.loc["sub-04_T1w", "qc_reasons"]


def test_lesion_rows_are_the_per_image_tables_with_identifiers(dataset):
    settings, items = dataset
    _run(settings, items)
    lesions = pd.read_csv(settings.output_dir / "group" / "group_lesions.tsv", sep="\t")
    assert len(lesions) == sum(LESIONS.values())
    for name, n in LESIONS.items():
        mine = lesions[lesions["bids_name"] == name].reset_index(drop=True)
        assert len(mine) == n
        if n:
            table = next(settings.output_dir.rglob(name.rsplit("_", 1)[0] + "_seg-CL_dseg.tsv"))
            original = pd.read_csv(table, sep="\t")
            pd.testing.assert_frame_equal(mine[list(LESION_TABLE_COLUMNS)], original,
                                          check_dtype=False)
    assert set(lesions.loc[lesions["participant_id"] == "sub-01", "site"]) == {"Basel"}


def test_sidecars_describe_exactly_the_columns_written(dataset):
    settings, items = dataset
    _run(settings, items)
    group = settings.output_dir / "group"
    for table in ("group_images", "group_lesions"):
        header = (group / f"{table}.tsv").read_text().splitlines()[0].split("\t")
        sidecar = json.loads((group / f"{table}.json").read_text())
        assert list(sidecar) == header
        assert all("Description" in entry for entry in sidecar.values())


def test_a_hand_edited_lesion_table_flags_the_image_and_leaves_its_rows_out(dataset):
    settings, items = dataset
    table = next(settings.output_dir.rglob("sub-02_ses-b_acq-mprage_seg-CL_dseg.tsv"))
    frame = pd.read_csv(table, sep="\t", keep_default_na=False, dtype=str)
    frame.loc[0, "n_voxels"] = "1"            # the largest lesion now the smallest
    frame.to_csv(table, sep="\t", index=False)
    assert _run(settings, items) == 0
    images = _images(settings)
    flagged = images.loc["sub-02_ses-b_acq-mprage_T1w"]
    assert "lesion_table_invalid" in flagged["qc_flags"]
    assert "sub-02_ses-b_acq-mprage_seg-CL_dseg.tsv" in flagged["qc_reasons"]
    lesions = pd.read_csv(settings.output_dir / "group" / "group_lesions.tsv", sep="\t")
    assert "sub-02_ses-b_acq-mprage_T1w" not in set(lesions["bids_name"])
    assert len(lesions) == LESIONS["sub-01_UNIT1"]


@pytest.mark.parametrize("damage", ["truncated", "not a table", "extra lesion"])
def test_damaged_lesion_tables_never_crash_the_group_level(dataset, damage):
    settings, items = dataset
    table = next(settings.output_dir.rglob("sub-01_seg-CL_dseg.tsv"))
    lines = table.read_text().splitlines()
    if damage == "truncated":
        table.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10] + "\n")
    elif damage == "not a table":
        table.write_text("this is not a lesion table\n")
    else:
        cells = lines[-1].split("\t")
        cells[0] = str(len(lines))
        table.write_text("\n".join(lines + ["\t".join(cells)]) + "\n")
    assert _run(settings, items) == 0
    assert "lesion_table_invalid" in _images(settings).loc["sub-01_UNIT1", "qc_flags"]


def test_a_deleted_output_is_reported_by_name(dataset):
    settings, items = dataset
    table = next(settings.output_dir.rglob("sub-01_seg-CL_dseg.tsv"))
    table.unlink()
    _run(settings, items)
    row = _images(settings).loc["sub-01_UNIT1"]
    assert "missing_outputs" in row["qc_flags"]
    assert "sub-01/anat/sub-01_seg-CL_dseg.tsv" in row["qc_reasons"]


def test_no_participant_outputs_at_all_is_exit_66_naming_the_folder(tmp_path):
    out = tmp_path / "empty-out"
    out.mkdir()
    settings = Settings(bids_dir=tmp_path, output_dir=out)
    with pytest.raises(MissingInputError) as caught:
        _run(settings, [work_item("sub-01_T1w")])
    assert caught.value.exit_code == 66
    assert str(out) in str(caught.value)
    assert not (out / "group").exists()


def test_without_participants_tsv_the_site_is_empty(dataset):
    settings, items = dataset
    (settings.bids_dir / "participants.tsv").unlink()
    _run(settings, items)
    assert set(_images(settings)["site"]) == {"n/a"}


def test_the_report_links_flagged_images_to_their_subject_reports(dataset):
    settings, items = dataset
    _run(settings, items)
    html = (settings.output_dir / "group" / "group_report.html").read_text()
    assert 'href="../sub-03.html"' in html and "sub-03_UNIT1" in html
    assert "The lesion frequency map is missing" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3", "")


def test_reruns_give_the_same_tables(dataset):
    settings, items = dataset
    _run(settings, items)
    group = settings.output_dir / "group"
    first = {p.name: p.read_bytes() for p in group.glob("*.tsv")}
    _run(settings, items)
    assert {p.name: p.read_bytes() for p in group.glob("*.tsv")} == first
    assert not list(Path(settings.output_dir).rglob(".cltmp-*"))

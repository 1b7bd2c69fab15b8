"""The group level on damaged inputs: hand-edited records and awkward participants.tsv files.

Records and lesion tables are written by :mod:`cl_bidsapp.group.testing` (no images), so the
group level runs in about a second.
"""
from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from cl_bidsapp.config import Settings
from cl_bidsapp.group import run_group_level
from cl_bidsapp.group.records import read_participants, record_path, summarise_image
from cl_bidsapp.group.testing import FAKE_MODEL, record, work_item, write_table_outputs
from cl_bidsapp.io import write_json
from cl_bidsapp.models.card import sha256_bytes


def _set(path: str, value):
    """An edit of a record: ``path`` is a field (``outputs``) or a member (``model.SHA256``)."""
    def edit(data):
        *parents, last = path.split(".")
        target = data
        for name in parents:
            target = target[name]
        target[last] = value
    return edit


#: image -> (edit of its record, the field a user must be told about)
WRONG_TYPES = {
    "sub-02_UNIT1": (_set("outputs", "a string"), "outputs"),
    "sub-03_UNIT1": (_set("model", "a string"), "model"),
    "sub-04_UNIT1": (_set("lesions", [4, 184]), "lesions"),
    "sub-05_UNIT1": (_set("model.SHA256", ["ab" * 32]), "model.SHA256"),
    "sub-06_UNIT1": (_set("warnings", "check the brain mask"), "warnings"),
    "sub-07_UNIT1": (_set("brain", 1200), "brain"),
    "sub-08_UNIT1": (_set("outputs.lesion_table", None), "outputs.lesion_table"),
    "sub-09_UNIT1": (_set("settings", [0.5]), "settings"),
    "sub-10_UNIT1": (_set("ood", "outside"), "ood"),
    "sub-11_UNIT1": (_set("lesions.count", "three"), "lesions.count"),
    "sub-12_UNIT1": (_set("model.IsDemo", "false"), "model.IsDemo"),
    "sub-13_UNIT1": (_set("masking_method", {"name": "uni"}), "masking_method"),
}


def _images(out):
    return pd.read_csv(out / "group" / "group_images.tsv", sep="\t", keep_default_na=False,
                       dtype=str).set_index("bids_name")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Group level run over one good record, records with wrong field types and odd values."""
    root = tmp_path_factory.mktemp("damaged")
    out = root / "out"
    names = ["sub-01_UNIT1", *WRONG_TYPES, "sub-20_UNIT1", "sub-21_UNIT1"]
    items = [work_item(name) for name in names]
    paths = {it.bids_name: write_table_outputs(out, it, n_lesions=2, seed=i)
             for i, it in enumerate(items)}
    for name, (edit, _) in WRONG_TYPES.items():
        data = json.loads(paths[name].read_text())
        edit(data)
        write_json(paths[name], data)
    # values of the right type that used to stop the group level
    data = json.loads(paths["sub-20_UNIT1"].read_text())
    data["ood"] = {"score": None, "threshold": 2.0, "verdict": "outside"}
    write_json(paths["sub-20_UNIT1"], data)
    data = json.loads(paths["sub-21_UNIT1"].read_text())
    data["lesions"]["count"] = float("inf")
    paths["sub-21_UNIT1"].write_text(json.dumps(data))  # written as Infinity
    settings = Settings(bids_dir=root / "bids", output_dir=out, work_dir=root / "work",
                        nprocs=1)
    code = run_group_level(settings, items, {"Name": "test"}, frequency_map=False)
    return code, _images(out)


def test_damaged_records_do_not_stop_the_group_level(damaged):
    code, images = damaged
    assert code == 0
    assert images.loc["sub-01_UNIT1", "status"] == "ok"
    assert images.loc["sub-01_UNIT1", "lesion_count"] == "2"
    assert images.loc["sub-01_UNIT1", "qc_flags"] == "n/a"


@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_a_field_of_the_wrong_type_flags_the_image_naming_record_and_field(damaged, name):
    _, images = damaged
    row = images.loc[name]
    field = WRONG_TYPES[name][1]
    assert row["status"] == "missing"
    assert row["qc_flags"] == "missing_outputs"
    assert f"sub-{name[4:6]}/log/{name}_record.json" in row["qc_reasons"]
    assert f"'{field}'" in row["qc_reasons"]
    assert "rerun the participant level" in row["qc_reasons"]


def test_an_outside_verdict_without_a_score_is_unknown(damaged):
    _, images = damaged
    row = images.loc["sub-20_UNIT1"]
    assert row["status"] == "ok"
    assert row["ood_verdict"] == "unknown"
    assert "outside_domain" not in row["qc_flags"]


def test_an_infinite_lesion_count_is_left_missing(damaged):
    _, images = damaged
    row = images.loc["sub-21_UNIT1"]
    assert row["status"] == "ok" and row["lesion_count"] == "n/a"


def test_a_failed_record_keeps_its_failure_unless_what_it_shows_is_damaged(tmp_path):
    failed = work_item("sub-01_UNIT1")
    data = record(failed, {}, lesion_count=0, total_volume_mm3=0, status="failed")
    data["outputs"] = "not read for a failed image"
    write_json(record_path(tmp_path, "01", failed.bids_name), data)
    summary = summarise_image(failed, tmp_path, {})
    assert (summary.status, summary.flag_codes) == ("failed", ["failed"])
    assert "something went wrong" in summary.row()["qc_reasons"]

    data["model"] = ["fake-model"]
    write_json(record_path(tmp_path, "01", failed.bids_name), data)
    summary = summarise_image(failed, tmp_path, {})
    assert (summary.status, summary.flag_codes) == ("missing", ["missing_outputs"])
    assert "'model' is a list, not an object" in summary.row()["qc_reasons"]


# -- participants.tsv --------------------------------------------------------------------


def _participants(tmp_path, text: str, encoding="utf-8"):
    bids = tmp_path / "bids"
    bids.mkdir(exist_ok=True)
    (bids / "participants.tsv").write_text(text, encoding=encoding)
    return bids


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_excel_byte_order_mark_does_not_hide_the_sites(tmp_path, caplog):
    bids = _participants(tmp_path, "participant_id\tsite\nsub-01\tBasel\nsub-02\tLausanne\n",
                         encoding="utf-8-sig")
    assert (bids / "participants.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    with caplog.at_level(logging.WARNING):
        participants = read_participants(bids)
    assert participants["01"]["site"] == "Basel" and participants["02"]["site"] == "Lausanne"
    assert _warnings(caplog) == []


def test_a_short_row_is_warned_about_and_its_missing_values_are_na(tmp_path, caplog):
    bids = _participants(tmp_path, "participant_id\tsite\tprotocol\n"
                                   "sub-01\tBasel\t3T-MP2RAGE\nsub-02\tLausanne\n")
    with caplog.at_level(logging.WARNING):
        participants = read_participants(bids)
    assert participants["01"]["protocol"] == "3T-MP2RAGE"
    assert participants["02"]["site"] == "Lausanne"
    assert participants["02"]["protocol"] is None
    [message] = _warnings(caplog)
    assert str(bids / "participants.tsv") in message and "line 3" in message
    assert "protocol" in message and "n/a" in message


def test_a_long_row_is_warned_about_and_its_extra_values_ignored(tmp_path, caplog):
    bids = _participants(tmp_path, "participant_id\tsite\nsub-01\tBasel\nsub-02\tLau\tsanne\n")
    with caplog.at_level(logging.WARNING):
        participants = read_participants(bids)
    assert participants["02"] == {"participant_id": "sub-02", "site": "Lau"}
    [message] = _warnings(caplog)
    assert str(bids / "participants.tsv") in message and "line 3" in message
    assert "'sanne'" in message and "ignored" in message


def test_a_file_without_participant_id_is_warned_about(tmp_path, caplog):
    bids = _participants(tmp_path, "subject\tsite\nsub-01\tBasel\n")
    with caplog.at_level(logging.WARNING):
        assert read_participants(bids) == {}
    [message] = _warnings(caplog)
    assert str(bids / "participants.tsv") in message and "participant_id" in message


def test_na_and_empty_cells_are_missing_values(tmp_path):
    bids = _participants(tmp_path, "participant_id\tsite\tprotocol\n"
                                   "sub-01\tn/a\t\nsub-02\t\tn/a\nsub-03\tBasel\t3T-MPRAGE\n")
    participants = read_participants(bids)
    for label in ("01", "02"):
        assert participants[label]["site"] is None and participants[label]["protocol"] is None
    summary = summarise_image(work_item("sub-01_UNIT1"), tmp_path / "out", participants)
    assert summary.values["site"] is None and summary.protocol is None


def test_a_protocol_of_na_gives_an_unknown_domain_not_out_of_domain(tmp_path):
    """End to end: the model card lists training protocols; sub-02's protocol is n/a."""
    out, models = tmp_path / "out", tmp_path / "models"
    bids = _participants(tmp_path, "participant_id\tsite\tprotocol\n"
                                   "sub-01\tBasel\t3T-MP2RAGE\nsub-02\tn/a\tn/a\n"
                                   "sub-03\tLausanne\t3T-MPRAGE\n")
    card = json.dumps({"name": "m", "input": {"contrasts": ["UNIT1"]},
                       "training": {"protocols": ["3T-MP2RAGE"]}}).encode()
    (models / "m").mkdir(parents=True)
    (models / "m" / "cl_model.json").write_bytes(card)
    model = FAKE_MODEL | {"SHA256": sha256_bytes(card)}
    items = [work_item(f"sub-0{i}_UNIT1") for i in (1, 2, 3)]
    for seed, item in enumerate(items):
        write_table_outputs(out, item, n_lesions=1, seed=seed, model=model)
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", nprocs=1,
                        models_dir=models)
    assert run_group_level(settings, items, {"Name": "test"}, frequency_map=False) == 0
    images = _images(out)
    assert dict(images["domain"]) == {"sub-01_UNIT1": "in-domain", "sub-02_UNIT1": "unknown",
                                      "sub-03_UNIT1": "out-of-domain"}
    assert images.loc["sub-02_UNIT1", "site"] == "n/a"


def test_what_participants_tsv_could_not_give_is_said_in_the_group_report(tmp_path):
    out = tmp_path / "out"
    bids = _participants(tmp_path, "participant_id\tsite\nsub-01\tBasel\nsub-02\n")
    item = work_item("sub-01_UNIT1")
    write_table_outputs(out, item, n_lesions=1, seed=0)
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", nprocs=1)
    assert run_group_level(settings, [item], {"Name": "test"}, frequency_map=False) == 0
    html = (out / "group" / "group_report.html").read_text()
    assert "participants.tsv, line 3: 1 value(s) where the header has 2 column(s)" in html

"""The participant level end to end through the command line, on 2 mm phantoms (CPU)."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cl_bidsapp import __version__
from cl_bidsapp.core.lesions import check_lesion_table
from cl_bidsapp.io import leftover_temporaries

pytestmark = pytest.mark.slow

EXPECTED_PER_IMAGE = [
    "anat/{s}_desc-brain_mask.json", "anat/{s}_desc-brain_mask.nii.gz",
    "anat/{s}_desc-preproc_UNIT1.json", "anat/{s}_desc-preproc_UNIT1.nii.gz",
    "anat/{s}_label-CL_mask.json", "anat/{s}_label-CL_mask.nii.gz",
    "anat/{s}_label-CL_probseg.json", "anat/{s}_label-CL_probseg.nii.gz",
    "anat/{s}_seg-CL_dseg.json", "anat/{s}_seg-CL_dseg.nii.gz", "anat/{s}_seg-CL_dseg.tsv",
    "log/{s}_UNIT1_record.json",
]


def cli(*args, check_code: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(["cl-bidsapp", *map(str, args)], capture_output=True, text=True,
                          check=False)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if check_code is not None:
        assert proc.returncode == check_code, proc.stderr[-3000:]
    return proc


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def first_run(phantom_2mm, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "cl"
    work = tmp_path_factory.mktemp("work")
    args = (phantom_2mm, out, "participant", "-w", work, "--model", tiny_model, "--no-tta",
            "--nprocs", "2")
    t0 = time.monotonic()
    proc = cli(*args)
    first = time.monotonic() - t0
    return out, work, args, proc, first


def test_every_expected_file_exists(first_run):
    out, _, _, _, _ = first_run
    files = _files(out)
    for sub in ("01", "02"):
        for pattern in EXPECTED_PER_IMAGE:
            assert f"sub-{sub}/" + pattern.format(s=f"sub-{sub}") in files
    for top in ("dataset_description.json", ".bidsignore", "descriptions.tsv"):
        assert top in files
    assert any(f.startswith("sub-01/log/") and f.endswith("/cl-bidsapp.toml") for f in files)
    assert leftover_temporaries(out) == []


def test_outputs_on_source_grid_and_tables_match_maps(first_run, phantom_2mm):
    out, _, _, _, _ = first_run
    for sub in ("01", "02"):
        source = nib.load(phantom_2mm / f"sub-{sub}/anat/sub-{sub}_UNIT1.nii.gz")
        anat = out / f"sub-{sub}" / "anat"
        prob = nib.load(anat / f"sub-{sub}_label-CL_probseg.nii.gz")
        dseg = nib.load(anat / f"sub-{sub}_seg-CL_dseg.nii.gz")
        mask = nib.load(anat / f"sub-{sub}_label-CL_mask.nii.gz")
        for img in (prob, dseg, mask):
            assert img.shape == source.shape
            assert np.allclose(img.affine, source.affine, atol=1e-4)
        p = prob.get_fdata()
        assert prob.get_data_dtype() == np.float32 and p.min() >= 0 and p.max() <= 1
        instances = np.asarray(dseg.dataobj)
        assert np.array_equal(instances > 0, np.asarray(mask.dataobj) > 0)
        table = pd.read_csv(anat / f"sub-{sub}_seg-CL_dseg.tsv", sep="\t")
        check_lesion_table(table, instances, dseg.affine)
        # two folds ran: each lesion has a fold-disagreement value
        if len(table):
            assert table["uncertainty_ddu"].notna().all()


def test_sidecars_and_record_carry_provenance(first_run, tiny_model):
    out, _, _, _, _ = first_run
    anat = out / "sub-01" / "anat"
    side = json.loads((anat / "sub-01_label-CL_mask.json").read_text())
    card_sha = __import__("hashlib").sha256((tiny_model / "cl_model.json").read_bytes())
    assert side["Model"]["SHA256"] == card_sha.hexdigest()
    assert side["Threshold"] == 0.5 and side["Connectivity"] == 26
    assert side["Folds"] == ["0", "1"] and side["TestTimeAugmentation"] is False
    assert side["Sources"] == ["bids::sub-01/anat/sub-01_label-CL_probseg.nii.gz"]
    pre = json.loads((anat / "sub-01_desc-preproc_UNIT1.json").read_text())
    assert pre["Sources"] == ["bids:raw:sub-01/anat/sub-01_UNIT1.nii.gz"]
    record = json.loads((out / "sub-01/log/sub-01_UNIT1_record.json").read_text())
    assert record["status"] == "ok" and record["masking_method"] == "robust-combination"
    assert record["software"]["cl-bidsapp"] == __version__ and "nnunetv2" in record["software"]
    assert set(record["seconds"]) == {"prepare", "skullstrip", "model_input", "segment",
                                      "lesions"}
    assert 900 < record["brain"]["brain_volume_ml"] < 2000
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    # the instance map and its table share one sidecar: image provenance + table columns
    dseg = json.loads((anat / "sub-01_seg-CL_dseg.json").read_text())
    assert dseg["Model"]["SHA256"] == card_sha.hexdigest() and "Description" in dseg
    table = pd.read_csv(anat / "sub-01_seg-CL_dseg.tsv", sep="\t")
    assert set(table.columns) <= set(dseg), "every table column is described"


def test_rerun_uses_the_cache(first_run):
    out, _, args, _, first = first_run
    t0 = time.monotonic()
    proc = cli(*args)
    second = time.monotonic() - t0
    print(f"\nfirst run {first:.1f} s, rerun from cache {second:.1f} s")
    assert "image(s) processed" in proc.stderr
    # nothing but the derivatives writer ran again: no stage reports work
    assert "nnU-Net segmentation ..." not in proc.stderr
    assert "brain extraction ..." not in proc.stderr


def test_one_broken_subject_does_not_stop_the_other(phantom_2mm, tiny_model, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(phantom_2mm, bids)
    bad = bids / "sub-02/anat/sub-02_UNIT1.nii.gz"
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(data[: len(data) // 3]))  # truncated volume
    out = tmp_path / "out"
    proc = cli(bids, out, "participant", "-w", tmp_path / "w", "--model", tiny_model,
               "--no-tta", "--skip-bids-validation", check_code=65)
    assert "1 of 2 image(s) failed" in proc.stderr
    assert "sub-02 sub-02_UNIT1" in proc.stderr and "sub-02_UNIT1.nii.gz" in proc.stderr
    assert (out / "sub-01/anat/sub-01_seg-CL_dseg.nii.gz").is_file()
    assert not (out / "sub-02/anat").exists()
    record = json.loads((out / "sub-02/log/sub-02_UNIT1_record.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 65
    assert record["software"]["cl-bidsapp"] == __version__
    assert (out / record["crash_file"]).is_file()
    assert leftover_temporaries(out) == []

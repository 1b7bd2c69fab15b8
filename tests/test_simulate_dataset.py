"""cl-bidsapp-simulate writes a complete, valid, reproducible BIDS dataset with ground truth."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from cl_bidsapp.errors import OutputError, UsageError
from cl_bidsapp.simulate import simulate_dataset
from cl_bidsapp.simulate.cli import main

ARGS = dict(n_subjects=2, n_sessions=2, protocols=("3T-MP2RAGE", "3T-MPRAGE"), voxel_size=2.0,
            lesion_mean=6.0, seed=11)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("sim") / "bids", **ARGS)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_names_and_sidecars(dataset):
    anat = dataset / "sub-01" / "ses-02" / "anat"
    for suffix in ("inv-1_MP2RAGE", "inv-2_MP2RAGE", "UNIT1"):
        assert (anat / f"sub-01_ses-02_{suffix}.nii.gz").is_file()
        assert (anat / f"sub-01_ses-02_{suffix}.json").is_file()
    assert sorted(p.name for p in (dataset / "sub-02" / "ses-01" / "anat").iterdir()) == [
        "sub-02_ses-01_T1w.json", "sub-02_ses-01_T1w.nii.gz"]
    inv2 = json.loads((anat / "sub-01_ses-02_inv-2_MP2RAGE.json").read_text())
    for key in ("RepetitionTimePreparation", "RepetitionTimeExcitation", "InversionTime",
                "FlipAngle", "NumberShots", "MagneticFieldStrength"):
        assert key in inv2
    assert inv2["InversionTime"] == 2.5
    t1w = json.loads((dataset / "sub-02/ses-01/anat/sub-02_ses-01_T1w.json").read_text())
    assert t1w["InversionTime"] == 0.9 and t1w["PulseSequenceType"] == "MPRAGE"
    assert not list(dataset.rglob(".cltmp-*"))


def test_participants_and_description_say_simulated(dataset):
    lines = (dataset / "participants.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["participant_id", "site", "protocol"]
    assert lines[1].split("\t") == ["sub-01", "site01", "3T-MP2RAGE"]
    assert lines[2].split("\t") == ["sub-02", "site02", "3T-MPRAGE"]
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Name"] == "cl-bidsapp-simulate"
    assert description["GeneratedBy"][0]["Version"]
    assert "SIMULATED" in description["Name"].upper()
    assert "simulated" in (dataset / "README").read_text().lower()
    reference = json.loads((dataset / "derivatives/reference/dataset_description.json")
                           .read_text())
    assert reference["DatasetType"] == "derivative"


@pytest.mark.parametrize("stem, source", [
    ("sub-01/ses-01/anat/sub-01_ses-01", "UNIT1"),
    ("sub-02/ses-02/anat/sub-02_ses-02", "T1w"),
])
def test_reference_masks_share_the_source_grid(dataset, stem, source):
    ref = dataset / "derivatives" / "reference"
    image = nib.load(dataset / f"{stem}_{source}.nii.gz")
    mask = nib.load(ref / f"{stem}_label-CL_mask.nii.gz")
    assert mask.shape == image.shape
    assert np.allclose(mask.affine, image.affine)
    assert mask.get_data_dtype() == np.uint8
    values = np.asarray(mask.dataobj)
    assert set(np.unique(values)) <= {0, 1}
    for name in ("label-GM_probseg", "label-WM_probseg", "label-CSF_probseg",
                 "desc-brain_mask", "seg-CL_dseg"):
        other = nib.load(ref / f"{stem}_{name}.nii.gz")
        assert other.shape == image.shape and np.allclose(other.affine, image.affine)
    gm = nib.load(ref / f"{stem}_label-GM_probseg.nii.gz").get_fdata()
    assert 0.0 <= gm.min() and gm.max() <= 1.0 + 1e-6 and gm.max() > 0.9
    # one table row per connected lesion (26-connectivity), sizes as in the mask
    table = (ref / f"{stem}_label-CL_lesions.tsv").read_text().splitlines()
    header = table[0].split("\t")
    for column in ("lesion_id", "n_voxels", "volume_mm3", "type", "centroid_x"):
        assert column in header
    rows = [dict(zip(header, line.split("\t"))) for line in table[1:]]
    _, n = ndi.label(values, np.ones((3, 3, 3)))
    assert n == len(rows)
    assert sum(int(r["n_voxels"]) for r in rows) == int(values.sum())
    assert {r["type"] for r in rows} <= {"intracortical", "leukocortical"}
    assert set(json.loads((ref / f"{stem}_label-CL_lesions.json").read_text())) >= set(header)


def test_lesions_keep_their_place_across_sessions(dataset):
    ref = dataset / "derivatives" / "reference" / "sub-01"
    counts = [len((ref / f"ses-0{s}/anat/sub-01_ses-0{s}_label-CL_lesions.tsv")
                  .read_text().splitlines()) - 1 for s in (1, 2)]
    assert counts[0] > 0
    assert abs(counts[0] - counts[1]) <= 1
    masks = [nib.load(ref / f"ses-0{s}/anat/sub-01_ses-0{s}_label-CL_mask.nii.gz")
             for s in (1, 2)]
    # different head positions in the scanner, so the voxels differ
    assert not np.array_equal(np.asarray(masks[0].dataobj), np.asarray(masks[1].dataobj))


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    again = simulate_dataset(tmp_path / "again", **ARGS)
    assert _digest(again) == _digest(dataset)
    other = simulate_dataset(tmp_path / "other", **{**ARGS, "n_sessions": 1, "n_subjects": 1,
                                                     "seed": 12})
    first = dataset / "sub-01/ses-01/anat/sub-01_ses-01_UNIT1.nii.gz"
    assert (other / "sub-01/anat/sub-01_UNIT1.nii.gz").read_bytes() != first.read_bytes()


def test_sessions_simulated_in_parallel_give_the_same_bytes(dataset, tmp_path, caplog):
    with caplog.at_level("INFO", logger="cl_bidsapp.simulate.dataset"):
        parallel = simulate_dataset(tmp_path / "parallel", **ARGS, nprocs=2)
    assert _digest(parallel) == _digest(dataset)
    assert "[4/4]" in caplog.text                     # progress counts every session
    assert not list(parallel.glob(".simulating-*"))


def test_a_simulation_process_that_dies_is_a_temporary_failure_not_a_traceback():
    import os

    from cl_bidsapp.errors import TemporaryFailure
    from cl_bidsapp.simulate.dataset import _run_jobs

    with pytest.raises(TemporaryFailure, match="most likely out of memory") as caught:
        list(_run_jobs([3, 3], 2, work=os._exit))      # each worker exits at once, as if killed
    assert caught.value.exit_code == 75 and "lower --nprocs (now 2" in str(caught.value)


def test_bids_validator_accepts_the_dataset(dataset):
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    result = subprocess.run([exe, str(dataset), "--recursive", "--format", "json"],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert not errors, errors[:5]


def test_rewrites_its_own_dataset_but_refuses_other_folders(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        simulate_dataset(foreign, n_subjects=1, voxel_size=2.0)
    assert (foreign / "notes.txt").read_text() == "mine"
    own = simulate_dataset(tmp_path / "own", n_subjects=2, voxel_size=2.0, lesion_mean=0)
    simulate_dataset(own, n_subjects=1, voxel_size=2.0, lesion_mean=0)
    assert not (own / "sub-02").exists()
    assert not (own / "derivatives/reference/sub-02").exists()


def test_an_interrupted_run_leaves_the_earlier_dataset_as_it_was(tmp_path, monkeypatch):
    import cl_bidsapp.simulate.dataset as dataset_module

    own = simulate_dataset(tmp_path / "own", n_subjects=2, voxel_size=2.0, lesion_mean=0)
    before = sorted(p.relative_to(own).as_posix() for p in own.rglob("*"))
    real = dataset_module.simulate_session
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:          # Ctrl-C while the second subject is simulated
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "simulate_session", interrupted)
    with pytest.raises(KeyboardInterrupt):
        simulate_dataset(own, n_subjects=3, voxel_size=2.0, lesion_mean=0, seed=5)
    assert sorted(p.relative_to(own).as_posix() for p in own.rglob("*")) == before
    monkeypatch.setattr(dataset_module, "simulate_session", real)
    # a killed run's staging folder (no cleanup) does not block the next run either
    (own / ".simulating-killed" / "sub-01").mkdir(parents=True)
    simulate_dataset(own, n_subjects=1, voxel_size=2.0, lesion_mean=0)
    assert sorted(p.name for p in own.iterdir() if p.name.startswith(".")) == []
    first = tmp_path / "first"
    (first / ".simulating-killed").mkdir(parents=True)   # the very first run was killed
    simulate_dataset(first, n_subjects=1, voxel_size=2.0, lesion_mean=0)
    assert (first / "sub-01").is_dir()


def test_a_folder_that_takes_no_new_file_is_refused_before_anything_is_deleted(
        tmp_path, monkeypatch):
    import errno
    import tempfile

    own = simulate_dataset(tmp_path / "own", n_subjects=1, voxel_size=2.0, lesion_mean=0)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(own))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError, match="cannot create files in this folder") as err:
        simulate_dataset(own, n_subjects=1, voxel_size=2.0, lesion_mean=0)
    assert err.value.exit_code == 73 and err.value.path == str(own)
    assert (own / "sub-01" / "anat" / "sub-01_UNIT1.nii.gz").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"protocols": ("1.5T-FLAIR",)}, "unknown protocol"),
    ({"n_subjects": 0}, "n-subjects"),
    ({"voxel_size": 0.1}, "voxel-size"),
    ({"lesion_contrast": -1}, "lesion-contrast"),
    ({"nprocs": 0}, "nprocs"),
])
def test_bad_arguments_are_usage_errors(tmp_path, kwargs, message):
    with pytest.raises(UsageError, match=message):
        simulate_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--n-subjects", "1", "--voxel-size", "2", "--protocol",
                 "7T-MP2RAGE", "--seed", "1", "--lesion-mean", "2"]) == 0
    sidecar = json.loads((out / "sub-01/anat/sub-01_inv-1_MP2RAGE.json").read_text())
    assert sidecar["MagneticFieldStrength"] == 7.0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main([str(tmp_path / "taken"), "--voxel-size", "2"]) == 73
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "y"), "--protocol", "9T-FOO"])
    assert exc.value.code == 64

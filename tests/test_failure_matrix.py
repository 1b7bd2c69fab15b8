"""The failure matrix: every bad input, model and fault gets a clear message naming the file,
the DESIGN.md exit code, no traceback on the console, an unchanged bids_dir and no
half-written derivative in the output folder.

The input cases run as one participant run over a dataset with one subject per case (each
image fails or succeeds on its own; the record says how); the run-level cases each run the
command line once.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cl_bidsapp.io import TMP_PREFIX, leftover_temporaries
from tests.bids_builders import make_dataset
from tests.matrix_builders import CASES, build_matrix_dataset

pytestmark = pytest.mark.slow
FAST = ("--folds", "0", "--no-tta", "--nprocs", "2")


def checksum_tree(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run_app(*args, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(["cl-bidsapp", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout, check=False)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    return proc


def assert_no_half_written(out: Path) -> None:
    assert leftover_temporaries(out) == [] if out.exists() else True
    for path in (out.rglob("*.nii.gz") if out.exists() else []):
        np.asarray(nib.load(path).dataobj)  # every derivative reads completely
    for path in (out.rglob("*.json") if out.exists() else []):
        json.loads(path.read_text())


# -- input images: one run, one subject per case -------------------------------------------

@pytest.fixture(scope="module")
def matrix(phantom_2mm, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    bids = build_matrix_dataset(phantom_2mm, root / "bids")
    before = checksum_tree(bids)
    out = root / "out"
    proc = run_app(bids, out, "participant", "-w", root / "work", "--model", tiny_model,
                   "--skip-bids-validation", *FAST)
    return bids, before, out, proc


@pytest.mark.parametrize("label", sorted(CASES))
def test_input_case(matrix, label):
    bids, before, out, proc = matrix
    _, status, code, text = CASES[label]
    record = json.loads((out / f"sub-{label}/log/sub-{label}_UNIT1_record.json").read_text())
    assert record["status"] == status
    if status == "failed":
        assert record["exit_code"] == code
        assert text in record["error"]
        assert f"sub-{label}_" in record["error"]  # names the damaged file
        if label == "invgrid":   # the hint leaves out the broken INV2, not INV1
            assert '{"inv2": {"acquisition": "none"}}' in record["error"]
        # the run's summary lists the image with its problem
        assert any(ln.startswith(f"  sub-{label} sub-{label}_UNIT1:")
                   for ln in proc.stderr.splitlines())
        assert text in proc.stderr
        assert not (out / f"sub-{label}" / "anat").exists()  # nothing half-written
    else:
        assert (out / f"sub-{label}/anat/sub-{label}_seg-CL_dseg.nii.gz").is_file()
        if text:
            assert any(text in w for w in record["warnings"]), record["warnings"]
            # said on the console as the stage finishes, not only in the record and report
            assert any(f"sub-{label}_UNIT1: " in ln and text in ln
                       for ln in proc.stderr.splitlines()), proc.stderr[-3000:]


def test_matrix_run_exit_code_bids_dir_and_outputs(matrix):
    bids, before, out, proc = matrix
    n_failed = sum(1 for c in CASES.values() if c[1] == "failed")
    assert f"{n_failed} of {len(CASES)} image(s) failed" in proc.stderr
    assert proc.returncode == 65  # every failure here is bad input data
    assert checksum_tree(bids) == before
    assert_no_half_written(out)
    assert (out / "sub-empty.html").is_file()  # failed subjects get a page with the error


# -- run-level cases: the command line once each ---------------------------------------------

@pytest.fixture
def small(phantom_2mm, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(phantom_2mm, bids)
    return bids


def _tampered_model(tiny_model, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_model, bad)
    ckpt = bad / "fold_0" / "checkpoint_final.pth"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    return bad


def _zip_with(tmp_path, name, entries):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data in entries:
            zf.writestr(entry, data)
    return path


def _card_missing_field(tiny_model, tmp_path):
    bad = tmp_path / "nocard"
    shutil.copytree(tiny_model, bad)
    card = json.loads((bad / "cl_model.json").read_text())
    del card["licence"]
    (bad / "cl_model.json").write_text(json.dumps(card))
    return bad


def _two_channel_model(tiny_model, tmp_path):
    from cl_bidsapp.models import card as cards

    bad = tmp_path / "twochannel"
    shutil.copytree(tiny_model, bad)
    ds = json.loads((bad / "dataset.json").read_text())
    ds["channel_names"] = {"0": "T1w", "1": "FLAIR"}
    (bad / "dataset.json").write_text(json.dumps(ds))
    card = json.loads((bad / "cl_model.json").read_text())
    (bad / "cl_model.json").unlink()
    cards.write_card(bad, name=card["name"], version=card["version"], description="x",
                     licence="MIT", citation="x", folds=card["nnunet"]["folds"])
    return bad


MODEL_CASES = {
    "missing": (lambda m, t: t / "no-such-model", 66, "not found; looked in"),
    "tampered": (_tampered_model, 65, "sha256"),
    "dotdot-zip": (lambda m, t: _zip_with(t, "evil.zip", [("../evil.txt", b"x")]), 65, ".."),
    "absolute-zip": (lambda m, t: _zip_with(t, "abs.zip", [("/tmp/evil.txt", b"x")]), 65,
                     "absolute"),
    "zip-bomb": (lambda m, t: _zip_with(t, "bomb.zip", [("zeros.bin", b"\0" * 2**26)]), 65,
                 "zip bomb"),
    "card-field": (_card_missing_field, 65, "licence"),
    "channels": (_two_channel_model, 65, "2 input channels"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_case(small, tiny_model, tmp_path, case):
    make, code, text = MODEL_CASES[case]
    model = make(tiny_model, tmp_path)
    before = checksum_tree(small)
    out = tmp_path / "out"
    proc = run_app(small, out, "participant", "-w", tmp_path / "w", "--model", model,
                   "--skip-bids-validation", *FAST)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert text in proc.stderr and Path(model).name in proc.stderr
    assert checksum_tree(small) == before
    assert not list(out.rglob("*.nii.gz")) if out.exists() else True
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_work_dir_on_a_full_disk(small, tiny_model, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        proc = run_app(small, tmp_path / "out", "participant", "-w", mount / "work",
                       "--model", tiny_model, "--skip-bids-validation", *FAST)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert "MB free" in proc.stderr and "work folder" in proc.stderr


def test_unwritable_output_exits_73(small, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_app(small, blocker / "out", "participant", "--skip-bids-validation",
                   "-w", tmp_path / "w")
    assert proc.returncode == 73 and str(blocker) in proc.stderr


def test_a_read_only_subject_folder_is_named_and_exits_73(small, tiny_model, tmp_path):
    # e.g. a container whose output bind mount is read-only below the top folder
    out = tmp_path / "out"
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(anat)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root?)")
    try:
        proc = run_app(small, out, "participant", "--participant-label", "01", "-w",
                       tmp_path / "w", "--model", tiny_model, "--skip-bids-validation", *FAST)
    finally:
        subprocess.run(["umount", str(anat)], check=False)
    assert proc.returncode == 73, proc.stderr[-2000:]
    assert f"{anat}: cannot create files in this folder" in proc.stderr
    assert TMP_PREFIX not in proc.stderr     # the folder is named, not a temporary file


def test_a_fold_the_model_lacks_is_refused_before_any_image_is_processed(small, tiny_model,
                                                                        tmp_path):
    out = tmp_path / "out"
    proc = run_app(small, out, "participant", "-w", tmp_path / "w", "--model", tiny_model,
                   "--skip-bids-validation", "--folds", "3", "--no-tta")
    assert proc.returncode == 64, proc.stderr[-2000:]
    assert "fold 3 is not in model" in proc.stderr and "available: 0" in proc.stderr
    assert not list(out.glob("sub-*")) and "brain" not in proc.stderr.lower()


def test_a_model_replaced_under_its_name_is_run_again_not_read_from_the_cache(small, tmp_path):
    from cl_bidsapp.models.install import install_model
    from cl_bidsapp.models.testing import make_tiny_model

    models = tmp_path / "models"

    def model(seed, version):
        return make_tiny_model(tmp_path / f"m{seed}", name="mine", version=version, seed=seed,
                               patch=(32, 32, 32), features=(4, 8, 16))

    install_model(model(1, "1.0.0"), models)
    out = tmp_path / "out"
    args = (small, out, "participant", "--participant-label", "01", "-w", tmp_path / "w",
            "--model", "mine", "--models-dir", models, "--skip-bids-validation", "--no-tta",
            "--nprocs", "2")
    assert run_app(*args).returncode == 0
    probseg = next(out.glob("sub-01/anat/*_label-CL_probseg.nii.gz"))
    first = probseg.read_bytes()
    upgraded = install_model(model(2, "2.0.0"), models, force=True)   # same name, same path
    assert run_app(*args).returncode == 0         # same work folder
    assert probseg.read_bytes() != first          # predicted again with the new weights
    record = json.loads(next(out.glob("sub-01/log/*_record.json")).read_text())
    assert record["model"]["SHA256"] == upgraded.sha256
    assert record["model"]["Version"] == "2.0.0"


def test_a_failed_rerun_says_the_derivatives_left_are_from_the_earlier_run(small, tiny_model,
                                                                          tmp_path):
    out = tmp_path / "out"
    args = (small, out, "participant", "--participant-label", "01", "-w", tmp_path / "w",
            "--model", tiny_model, "--skip-bids-validation", *FAST)
    assert run_app(*args).returncode == 0
    record_file = next(out.glob("sub-01/log/*_record.json"))
    first = json.loads(record_file.read_text())
    uni = next(small.glob("sub-01/anat/*_UNIT1.nii.gz"))
    uni.write_bytes(uni.read_bytes()[:1000])             # the input is damaged afterwards
    assert run_app(*args).returncode == 65
    failed = json.loads(record_file.read_text())
    assert failed["status"] == "failed"
    earlier = failed["earlier_outputs"]
    assert (earlier["run_id"], earlier["finished"]) == (first["run_id"], first["finished"])
    assert sorted(earlier["files"]) == sorted(first["outputs"].values())
    assert all((out / rel).is_file() for rel in earlier["files"])   # kept, not deleted
    page = (out / "sub-01.html").read_text()
    assert f"are from an earlier run ({first['run_id']}" in page


def test_derivatives_only_dataset(bids_layouts, tmp_path):
    proc = run_app(bids_layouts / "ds000001-fmriprep", tmp_path / "out", "participant")
    assert proc.returncode == 65 and "derivatives dataset" in proc.stderr
    assert "dataset_description.json" in proc.stderr


def test_zero_byte_images_of_bids_examples_fail_validation(bids_layouts, tmp_path):
    proc = run_app(bids_layouts / "ds005427-anat-skeleton", tmp_path / "out", "participant",
                   "--participant-label", "01")
    assert proc.returncode == 16 and "EMPTY_FILE" in proc.stderr
    assert "sub-01_T1w.nii.gz" in proc.stderr


# -- faults --------------------------------------------------------------------------------

def _outputs(out: Path) -> dict[str, object]:
    """Voxels of every NIfTI and the content of every table (timestamps aside)."""
    result = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel.endswith(".nii.gz"):
            result[rel] = hashlib.sha256(np.asarray(nib.load(path).dataobj).tobytes()).hexdigest()
        elif rel.endswith(".tsv") and "/anat/" in rel:
            result[rel] = pd.read_csv(path, sep="\t").round(4).to_csv()
    return result


def test_kill_mid_run_then_rerun_gives_the_same_outputs(small, tiny_model, tmp_path):
    common = ("participant", "--participant-label", "01", "--model", tiny_model,
              "--skip-bids-validation", *FAST)
    reference = run_app(small, tmp_path / "ref", "-w", tmp_path / "wref", *common)
    assert reference.returncode == 0
    out, work = tmp_path / "out", tmp_path / "w"
    proc = subprocess.Popen(["cl-bidsapp", str(small), str(out), "-w", str(work),
                             *map(str, common)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stderr:  # kill while nnU-Net runs
        if "nnU-Net segmentation ..." in line:
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    rerun = run_app(small, out, "-w", work, *common)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _outputs(out) == _outputs(tmp_path / "ref")
    assert leftover_temporaries(out) == []


def test_two_runs_share_one_output_folder(small, tiny_model, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(["cl-bidsapp", str(small), str(out), "participant",
                               "--participant-label", label, "-w", str(tmp_path / f"w{label}"),
                               "--model", str(tiny_model), "--skip-bids-validation", "--folds",
                               "0", "--no-tta", "--nprocs", "1"],
                              stderr=subprocess.PIPE, text=True) for label in ("01", "02")]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    for label in ("01", "02"):
        assert (out / f"sub-{label}/anat/sub-{label}_seg-CL_dseg.tsv").is_file()
    assert_no_half_written(out)


@pytest.mark.parametrize("kind, labels", [("oom", ["02"]), ("cuda-oom", ["02"]),
                                          ("kill", ["01", "02"])])
def test_out_of_memory_is_explained(small, tiny_model, tmp_path, kind, labels):
    # "kill" is what the kernel's OOM killer does to a worker; the other subject survives
    proc = run_app(small, tmp_path / "out", "participant", "-w", tmp_path / "w",
                   "--participant-label", *labels, "--model", tiny_model,
                   "--skip-bids-validation", *FAST,
                   env={"CL_BIDSAPP_INJECT_FAULT": f"Segment:{kind}:02"})
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert f"1 of {len(labels)} image(s) failed" in proc.stderr
    assert "--mem" in proc.stderr and "--nprocs 1" in proc.stderr
    assert "--device cpu" in proc.stderr
    if "01" in labels:
        assert (tmp_path / "out/sub-01/anat/sub-01_seg-CL_dseg.nii.gz").is_file()


# -- security: where a run writes, and whether it opens sockets ------------------------------

AUDIT = textwrap.dedent("""
    import os, sys
    _LOG = os.environ["CL_AUDIT_LOG"]
    _ALLOWED = tuple(p for p in os.environ["CL_AUDIT_ALLOWED"].split(os.pathsep) if p)

    def _note(kind, what):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()}\\t{kind}\\t{what}\\n")

    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing:
                full = os.path.realpath(os.fsdecode(path))
                if full != os.path.realpath(_LOG) and not full.startswith(_ALLOWED):
                    _note("write", full)
        elif event in ("socket.connect", "socket.getaddrinfo"):
            _note("network", repr(args[1] if event == "socket.connect" else args[0]))

    sys.addaudithook(_hook)
""")


def test_writes_only_to_output_and_work_and_opens_no_socket(small, tiny_model, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    out, work, home, cwd = (tmp_path / n for n in ("out", "work", "home", "cwd"))
    home.mkdir()
    cwd.mkdir()
    log = tmp_path / "audit.log"
    allowed = [str(out.resolve()), str(work.resolve()), "/dev/"]
    env = {"PYTHONPATH": str(hooks), "CL_AUDIT_LOG": str(log),
           "CL_AUDIT_ALLOWED": os.pathsep.join(allowed), "HOME": str(home),
           "PYTHONDONTWRITEBYTECODE": "1"}
    # a TMPDIR the CI runner set would be respected (and written): point it into the work dir
    env["TMPDIR"] = str(work / "tmp")
    before = checksum_tree(small)
    proc = run_app(small, out, "participant", "-w", work, "--model", tiny_model,
                   "--skip-bids-validation", *FAST, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = log.read_text().splitlines() if log.exists() else []
    assert [e for e in events if "\tnetwork\t" in e] == []
    assert [e for e in events if "\twrite\t" in e] == []
    assert checksum_tree(small) == before
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []


def test_checkpoints_are_verified_then_loaded_with_weights_only(tiny_model, monkeypatch):
    import torch

    from cl_bidsapp.models.nnunet_backend import load_verified_checkpoint
    from cl_bidsapp.models.registry import resolve_model

    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    checkpoint = load_verified_checkpoint(resolve_model(str(tiny_model)), 0)
    assert "network_weights" in checkpoint
    assert calls == [True]  # slim checkpoints never need the full unpickler

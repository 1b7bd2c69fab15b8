"""Broken inputs for the failure matrix, built from one good 2 mm phantom subject.

Each builder gets the good subject's files (UNIT1, inv-1, inv-2 and sidecars) copied into
``anat`` under the case's subject label, and damages them the way real data go wrong.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np


def _paths(anat: Path, label: str) -> dict[str, Path]:
    stem = f"sub-{label}"
    return {"uni": anat / f"{stem}_UNIT1.nii.gz", "uni_json": anat / f"{stem}_UNIT1.json",
            "inv1": anat / f"{stem}_inv-1_MP2RAGE.nii.gz",
            "inv1_json": anat / f"{stem}_inv-1_MP2RAGE.json",
            "inv2": anat / f"{stem}_inv-2_MP2RAGE.nii.gz",
            "inv2_json": anat / f"{stem}_inv-2_MP2RAGE.json"}


def _rewrite(path: Path, data=None, affine=None, dtype=None) -> None:
    img = nib.load(path)
    array = np.asarray(img.dataobj) if data is None else data
    out = nib.Nifti1Image(array.astype(dtype) if dtype else array,
                          img.affine if affine is None else affine)
    out.to_filename(path)


def _patch_header(path: Path, **fields) -> None:
    """Change header fields in place, bypassing nibabel's consistency fixes."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:], mtime=0))


def empty(p):
    p["uni"].write_bytes(b"")


def truncated(p):
    raw = gzip.decompress(p["uni"].read_bytes())
    p["uni"].write_bytes(gzip.compress(raw[: len(raw) // 3], mtime=0))


def not_nifti(p):
    p["uni"].write_text("<html><body>404 Not Found</body></html>")


def series4d(p):
    data = np.asarray(nib.load(p["uni"]).dataobj)
    _rewrite(p["uni"], np.stack([data] * 3, axis=-1))


def nan_voxels(p):
    data = np.asarray(nib.load(p["uni"]).dataobj, dtype=np.float32)
    data[:4] = np.nan
    data[-4:] = np.inf
    _rewrite(p["uni"], data)


def all_zero(p):
    data = np.zeros(nib.load(p["uni"]).shape, np.uint16)
    _rewrite(p["uni"], data)


def few_voxels(p):
    data = np.asarray(nib.load(p["uni"]).dataobj)[40:48, 40:48, 40:48]
    _rewrite(p["uni"], data)


def anisotropic(p):
    _rewrite(p["uni"], affine=np.diag([0.5, 0.5, 6.0, 1.0]))


def oblique(p):
    angle = np.deg2rad(15)
    rot = np.array([[1, 0, 0, 0], [0, np.cos(angle), -np.sin(angle), 0],
                    [0, np.sin(angle), np.cos(angle), 0], [0, 0, 0, 1]])
    for key in ("uni", "inv1", "inv2"):
        _rewrite(p[key], affine=rot @ nib.load(p[key]).affine)


def singular_affine(p):
    srow = nib.load(p["uni"]).affine
    _patch_header(p["uni"], qform_code=0, sform_code=1, srow_z=[0.0, 0.0, 0.0, srow[2, 3]])


def nan_affine(p):
    srow = nib.load(p["uni"]).affine
    _patch_header(p["uni"], qform_code=0, sform_code=1,
                  srow_x=[np.nan, *srow[0, 1:]])


def inv_other_grid(p):
    img = nib.load(p["inv2"])
    affine = img.affine.copy()
    affine[:3, 3] += [7.0, 0.0, 0.0]
    _rewrite(p["inv2"], affine=affine)


def inv1_without_inv2(p):
    p["inv2"].unlink()
    p["inv2_json"].unlink()


def bad_sidecar(p):
    p["uni_json"].write_text('{"MagneticFieldStrength": 3,')


def absurd_timings(p):
    meta = json.loads(p["inv1_json"].read_text())
    meta["InversionTime"] = 2500
    p["inv1_json"].write_text(json.dumps(meta))


def no_sidecars(p):
    for key in ("uni_json", "inv1_json", "inv2_json"):
        p[key].unlink(missing_ok=True)


def good(p):
    return None


#: label -> (builder, expected status, expected exit code, text in the error or warnings)
CASES = {
    "good": (good, "ok", 0, None),
    "empty": (empty, "failed", 65, "the file is empty (0 bytes)"),
    "truncated": (truncated, "failed", 65, "truncated or corrupt"),
    "notnifti": (not_nifti, "failed", 65, "HTML page"),
    "series": (series4d, "failed", 65, "4-D series of 3 volumes"),
    "nanvox": (nan_voxels, "ok", 0, "NaN or infinite voxels"),
    "zero": (all_zero, "failed", 65, "every voxel is 0"),
    "tiny": (few_voxels, "failed", 65, "too few for a head"),
    "aniso": (anisotropic, "failed", 65, "12.0 times longer than wide"),
    "oblique": (oblique, "ok", 0, "is oblique"),
    "singular": (singular_affine, "failed", 65, "not invertible"),
    "nanaffine": (nan_affine, "failed", 65, "NaN or infinite values"),
    "invgrid": (inv_other_grid, "failed", 65, "different grids"),
    "inv1only": (inv1_without_inv2, "ok", 0, "INV1 without INV2"),
    "badjson": (bad_sidecar, "failed", 65, "sidecar is not valid JSON"),
    "timings": (absurd_timings, "ok", 0, "milliseconds stored as seconds"),
    "nosidecar": (no_sidecars, "ok", 0, None),
}


def build_matrix_dataset(source: Path, root: Path, labels=None) -> Path:
    """A dataset with one subject per case, from sub-01 of the phantom ``source``."""
    import shutil

    root.mkdir(parents=True)
    for name in ("dataset_description.json", "README"):
        if (source / name).exists():
            shutil.copy(source / name, root / name)
    for label in labels or CASES:
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        for f in (source / "sub-01" / "anat").iterdir():
            shutil.copy(f, anat / f.name.replace("sub-01", f"sub-{label}"))
        CASES[label][0](_paths(anat, label))
    return root

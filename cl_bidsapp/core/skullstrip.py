"""Brain extraction: deepbet (default, weights inside its wheel), SynthStrip when installed,
or the non-zero region of an image that is already brain-extracted.

All functions take and return nibabel images on the *input's* voxel grid (never resampled or
reoriented), with the brain mask as uint8 0/1.

>>> import numpy as np, nibabel as nib
>>> data = np.zeros((20, 20, 20), np.float32); data[5:15, 5:15, 5:15] = 1.0
>>> data[9, 9, 9] = 0.0                       # a hole inside the brain is filled
>>> mask = nonzero_mask(nib.Nifti1Image(data, np.eye(4)))
>>> int(mask.get_fdata().sum()), mask.get_data_dtype().name
(1000, 'uint8')
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from cl_bidsapp.core.preproc import image_like
from cl_bidsapp.errors import InputDataError, MissingInputError

LOGGER = logging.getLogger(__name__)

_DEEPBET_CACHE: dict[str, object] = {}
SYNTHSTRIP_EXE = "mri_synthstrip"


def _mask_image(mask: np.ndarray, like: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    return image_like(mask, like, np.uint8)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component with its holes filled (what a brain mask should be)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def nonzero_mask(img: nib.spatialimages.SpatialImage, tolerance: float = 1e-3) -> nib.Nifti1Image:
    """Brain mask of an already brain-extracted image: voxels that differ from the background.

    The background value is the most common border value; ``tolerance`` is a fraction of the
    image's intensity range (resampled templates carry denormal values instead of exact zeros).
    """
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    data = np.nan_to_num(data)
    border = np.concatenate([data[[0, -1]].ravel(), data[:, [0, -1]].ravel(),
                             data[:, :, [0, -1]].ravel()])
    values, counts = np.unique(border, return_counts=True)
    background = float(values[counts.argmax()])
    span = float(np.percentile(data, 99.5) - np.percentile(data, 0.5)) or 1.0
    mask = np.abs(data - background) > tolerance * span
    return _mask_image(clean_mask(mask), img)


def _deepbet(device: str):
    key = "cuda" if str(device).startswith("cuda") else "cpu"
    if key not in _DEEPBET_CACHE:
        try:
            from deepbet import BrainExtraction
        except ImportError:  # pragma: no cover - deepbet is a hard dependency
            raise MissingInputError(
                "deepbet is not installed", hint="pip install deepbet") from None
        LOGGER.info("Loading the deepbet brain-extraction network (%s)", key)
        _DEEPBET_CACHE[key] = BrainExtraction(no_gpu=(key == "cpu"))
    return _DEEPBET_CACHE[key]


def deepbet_mask(img: nib.spatialimages.SpatialImage, device: str = "cpu",
                 threshold: float = 0.5) -> nib.Nifti1Image:
    """Brain mask from deepbet (Fisch et al. 2024), run in this process.

    deepbet reorients to RAS internally and back, so the mask lies on ``img``'s grid.
    """
    bet = _deepbet(device)
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]))
    work = nib.Nifti1Image(data, img.affine)
    try:
        _, mask_img, _ = bet.run(work, threshold=threshold)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise InputDataError(f"brain extraction (deepbet) failed: {exc}",
                             path=img.get_filename(),
                             hint="check that the image shows a head; or give a brain mask with "
                                  "--derivatives, or use --skull-strip skip") from None
    mask = np.asarray(mask_img.dataobj).reshape(img.shape[:3]) > 0
    if not mask.any():
        raise InputDataError("brain extraction (deepbet) found no brain", path=img.get_filename(),
                             hint="give a brain mask with --derivatives NAME=PATH")
    return _mask_image(clean_mask(mask), img)


def synthstrip_mask(img: nib.spatialimages.SpatialImage, threads: int = 1,
                    border_mm: float = 1.0) -> nib.Nifti1Image:
    """Brain mask from FreeSurfer's SynthStrip (``mri_synthstrip``), as the seed paper used."""
    exe = shutil.which(SYNTHSTRIP_EXE)
    if exe is None:
        raise MissingInputError(
            f"SynthStrip ({SYNTHSTRIP_EXE}) is not installed or not on PATH",
            hint="install FreeSurfer 7.3+ (or the synthstrip container), or use "
                 "--skull-strip-tool deepbet")
    with tempfile.TemporaryDirectory(prefix="cl-synthstrip-") as tmp:
        src, out = Path(tmp) / "in.nii.gz", Path(tmp) / "mask.nii.gz"
        nib.Nifti1Image(np.asarray(img.dataobj, np.float32).reshape(img.shape[:3]),
                        img.affine).to_filename(src)
        cmd = [exe, "-i", str(src), "-m", str(out), "-b", str(border_mm), "-n", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
            raise InputDataError(f"SynthStrip failed: {' / '.join(tail)}",
                                 path=img.get_filename())
        mask = np.asarray(nib.load(out).dataobj).reshape(img.shape[:3]) > 0
    return _mask_image(clean_mask(mask), img)

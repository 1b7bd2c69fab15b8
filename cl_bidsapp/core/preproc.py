"""Preprocessing steps between a checked input image and the segmentation model.

* :func:`masking_image` picks what brain extraction looks at. For MP2RAGE, the UNI image has a
  "salt and pepper" background that brain-extraction networks were not trained on, so the
  robust combination (O'Brien et al. 2014) of UNI with INV1 and INV2 is used when both
  inversions exist, INV2 alone when it is the only companion, and UNI only as a last resort.
* :func:`model_input` masks the image the model wants with the brain mask.
* :func:`compute_uni` builds UNI from complex inversions when a dataset stores no UNI.
* :func:`brain_statistics` records brain volume and intensity percentiles for group QC.

Everything stays on the source grid of the UNI / T1w image.

>>> import numpy as np, nibabel as nib
>>> img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), np.diag([2, 2, 2, 1]))
>>> mask = nib.Nifti1Image((np.arange(27) > 20).reshape(3, 3, 3).astype(np.uint8), img.affine)
>>> out = model_input(img, mask)
>>> out.get_data_dtype().name, float(out.get_fdata().sum()), float(out.get_fdata()[0, 0, 0])
('float32', 141.0, 0.0)
"""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np

from cl_bidsapp.core import mp2rage

LOGGER = logging.getLogger(__name__)

MASKING_METHODS = {
    "robust-combination": "robust combination of UNI with INV1 and INV2 (O'Brien et al. 2014)",
    "inv2": "the second-inversion image (INV2)",
    "uni": "the UNI image itself (no inversion images): its noisy background can mislead "
           "brain extraction",
    "t1w": "the T1-weighted image itself",
}


def image_like(data, like, dtype=None) -> nib.Nifti1Image:
    """A new NIfTI image with ``like``'s grid and header (orientation codes, units).

    Intensity scaling of ``like`` is not carried over (nibabel resets it for new data).
    """
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    header = like.header if isinstance(like.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(data, like.affine, header)
    out.set_data_dtype(data.dtype)
    return out


def _array(img) -> np.ndarray:
    return np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])


def masking_image(image, contrast: str, inv1=None, inv2=None
                  ) -> tuple[nib.Nifti1Image, str, list[str]]:
    """The image brain extraction should run on, the method's key, and warnings.

    Parameters
    ----------
    image : nibabel image
        The checked UNI (MP2RAGE) or T1w (MPRAGE) image.
    contrast : {"MP2RAGE", "MPRAGE"}
    inv1, inv2 : nibabel images, optional
        Magnitude inversion images on the same grid as ``image`` (checked by the caller).
    """
    warnings: list[str] = []
    if contrast != "MP2RAGE":
        return image, "t1w", warnings
    if inv1 is not None and inv2 is not None:
        robust = mp2rage.robust_combination(_array(image), _array(inv1), _array(inv2))
        # shifted to 0..1 so that the background is 0, as brain-extraction networks expect
        return image_like(robust + 0.5, image, np.float32), "robust-combination", warnings
    if inv2 is not None:
        return image_like(mp2rage.masking_image_from_inv2(_array(inv2)), image, np.float32), \
            "inv2", warnings
    if inv1 is not None:
        warnings.append("INV1 without INV2: INV1 alone is not used for brain extraction "
                        "(its white matter is near zero); the UNI image was used instead.")
    warnings.append("Brain extraction ran on the UNI image (no INV2 available): its noisy "
                    "background can make the brain mask less reliable; check the mask "
                    "outline in the report.")
    return image, "uni", warnings


def model_input(image, brain_mask, background: float = 0.0) -> nib.Nifti1Image:
    """The image masked by the brain mask (float32), as the model card asks."""
    data = _array(image)
    mask = _array(brain_mask) > 0
    out = np.where(mask, data, np.float32(background)).astype(np.float32)
    return image_like(out, image, np.float32)


def _phase_to_radians(phase: np.ndarray) -> np.ndarray:
    """Siemens stores phase as -4096..4095; others in radians."""
    span = float(np.nanmax(np.abs(phase))) if phase.size else 0.0
    if span > 2 * np.pi * 1.05:
        return phase * (np.pi / 4096.0)
    return phase


def compute_uni(inv1_mag, inv1_phase, inv2_mag, inv2_phase) -> nib.Nifti1Image:
    """UNI (stored 0..4095, uint16) from complex INV1 and INV2 (Marques et al. 2010)."""
    z1 = _array(inv1_mag) * np.exp(1j * _phase_to_radians(_array(inv1_phase)))
    z2 = _array(inv2_mag) * np.exp(1j * _phase_to_radians(_array(inv2_phase)))
    uni = mp2rage.uni_from_inversions(z1, z2)
    return image_like(mp2rage.uni_to_scanner(uni), inv2_mag, np.uint16)


def brain_statistics(image, brain_mask) -> dict[str, float]:
    """Brain volume (mL) and intensity percentiles inside the brain (for group QC).

    >>> img = nib.Nifti1Image(np.arange(1000, dtype=np.float32).reshape(10, 10, 10), np.eye(4))
    >>> stats = brain_statistics(img, nib.Nifti1Image(np.ones((10, 10, 10)), np.eye(4)))
    >>> stats["brain_volume_ml"], stats["intensity_p50"]
    (1.0, 499.5)
    """
    data = _array(image)
    mask = _array(brain_mask) > 0
    voxel_ml = float(abs(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    values = data[mask]
    stats = {"brain_volume_ml": round(float(mask.sum()) * voxel_ml, 3)}
    if values.size:
        p = np.percentile(values, [1, 25, 50, 75, 99])
        for name, value in zip(("p01", "p25", "p50", "p75", "p99"), p):
            stats[f"intensity_{name}"] = round(float(value), 4)
    return stats

"""Is an input image already brain-extracted (skull-stripped)?

Users often hand the app images that another pipeline has already stripped; stripping them
again can cut into the cortex, where the lesions are. The decision rests on two facts:

* a brain-extracted image sits in a **constant background** (exactly 0, or another constant
  value, up to rounding) that fills most of the image border, whereas a head scan has noise
  (MPRAGE) or "salt and pepper" (MP2RAGE UNI) outside the head;
* what that background encloses has the **volume of a brain**, :data:`BRAIN_VOLUME_L`
  (0.8 to 2.2 litres, brain stem and cerebellum included), whereas a head whose background was
  zeroed still encloses 3 litres or more of tissue.

"Constant" allows a tiny tolerance (:data:`BACKGROUND_TOLERANCE` of the image's intensity
range) because resampled templates carry denormal values (1e-40) where they should be 0.
For reference: nilearn's MNI152 2009 template (``load_mni152_template``, nilearn 0.14) is
brain-only, 1.89 L, and is detected as brain-extracted.

>>> import numpy as np, nibabel as nib
>>> grid = np.indices((90, 110, 90)) - np.array([45, 55, 45])[:, None, None, None]
>>> brain = ((grid / np.array([32, 42, 35])[:, None, None, None]) ** 2).sum(0) <= 1
>>> img = nib.Nifti1Image(brain * 100.0, np.diag([2, 2, 2, 1]))      # 1.58 L, zero outside
>>> detect_skull_stripped(img)[0]
True
"""
from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Volume range (litres) of what a constant background may enclose in a brain-extracted image.
BRAIN_VOLUME_L = (0.8, 2.2)
#: Share of the image border that must be constant background.
MIN_CONSTANT_BORDER = 0.9
#: Largest deviation from the background value still counted as background, as a fraction of
#: the image's robust intensity range.
BACKGROUND_TOLERANCE = 1e-3


def detect_skull_stripped(img) -> tuple[bool, str]:
    """Decide whether an image is already brain-extracted, and say why.

    Parameters
    ----------
    img : nibabel image
        A 3-D image (singleton 4th+ axes are ignored), e.g. from
        :func:`cl_bidsapp.core.images.check_image`.

    Returns
    -------
    stripped : bool
    reason : str
        One sentence a user can read in a log or report.
    """
    data = np.asarray(np.asanyarray(img.dataobj), dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    voxel_ml = abs(float(np.linalg.det(np.asarray(img.affine, float)[:3, :3]))) / 1000.0

    border = _border_mask(data.shape)
    background_value = float(np.median(data[border]))
    deviation = np.abs(data - background_value)
    # Subsampled percentile: the robust range needs no more, and a 1 mm head is 10 M voxels.
    scale = float(np.percentile(deviation[::2, ::2, ::2], 99.5))
    if scale == 0:
        return False, "the image is (almost) constant, so no brain can be found in it"
    background = deviation <= BACKGROUND_TOLERANCE * scale
    constant_border = float(background[border].mean())
    if constant_border < MIN_CONSTANT_BORDER:
        return False, (f"not brain-extracted: {1 - constant_border:.0%} of the image border "
                       "varies (noise or tissue outside the brain), as in a head image")

    labels, _ = ndimage.label(background)
    outside_labels = np.unique(labels[border])
    outside = np.isin(labels, outside_labels[outside_labels > 0])
    enclosed_l = float(np.count_nonzero(~outside)) * voxel_ml / 1000.0
    low, high = BRAIN_VOLUME_L
    logger.debug("constant border %.3f, background %g, enclosed %.2f L",
                 constant_border, background_value, enclosed_l)
    if enclosed_l > high:
        return False, (f"not brain-extracted: the constant background encloses {enclosed_l:.2f} L,"
                       f" more than a brain ({low:g}-{high:g} L): a head with a blanked "
                       "background")
    if enclosed_l < low:
        return False, (f"not recognised as brain-extracted: the constant background encloses "
                       f"only {enclosed_l:.2f} L, less than a whole brain ({low:g}-{high:g} L)")
    return True, (f"already brain-extracted: a constant background ({background_value:.4g}) "
                  f"surrounds {enclosed_l:.2f} L of tissue, the volume of a brain")


def _border_mask(shape: tuple[int, ...]) -> np.ndarray:
    border = np.zeros(shape, dtype=bool)
    for axis in range(len(shape)):
        index = [slice(None)] * len(shape)
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    return border

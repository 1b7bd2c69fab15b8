"""Connected components: thresholding, 26-connectivity, minimum size and lesion order.

The method's post-processing (see ``method.md``): threshold the probability map
(``>= threshold``), split the result into connected components with **26-connectivity**, and
drop components smaller than a minimum size. 26-connectivity (voxels touching by a face, an
edge or a corner belong to one lesion) is used everywhere in this app, for lesions and for
evaluation alike, because the published metrics of the method were computed with it; mixing
connectivities would make lesion counts disagree between the lesion table and the evaluation.

Lesions are numbered 1..N in a fixed order that does not depend on the labelling algorithm:
**largest first** (most voxels); lesions of equal size are ordered by the position of their
first voxel in array order (lowest ``i``, then ``j``, then ``k``). So lesion 1 (``CL-001``) is
always the largest lesion of a scan.

>>> import numpy as np
>>> prob = np.zeros((6, 6, 6), dtype=np.float32)
>>> prob[0, 0, 0:2] = 0.9          # 2 voxels: below the default minimum size of 3
>>> prob[3:5, 3:5, 3:5] = 0.7      # 8 voxels
>>> prob[0, 5, 3:6] = 0.6          # 3 voxels
>>> instances = lesion_instances(prob)
>>> sorted(np.unique(instances).tolist()), int((instances == 1).sum())
([0, 1, 2], 8)
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

CONNECTIVITY = 26
DEFAULT_THRESHOLD = 0.5
#: The method's earlier work removes components of 2 voxels or fewer: the smallest lesion kept
#: has 3 voxels.
DEFAULT_MIN_SIZE = 3

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3-D mask with 26-connectivity.

    Labels come in the labelling algorithm's order; use :func:`lesion_instances` for the
    app's documented order.

    Parameters
    ----------
    mask : ndarray
        3-D array; every non-zero voxel is foreground.

    Returns
    -------
    labels : ndarray of int32
        0 for background, 1..n for components.
    n : int
        Number of components.

    Examples
    --------
    >>> m = np.zeros((3, 3, 3), bool); m[0, 0, 0] = m[1, 1, 1] = True  # corner contact
    >>> label_components(m)[1]
    1
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3-D mask, got shape {mask.shape}")
    labels, n = ndimage.label(mask != 0, structure=_STRUCTURE_26, output=np.int32)
    return labels, int(n)


def min_size_in_voxels(min_size_mm3: float, voxel_size: Sequence[float]) -> int:
    """Convert a minimum lesion size in mm³ into a number of voxels (rounded up, at least 1).

    Parameters
    ----------
    min_size_mm3 : float
        Smallest lesion volume to keep, in mm³.
    voxel_size : sequence of 3 floats
        Voxel edge lengths in mm.

    Examples
    --------
    >>> min_size_in_voxels(3, (1, 1, 1))
    3
    >>> min_size_in_voxels(3, (0.7, 0.7, 0.7))   # 3 / 0.343 = 8.7 voxels
    9
    >>> min_size_in_voxels(3, (2, 2, 2))
    1
    """
    voxel_mm3 = float(np.prod(np.abs(np.asarray(voxel_size, dtype=float)[:3])))
    if not min_size_mm3 >= 0:
        raise ValueError(f"minimum lesion size must be >= 0 mm3, got {min_size_mm3}")
    if not voxel_mm3 > 0 or not math.isfinite(voxel_mm3):
        raise ValueError(f"voxel size must be positive and finite, got {tuple(voxel_size)}")
    # Tolerate float noise so that 3 mm3 on 1 mm voxels stays 3 voxels, not 4.
    return max(1, math.ceil(min_size_mm3 / voxel_mm3 - 1e-9))


def lesion_instances(probability_map: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                     min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Turn a probability map (or a binary mask) into a lesion instance map.

    Parameters
    ----------
    probability_map : ndarray
        3-D CL probability (0..1). A boolean mask works too (True counts as 1). NaN voxels count
        as background.
    threshold : float
        Voxels with probability ``>= threshold`` are lesion.
    min_size : int
        Components with fewer voxels are dropped (default 3: the method removes <= 2 voxels).

    Returns
    -------
    ndarray of int32
        0 background, lesions 1..N, largest first, ties by first voxel in array order.

    Examples
    --------
    >>> p = np.zeros((5, 5, 5)); p[0, 0, 0:3] = 1; p[4, 4, 0:4] = 1
    >>> lesion_instances(p)[4, 4, 0], lesion_instances(p)[0, 0, 0]
    (np.int32(1), np.int32(2))
    """
    probability_map = np.asarray(probability_map)
    if not 0 < threshold <= 1:
        # 0 would make every background voxel a lesion; above 1 nothing can pass.
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    labels, n = label_components(probability_map >= threshold)
    return _ordered_instances(labels, n, min_size)


def _ordered_instances(labels: np.ndarray, n: int, min_size: int) -> np.ndarray:
    """Renumber raw component labels: drop small ones, largest first, ties by first voxel."""
    out = np.zeros(labels.shape, dtype=np.int32)
    if n == 0:
        return out
    flat_index = np.flatnonzero(labels)           # ascending, so first hit = first voxel
    flat_labels = labels.ravel()[flat_index]
    sizes = np.bincount(flat_labels, minlength=n + 1)
    first = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    present, first_pos = np.unique(flat_labels, return_index=True)
    first[present] = flat_index[first_pos]
    kept = np.flatnonzero(sizes >= max(int(min_size), 1))
    kept = kept[kept > 0]
    order = kept[np.lexsort((first[kept], -sizes[kept]))]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    out.ravel()[flat_index] = lut[flat_labels]
    dropped = n - order.size
    if dropped:
        logger.debug("dropped %d components smaller than %d voxels", dropped, min_size)
    return out


def as_lesion_mask(array: np.ndarray) -> np.ndarray:
    """A boolean lesion mask from a binary mask or instance map: non-zero, non-NaN voxels.

    >>> as_lesion_mask(np.array([0.0, 1.0, np.nan, 2.0])).tolist()
    [False, True, False, True]
    """
    array = np.asarray(array)
    if array.dtype.kind == "f":
        array = np.nan_to_num(array, nan=0.0)
    return array != 0

"""From a cortical-lesion probability map to individual lesions and a per-lesion table.

The steps follow the method's post-processing (see ``method.md``): threshold the probability
map (``>= threshold``), split the result into connected components with **26-connectivity**,
and drop components smaller than a minimum size. 26-connectivity (voxels touching by a face,
an edge or a corner belong to one lesion) is used everywhere in this app, for lesions and for
evaluation alike, because the published metrics of the method were computed with it; mixing
connectivities would make counts disagree between the lesion table and the evaluation.

Lesions are numbered 1..N in a fixed order that does not depend on the labelling algorithm:
**largest first** (most voxels); lesions of equal size are ordered by the position of their
first voxel in array order (lowest ``i``, then ``j``, then ``k``). So ``CL-001`` is always the
largest lesion of a scan.

>>> import numpy as np
>>> prob = np.zeros((6, 6, 6), dtype=np.float32)
>>> prob[0, 0, 0:2] = 0.9          # 2 voxels: below the default minimum size of 3
>>> prob[3:5, 3:5, 3:5] = 0.7      # 8 voxels
>>> prob[0, 5, 3:6] = 0.6          # 3 voxels
>>> instances = lesion_instances(prob)
>>> sorted(np.unique(instances).tolist()), int((instances == 1).sum())
([0, 1, 2], 8)
>>> table = lesion_table(instances, np.eye(4), probability_map=prob)
>>> print(table[["index", "name", "n_voxels", "prob_max"]].to_string(index=False))
 index   name  n_voxels  prob_max
     1 CL-001         8       0.7
     2 CL-002         3       0.6
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from cl_bidsapp.errors import InputDataError

logger = logging.getLogger(__name__)

CONNECTIVITY = 26
DEFAULT_THRESHOLD = 0.5
#: The method's earlier work removes components of 2 voxels or fewer: the smallest lesion kept
#: has 3 voxels.
DEFAULT_MIN_SIZE = 3
LESION_NAME_PREFIX = "CL"

#: Columns of the per-lesion table, in order; ``bids_spec/lesion_table.json`` documents each.
LESION_TABLE_COLUMNS = (
    "index", "name", "n_voxels", "volume_mm3",
    "centroid_x", "centroid_y", "centroid_z",
    "centroid_i", "centroid_j", "centroid_k",
    "prob_mean", "prob_max", "uncertainty_ddu",
)

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
    if not 0 <= threshold or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
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


def lesion_names(n: int, prefix: str = LESION_NAME_PREFIX) -> list[str]:
    """Names ``CL-001`` .. for ``n`` lesions (more digits once there are 1000 or more).

    >>> lesion_names(2)
    ['CL-001', 'CL-002']
    """
    width = max(3, len(str(n)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, n + 1)]


def lesion_uncertainty(instances: np.ndarray, fold_probability_maps: Sequence[np.ndarray],
                       threshold: float = DEFAULT_THRESHOLD,
                       min_size: int = DEFAULT_MIN_SIZE) -> np.ndarray:
    """Disagreement of the fold models about each lesion (DDU, 0 = agree, 1 = none see it).

    For lesion L of the ensemble instance map and each fold (ensemble member) m, the member's
    own map is thresholded and cleaned the same way; the best IoU between L and any of that
    member's lesions overlapping L is taken (0 when none overlaps).
    ``DDU(L) = 1 - mean over members of that best IoU``.

    Parameters
    ----------
    instances : ndarray of int
        Ensemble lesion instance map (0 background, 1..N).
    fold_probability_maps : sequence of ndarray
        One probability map per fold, same shape as ``instances``; at least two.
    threshold, min_size
        As used for the ensemble (see :func:`lesion_instances`).

    Returns
    -------
    ndarray of float, shape (N,)
        DDU of lesions 1..N.

    Examples
    --------
    >>> p = np.zeros((4, 4, 8)); p[1:3, 1:3, 1:3] = 1
    >>> inst = lesion_instances(p)
    >>> half = p.copy(); half[1:3, 1:3, 2] = 0     # the second fold sees half of the lesion
    >>> lesion_uncertainty(inst, [p, half]).round(3).tolist()   # 1 - (1 + 0.5) / 2
    [0.25]
    """
    instances = np.asarray(instances)
    members = list(fold_probability_maps)
    if len(members) < 2:
        raise ValueError("fold disagreement needs at least two fold probability maps")
    n = int(instances.max(initial=0))
    best_sum = np.zeros(n + 1)
    sizes = np.bincount(instances.ravel(), minlength=n + 1)
    lesion_voxels = np.flatnonzero(instances)
    lesion_of_voxel = instances.ravel()[lesion_voxels].astype(np.int64)
    for member in members:
        member = np.asarray(member)
        if member.shape != instances.shape:
            raise ValueError(f"fold map shape {member.shape} differs from {instances.shape}")
        member_inst = lesion_instances(member, threshold, min_size)
        m_n = int(member_inst.max(initial=0))
        m_sizes = np.bincount(member_inst.ravel(), minlength=m_n + 1)
        m_of_voxel = member_inst.ravel()[lesion_voxels].astype(np.int64)
        both = m_of_voxel > 0
        pair = lesion_of_voxel[both] * (m_n + 1) + m_of_voxel[both]
        codes, inter = np.unique(pair, return_counts=True)
        lesion, other = np.divmod(codes, m_n + 1)
        iou = inter / (sizes[lesion] + m_sizes[other] - inter)
        best = np.zeros(n + 1)
        np.maximum.at(best, lesion, iou)
        best_sum += best
    return 1.0 - best_sum[1:] / len(members)


def lesion_table(instances: np.ndarray, affine: np.ndarray,
                 probability_map: np.ndarray | None = None,
                 fold_probability_maps: Sequence[np.ndarray] | None = None,
                 threshold: float = DEFAULT_THRESHOLD, min_size: int = DEFAULT_MIN_SIZE,
                 prefix: str = LESION_NAME_PREFIX) -> pd.DataFrame:
    """One row per lesion of an instance map, columns as in ``bids_spec/lesion_table.json``.

    Parameters
    ----------
    instances : ndarray of int
        Lesion instance map (0 background, 1..N), e.g. from :func:`lesion_instances`.
    affine : (4, 4) array
        Voxel-to-world affine of the image; centroids ``centroid_x/y/z`` are in its scanner
        (world) millimetres, ``volume_mm3`` uses its voxel volume.
    probability_map : ndarray, optional
        CL probability on the same grid; without it ``prob_mean``/``prob_max`` are NaN.
    fold_probability_maps : sequence of ndarray, optional
        Per-fold maps; with two or more, ``uncertainty_ddu`` is filled
        (see :func:`lesion_uncertainty`), otherwise it is NaN.
    threshold, min_size
        Used to threshold the fold maps the same way as the ensemble.
    prefix : str
        Lesion name prefix (``CL`` gives ``CL-001``).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`LESION_TABLE_COLUMNS`, one row per lesion in index order.
    """
    instances = np.asarray(instances)
    affine = np.asarray(affine, dtype=float)
    if instances.ndim != 3:
        raise ValueError(f"expected a 3-D instance map, got shape {instances.shape}")
    if instances.size and instances.min() < 0:
        raise ValueError("instance map has negative labels")
    flat_index = np.flatnonzero(instances)
    lab = instances.ravel()[flat_index].astype(np.int64)
    n = int(lab.max(initial=0))
    counts = np.bincount(lab, minlength=n + 1)[1:]
    missing = np.flatnonzero(counts == 0) + 1
    if missing.size:
        raise ValueError(f"instance map labels are not 1..{n}: missing {missing[:5].tolist()}")
    ijk = np.unravel_index(flat_index, instances.shape)
    centroid_ijk = np.stack(
        [np.bincount(lab, weights=axis, minlength=n + 1)[1:] / counts for axis in ijk], axis=1
    ) if n else np.zeros((0, 3))
    centroid_xyz = centroid_ijk @ affine[:3, :3].T + affine[:3, 3]
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))

    prob_mean = np.full(n, np.nan)
    prob_max = np.full(n, np.nan)
    if probability_map is not None:
        prob = np.asarray(probability_map, dtype=float)
        if prob.shape != instances.shape:
            raise ValueError(f"probability map shape {prob.shape} differs from {instances.shape}")
        values = np.nan_to_num(prob.ravel()[flat_index], nan=0.0)
        prob_mean = np.bincount(lab, weights=values, minlength=n + 1)[1:] / np.maximum(counts, 1)
        peak = np.full(n + 1, -np.inf)
        np.maximum.at(peak, lab, values)
        prob_max = peak[1:]
    ddu = np.full(n, np.nan)
    if fold_probability_maps is not None and len(fold_probability_maps) >= 2:
        ddu = lesion_uncertainty(instances, fold_probability_maps, threshold, min_size)

    table = pd.DataFrame({
        "index": np.arange(1, n + 1, dtype=np.int64),
        "name": lesion_names(n, prefix),
        "n_voxels": counts.astype(np.int64),
        "volume_mm3": counts * voxel_mm3,
        "centroid_x": centroid_xyz[:, 0], "centroid_y": centroid_xyz[:, 1],
        "centroid_z": centroid_xyz[:, 2],
        "centroid_i": centroid_ijk[:, 0], "centroid_j": centroid_ijk[:, 1],
        "centroid_k": centroid_ijk[:, 2],
        "prob_mean": prob_mean, "prob_max": prob_max, "uncertainty_ddu": ddu,
    })
    return table[list(LESION_TABLE_COLUMNS)]


def check_lesion_table(table: pd.DataFrame, instances: np.ndarray,
                       affine: np.ndarray | None = None,
                       source: str | Path | None = None) -> None:
    """Refuse a lesion table that does not describe the lesions of an instance map.

    The table must list exactly the lesions 1..N present in the map, each once, with the
    voxel count it has in the map; with ``affine`` the volumes must agree too. Values read
    from a TSV (strings, ``n/a``) are accepted as long as they parse as numbers.

    Parameters
    ----------
    table : pandas.DataFrame
        The per-lesion table (e.g. read back with ``pandas.read_csv(..., sep="\\t")``).
    instances : ndarray of int
        The lesion instance map the table claims to describe.
    affine : (4, 4) array, optional
        The map's affine, to check ``volume_mm3``.
    source : str or Path, optional
        The table's file name, used in error messages.

    Raises
    ------
    InputDataError
        With a plain message saying what disagrees.

    Examples
    --------
    >>> inst = np.zeros((3, 3, 3), int); inst[0, 0, :] = 1
    >>> check_lesion_table(lesion_table(inst, np.eye(4)), inst)
    >>> bad = lesion_table(inst, np.eye(4)).assign(n_voxels=5)
    >>> check_lesion_table(bad, inst)
    Traceback (most recent call last):
    ...
    cl_bidsapp.errors.InputDataError: lesion table does not match the lesion map: lesion 1 has 5 voxels in the table but 3 in the map
    """
    def fail(problem: str) -> None:
        raise InputDataError(f"lesion table does not match the lesion map: {problem}",
                             path=source)

    for column in ("index", "n_voxels"):
        if column not in table.columns:
            fail(f"column '{column}' is missing")
    index = pd.to_numeric(table["index"], errors="coerce").to_numpy(dtype=float)
    n_voxels = pd.to_numeric(table["n_voxels"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(index).any() or (index != np.round(index)).any():
        fail("column 'index' has values that are not whole numbers")
    if np.isnan(n_voxels).any():
        fail("column 'n_voxels' has values that are not numbers")
    index = index.astype(np.int64)
    duplicated = pd.Series(index)[pd.Series(index).duplicated()].unique()
    if duplicated.size:
        fail(f"lesion {int(duplicated[0])} is listed more than once")
    instances = np.asarray(instances)
    if instances.size and instances.min() < 0:
        fail("the map has negative labels")
    in_map = np.bincount(instances.ravel().astype(np.int64), minlength=1)
    map_labels = {label for label in np.flatnonzero(in_map).tolist() if label > 0}
    table_labels = set(index.tolist())
    if table_labels - map_labels:
        extra = sorted(table_labels - map_labels)
        fail(f"lesion(s) {extra[:5]} are in the table but not in the map")
    if map_labels - table_labels:
        lost = sorted(map_labels - table_labels)
        fail(f"lesion(s) {lost[:5]} are in the map but not in the table")
    for label, count in zip(index, n_voxels):
        if count != in_map[label]:
            fail(f"lesion {label} has {count:g} voxels in the table but {in_map[label]} in the map")
    if affine is not None and "volume_mm3" in table.columns:
        volume = pd.to_numeric(table["volume_mm3"], errors="coerce").to_numpy(dtype=float)
        voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
        expected = in_map[index] * voxel_mm3
        wrong = ~np.isclose(volume, expected, rtol=1e-3, atol=1e-3)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            fail(f"lesion {index[i]} has volume {volume[i]:g} mm3 in the table "
                 f"but {expected[i]:g} mm3 in the map")


def lesion_table_sidecar() -> dict:
    """The column dictionary of the lesion table (``bids_spec/lesion_table.json``).

    >>> sorted(lesion_table_sidecar()) == sorted(LESION_TABLE_COLUMNS)
    True
    """
    from bids_spec import spec_path

    return json.loads(spec_path("lesion_table.json").read_text(encoding="utf-8"))

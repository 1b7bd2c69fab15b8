"""Lesions of a scan: instance map, per-lesion table, fold disagreement, table checks.

Lesions are the 26-connected components of the thresholded probability map, numbered largest
first (see :mod:`cl_bidsapp.core.components`, whose main functions are re-exported here).
The per-lesion table has the columns documented in ``bids_spec/lesion_table.json``; the
derivatives writer copies that file next to every table.

>>> import numpy as np
>>> prob = np.zeros((6, 6, 6), dtype=np.float32)
>>> prob[3:5, 3:5, 3:5] = 0.7      # 8 voxels
>>> prob[0, 5, 3:6] = 0.6          # 3 voxels
>>> instances = lesion_instances(prob)
>>> table = lesion_table(instances, np.eye(4), probability_map=prob)
>>> print(table[["index", "name", "n_voxels", "prob_max"]].to_string(index=False))
 index   name  n_voxels  prob_max
     1 CL-001         8       0.7
     2 CL-002         3       0.6
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from cl_bidsapp.core.components import (  # noqa: F401  (re-exported: the lesion API)
    CONNECTIVITY,
    DEFAULT_MIN_SIZE,
    DEFAULT_THRESHOLD,
    label_components,
    lesion_instances,
    min_size_in_voxels,
)
from cl_bidsapp.errors import InputDataError

logger = logging.getLogger(__name__)

LESION_NAME_PREFIX = "CL"

#: Columns of the per-lesion table, in order; ``bids_spec/lesion_table.json`` documents each.
LESION_TABLE_COLUMNS = (
    "index", "name", "n_voxels", "volume_mm3",
    "centroid_x", "centroid_y", "centroid_z",
    "centroid_i", "centroid_j", "centroid_k",
    "prob_mean", "prob_max", "uncertainty_ddu",
)


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

    logger.debug("lesion table: %d lesions, %d fold maps", n,
                 0 if fold_probability_maps is None else len(fold_probability_maps))
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

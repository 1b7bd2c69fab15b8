"""Properties of each lesion of an instance map: size, shape, cortical involvement, depth.

Used by the evaluation mode's error analysis (which lesions does a model miss?), for reference
and predicted lesions alike. Every property is computed in millimetres from the image's
affine, so anisotropic or oblique voxels give the same answer as isotropic ones.

* **Volume**: voxels x voxel volume (``|det A|`` of the affine's 3x3 part).
* **Principal lengths** ``length_major_mm >= length_middle_mm >= length_minor_mm``: the side
  lengths of the box with the same second moments as the lesion, ``sqrt(12 λ)`` for each
  eigenvalue λ of the covariance of the lesion's points in mm. Each voxel counts as a solid
  box (its own covariance ``A diag(1/12) Aᵀ`` is added), so a bar of 1 x 1 x 10 voxels of 1 mm
  has lengths exactly 10, 1 and 1 mm, and a single voxel has its own edge lengths.
* **Elongation** ``major / middle`` and **flatness** ``middle / minor`` (both >= 1), and
  **roundness** ``minor / major`` (1 for a cube or ball, towards 0 for a bar or a plate).
* **Sphericity** ``π^(1/3) (6 V)^(2/3) / S``, with S the area of the voxel faces between the
  lesion and the rest. A voxel cube has 0.806 (that of a cube), whatever its size; staircase
  faces make a voxelised ball score about 0.66 rather than 1, so compare lesions with one
  another, not with a true sphere.
* **Cortical involvement**, from tissue labels (:func:`tissue_labels`): ``intracortical`` when
  the lesion has grey-matter voxels and neither it nor its 26 neighbours has a white-matter
  voxel; ``leukocortical`` when it has grey-matter voxels and it or its neighbours touch white
  matter; ``white matter`` when it has white-matter voxels but no grey-matter voxel;
  ``other`` when it has neither (CSF, outside the brain). The phantom simulator draws its
  lesion types with the same rule.
* **Surface distance**: the smallest distance (mm) from a lesion voxel's centre to the centre
  of the nearest voxel outside the brain mask; a lesion in the outermost brain layer of 1 mm
  voxels has 1 mm, one outside the brain 0.
* **Probability**: mean and maximum of a probability map inside the lesion.

>>> import numpy as np
>>> labels = np.zeros((12, 12, 12), np.int32)
>>> labels[2:4, 2:4, 2:4] = 1          # 2 x 2 x 2 cube
>>> labels[6, 6, 1:11] = 2             # 1 x 1 x 10 bar
>>> p = lesion_properties(labels, np.diag([1.0, 1.0, 1.0, 1.0]))
>>> print(p[["n_voxels", "length_major_mm", "elongation", "roundness",
...          "sphericity"]].round(3).to_string())
       n_voxels  length_major_mm  elongation  roundness  sphericity
index                                                              
1             8              2.0         1.0        1.0       0.806
2            10             10.0        10.0        0.1       0.534
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import ndimage

#: Values of :func:`tissue_labels`.
TISSUE_NONE, TISSUE_GM, TISSUE_WM, TISSUE_CSF = 0, 1, 2, 3
INTRACORTICAL, LEUKOCORTICAL, WHITE_MATTER, OTHER = (
    "intracortical", "leukocortical", "white matter", "other")
#: Cortical involvement categories, in the order reports show them.
INVOLVEMENTS = (INTRACORTICAL, LEUKOCORTICAL, WHITE_MATTER, OTHER)

PROPERTY_COLUMNS = (
    "n_voxels", "volume_mm3", "centroid_x", "centroid_y", "centroid_z",
    "length_major_mm", "length_middle_mm", "length_minor_mm", "elongation", "flatness",
    "roundness", "surface_area_mm2", "sphericity", "n_voxels_gm", "n_voxels_wm",
    "involvement", "surface_distance_mm", "prob_mean", "prob_max",
)
_CUBE = np.ones((3, 3, 3), dtype=bool)


def principal_lengths(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Side lengths (mm, largest first) of the box with the lesion's second moments.

    Parameters
    ----------
    ijk : ndarray, shape (n, 3)
        Voxel indices of the lesion (n >= 1).
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine.

    Examples
    --------
    A 3 x 1 x 1 bar of 2 mm voxels is 6 mm long and 2 mm wide:

    >>> principal_lengths(np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]]),
    ...                   np.diag([2.0, 2.0, 2.0, 1.0])).round(6).tolist()
    [6.0, 2.0, 2.0]
    """
    linear = np.asarray(affine, dtype=float)[:3, :3]
    points = np.asarray(ijk, dtype=float) @ linear.T
    spread = np.cov(points, rowvar=False, bias=True) if len(points) > 1 else np.zeros((3, 3))
    covariance = spread + linear @ np.diag([1.0 / 12] * 3) @ linear.T
    eigen = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)[::-1]
    return np.sqrt(12.0 * eigen)


def surface_area(mask: np.ndarray, affine: np.ndarray) -> float:
    """Area (mm²) of the voxel faces between a mask and the rest.

    A face across axis ``a`` has the area of the parallelogram spanned by the other two
    columns of the affine.

    >>> m = np.zeros((3, 3, 12), bool); m[1, 1, 1:11] = True
    >>> surface_area(m, np.eye(4))
    42.0
    """
    mask = np.pad(np.asarray(mask, dtype=bool), 1)
    columns = np.asarray(affine, dtype=float)[:3, :3].T
    area = 0.0
    for axis in range(3):
        others = [columns[a] for a in range(3) if a != axis]
        faces = int(np.count_nonzero(np.diff(mask, axis=axis)))
        area += faces * float(np.linalg.norm(np.cross(*others)))
    return area


def sphericity(volume_mm3: float, area_mm2: float) -> float:
    """``π^(1/3) (6 V)^(2/3) / S``: 1 for a ball, 0.806 for a cube (NaN when S is 0).

    >>> round(sphericity(8.0, 24.0), 3)
    0.806
    """
    if not area_mm2 > 0:
        return float("nan")
    return math.pi ** (1 / 3) * (6.0 * volume_mm3) ** (2 / 3) / area_mm2


def tissue_labels(gm: np.ndarray | None = None, wm: np.ndarray | None = None,
                  csf: np.ndarray | None = None, brain: np.ndarray | None = None
                  ) -> np.ndarray | None:
    """Most likely tissue per voxel: 0 none, 1 GM, 2 WM, 3 CSF (ties go to the lower label).

    Probability maps (0..1) of whatever tissues are given. With a white-matter map, the
    labels are the argmax of (rest, GM, WM, CSF), ``rest = 1 - GM - WM - CSF`` (the phantom
    simulator's rule). Without one, a brain mask is needed: inside it the white-matter
    probability is taken as ``1 - GM - CSF``, so that sulcal CSF counts as white matter
    unless a CSF map is given too (prefer a WM map). None when neither map is usable.

    >>> tissue_labels(np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.6, 0.1]),
    ...               np.array([0.1, 0.1, 0.2])).tolist()
    [1, 2, 0]
    >>> tissue_labels(gm=np.array([0.7, 0.2, 0.2]), brain=np.array([1, 1, 0])).tolist()
    [1, 2, 0]
    >>> tissue_labels(gm=np.array([0.7])) is None
    True
    """
    given = [np.asarray(m, dtype=np.float32) for m in (gm, wm, csf) if m is not None]
    if not given:
        return None
    shape = given[0].shape
    zeros = np.zeros(shape, np.float32)
    gm_p, csf_p = (zeros if m is None else np.asarray(m, np.float32) for m in (gm, csf))
    if wm is not None:
        wm_p = np.asarray(wm, np.float32)
        rest = 1.0 - gm_p - wm_p - csf_p
    elif brain is not None:
        inside = np.asarray(brain) > 0
        wm_p = np.where(inside, np.clip(1.0 - gm_p - csf_p, 0.0, None), 0.0)
        rest = np.where(inside, 0.0, 1.0 - gm_p - csf_p)
    else:
        return None
    return np.argmax(np.stack([rest, gm_p, wm_p, csf_p]), axis=0).astype(np.uint8)


def involvement(n_gm: int, n_wm: int, touches_wm: bool) -> str:
    """Cortical involvement category from tissue counts (see the module docstring).

    >>> involvement(5, 0, False), involvement(5, 0, True), involvement(0, 4, True)
    ('intracortical', 'leukocortical', 'white matter')
    >>> involvement(0, 0, False)
    'other'
    """
    if n_gm > 0:
        return LEUKOCORTICAL if touches_wm or n_wm > 0 else INTRACORTICAL
    return WHITE_MATTER if n_wm > 0 else OTHER


def surface_distance_map(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Distance (mm) of each voxel centre to the nearest voxel centre outside the brain mask.

    0 outside the brain. Computed on the brain's bounding box (plus one voxel of outside), so
    it costs little more than the brain itself.

    >>> b = np.zeros((7, 7, 7), bool); b[1:6, 1:6, 1:6] = True     # a 5-voxel cube
    >>> surface_distance_map(b, np.diag([2.0, 2.0, 2.0, 1.0]))[3, 3].tolist()
    [0.0, 2.0, 4.0, 6.0, 4.0, 2.0, 0.0]
    """
    brain = np.asarray(brain) > 0
    distance = np.zeros(brain.shape, dtype=np.float32)
    boxes = ndimage.find_objects(brain.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return distance
    box = boxes[0]
    padded = np.pad(brain[box], 1)
    zooms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    inner = ndimage.distance_transform_edt(padded, sampling=zooms)[1:-1, 1:-1, 1:-1]
    distance[box] = inner
    return distance


def lesion_properties(labels: np.ndarray, affine: np.ndarray, *,
                      tissue: np.ndarray | None = None,
                      surface_distance: np.ndarray | None = None,
                      probability: np.ndarray | None = None) -> pd.DataFrame:
    """Properties of every lesion 1..N of an instance map (see the module docstring).

    Parameters
    ----------
    labels : ndarray of int
        Instance map, 0 background, lesions 1..N.
    affine : ndarray
        Voxel-to-world affine of the image.
    tissue : ndarray, optional
        Labels of :func:`tissue_labels` on the same grid; without it the involvement columns
        are empty (None / NaN).
    surface_distance : ndarray, optional
        From :func:`surface_distance_map`.
    probability : ndarray, optional
        A probability map for ``prob_mean`` and ``prob_max``.

    Returns
    -------
    pandas.DataFrame
        Index ``index`` (the lesion label; labels without voxels are left out), columns
        :data:`PROPERTY_COLUMNS`.

    Examples
    --------
    An intracortical lesion (two voxels deep inside grey matter) and a leukocortical one
    (a grey-matter voxel next to white matter):

    >>> tissue = np.full((8, 8, 8), TISSUE_GM, np.uint8); tissue[:, :, 6:] = TISSUE_WM
    >>> lab = np.zeros((8, 8, 8), np.int32); lab[2, 2, 1:3] = 1; lab[5, 5, 5] = 2
    >>> lesion_properties(lab, np.eye(4), tissue=tissue)["involvement"].tolist()
    ['intracortical', 'leukocortical']
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=float)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    rows = {}
    for value, box in enumerate(ndimage.find_objects(labels.astype(np.int32)), start=1):
        if box is None:
            continue
        # one voxel of margin: the 26 neighbours of the lesion
        grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n))
                      for s, n in zip(box, labels.shape))
        local = labels[grown] == value
        offset = np.array([s.start for s in grown])
        ijk = np.argwhere(local) + offset
        rows[value] = _one_lesion(local, ijk, grown, affine, voxel_mm3, tissue,
                                  surface_distance, probability)
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(PROPERTY_COLUMNS))
    table.index.name = "index"
    return table


def _one_lesion(local, ijk, grown, affine, voxel_mm3, tissue, surface_distance,
                probability) -> list:
    n = len(ijk)
    volume = n * voxel_mm3
    centroid = affine[:3, :3] @ ijk.mean(axis=0) + affine[:3, 3]
    lengths = principal_lengths(ijk, affine)
    major, middle, minor = (float(v) for v in lengths)
    area = surface_area(local, affine)
    n_gm = n_wm = None
    kind = None
    if tissue is not None:
        tissue_local = np.asarray(tissue[grown])
        n_gm = int(np.count_nonzero(tissue_local[local] == TISSUE_GM))
        n_wm = int(np.count_nonzero(tissue_local[local] == TISSUE_WM))
        near = ndimage.binary_dilation(local, _CUBE)
        kind = involvement(n_gm, n_wm, bool((tissue_local[near] == TISSUE_WM).any()))
    depth = float("nan")
    if surface_distance is not None:
        depth = float(np.asarray(surface_distance[grown])[local].min())
    prob_mean = prob_max = float("nan")
    if probability is not None:
        values = np.asarray(probability[grown], dtype=float)[local]
        prob_mean, prob_max = float(values.mean()), float(values.max())
    return [n, volume, *(float(c) for c in centroid), major, middle, minor,
            _ratio(major, middle), _ratio(middle, minor), _ratio(minor, major), area,
            sphericity(volume, area), n_gm, n_wm, kind, depth, prob_mean, prob_max]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")

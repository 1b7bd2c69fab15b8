"""The phantoms' anatomy in template space: MNI152 2009a tissue maps plus a synthetic head.

The brain comes from the MNI152 2009a (symmetric) 1 mm grey- and white-matter maps and brain
mask that ship inside nilearn. Around it this module builds, once per process, a head:

* intracranial space: the brain mask closed over sulci and the interhemispheric fissure and
  grown by ~3 mm (subarachnoid CSF), continued downwards as a spinal canal with a cord;
* the skull as a shell outside the intracranial surface (inner and outer tables around a fatty
  diploe) and the scalp (fat under skin) inside an outer head surface that also has a neck and a
  lower face, so brain extraction sees a whole head rather than a floating brain.

Both surfaces are stored as signed distance maps (mm, negative inside) on a 2 mm grid: the
per-subject code turns them into partial-volume layers of any thickness.

The module also marks the cortex (grey matter of the cerebral cortex, excluding deep grey nuclei,
cerebellum and brainstem) where cortical lesions may be placed.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from cl_bidsapp.errors import MissingInputError

log = logging.getLogger(__name__)

_NILEARN_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}
#: Extra slices below the template (1 mm) where the brainstem continues as a spinal cord.
_CORD_PAD_MM = 12
#: Spinal canal and cord (MNI mm): centre in the axial plane and radii.
_CANAL_CENTRE = (0.0, -44.0)
_CANAL_RADIUS = 9.0
_CORD_RADIUS = 5.0
#: Head grid bounds (MNI mm) and spacing.
_HEAD_LOWER = np.array([-104.0, -134.0, -180.0])
_HEAD_UPPER = np.array([104.0, 108.0, 122.0])
_HEAD_STEP = 2.0
#: Outer head surface: this far outside the intracranial surface over the vault (skull + scalp).
_VAULT_THICKNESS = 14.0
#: Deep grey nuclei (basal ganglia, thalamus) as an MNI ellipsoid (centre, radii) in mm.
_DEEP_GREY = ((0.0, -6.0, 4.0), (30.0, 34.0, 21.0))
#: Cortex is grey matter within this distance (mm) of the CSF outside the brain.
_CORTEX_DEPTH = 6.0


@dataclass(frozen=True)
class Template:
    """Tissue maps and head model in MNI space at one resolution.

    Attributes
    ----------
    spacing : float
        Voxel size of the brain maps (1 or 2 mm).
    brain_affine : ndarray
        Voxel to MNI mm of ``gm``, ``wm``, ``brain`` and ``cortex``.
    gm, wm, brain : ndarray
        Grey- and white-matter fractions and brain-mask fraction (float32).
    cortex : ndarray
        Cortical region (float32, 0/1): cerebral cortex grown by 3 mm, so that it also covers the
        white matter right under the cortex (leukocortical lesions).
    head_affine : ndarray
        Voxel to MNI mm of the distance maps (2 mm grid).
    icv_distance, head_distance : ndarray
        Signed distances (mm, negative inside) to the intracranial and the outer head surfaces.
    intracortical_sites, leukocortical_sites : ndarray
        (N, 3) MNI mm of candidate lesion centres: cortex away from white matter, and cortex on
        the grey/white boundary.
    """

    spacing: float
    brain_affine: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    cortex: np.ndarray
    head_affine: np.ndarray
    icv_distance: np.ndarray
    head_distance: np.ndarray
    intracortical_sites: np.ndarray
    leukocortical_sites: np.ndarray


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError("nilearn is not installed; it provides the MNI152 tissue maps",
                                hint="pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _load(key: str) -> tuple[np.ndarray, np.ndarray]:
    path = _nilearn_data_dir() / _NILEARN_FILES[key]
    if not path.is_file():
        raise MissingInputError("MNI152 2009a map missing from the nilearn package", path=path,
                                hint="reinstall nilearn (pip install --force-reinstall nilearn)")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    top = float(data.max())
    return (data / top if top > 0 else data), img.affine


def _ellipsoid(mm: np.ndarray, centre, radii) -> np.ndarray:
    """Boolean mask of points (..., 3) inside an axis-aligned ellipsoid."""
    rel = (mm - np.asarray(centre)) / np.asarray(radii)
    return (rel ** 2).sum(-1) <= 1.0


def _infratentorial(mm: np.ndarray) -> np.ndarray:
    """Cerebellum and brainstem: below a tentorium that rises from the occiput to the notch.

    Tentorium height (MNI mm) drops 0.3 mm per mm behind y = -40 and curves down laterally;
    it was drawn over the MNI152 2009a grey-matter map (checked on sagittal slices).
    """
    x, y, z = mm[..., 0], mm[..., 1], mm[..., 2]
    tentorium = 2.0 - 0.3 * np.clip(-40.0 - y, 0.0, None) - 0.005 * x ** 2
    cerebellum = (z < tentorium) & (y < -30.0)
    brainstem = (np.abs(x) < 20.0) & (y > -45.0) & (y < -5.0) & (z < -10.0)
    return cerebellum | brainstem


def _grid_mm(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"),
                   -1)
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def _block_average(arr: np.ndarray, factor: int) -> np.ndarray:
    pad = [(0, (-n) % factor) for n in arr.shape]
    a = np.pad(arr, pad)
    shape = []
    for n in a.shape:
        shape += [n // factor, factor]
    return a.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32)


def _signed_distance(inside: np.ndarray, step: float) -> np.ndarray:
    out = ndi.distance_transform_edt(~inside, sampling=step)
    into = ndi.distance_transform_edt(inside, sampling=step)
    return (out - into).astype(np.float32)


def _brain_maps() -> tuple:
    """1 mm GM, WM, brain mask and affine, padded downwards with a spinal cord."""
    gm, affine = _load("gm")
    wm, _ = _load("wm")
    t1, _ = _load("t1")
    brain = (t1 > 0.2).astype(np.float32)  # nilearn's own brain-mask rule
    pad = ((0, 0), (0, 0), (_CORD_PAD_MM, 0))
    gm, wm, brain = (np.pad(a, pad) for a in (gm, wm, brain))
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, 2] * _CORD_PAD_MM
    # The brainstem ends at the template's lowest slice: continue it as a cord (white matter).
    low = _grid_mm(gm[:, :, :_CORD_PAD_MM + 1].shape, affine)
    radial = np.hypot(low[..., 0] - _CANAL_CENTRE[0], low[..., 1] - _CANAL_CENTRE[1])
    cord = np.clip(_CORD_RADIUS + 0.5 - radial, 0, 1)
    wm[:, :, :_CORD_PAD_MM] = np.maximum(wm[:, :, :_CORD_PAD_MM], cord[:, :, :_CORD_PAD_MM])
    return gm, wm, brain, affine


def _cortex_and_sites(gm, wm, affine):
    """Cortical region and candidate lesion centres (in MNI mm)."""
    csf = np.clip(1.0 - gm - wm, 0, 1)
    grey = (gm >= wm) & (gm >= csf) & (gm > 0.3)
    white = (wm > gm) & (wm >= csf)
    parenchyma = (gm + wm) >= 0.5
    labels, _ = ndi.label(~parenchyma)
    outside = labels == labels[0, 0, -1]  # the CSF and air around the brain (not ventricles)
    step = float(abs(affine[0, 0]))
    near_outside = ndi.distance_transform_edt(~outside, sampling=step) <= _CORTEX_DEPTH
    mm = _grid_mm(gm.shape, affine)
    # The symmetric template blends both medial surfaces across the midline, where a real
    # brain has the falx: keep lesions within one hemisphere.
    midline = np.abs(mm[..., 0]) < 2.5
    excluded = (_ellipsoid(mm, *_DEEP_GREY) | _infratentorial(mm) | midline
                | (mm[..., 2] < -45))
    cortex = grey & near_outside & ~excluded
    touches_white = ndi.binary_dilation(white, structure=np.ones((3, 3, 3), bool))
    boundary = cortex & ndi.binary_dilation(white)  # 6-neighbour of white matter
    interior = cortex & ~touches_white
    region = (ndi.distance_transform_edt(~cortex, sampling=step) <= 3.0) & ~midline
    ijk_to_mm = affine[:3, :3], affine[:3, 3]

    def sites(mask):
        ijk = np.argwhere(mask).astype(np.float64)
        return ijk @ ijk_to_mm[0].T + ijk_to_mm[1]

    return region.astype(np.float32), sites(interior), sites(boundary)


def _head_maps(brain, brain_affine):
    """Signed distance maps of the intracranial and outer head surfaces on the 2 mm head grid."""
    shape = tuple(np.round((_HEAD_UPPER - _HEAD_LOWER) / _HEAD_STEP).astype(int) + 1)
    affine = np.diag([_HEAD_STEP] * 3 + [1.0])
    affine[:3, 3] = _HEAD_LOWER
    mm = _grid_mm(shape, affine)
    to_brain = np.linalg.inv(brain_affine)
    ijk = mm @ to_brain[:3, :3].T.astype(np.float32) + to_brain[:3, 3].astype(np.float32)
    brain2 = ndi.map_coordinates(brain, np.moveaxis(ijk, -1, 0), order=1, cval=0.0) > 0.5
    # Closing (radius ~10 mm) fills sulci and the fissure; the net 3 mm growth is the
    # subarachnoid space between brain and skull.
    grown = ndi.distance_transform_edt(~brain2, sampling=_HEAD_STEP) <= 10.0
    icv = ndi.distance_transform_edt(grown, sampling=_HEAD_STEP) > 7.0
    canal = (np.hypot(mm[..., 0] - _CANAL_CENTRE[0], mm[..., 1] - _CANAL_CENTRE[1])
             <= _CANAL_RADIUS) & (mm[..., 2] < -55)
    icv = ndi.gaussian_filter((icv | canal).astype(np.float32), 1.0) > 0.5
    icv_distance = _signed_distance(icv, _HEAD_STEP)
    vault = icv_distance <= _VAULT_THICKNESS
    rel = (mm[..., :2] - np.array([0.0, -22.0], np.float32)) / np.array([54.0, 60.0], np.float32)
    neck = ((rel ** 2).sum(-1) <= 1.0) & (mm[..., 2] < -40)
    face = _ellipsoid(mm, (0.0, 38.0, -52.0), (56.0, 52.0, 46.0))
    jaw_to_neck = _ellipsoid(mm, (0.0, 0.0, -75.0), (58.0, 72.0, 40.0))
    head = ndi.gaussian_filter((vault | neck | face | jaw_to_neck).astype(np.float32),
                               4.0 / _HEAD_STEP) > 0.5
    return affine, icv_distance, _signed_distance(head, _HEAD_STEP)


@functools.lru_cache(maxsize=1)
def _coarse_anatomy():
    """Everything that is computed on 2 mm grids, shared by both resolutions."""
    gm1, wm1, brain1, affine1 = _brain_maps()
    gm, wm, brain = (_block_average(a, 2) for a in (gm1, wm1, brain1))
    affine = affine1.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.25)  # centre of each 2x2x2 block
    cortex, interior, boundary = _cortex_and_sites(gm, wm, affine)
    head_affine, icv_distance, head_distance = _head_maps(brain, affine)
    return (gm1, wm1, brain1, affine1), (gm, wm, brain, affine, cortex), (
        head_affine, icv_distance, head_distance, interior, boundary)


@functools.lru_cache(maxsize=2)
def load_template(spacing: float = 1.0) -> Template:
    """Build (once per process) the template anatomy at 1 mm, or 2 mm for coarse phantoms.

    Parameters
    ----------
    spacing : float
        1 or 2 (mm): resolution of the brain maps. 2 mm maps are block averages of the 1 mm
        ones, so coarse phantoms get correct partial-volume fractions. The cortical region,
        lesion sites and head surfaces are always computed at 2 mm (they need no more detail).

    Returns
    -------
    Template
    """
    if spacing not in (1.0, 2.0):
        raise ValueError(f"template spacing must be 1 or 2 mm, not {spacing}")
    fine, coarse, head = _coarse_anatomy()
    if spacing == 2.0:
        gm, wm, brain, affine, cortex = coarse
    else:
        gm, wm, brain, affine = fine
        cortex = np.repeat(np.repeat(np.repeat(coarse[4], 2, 0), 2, 1), 2, 2)
        cortex = np.ascontiguousarray(cortex[:gm.shape[0], :gm.shape[1], :gm.shape[2]])
    head_affine, icv_distance, head_distance, interior, boundary = head
    for arr in (gm, wm, brain, cortex, icv_distance, head_distance):
        arr.setflags(write=False)
    return Template(float(spacing), affine, gm, wm, brain, cortex, head_affine, icv_distance,
                    head_distance, interior, boundary)

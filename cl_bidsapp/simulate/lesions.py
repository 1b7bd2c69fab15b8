"""Cortical lesions: where, how many, how big, what shape.

A subject's lesions are planned once in template space (type, volume, centre, T1 ratio) and
drawn into each session's image grid, so repeated sessions show the same lesions.

* Count: negative binomial around ``mean_count`` (over-dispersed: some subjects have none).
* Type: ``intracortical`` lesions lie in cortical grey matter and never touch white matter
  (no white-matter voxel among their 26 neighbours); ``leukocortical`` lesions contain both grey-
  and white-matter voxels, i.e. they cross the grey/white boundary. Tissue per voxel is the most
  likely one of the reference probability maps (:func:`~cl_bidsapp.simulate.anatomy.tissue_labels`).
* Volume: truncated Pareto (heavy tail) between 3 and 300 mm^3, i.e. 3 to a few hundred voxels
  at 1 mm; never fewer than 3 voxels at coarser voxel sizes (the app's smallest lesion).
* Shape: grown voxel by voxel from the centre in order of a randomly perturbed distance, within
  the allowed tissue, giving irregular, 26-connected blobs; lesions keep at least one voxel
  apart, so each is one connected component of the mask.
* Contrast: T1 of the lesion tissue = ``contrast`` x the subject's grey-matter T1 (a little
  random spread per lesion), proton density as grey matter.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cl_bidsapp.simulate.anatomy import SessionAnatomy, tissue_labels
from cl_bidsapp.simulate.template import Template

log = logging.getLogger(__name__)

LESION_TYPES = ("intracortical", "leukocortical")
#: Negative binomial shape: with a mean of 8, about 1 subject in 12 has no lesion.
_COUNT_DISPERSION = 1.2
_MIN_VOLUME_MM3 = 3.0
_MAX_VOLUME_MM3 = 300.0
_SIZE_TAIL = 0.6              # Pareto exponent: smaller = heavier tail
_MIN_VOXELS = 3
_MIN_SPACING_MM = 12.0        # between planned lesion centres
_T1_RATIO_SPREAD = 0.04       # per-lesion log-normal spread of the T1 ratio
_ROUGHNESS = 0.6              # how much the random field distorts the growth order


@dataclass(frozen=True)
class LesionPlan:
    """One lesion of a subject, independent of any image grid."""

    kind: str
    volume_mm3: float
    site_mni: tuple
    t1_ratio: float
    shape_seed: int


@dataclass
class Lesion:
    """One lesion drawn into an image grid."""

    lesion_id: int
    kind: str
    voxels: np.ndarray        # (N, 3) voxel indices
    t1_ratio: float
    n_grey: int
    n_white: int


def draw_volume(rng: np.random.Generator, size=None):
    """Lesion volumes (mm^3) from a Pareto law truncated to [3, 300].

    >>> import numpy as np
    >>> v = draw_volume(np.random.default_rng(0), 10000)
    >>> bool(v.min() >= 3.0 and v.max() <= 300.0 and np.median(v) < 15 < v.mean())
    True
    """
    u = rng.random(size)
    ratio = (_MIN_VOLUME_MM3 / _MAX_VOLUME_MM3) ** _SIZE_TAIL
    return _MIN_VOLUME_MM3 * (1.0 - u * (1.0 - ratio)) ** (-1.0 / _SIZE_TAIL)


def draw_count(rng: np.random.Generator, mean_count: float) -> int:
    """Number of lesions of one subject (negative binomial with the given mean)."""
    if mean_count <= 0:
        return 0
    p = _COUNT_DISPERSION / (_COUNT_DISPERSION + mean_count)
    return int(rng.negative_binomial(_COUNT_DISPERSION, p))


def plan_lesions(rng: np.random.Generator, template: Template, mean_count: float = 8.0,
                 contrast: float = 1.3, leukocortical_fraction: float = 0.5,
                 volume_scale: float = 1.0) -> list:
    """Draw the lesions of one subject.

    Parameters
    ----------
    rng : numpy.random.Generator
    template : Template
        Supplies candidate centres for each lesion type.
    mean_count : float
        Mean number of lesions per subject.
    contrast : float
        Lesion T1 / grey-matter T1 (> 1: darker than grey matter on UNI and MPRAGE).
    leukocortical_fraction : float
        Probability that a lesion is leukocortical.
    volume_scale : float
        Multiplies every lesion volume (e.g. larger lesions for coarse training data).

    Returns
    -------
    list of LesionPlan
    """
    n = draw_count(rng, mean_count)
    plans, centres = [], []
    for _ in range(n):
        kind = LESION_TYPES[int(rng.random() < leukocortical_fraction)]
        sites = (template.leukocortical_sites if kind == "leukocortical"
                 else template.intracortical_sites)
        for _attempt in range(50):
            site = sites[rng.integers(len(sites))]
            if all(np.linalg.norm(site - c) >= _MIN_SPACING_MM for c in centres):
                break
        centres.append(site)
        ratio = float(contrast * np.exp(rng.normal(0.0, _T1_RATIO_SPREAD)))
        plans.append(LesionPlan(kind=kind, volume_mm3=float(draw_volume(rng)) * volume_scale,
                                site_mni=tuple(float(v) for v in site), t1_ratio=ratio,
                                shape_seed=int(rng.integers(2 ** 31))))
    return plans


_N26 = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
        if (a, b, c) != (0, 0, 0)]
_N6 = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]


def _grow(allowed, start, n_target, priority):
    """Grow a 26-connected set from ``start`` voxels in order of ``priority`` within ``allowed``."""
    taken = np.zeros(allowed.shape, bool)
    heap, order = [], []
    shape = allowed.shape
    for v in start:
        taken[v] = True
        order.append(v)
    for v in start:
        _push_neighbours(heap, v, shape, priority, taken, allowed)
    while heap and len(order) < n_target:
        _, v = heapq.heappop(heap)
        if taken[v]:
            continue
        taken[v] = True
        order.append(v)
        _push_neighbours(heap, v, shape, priority, taken, allowed)
    return order


def _push_neighbours(heap, v, shape, priority, taken, allowed):
    for d in _N26:
        w = (v[0] + d[0], v[1] + d[1], v[2] + d[2])
        if (0 <= w[0] < shape[0] and 0 <= w[1] < shape[1] and 0 <= w[2] < shape[2]
                and allowed[w] and not taken[w]):
            heapq.heappush(heap, (priority[w], w))


def _box(centre, radius, shape):
    lo = np.maximum(np.asarray(centre) - radius, 0)
    hi = np.minimum(np.asarray(centre) + radius + 1, shape)
    return lo, hi, tuple(slice(a, b) for a, b in zip(lo, hi))


def place_lesions(plans, anatomy: SessionAnatomy) -> tuple:
    """Draw planned lesions into a session's grid.

    Parameters
    ----------
    plans : list of LesionPlan
    anatomy : SessionAnatomy

    Returns
    -------
    labels : numpy.ndarray
        uint16 lesion instance map (0 background, lesion ids 1..N).
    lesions : list of Lesion
        Lesions actually drawn (a planned lesion is dropped when no allowed voxel is near its
        centre in this grid, e.g. at coarse voxel sizes).
    """
    shape = anatomy.shape
    voxel = anatomy.voxel_size
    labels = np.zeros(shape, np.uint16)
    blocked = np.zeros(shape, bool)  # lesions and their 26-neighbours
    lesions = []
    cube = np.ones((3, 3, 3), bool)
    for plan in plans:
        # room for a lesion spread along a ~3 mm thick cortical sheet
        radius_mm = max(14.0, 2.0 * np.sqrt(plan.volume_mm3 / (3.0 * np.pi)))
        radius = int(np.ceil(radius_mm / voxel))
        centre = anatomy.locate(plan.site_mni)
        lo, hi, box = _box(centre, radius + 1, shape)
        lab = tissue_labels(anatomy.gm[box], anatomy.wm[box], anatomy.csf[box])
        cortex = anatomy.cortex[box]
        free = ~blocked[box]
        grey = (lab == 1) & cortex & free
        white = (lab == 2) & cortex & free
        if plan.kind == "intracortical":
            allowed = grey & ~ndi.binary_dilation(lab == 2, cube)
            seeds = allowed
        else:
            allowed = grey | white
            seeds = grey & ndi.binary_dilation(white)
        # Voxels on the box's rim may have neighbours outside it: keep them out of the lesion.
        allowed[[0, -1], :, :] = allowed[:, [0, -1], :] = allowed[:, :, [0, -1]] = False
        seeds = seeds & allowed
        local_centre = np.asarray(centre) - lo
        candidates = np.argwhere(seeds)
        if len(candidates) == 0:
            log.debug("no %s voxel near %s: lesion dropped", plan.kind, plan.site_mni)
            continue
        dist = np.linalg.norm((candidates - local_centre) * voxel, axis=1)
        if dist.min() > 8.0:
            log.debug("%s site %s too far from allowed voxels: dropped", plan.kind,
                      plan.site_mni)
            continue
        seed = tuple(int(v) for v in candidates[int(np.argmin(dist))])
        start = [seed]
        if plan.kind == "leukocortical":
            for d in _N6:
                w = tuple(s + o for s, o in zip(seed, d))
                if all(0 <= w[i] < allowed.shape[i] for i in range(3)) and white[w] and allowed[w]:
                    start.append(w)
                    break
        rng = np.random.default_rng(plan.shape_seed)
        field = ndi.gaussian_filter(rng.standard_normal(allowed.shape), 1.5 / voxel + 0.5)
        field /= field.std() + 1e-12
        ijk = np.indices(allowed.shape).reshape(3, -1).T - np.asarray(seed)
        distance = np.linalg.norm(ijk * voxel, axis=1).reshape(allowed.shape)
        priority = distance * np.clip(1.0 + _ROUGHNESS * field, 0.2, None)
        priority += 1e-3 * rng.random(allowed.shape)
        n_target = max(_MIN_VOXELS, int(round(plan.volume_mm3 / voxel ** 3)))
        grown = _grow(allowed, start, n_target, priority)
        if len(grown) < _MIN_VOXELS:
            log.debug("%s lesion at %s could not grow: dropped", plan.kind, plan.site_mni)
            continue
        local = np.array(grown)
        n_white = int(sum(lab[tuple(v)] == 2 for v in local))
        if plan.kind == "leukocortical" and n_white == 0:
            continue
        voxels = local + lo
        lesion_id = len(lesions) + 1
        labels[tuple(voxels.T)] = lesion_id
        mask = np.zeros(allowed.shape, bool)
        mask[tuple(local.T)] = True
        blocked[box] |= ndi.binary_dilation(mask, cube)
        lesions.append(Lesion(lesion_id=lesion_id, kind=plan.kind, voxels=voxels,
                              t1_ratio=plan.t1_ratio, n_grey=len(local) - n_white,
                              n_white=n_white))
    return labels, lesions


def lesion_occupancy(labels: np.ndarray, lesions) -> list:
    """Fraction of each voxel filled by lesion tissue, with a partial-volume edge.

    Inside a lesion the fraction is 1; voxels next to it get up to about a third (a lesion's
    border rarely follows voxel edges).

    Returns
    -------
    list of (flat_indices, fraction, t1_ratio), one per lesion.
    """
    out = []
    shape = labels.shape
    for lesion in lesions:
        lo = np.maximum(lesion.voxels.min(0) - 2, 0)
        hi = np.minimum(lesion.voxels.max(0) + 3, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        mask = labels[box] == lesion.lesion_id
        frac = np.maximum(mask, 0.5 * ndi.gaussian_filter(mask.astype(np.float32), 0.6))
        nz = np.argwhere(frac > 0.01)
        flat = np.ravel_multi_index(tuple((nz + lo).T), shape)
        out.append((flat, frac[tuple(nz.T)].astype(np.float32), lesion.t1_ratio))
    return out

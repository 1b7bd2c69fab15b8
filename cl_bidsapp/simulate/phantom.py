"""One simulated subject session, in memory: anatomy, lesions and images.

Random draws come from separate streams keyed by (seed, subject, session, purpose), so that
changing, say, the lesion count leaves every subject's anatomy and head pose unchanged, and a
subject's lesions and anatomy are shared by its sessions.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from cl_bidsapp.simulate.anatomy import (SessionAnatomy, draw_pose, draw_subject, image_grid,
                                         sample_session)
from cl_bidsapp.simulate.lesions import Lesion, lesion_occupancy, place_lesions, plan_lesions
from cl_bidsapp.simulate.protocols import Protocol, get_protocol, tissues_for
from cl_bidsapp.simulate.render import acquire, draw_fields, noise_free_signals
from cl_bidsapp.simulate.template import load_template

log = logging.getLogger(__name__)

#: Between-subject spread (relative SD) of brain-tissue T1.
_T1_SPREAD = 0.03
# Stream keys, one per kind of random draw.
_ANATOMY, _LESIONS, _TISSUE, _POSE, _GRID, _FIELDS, _NOISE = range(7)


@dataclass
class SessionPhantom:
    """A simulated session: what was imaged and the images."""

    anatomy: SessionAnatomy
    lesion_labels: np.ndarray        # uint16 instance map
    lesions: list                    # of Lesion
    images: dict                     # protocol name -> {"inv1", "inv2", "uni"} or {"t1w"}
    tissues: dict                    # protocol name -> {tissue: Tissue}


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(key)))


def _subject_tissues(protocol: Protocol, rng: np.random.Generator) -> dict:
    base = tissues_for(protocol)
    factors = np.exp(rng.normal(0.0, _T1_SPREAD, 3))
    out = dict(base)
    for name, factor in zip(("GM", "WM", "CSF"), factors):
        out[name] = replace(base[name], t1=base[name].t1 * float(factor))
    return out


def simulate_session(protocols, subject: int = 1, session: int = 1, voxel_size: float = 1.0,
                     lesion_mean: float = 8.0, lesion_contrast: float = 1.3,
                     noise: float = 0.03, seed: int = 0,
                     leukocortical_fraction: float = 0.5,
                     lesion_volume_scale: float = 1.0) -> SessionPhantom:
    """Simulate one session of one subject with one or more protocols (same head, same pose).

    Parameters
    ----------
    protocols : sequence of str or Protocol
        Acquisitions to simulate on the same anatomy (e.g. MP2RAGE and MPRAGE for a figure).
    subject, session : int
        1-based indices: with ``seed`` they fix all random draws.
    voxel_size : float
        Isotropic voxel size in mm.
    lesion_mean, lesion_contrast, noise, seed, leukocortical_fraction, lesion_volume_scale
        See :func:`cl_bidsapp.simulate.simulate_dataset`.

    Returns
    -------
    SessionPhantom
    """
    protocols = [p if isinstance(p, Protocol) else get_protocol(p) for p in protocols]
    template = load_template(2.0 if voxel_size >= 1.5 else 1.0)
    subject_anatomy = draw_subject(_rng(seed, subject, _ANATOMY))
    plans = plan_lesions(_rng(seed, subject, _LESIONS), template, lesion_mean, lesion_contrast,
                         leukocortical_fraction, lesion_volume_scale)
    pose = draw_pose(_rng(seed, subject, session, _POSE))
    shape, affine = image_grid(voxel_size, _rng(seed, subject, session, _GRID))
    anatomy = sample_session(template, subject_anatomy, pose, shape, affine)
    labels, lesions = place_lesions(plans, anatomy)
    occupancy = lesion_occupancy(labels, lesions)
    images, tissue_sets = {}, {}
    for k, protocol in enumerate(protocols):
        tissues = _subject_tissues(protocol, _rng(seed, subject, _TISSUE))
        fields = draw_fields(anatomy, pose, protocol, _rng(seed, subject, session, _FIELDS, k))
        signals = noise_free_signals(anatomy, tissues, protocol, fields, occupancy)
        del fields
        images[protocol.name] = acquire(signals, protocol, tissues, noise,
                                        _rng(seed, subject, session, _NOISE, k))
        tissue_sets[protocol.name] = tissues
    log.info("sub-%02d ses-%02d: %d of %d planned lesions drawn", subject, session,
             len(lesions), len(plans))
    return SessionPhantom(anatomy=anatomy, lesion_labels=labels, lesions=lesions, images=images,
                          tissues=tissue_sets)


def lesion_rows(phantom: SessionPhantom, tissues: dict) -> list:
    """Per-lesion table rows (dicts) for the reference derivatives."""
    rows = []
    affine = phantom.anatomy.affine
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    grey_t1 = tissues["GM"].t1
    for lesion in phantom.lesions:
        lesion: Lesion
        centroid = lesion.voxels.mean(0)
        mm = affine[:3, :3] @ centroid + affine[:3, 3]
        rows.append({
            "lesion_id": lesion.lesion_id,
            "type": lesion.kind,
            "n_voxels": len(lesion.voxels),
            "volume_mm3": round(len(lesion.voxels) * voxel_volume, 3),
            "centroid_i": round(float(centroid[0]), 2),
            "centroid_j": round(float(centroid[1]), 2),
            "centroid_k": round(float(centroid[2]), 2),
            "centroid_x": round(float(mm[0]), 2),
            "centroid_y": round(float(mm[1]), 2),
            "centroid_z": round(float(mm[2]), 2),
            "n_voxels_gm": lesion.n_grey,
            "n_voxels_wm": lesion.n_white,
            "t1_ratio": round(lesion.t1_ratio, 4),
            "t1_ms": round(1000.0 * grey_t1 * lesion.t1_ratio, 1),
        })
    return rows


__all__ = ["SessionPhantom", "simulate_session", "lesion_rows"]

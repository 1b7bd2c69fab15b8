"""Per-subject anatomy: a deformed, posed copy of the template head on the scanner's grid.

Every subject gets a smooth random deformation and head size (fixed across its sessions);
every session gets its own head pose in the scanner. For each voxel of the session's image grid
the template position is ``y + u(y)`` with ``y`` an affine function of the voxel (pose, head
size, shear) and ``u`` the subject's smooth displacement. These positions are computed on a grid
4 mm apart and interpolated linearly (exact for the affine part; the displacement varies over
centimetres), then the template maps are resampled at them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial.transform import Rotation

from cl_bidsapp.simulate.template import Template

log = logging.getLogger(__name__)

#: Field of view (mm) of the simulated acquisition: 176 sagittal slices x 240 x 256, as in
#: typical 1 mm MP2RAGE/MPRAGE protocols; RAS axis order.
FIELD_OF_VIEW_MM = (176.0, 240.0, 256.0)
#: Template point placed at the head's position in the scanner (inside the intracranial space).
_HEAD_CENTRE_MNI = np.array([0.0, -15.0, 5.0])
#: Position of that point in the scanner (mm, relative to the FOV centre): head high in the
#: FOV so that the neck fills the lower part, as in real acquisitions.
_HEAD_POSITION = np.array([0.0, 2.0, 22.0])
#: Spacing (mm) of the grid on which template positions and smooth fields are computed.
_COARSE_MM = 4.0
#: Displacement field: control-point spacing (mm) and RMS amplitude per axis (mm).
_WARP_SPACING = 12.0
_WARP_RMS = 2.0


@dataclass(frozen=True)
class SubjectAnatomy:
    """What stays the same across a subject's sessions."""

    scale: np.ndarray          # head size relative to MNI152, per axis
    shear: np.ndarray          # small shears (xy, xz, yz)
    warp: np.ndarray           # (3, nx, ny, nz) displacement control values, mm
    warp_origin: np.ndarray    # MNI mm of control point (0, 0, 0)
    skull_mm: float
    fat_mm: float
    skin_mm: float


@dataclass(frozen=True)
class Pose:
    """Head position of one session: rotation (scanner <- head) and translation (mm)."""

    rotation: np.ndarray
    translation: np.ndarray


@dataclass
class SessionAnatomy:
    """Tissue fractions of one session on its image grid (all float32 unless noted).

    ``gm``, ``wm`` and ``csf`` are quantised to steps of 1/255 so that the probability maps
    written to disk are exactly the ones the signal was computed from.
    """

    affine: np.ndarray
    shape: tuple
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    bone: np.ndarray
    marrow: np.ndarray
    fat: np.ndarray
    soft: np.ndarray
    brain_mask: np.ndarray     # bool
    cortex: np.ndarray         # bool: cortical region allowed for lesions
    coarse_mni: np.ndarray     # (3, cx, cy, cz) MNI mm at every ``coarse_step``-th voxel
    coarse_step: int

    @property
    def voxel_size(self) -> float:
        return float(np.sqrt((self.affine[:3, 0] ** 2).sum()))

    def locate(self, mni_mm) -> tuple:
        """Voxel index whose (deformed) template position is closest to ``mni_mm``."""
        q = np.asarray(mni_mm, dtype=np.float32).reshape(3, 1, 1, 1)
        dist = ((self.coarse_mni - q) ** 2).sum(0)
        c = np.array(np.unravel_index(int(np.argmin(dist)), dist.shape))
        s = self.coarse_step
        lo = np.maximum(c * s - s, 0)
        hi = np.minimum(c * s + s + 1, np.array(self.shape))
        local = upsample_linear(self.coarse_mni, self.shape, s, lo, hi)
        d = ((local - q) ** 2).sum(0)
        k = np.unravel_index(int(np.argmin(d)), d.shape)
        return tuple(int(a + b) for a, b in zip(lo, k))


def draw_subject(rng: np.random.Generator) -> SubjectAnatomy:
    """Random head size, shape and scalp of one subject."""
    scale = rng.normal(0.92, 0.035) * (1.0 + rng.normal(0.0, 0.025, 3))
    shear = rng.normal(0.0, 0.03, 3)
    shape = (int(240 // _WARP_SPACING) + 1, int(270 // _WARP_SPACING) + 1,
             int(320 // _WARP_SPACING) + 1)
    warp = rng.standard_normal((3,) + shape)
    warp = np.stack([ndi.gaussian_filter(w, 1.0, mode="wrap") for w in warp])
    warp *= _WARP_RMS / warp.std(axis=(1, 2, 3), keepdims=True)
    origin = np.array([-120.0, -150.0, -190.0])
    return SubjectAnatomy(scale=scale, shear=shear, warp=warp.astype(np.float32),
                          warp_origin=origin, skull_mm=float(rng.uniform(5.5, 8.0)),
                          fat_mm=float(rng.uniform(2.5, 5.0)),
                          skin_mm=float(rng.uniform(1.5, 2.5)))


def draw_pose(rng: np.random.Generator) -> Pose:
    """Head pose of one session: a few degrees of roll and yaw, more pitch, mm of shift."""
    angles = rng.normal(0.0, 1.0, 3) * np.array([8.0, 3.0, 3.0])  # pitch about x, roll, yaw
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    translation = _HEAD_POSITION + rng.normal(0.0, 1.0, 3) * np.array([2.0, 4.0, 5.0])
    return Pose(rotation=rotation, translation=translation)


def image_grid(voxel_size: float, rng: np.random.Generator) -> tuple:
    """Shape and affine (RAS, voxel -> scanner mm) of the acquisition grid."""
    shape = tuple(int(round(f / voxel_size)) for f in FIELD_OF_VIEW_MM)
    affine = np.diag([voxel_size] * 3 + [1.0])
    centre_offset = rng.uniform(-3.0, 3.0, 3)
    affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * voxel_size + centre_offset
    return shape, affine


def upsample_linear(coarse: np.ndarray, shape, step: int, lo=None, hi=None) -> np.ndarray:
    """Linearly interpolate ``coarse[..., i, j, k]`` (samples every ``step`` voxels) to voxels.

    ``lo``/``hi`` restrict the output to a box of the full grid. Leading axes are channels.

    >>> import numpy as np
    >>> c = np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1) * np.ones((1, 3, 2, 2), np.float32)
    >>> upsample_linear(c, (5, 3, 3), 2)[0, :, 0, 0].tolist()
    [0.0, 0.5, 1.0, 1.5, 2.0]
    """
    lo = np.zeros(3, int) if lo is None else np.asarray(lo)
    hi = np.asarray(shape) if hi is None else np.asarray(hi)
    out = coarse
    lead = coarse.ndim - 3
    for axis in range(3):
        pos = np.arange(lo[axis], hi[axis], dtype=np.float32) / step
        i0 = np.minimum(pos.astype(np.intp), coarse.shape[lead + axis] - 2)
        w = (pos - i0).astype(np.float32)
        wshape = [1] * out.ndim
        wshape[lead + axis] = -1
        w = w.reshape(wshape)
        a = np.take(out, i0, axis=lead + axis)
        b = np.take(out, i0 + 1, axis=lead + axis)
        b -= a
        b *= w
        a += b
        out = a
    return out


def _coarse_positions(shape, affine, step):
    """Scanner mm of every ``step``-th voxel, (3, cx, cy, cz), covering the last voxel."""
    axes = [np.arange(-(-(n - 1) // step) + 1, dtype=np.float64) * step for n in shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.einsum("ab,b...->a...", affine[:3, :3], ijk) + affine[:3, 3, None, None, None]


def template_positions(subject: SubjectAnatomy, pose: Pose, coarse_scanner_mm) -> np.ndarray:
    """MNI mm (deformed) of scanner positions (3, ...)."""
    x = coarse_scanner_mm.reshape(3, -1)
    head = pose.rotation.T @ (x - pose.translation[:, None])
    sx, sy, sz = subject.shear
    shear = np.array([[1.0, sx, sy], [0.0, 1.0, sz], [0.0, 0.0, 1.0]])
    y = np.linalg.inv(shear @ np.diag(subject.scale)) @ head + _HEAD_CENTRE_MNI[:, None]
    grid = (y - subject.warp_origin[:, None]) / _WARP_SPACING
    u = np.stack([ndi.map_coordinates(w.astype(np.float64), grid, order=3, mode="nearest")
                  for w in subject.warp])
    return (y + u).reshape(coarse_scanner_mm.shape).astype(np.float32)


def _bounding_box(mask):
    """(lo, hi) index bounds of the True voxels (the whole grid if there are none)."""
    if not mask.any():
        return np.zeros(3, int), np.array(mask.shape)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1] + 1)
    return np.array(lo), np.array(hi)


def _step(distance, edge, width):
    """Soft 0 -> 1 transition of ``distance`` across ``edge`` (partial volume), float32."""
    out = distance - np.float32(edge)
    out *= np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _quantise(frac):
    return np.rint(np.clip(frac, 0.0, 1.0) * 255.0).astype(np.float32) / np.float32(255.0)


def sample_session(template: Template, subject: SubjectAnatomy, pose: Pose, shape,
                   affine) -> SessionAnatomy:
    """Resample the template head into one session's image grid.

    Parameters
    ----------
    template : Template
        From :func:`cl_bidsapp.simulate.template.load_template`.
    subject : SubjectAnatomy
        From :func:`draw_subject`.
    pose : Pose
        From :func:`draw_pose`.
    shape, affine
        Image grid (from :func:`image_grid`).

    Returns
    -------
    SessionAnatomy
    """
    voxel = float(np.sqrt((affine[:3, 0] ** 2).sum()))
    step = max(1, int(round(_COARSE_MM / voxel)))
    coarse_mni = template_positions(subject, pose, _coarse_positions(shape, affine, step))

    def to_voxels(grid_affine):
        inv = np.linalg.inv(grid_affine)
        if np.count_nonzero(inv[:3, :3] - np.diag(np.diag(inv[:3, :3]))):
            raise ValueError("template grids must be axis-aligned")
        scale = np.diag(inv[:3, :3]).astype(np.float32)[:, None, None, None]
        return coarse_mni * scale + inv[:3, 3].astype(np.float32)[:, None, None, None]

    # The head surfaces are distance maps: smooth enough to sample on the coarse grid.
    head_grid = to_voxels(template.head_affine)
    icv_distance, head_distance = (
        upsample_linear(ndi.map_coordinates(d, head_grid, order=1, mode="nearest",
                                            prefilter=False, output=np.float32)[None],
                        shape, step)[0]
        for d in (template.icv_distance, template.head_distance))
    # Brain maps need full resolution, but only inside the intracranial space.
    inside = icv_distance < voxel
    lo, hi = _bounding_box(inside)
    inside_box = inside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    coords = upsample_linear(to_voxels(template.brain_affine), shape, step, lo, hi)[:, inside_box]

    def resample(arr, order=1, mode="constant"):
        values = ndi.map_coordinates(arr, coords, order=order, mode=mode, cval=0.0,
                                     prefilter=False, output=np.float32)
        full = np.zeros(shape, np.float32)
        full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside_box] = values
        return full

    gm = resample(template.gm, mode="nearest")
    wm = resample(template.wm, mode="nearest")
    brain_mask = resample(template.brain) >= 0.5
    cortex = resample(template.cortex, order=0) > 0.5
    del coords, inside, inside_box
    # Template mm are scaled by the head size: thicknesses and partial-volume widths follow.
    mm = float(np.mean(subject.scale))
    width = voxel / mm
    icv = 1.0 - _step(icv_distance, 0.0, width)
    skull_in = 1.0 - _step(icv_distance, subject.skull_mm / mm, width)
    head = 1.0 - _step(head_distance, 0.0, width)
    bone_all = np.clip(skull_in - icv, 0.0, 1.0) * head
    marrow = (_step(icv_distance, 0.3 * subject.skull_mm / mm, width)
              - _step(icv_distance, 0.7 * subject.skull_mm / mm, width)) * head
    bone = np.clip(bone_all - marrow, 0.0, 1.0)
    outside_skull = np.clip(head - skull_in, 0.0, 1.0)
    skin_edge = -subject.skin_mm / mm
    under_skin = 1.0 - _step(head_distance, skin_edge, width)
    fat = outside_skull * (under_skin - (1.0 - _step(head_distance,
                                                      skin_edge - subject.fat_mm / mm, width)))
    soft = np.clip(outside_skull - fat, 0.0, 1.0)
    del icv_distance, head_distance, skull_in, bone_all, under_skin, outside_skull
    gm = _quantise(np.minimum(gm, icv))
    wm = _quantise(np.minimum(wm, icv - gm))
    csf = _quantise(icv - gm - wm)
    return SessionAnatomy(affine=affine, shape=tuple(shape), gm=gm, wm=wm, csf=csf, bone=bone,
                          marrow=marrow, fat=fat, soft=soft, brain_mask=brain_mask & (icv > 0.5),
                          cortex=cortex, coarse_mni=coarse_mni, coarse_step=step)


def tissue_labels(gm, wm, csf) -> np.ndarray:
    """Most likely tissue per voxel: 0 none, 1 GM, 2 WM, 3 CSF (ties go to the lower label).

    Voxels where non-brain tissue or air outweighs all three get 0.

    >>> import numpy as np
    >>> tissue_labels(np.array([0.6, 0.3, 0.1]), np.array([0.3, 0.6, 0.1]),
    ...               np.array([0.1, 0.1, 0.2])).tolist()
    [1, 2, 0]
    """
    gm, wm, csf = (np.asarray(a, dtype=np.float32) for a in (gm, wm, csf))
    rest = 1.0 - gm - wm - csf
    stack = np.stack([rest, gm, wm, csf])
    return np.argmax(stack, axis=0).astype(np.uint8)

"""Images prepared for display: RAS orientation, a shared grid, intensity window, slice choice.

Figures never show arrays in their stored orientation: every image is turned to the closest
RAS+ orientation (display only; the files are not touched), so a left-posterior-superior scan
and a right-anterior-superior one look the same. Overlays are put on the background's grid when
they were saved on another one.

>>> import numpy as np, nibabel as nib
>>> data = np.arange(24, dtype=float).reshape(2, 3, 4)
>>> lps = nib.Nifti1Image(data[::-1, ::-1], np.diag([-1.0, -1.0, 1.0, 1.0]))
>>> ras = nib.Nifti1Image(data, np.eye(4))
>>> bool((as_display(lps).data == as_display(ras).data).all())
True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

logger = logging.getLogger(__name__)

#: Axis of the RAS array that each view slices through.
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass
class DisplayImage:
    """A 3-D array in RAS+ voxel order with its voxel sizes (mm) and affine."""

    data: np.ndarray
    zooms: tuple[float, float, float]
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def world(self, ijk) -> np.ndarray:
        """World (scanner RAS) millimetres of voxel indices."""
        return nib.affines.apply_affine(self.affine, np.asarray(ijk, dtype=float))


def as_display(img, reference: DisplayImage | None = None, order: int = 1) -> DisplayImage:
    """Return ``img`` as a :class:`DisplayImage`, optionally on the grid of ``reference``.

    Parameters
    ----------
    img : nibabel image
        3-D image (a trailing singleton axis is dropped; a 4-D image shows its first volume).
    reference : DisplayImage, optional
        When given and ``img`` lies on another grid, ``img`` is resampled onto it
        (``order`` 0 for labels and masks, 1 for intensities).
    order : int
        Spline order of that resampling.
    """
    while img.ndim > 3:
        img = img.slicer[..., 0]
    canon = nib.as_closest_canonical(img)
    if reference is not None and not _same_grid(canon, reference):
        from nibabel.processing import resample_from_to

        logger.debug("resampling an overlay onto the background grid for display")
        canon = resample_from_to(canon, (reference.shape, reference.affine), order=order,
                                 mode="constant", cval=0)
    data = np.asanyarray(canon.dataobj)
    zooms = tuple(float(z) for z in canon.header.get_zooms()[:3])
    return DisplayImage(data, zooms, canon.affine)  # type: ignore[arg-type]


def _same_grid(img, reference: DisplayImage) -> bool:
    return (tuple(img.shape[:3]) == reference.shape
            and np.allclose(img.affine, reference.affine, atol=1e-3))


def intensity_window(data: np.ndarray, mask: np.ndarray | None = None,
                     percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    """Display range from percentiles of the voxels in ``mask`` (else the non-zero voxels).

    >>> intensity_window(np.arange(1001.0), percentiles=(0, 100))
    (1.0, 1000.0)
    """
    values = data[mask > 0] if mask is not None else data[data != 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    # a random subset keeps this fast on 1 mm volumes without moving the percentiles much
    if values.size > 200_000:
        values = np.random.default_rng(0).choice(values, 200_000, replace=False)
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    """Slices around the non-zero voxels of ``mask`` (the whole array when it is empty).

    >>> m = np.zeros((10, 10, 10)); m[4:6, 3, 7] = 1
    >>> bounding_box(m, margin=1)
    (slice(3, 7, None), slice(2, 5, None), slice(6, 9, None))
    """
    nonzero = np.nonzero(mask)
    if nonzero[0].size == 0:
        return tuple(slice(0, n) for n in mask.shape)  # type: ignore[return-value]
    return tuple(slice(max(int(idx.min()) - margin, 0), min(int(idx.max()) + margin + 1, n))
                 for idx, n in zip(nonzero, mask.shape))  # type: ignore[return-value]


def pick_slices(extent: np.ndarray, n_slices: int, axis: int = 2,
                prefer: np.ndarray | None = None) -> list[int]:
    """``n_slices`` slice indices spread evenly through the non-zero extent of ``extent``.

    The first and last 5 % of the extent are skipped (slivers of brain say little). With
    ``prefer`` (e.g. a lesion mask), each slice moves, within its share of the extent, to the
    slice with the most ``prefer`` voxels, so that lesions are seen in the mosaic.

    >>> m = np.zeros((4, 4, 100)); m[..., 10:90] = 1
    >>> pick_slices(m, 4)
    [23, 41, 58, 76]
    """
    other = tuple(a for a in range(3) if a != axis)
    profile = np.count_nonzero(extent, axis=other)
    filled = np.flatnonzero(profile)
    if filled.size == 0:
        first, last = 0, extent.shape[axis] - 1
    else:
        first, last = int(filled[0]), int(filled[-1])
    span = last - first
    lo, hi = first + 0.05 * span, last - 0.05 * span
    edges = np.linspace(lo, hi, n_slices + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    slices = [int(round(c)) for c in centres]
    if prefer is not None:
        counts = np.count_nonzero(prefer, axis=other)
        for n, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            window = np.arange(int(np.ceil(a)), int(np.floor(b)) + 1)
            window = window[(window >= 0) & (window < len(counts))]
            if window.size and counts[window].max() > 0:
                slices[n] = int(window[np.argmax(counts[window])])
    return sorted(set(slices))


def view_slice(data: np.ndarray, view: str, index: int) -> np.ndarray:
    """2-D slice for ``imshow(origin="lower")``: rows go up (S or A), columns go right.

    Axial and coronal views put the subject's left on the left (neurological convention);
    the sagittal view puts anterior on the left.
    """
    if view == "axial":
        return data[:, :, index].T
    if view == "coronal":
        return data[:, index, :].T
    if view == "sagittal":
        return data[index, ::-1, :].T
    raise ValueError(f"unknown view {view!r}")


def view_spacing(zooms, view: str) -> tuple[float, float]:
    """(column, row) voxel sizes in mm of a view's slices."""
    x, y, z = zooms
    return {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}[view]


def lesion_centres(instances: np.ndarray, labels) -> dict[int, tuple[int, int, int]]:
    """For each label, the lesion voxel nearest its centre of mass.

    Cortical lesions are often curved, so the centre of mass may fall outside the lesion; the
    nearest lesion voxel guarantees that the three views through it all cut the lesion.

    >>> a = np.zeros((5, 5, 5), int); a[0, 0, 0:3] = 1
    >>> lesion_centres(a, [1])
    {1: (0, 0, 1)}
    """
    from scipy import ndimage

    wanted = [int(lab) for lab in labels]
    boxes = ndimage.find_objects(instances.astype(np.int32, copy=False))
    out: dict[int, tuple[int, int, int]] = {}
    for label in wanted:
        if label < 1 or label > len(boxes) or boxes[label - 1] is None:
            continue
        box = boxes[label - 1]
        coords = np.argwhere(instances[box] == label)
        centre = coords.mean(axis=0)
        best = coords[np.argmin(((coords - centre) ** 2).sum(axis=1))]
        out[label] = tuple(int(b + s.start) for b, s in zip(best, box))  # type: ignore
    return out

"""Report figures: orientation independence, lesion-centred close-ups, formats, determinism."""
from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest

from cl_bidsapp.reports import figures
from cl_bidsapp.reports.display import as_display, pick_slices


def _head(shape=(40, 48, 36)):
    """An ellipsoid 'brain' with a bright off-centre blob, two lesions and a mask."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt((((grid.T - centre) / (np.array(shape) * 0.4)) ** 2).sum(-1)).T
    brain = r < 1
    image = np.where(brain, 1000.0 + 400 * (grid[0] / shape[0]), 0).astype(np.float32)
    lesions = np.zeros(shape, np.int16)
    lesions[26:30, 30:33, 20:23] = 1          # 36 voxels, right-anterior
    lesions[10:12, 12:14, 12:14] = 2          # 8 voxels, left-posterior
    return image, brain.astype(np.uint8), lesions


def _img(data, affine):
    return nib.Nifti1Image(data, affine)


def _flip_to_lps(data, affine):
    """The same world content stored left-posterior-superior."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    return data[::-1, ::-1].copy(), affine @ flip


def _png_pixels(data: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_mosaic_looks_the_same_whatever_the_stored_orientation():
    image, brain, lesions = _head()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ras = figures.mosaic(_img(image, affine), _img(brain, affine), n_slices=6)
    lps_image, lps_affine = _flip_to_lps(image, affine)
    lps_brain, _ = _flip_to_lps(brain, affine)
    lps = figures.mosaic(_img(lps_image, lps_affine), _img(lps_brain, lps_affine), n_slices=6)
    assert np.array_equal(_png_pixels(ras), _png_pixels(lps))
    # neurological convention: the subject's right (the brighter side, high x) on the right
    grey = _png_pixels(ras)[..., :3].mean(-1)
    panel = grey[:, 2 * grey.shape[1] // 6: 3 * grey.shape[1] // 6]
    left, right = np.hsplit(panel[:, : panel.shape[1] // 2 * 2], 2)
    assert right[right > 0.05].mean() > left[left > 0.05].mean() + 0.05


def test_overlay_on_another_grid_is_resampled_onto_the_background():
    image, brain, _ = _head()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine = np.repeat(np.repeat(np.repeat(brain, 2, 0), 2, 1), 2, 2)
    fine_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_affine[:3, 3] = -0.5
    shown = as_display(_img(fine, fine_affine), as_display(_img(image, affine)), order=0)
    assert shown.shape == image.shape
    assert np.mean(shown.data == brain) > 0.97


def test_mosaic_slices_move_to_lesions_when_asked():
    _, brain, lesions = _head()
    towards = pick_slices(brain, 4, prefer=lesions > 0)
    assert len(towards) == 4
    for label in (1, 2):
        slices = set(np.flatnonzero((lesions == label).any(axis=(0, 1))))
        assert slices & set(towards), f"lesion {label} is in no mosaic slice"


def test_lesion_zooms_follow_the_requested_order_and_cap():
    image, brain, lesions = _head()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    zooms = figures.lesion_zooms(_img(image, affine), _img(lesions, affine), [2, 1, 7],
                                 extent_img=_img(brain, affine), fov_mm=20)
    assert [label for label, _ in zooms] == [2, 1]  # label 7 does not exist: skipped
    capped = figures.lesion_zooms(_img(image, affine), _img(lesions, affine), max_lesions=1)
    assert [label for label, _ in capped] == [1]


def test_lesion_zoom_is_centred_on_its_lesion():
    image, brain, lesions = _head()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    (_, png), = figures.lesion_zooms(_img(image, affine), _img(lesions, affine), [2],
                                     fov_mm=24, captions={2: ""})
    pixels = _png_pixels(png)[..., :3]
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)
    assert red.any(), "the lesion outline must be drawn"
    height, width = red.shape
    ys, xs = np.nonzero(red)
    # three views side by side: the outline sits in the middle of each third
    for third in range(3):
        in_view = (xs >= third * width / 3) & (xs < (third + 1) * width / 3)
        assert in_view.any()
        centre = xs[in_view].mean() - third * width / 3
        assert abs(centre - width / 6) < width / 12


def test_histogram_and_formats():
    svg = figures.histogram(np.random.default_rng(0).normal(size=500), markers={"median": 0})
    assert b"<svg" in svg and b"<image" not in svg
    image, brain, _ = _head()
    out = figures.mosaic(_img(image, np.eye(4)), _img(brain, np.eye(4)), n_slices=3, fmt="svg")
    assert out.lstrip().startswith(b"<?xml")
    with pytest.raises(ValueError, match="png or svg"):
        figures.histogram([1, 2], fmt="gif")


def test_same_input_gives_the_same_bytes():
    image, brain, lesions = _head()
    args = (_img(image, np.eye(4)), _img(lesions, np.eye(4)))
    assert figures.mosaic(*args, fmt="svg") == figures.mosaic(*args, fmt="svg")
    assert figures.lesion_zooms(*args) == figures.lesion_zooms(*args)

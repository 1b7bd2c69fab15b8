"""Report figures: slice mosaics, lesion-centred zooms and histograms, as PNG or SVG bytes.

The functions take nibabel images (or arrays, for :func:`histogram`) and return the bytes of
one figure, so the subject report and the group report can embed them inline or save them.
They draw with matplotlib's object API (no pyplot state, no GUI backend), show every image in
RAS+ orientation whatever its stored orientation (see :mod:`cl_bidsapp.reports.display`), and
write nothing to disk: when ``MPLCONFIGDIR`` is unset, matplotlib's font cache goes to the
system temporary folder rather than the user's home.

>>> import numpy as np, nibabel as nib
>>> head = np.zeros((20, 20, 20), np.float32); head[4:16, 4:16, 4:16] = 100
>>> png = mosaic(nib.Nifti1Image(head, np.eye(4)), n_slices=4)
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
>>> data_uri(b"<svg/>", "svg")
'data:image/svg+xml;base64,PHN2Zy8+'
"""
from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cl_bidsapp.reports.canvas import (BRAIN_COLOUR, HEADER_INCHES, LESION_COLOUR, MIME,
                                       OTHER_LESION_COLOUR, draw_panel, figure_bytes,
                                       header_band, new_figure, panel_label, window_around)
from cl_bidsapp.reports.display import (DisplayImage, as_display, bounding_box,
                                        intensity_window, lesion_centres, pick_slices,
                                        view_slice, view_spacing)

logger = logging.getLogger(__name__)

_PANEL_INCHES = 2.0
_ZOOM_INCHES = 1.8
_DPI = 100


def data_uri(data: bytes, fmt: str) -> str:
    """A ``data:`` URI that embeds figure bytes in HTML (``fmt`` is ``"png"`` or ``"svg"``)."""
    return f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


def mosaic(background_img, contour_img=None, overlay_img=None, *, n_slices: int = 12,
           columns: int = 6, view: str = "axial", extent_img=None, focus_img=None,
           contour_colors: Sequence[str] | None = None,
           contour_labels: Sequence[str] | None = None,
           contour_fills: Sequence[float] | None = None, overlay_threshold: float = 0.05,
           overlay_range: tuple[float, float] = (0.0, 1.0), overlay_label: str = "",
           window: tuple[float, float] | None = None, title: str = "",
           fmt: str = "png", dpi: int = _DPI) -> bytes:
    """Slices through the brain with outlines and a colour overlay on a grey-scale image.

    Parameters
    ----------
    background_img : nibabel image
        The grey-scale image (e.g. the model input or the source image).
    contour_img : nibabel image or sequence of them, optional
        Masks or label maps to outline (every non-zero region gets an outline).
    overlay_img : nibabel image, optional
        Values drawn in colour where ``>= overlay_threshold`` (e.g. a probability map).
    n_slices, columns : int
        Number of slices and panels per row.
    view : {"axial", "coronal", "sagittal"}
        Slicing direction.
    extent_img : nibabel image, optional
        Slices are spread over, and panels cropped to, its non-zero region (default: the
        first contour image, else the non-zero background).
    focus_img : nibabel image, optional
        Slices move towards where this is non-zero (e.g. lesions), see
        :func:`~cl_bidsapp.reports.display.pick_slices`.
    contour_colors, contour_labels : sequence of str, optional
        One colour and legend label per contour image.
    contour_fills : sequence of float, optional
        Per contour image, the opacity of a fill inside the outline (0: outline only); small
        lesions are easier to spot filled.
    overlay_threshold, overlay_range, overlay_label
        Overlay visibility threshold, colour-scale limits and colour-bar label.
    window : (low, high), optional
        Grey-scale limits (default: 0.5-99.5 percentiles inside the extent).
    title : str
        Text at the top left.
    fmt : {"png", "svg"}
        Output format. ``dpi`` sets the PNG resolution.

    Returns
    -------
    bytes
    """
    background = as_display(background_img)
    contours = _as_list(contour_img)
    contour_arrays = [as_display(c, background, order=0).data for c in contours]
    overlay = as_display(overlay_img, background).data if overlay_img is not None else None
    if extent_img is not None:
        extent = as_display(extent_img, background, order=0).data > 0
    elif contour_arrays:
        extent = contour_arrays[0] > 0
    else:
        extent = background.data != 0
    if not extent.any():
        extent = np.ones(background.shape, bool)
    focus = as_display(focus_img, background, order=0).data > 0 if focus_img is not None else None
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[view]
    slices = pick_slices(extent, n_slices, axis=axis, prefer=focus)
    lo, hi = window or intensity_window(background.data, extent)
    box = bounding_box(extent, margin=3)
    colours = list(contour_colors or [BRAIN_COLOUR, LESION_COLOUR, OTHER_LESION_COLOUR])

    def crop(data: np.ndarray) -> np.ndarray:
        return data[box]

    bg = crop(background.data)
    cts = [crop(c) for c in contour_arrays]
    ov = crop(overlay) if overlay is not None else None
    local = [s - box[axis].start for s in slices]
    col_mm, row_mm = view_spacing(background.zooms, view)
    first = view_slice(bg, view, local[0])
    aspect = (first.shape[0] * row_mm) / max(first.shape[1] * col_mm, 1e-6)
    columns = max(1, min(columns, len(local)))
    rows = -(-len(local) // columns)
    panel_w = _PANEL_INCHES
    panel_h = panel_w * aspect
    width, height = columns * panel_w, rows * panel_h + HEADER_INCHES
    fig = new_figure(width, height)
    scalar = None
    for n, index in enumerate(local):
        r, c = divmod(n, columns)
        ax = fig.add_axes([c * panel_w / width, 1 - (HEADER_INCHES + (r + 1) * panel_h) / height,
                           panel_w / width, panel_h / height])
        scalar = draw_panel(ax, bg, view, index, (col_mm, row_mm), (lo, hi), cts, colours,
                             ov, overlay_threshold, overlay_range,
                             fills=contour_fills) or scalar
        world = background.world(_panel_centre(box, axis, slices[n]))[axis]
        # a whole number, so that a slice just below 0 reads "0 mm", not "-0 mm"
        panel_label(ax, f"{'xyz'[axis]} = {int(round(float(world)))} mm")
    header_band(fig, height, title, contours, colours, contour_labels, scalar, overlay_label)
    return figure_bytes(fig, fmt, dpi)


def lesion_zooms(background_img, lesion_img, labels: Sequence[int] | None = None, *,
                 probability_img=None, max_lesions: int = 12, fov_mm: float = 40.0,
                 captions: Mapping[int, str] | None = None,
                 window: tuple[float, float] | None = None, extent_img=None,
                 overlay_threshold: float = 0.05, fmt: str = "png",
                 dpi: int = _DPI) -> list[tuple[int, bytes]]:
    """Axial, coronal and sagittal close-ups centred on each lesion, one figure per lesion.

    Parameters
    ----------
    background_img : nibabel image
        Grey-scale image (the model input).
    lesion_img : nibabel image
        Lesion instance map (0 background, 1..N).
    labels : sequence of int, optional
        Lesions to show, in this order (default: 1, 2, ... which is largest first for the
        app's instance maps). At most ``max_lesions`` figures are made.
    probability_img : nibabel image, optional
        Adds a fourth panel: the axial view with the probability in colour.
    fov_mm : float
        Side of each close-up, in mm.
    captions : mapping of int to str, optional
        Text written above each lesion's views (default: the label).
    window : (low, high), optional
        Grey-scale limits (default: percentiles inside ``extent_img`` or the non-zero image).
    extent_img : nibabel image, optional
        Brain mask used for the default grey-scale window.
    overlay_threshold : float
        Probability below which the fourth panel shows no colour.
    fmt, dpi
        As for :func:`mosaic`.

    Returns
    -------
    list of (label, bytes)
        The lesion label and its figure, in the order shown. The outlined lesion is red;
        neighbouring lesions are yellow.
    """
    background = as_display(background_img)
    instances = as_display(lesion_img, background, order=0).data.astype(np.int32)
    prob = (as_display(probability_img, background).data
            if probability_img is not None else None)
    mask = as_display(extent_img, background, order=0).data if extent_img is not None else None
    lo, hi = window or intensity_window(background.data, mask)
    if labels is None:
        labels = range(1, int(instances.max(initial=0)) + 1)
    wanted = [int(lab) for lab in labels][:max(0, max_lesions)]
    centres = lesion_centres(instances, wanted)
    views = ("axial", "coronal", "sagittal") + (("axial",) if prob is not None else ())
    figures = []
    for label in wanted:
        if label not in centres:
            logger.debug("lesion %d is not in the instance map; no close-up", label)
            continue
        centre = centres[label]
        fig = new_figure(len(views) * _ZOOM_INCHES, _ZOOM_INCHES + HEADER_INCHES)
        height = _ZOOM_INCHES + HEADER_INCHES
        half = [max(int(round(fov_mm / 2 / z)), 2) for z in background.zooms]
        bg = window_around(background.data, centre, half)
        inst = window_around(instances, centre, half)
        this = inst == label
        others = (inst > 0) & ~this
        pr = window_around(prob, centre, half) if prob is not None else None
        for n, view in enumerate(views):
            ax = fig.add_axes([n / len(views), 0, 1 / len(views), _ZOOM_INCHES / height])
            axis = {"sagittal": 0, "coronal": 1, "axial": 2}[view]
            show_prob = pr is not None and n == 3
            draw_panel(ax, bg, view, half[axis], view_spacing(background.zooms, view),
                        (lo, hi), [] if show_prob else [others, this],
                        [OTHER_LESION_COLOUR, LESION_COLOUR], pr if show_prob else None,
                        overlay_threshold, (0.0, 1.0), linewidth=0.9,
                        interpolation="nearest", voxel_edges=True)
            panel_label(ax, "probability" if show_prob else view)
        caption = (captions or {}).get(label, f"lesion {label}")
        fig.text(0.01, 1 - (HEADER_INCHES / 2) / height, caption, color="white", fontsize=8,
                 va="center")
        figures.append((label, figure_bytes(fig, fmt, dpi)))
    return figures


def histogram(values, bins: int = 60, *, value_range: tuple[float, float] | None = None,
              xlabel: str = "", ylabel: str = "voxels", title: str = "",
              markers: Mapping[str, float] | None = None, log: bool = False,
              color: str = "#4b5563", fmt: str = "svg", dpi: int = _DPI) -> bytes:
    """A small histogram, e.g. of intensities inside the brain or of lesion volumes.

    Parameters
    ----------
    values : array-like
        Numbers to count (non-finite values are ignored).
    bins : int
        Number of bins.
    value_range : (low, high), optional
        Range of the bins (default: the data's).
    xlabel, ylabel, title : str
        Axis labels and title.
    markers : mapping of str to float, optional
        Vertical dashed lines with labels (e.g. percentiles or a threshold).
    log : bool
        Logarithmic counts.
    color, fmt, dpi
        Bar colour and output, as for :func:`mosaic`.

    Returns
    -------
    bytes

    Examples
    --------
    >>> svg = histogram([1, 2, 2, 3], bins=3, markers={"median": 2})
    >>> svg.lstrip().startswith(b"<?xml")
    True
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    fig = new_figure(5.0, 2.2, facecolor="white")
    ax = fig.add_axes([0.12, 0.22, 0.84, 0.64 if title else 0.72])
    if values.size:
        ax.hist(values, bins=bins, range=value_range, color=color, log=log)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    for n, (label, x) in enumerate((markers or {}).items()):
        ax.axvline(x, color=LESION_COLOUR if n == 0 else "#2563eb", lw=1, ls="--")
        ax.text(x, 1.0, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7,
                va="bottom", color="#111827")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if title:
        fig.text(0.01, 0.97, title, fontsize=9, va="top")
    return figure_bytes(fig, fmt, dpi)


def save_figure(data: bytes, path: str | Path) -> Path:
    """Write figure bytes atomically (see :mod:`cl_bidsapp.io`)."""
    from cl_bidsapp.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# -- drawing helpers --------------------------------------------------------------------------
def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [img for img in images if img is not None]
    return [images]


def _panel_centre(box, axis: int, index: int) -> list[float]:
    centre = [(s.start + s.stop - 1) / 2 for s in box]
    centre[axis] = index
    return centre


__all__ = ["mosaic", "lesion_zooms", "histogram", "data_uri", "save_figure", "DisplayImage",
           "BRAIN_COLOUR", "LESION_COLOUR", "OTHER_LESION_COLOUR"]

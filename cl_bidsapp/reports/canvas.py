"""Matplotlib drawing shared by the report figures: panels, header bands, figure bytes.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot,
so no GUI backend or global figure state is involved and threads do not interfere.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cl_bidsapp.reports.display import view_slice

#: Colours shared by the subject and group reports (legible on a grey-scale MRI).
BRAIN_COLOUR = "#22d3ee"
LESION_COLOUR = "#ff3b30"
OTHER_LESION_COLOUR = "#facc15"
OVERLAY_CMAP = "autumn"
MIME = {"png": "image/png", "svg": "image/svg+xml"}

HEADER_INCHES = 0.34
_EDGE = 8


def window_around(data: np.ndarray, centre, half) -> np.ndarray:
    """The block of ``2 * half + 1`` voxels centred on ``centre``, zero-padded at the edges."""
    out = np.zeros([2 * h + 1 for h in half], dtype=data.dtype)
    src, dst = [], []
    for c, h, n in zip(centre, half, data.shape):
        lo, hi = max(c - h, 0), min(c + h + 1, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - (c - h), hi - (c - h)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def panel_label(ax, text: str) -> None:
    ax.text(0.03, 0.03, text, transform=ax.transAxes, color="white", fontsize=6.5,
            bbox={"facecolor": "black", "alpha": 0.55, "pad": 1.2, "linewidth": 0})


def draw_panel(ax, bg, view, index, spacing, window, contours, colours, overlay,
               threshold, overlay_range, linewidth=1.0, interpolation="antialiased",
               fills=None, voxel_edges=False):
    """Draw one slice; return the overlay's image artist (for a colour bar) or None.

    Outlines run through voxel centres (smooth, for mosaics), or with ``voxel_edges`` along
    the voxels' borders, so that a close-up shows exactly which voxels a lesion has.
    """
    img2d = view_slice(bg, view, index)
    rows, cols = img2d.shape
    extent = (0, cols * spacing[0], 0, rows * spacing[1])
    ax.set_facecolor("black")
    ax.imshow(img2d, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
              extent=extent, interpolation=interpolation, aspect="equal")
    artist = None
    if overlay is not None:
        ov = view_slice(overlay, view, index).astype(float)
        ov = np.ma.masked_less(ov, threshold)
        artist = ax.imshow(ov, cmap=OVERLAY_CMAP, vmin=overlay_range[0], vmax=overlay_range[1],
                           origin="lower", extent=extent, interpolation="nearest",
                           alpha=0.75, aspect="equal")
    xs = (np.arange(cols) + 0.5) * spacing[0]
    ys = (np.arange(rows) + 0.5) * spacing[1]
    for n, (mask, colour) in enumerate(zip(contours, colours)):
        part = view_slice(mask, view, index) > 0
        if not part.any() or part.all():
            continue
        alpha = fills[n] if fills is not None and n < len(fills) else 0.0
        if alpha > 0:
            ax.imshow(np.ma.masked_equal(part, False), cmap=single_colour(colour),
                      vmin=0, vmax=1, origin="lower", extent=extent, alpha=alpha,
                      interpolation="nearest", aspect="equal")
        if voxel_edges:
            # upsampled voxels put the 0.5 level on (nearly) the voxel borders
            fine = np.kron(part, np.ones((_EDGE, _EDGE), bool)).astype(np.float32)
            ax.contour((np.arange(cols * _EDGE) + 0.5) * spacing[0] / _EDGE,
                       (np.arange(rows * _EDGE) + 0.5) * spacing[1] / _EDGE, fine,
                       levels=[0.5], colors=[colour], linewidths=linewidth)
        else:
            ax.contour(xs, ys, part.astype(np.float32), levels=[0.5], colors=[colour],
                       linewidths=linewidth)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_axis_off()
    return artist


def header_band(fig, height, title, contours, colours, labels, scalar, overlay_label) -> None:
    from matplotlib.lines import Line2D

    y = 1 - (HEADER_INCHES / 2) / height
    if title:
        fig.text(0.005, y, title, color="white", fontsize=9, va="center", weight="bold")
    if labels and contours:
        handles = [Line2D([], [], color=c, lw=1.5) for c in colours[:len(contours)]]
        fig.legend(handles, list(labels)[:len(contours)], loc="center right",
                   bbox_to_anchor=(0.995, y), ncols=len(handles), frameon=False,
                   labelcolor="white", fontsize=8, handlelength=1.5)
    if scalar is not None:
        width = fig.get_figwidth()
        cax = fig.add_axes([0.40, y - 0.07 / height, 1.6 / width, 0.14 / height])
        bar = fig.colorbar(scalar, cax=cax, orientation="horizontal")
        bar.ax.tick_params(labelsize=6, colors="white", length=2, pad=1)
        bar.outline.set_edgecolor("white")
        if overlay_label:
            fig.text(0.40 + 1.7 / width, y, overlay_label, color="white", fontsize=8,
                     va="center")


def single_colour(colour: str):
    from matplotlib.colors import ListedColormap

    return ListedColormap([colour])


def new_figure(width: float, height: float, facecolor: str = "black"):
    configure_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), facecolor=facecolor)


def figure_bytes(fig, fmt: str, dpi: int) -> bytes:
    import matplotlib

    if fmt not in MIME:
        raise ValueError(f"figure format must be png or svg, not {fmt!r}")
    buffer = io.BytesIO()
    # fixed hash salt and no date: the same figure gives the same bytes on every rebuild
    with matplotlib.rc_context({"svg.hashsalt": "cl-bidsapp", "svg.fonttype": "path"}):
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        fig.savefig(buffer, format=fmt, dpi=dpi, facecolor=fig.get_facecolor(),
                    metadata=metadata)
    return buffer.getvalue()


def configure_matplotlib() -> None:
    """Keep matplotlib's cache out of the user's home (read-only in containers)."""
    if "matplotlib" not in sys.modules and "MPLCONFIGDIR" not in os.environ:
        folder = Path(tempfile.gettempdir()) / f"cl-bidsapp-matplotlib-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(folder)

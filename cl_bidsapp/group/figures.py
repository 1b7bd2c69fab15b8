"""Figures of the group report: lesion-load distributions and the lesion frequency map.

Figures are PNG bytes (matplotlib's object API, no pyplot state, no display needed); the
report embeds them and ``group/figures/`` keeps a copy. Large datasets are drawn with box plots
and at most :data:`MAX_POINTS` jittered points per panel, chosen with a fixed seed, so a
figure of 10,000 images is as quick and as small as one of 100.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

MAX_POINTS = 2000
#: Groupings shown in the distribution figure: (column of group_images.tsv, axis label).
GROUPINGS = (("site", "site"), ("session_id", "session"), ("contrast", "contrast"))
MEASURES = (("lesion_count", "lesions per image"), ("total_volume_mm3", "lesion volume (mm³)"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def distribution_figure(rows: Sequence[dict]) -> bytes | None:
    """Lesion count and volume of processed images by site, session and contrast.

    Parameters
    ----------
    rows : sequence of dict
        Rows of ``group_images.tsv`` (status ``ok`` rows are drawn).

    Returns
    -------
    bytes or None
        A PNG, or None when no image was processed.
    """
    done = [r for r in rows if r.get("status") == "ok" and r.get("lesion_count") is not None]
    if not done:
        return None
    groupings = [(c, label) for c, label in GROUPINGS
                 if any(r.get(c) is not None for r in done)]
    fig = _figure(4.2 * len(groupings), 6.4)
    axes = fig.subplots(len(MEASURES), len(groupings), squeeze=False)
    rng = np.random.default_rng(0)
    for col, (column, label) in enumerate(groupings):
        levels = sorted({str(r.get(column) or "n/a") for r in done})
        for row_index, (measure, measure_label) in enumerate(MEASURES):
            ax = axes[row_index][col]
            data = []
            for level in levels:
                values = np.array([float(r[measure]) for r in done
                                   if str(r.get(column) or "n/a") == level
                                   and r.get(measure) is not None])
                data.append(values)
            ax.boxplot([d if d.size else np.array([np.nan]) for d in data],
                       showfliers=False, widths=0.5)
            ax.set_xticks(range(1, len(levels) + 1), [_short(v) for v in levels],
                          rotation=30 if len(levels) > 4 else 0)
            for position, values in enumerate(data, start=1):
                if values.size > MAX_POINTS:
                    values = rng.choice(values, MAX_POINTS, replace=False)
                jitter = rng.uniform(-0.15, 0.15, values.size)
                ax.scatter(position + jitter, values, s=8, alpha=0.5, color="#c0392b",
                           linewidths=0)
            if measure == "total_volume_mm3" and any((d > 0).any() for d in data if d.size):
                ax.set_yscale("symlog", linthresh=10)
            ax.set_xlabel(f"by {label}")
            ax.set_ylabel(measure_label)
            ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def frequency_figure(map_path: Path, template_t1w: Path, n_images: int,
                     n_slices: int = 10) -> bytes:
    """Axial slices of the template with the lesion frequency map on top.

    Slices are spread evenly over the extent of the template brain; the colour scale runs
    from 0 to the map's maximum (a single image gives 0 or 1).
    """
    import nibabel as nib

    freq_img = nib.as_closest_canonical(nib.load(str(map_path)))
    anat_img = nib.as_closest_canonical(nib.load(str(template_t1w)))
    freq = np.asarray(freq_img.dataobj, dtype=np.float32)
    anat = np.asarray(anat_img.dataobj, dtype=np.float32).reshape(anat_img.shape[:3])
    if anat.shape != freq.shape:  # not expected: the map is written on the template grid
        from nilearn.image import resample_to_img

        anat = resample_to_img(anat_img, freq_img, interpolation="linear",
                               force_resample=True, copy_header=True).get_fdata()
    inside = np.flatnonzero(anat.max(axis=(0, 1)) > 0)
    low, high = (inside[0], inside[-1]) if inside.size else (0, anat.shape[2] - 1)
    slices = np.linspace(low + 0.1 * (high - low), high - 0.1 * (high - low),
                         n_slices).round().astype(int)
    vmax = float(freq.max()) or 1.0
    window = np.percentile(anat[anat > 0], [1, 99]) if (anat > 0).any() else (0, 1)
    columns = 5
    rows = int(np.ceil(len(slices) / columns))
    fig = _figure(2.2 * columns, 2.5 * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False)
    shown = None
    for ax, k in zip(axes.ravel(), slices):
        ax.imshow(anat[:, :, k].T, origin="lower", cmap="gray", vmin=window[0],
                  vmax=window[1])
        overlay = np.ma.masked_less_equal(freq[:, :, k].T, 0)
        shown = ax.imshow(overlay, origin="lower", cmap="hot", vmin=0, vmax=vmax, alpha=0.9)
        z = nib.affines.apply_affine(freq_img.affine, [0, 0, k])[2]
        ax.set_title(f"z = {z:.0f} mm", fontsize=8)
        ax.axis("off")
    for ax in axes.ravel()[len(slices):]:
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=axes, shrink=0.6, label=f"fraction of {n_images} image(s)")
    return _png(fig)


def _short(text: str, width: int = 14) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

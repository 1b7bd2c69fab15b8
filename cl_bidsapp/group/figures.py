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
    dot = 18 if len(done) < 200 else 6   # few images: each dot should be seen
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
                ax.scatter(position + jitter, values, s=dot, alpha=0.6, color="#c0392b",
                           linewidths=0, zorder=3)
            positive = np.concatenate([d[d > 0] for d in data]) if data else np.array([])
            if measure == "total_volume_mm3" and positive.size and (
                    positive.max() > 100 * np.median(positive)):
                # lesion loads are heavy-tailed: a log scale keeps the bulk readable
                ax.set_yscale("symlog", linthresh=10)
            ax.set_xlabel(f"by {label}")
            ax.set_ylabel(measure_label)
            ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def frequency_figure(map_path: Path, template_t1w: Path, template_mask: Path,
                     n_images: int, n_slices: int = 12) -> bytes:
    """Axial slices of the template with the lesion frequency map on top.

    Drawn with the subject report's mosaic (:func:`cl_bidsapp.reports.figures.mosaic`): the
    template brain outlined, every voxel where at least one image has a lesion coloured, on a
    scale from 0 to the map's maximum, slices moved towards the lesions.
    """
    import nibabel as nib

    from cl_bidsapp.reports.figures import mosaic

    frequency = nib.load(str(map_path))
    values = np.asarray(frequency.dataobj, dtype=np.float32)
    top = float(values.max()) or 1.0
    brain = nib.load(str(template_mask))
    return mosaic(nib.load(str(template_t1w)), contour_img=brain, overlay_img=frequency,
                  n_slices=n_slices, extent_img=brain,
                  focus_img=nib.Nifti1Image((values > 0).astype(np.uint8), frequency.affine),
                  contour_labels=["template brain"],
                  overlay_threshold=0.5 / max(n_images, 1), overlay_range=(0.0, top),
                  overlay_label=f"fraction of {n_images} image(s) with a lesion",
                  title="Lesion frequency, MNI152NLin2009cAsym")


def _short(text: str, width: int = 14) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"

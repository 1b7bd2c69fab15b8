"""A picture of one phantom: INV1, INV2, UNI and MPRAGE of the same head, lesions outlined.

``cl-bidsapp-simulate montage docs/figures/phantom_montage.png`` draws the README figure.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cl_bidsapp.io import atomic_path
from cl_bidsapp.simulate.dataset import DEFAULT_NOISE
from cl_bidsapp.simulate.phantom import simulate_session
from cl_bidsapp.simulate.protocols import get_protocol

log = logging.getLogger(__name__)

_ZOOM_MM = 40.0


def make_montage(out_png, mp2rage: str = "3T-MP2RAGE", mprage: str = "3T-MPRAGE",
                 subject: int = 1, seed: int = 0, voxel_size: float = 1.0,
                 lesion_mean: float = 8.0, lesion_contrast: float = 1.3,
                 noise: float = DEFAULT_NOISE) -> Path:
    """Simulate one session with an MP2RAGE and an MPRAGE protocol and draw it as a PNG.

    Rows: axial, a zoom on the largest lesion, coronal, sagittal (all through that lesion);
    columns: INV1, INV2, UNI, MPRAGE; red lines outline the reference lesions.

    Parameters
    ----------
    out_png : str or Path
        Output file.
    mp2rage, mprage : str
        Protocol presets for the MP2RAGE columns and the MPRAGE column.
    subject, seed, voxel_size, lesion_mean, lesion_contrast, noise
        As for :func:`cl_bidsapp.simulate.simulate_dataset`.

    Returns
    -------
    pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not get_protocol(mp2rage).is_mp2rage or get_protocol(mprage).is_mp2rage:
        raise ValueError("give an MP2RAGE preset and an MPRAGE preset")
    phantom = simulate_session([mp2rage, mprage], subject, 1, voxel_size, lesion_mean,
                               lesion_contrast, noise, seed)
    mp2, mpr = phantom.images[get_protocol(mp2rage).name], phantom.images[get_protocol(mprage).name]
    columns = [("INV1", mp2["inv1"]), ("INV2", mp2["inv2"]), ("UNI", mp2["uni"]),
               ("MPRAGE (T1w)", mpr["t1w"])]
    lesion = phantom.lesion_labels > 0
    if phantom.lesions:
        biggest = max(phantom.lesions, key=lambda les: len(les.voxels))
        centre = biggest.voxels.mean(0).round().astype(int)
    else:
        centre = np.array(np.nonzero(phantom.anatomy.brain_mask)).mean(1).round().astype(int)
    half = int(_ZOOM_MM / 2 / phantom.anatomy.voxel_size)
    zoom = tuple(slice(max(c - half, 0), c + half) for c in centre[:2])

    def views(vol):
        return [vol[:, :, centre[2]], vol[:, :, centre[2]][zoom], vol[:, centre[1], :],
                vol[centre[0], :, :]]

    rows = ["axial", "axial, zoom on the largest lesion", "coronal", "sagittal"]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 3.3 * len(rows)),
                             facecolor="black")
    for j, (title, vol) in enumerate(columns):
        brain = vol[phantom.anatomy.brain_mask]
        vmax = float(np.percentile(brain, 99.5)) if title != "UNI" else 4095.0
        vmin = 0.0
        for i, (img, outline) in enumerate(zip(views(vol), views(lesion))):
            ax = axes[i, j]
            ax.imshow(img.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            if outline.any():
                ax.contour(outline.T.astype(float), [0.5], colors="red", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, color="white", fontsize=12)
            if j == 0:
                ax.set_ylabel(rows[i], color="white", fontsize=9)
    n = len(phantom.lesions)
    fig.suptitle(f"Simulated phantom (sub-{subject:02d}, seed {seed}, {mp2rage} / {mprage}, "
                 f"{voxel_size:g} mm): {n} cortical lesion{'s' if n != 1 else ''} outlined in red",
                 color="white", fontsize=11)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=64, facecolor="black", format="png")
    plt.close(fig)
    return out

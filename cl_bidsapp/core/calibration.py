"""Calibration of a CL probability map against a reference mask: Brier score and ECE.

Both are computed over the voxels of the brain mask when one is given, else over all voxels
of the image. Pass the brain mask: over all voxels the empty background outside the head
dominates and makes every model look well calibrated. NaN probabilities are left out and
values are clipped to 0..1.
The ECE measures the reliability of the CL probability itself (not of the most likely class):
in each of 30 equal-width bins, the mean probability is compared with the fraction of
reference-lesion voxels.

>>> import numpy as np
>>> p = np.array([0.0, 0.0, 1.0]); y = np.array([0, 0, 1])
>>> brier_score(p, y), expected_calibration_error(p, y)
(0.0, 0.0)
"""
from __future__ import annotations

import numpy as np

from cl_bidsapp.core.components import as_lesion_mask

ECE_BINS = 30


def brier_score(probability: np.ndarray, reference: np.ndarray,
                brain_mask: np.ndarray | None = None) -> float:
    """Mean squared difference between the CL probability and the reference (0 is perfect).

    Over the brain-mask voxels when ``brain_mask`` is given, else all voxels; NaN
    probabilities are left out.

    >>> round(brier_score(np.array([0.9, 0.2]), np.array([1, 0])), 3)
    0.025
    """
    prob, ref = _calibration_inputs(probability, reference, brain_mask)
    return float(np.mean((prob - ref) ** 2)) if prob.size else float("nan")


def expected_calibration_error(probability: np.ndarray, reference: np.ndarray,
                               brain_mask: np.ndarray | None = None,
                               n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the CL probability over ``n_bins`` equal-width bins.

    ``ECE = sum over bins of (voxels in bin / voxels) * |mean probability - lesion fraction|``,
    over the brain-mask voxels when given, else all voxels (probability 1.0 falls in the top
    bin).

    >>> p = np.array([0.1, 0.1, 0.9, 0.9]); y = np.array([0, 0, 1, 0])
    >>> round(expected_calibration_error(p, y), 3)   # (2 * 0.1 + 2 * 0.4) / 4
    0.25
    """
    prob, ref = _calibration_inputs(probability, reference, brain_mask)
    if not prob.size:
        return float("nan")
    bins = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, weights=prob, minlength=n_bins)
                 - np.bincount(bins, weights=ref, minlength=n_bins))
    # sum_b (n_b / N) |mean_p - mean_y| = sum_b |sum_p - sum_y| / N
    return float(gap.sum() / count.sum())


def _calibration_inputs(probability, reference, brain_mask):
    prob = np.asarray(probability, dtype=float)
    ref = as_lesion_mask(reference)
    if prob.shape != ref.shape:
        raise ValueError(f"probability shape {prob.shape} differs from reference {ref.shape}")
    keep = np.isfinite(prob)
    if brain_mask is not None:
        brain = as_lesion_mask(brain_mask)
        if brain.shape != ref.shape:
            raise ValueError(f"brain mask shape {brain.shape} differs from {ref.shape}")
        keep &= brain
    return np.clip(prob[keep], 0.0, 1.0), ref[keep].astype(float)

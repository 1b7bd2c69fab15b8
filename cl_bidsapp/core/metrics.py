"""Evaluation of a predicted lesion mask against a reference mask, as the method defines it.

The definitions (``method.md``) are the contract; in short, per scan:

* Lesions are connected components with 26-connectivity in both masks (as in
  :mod:`cl_bidsapp.core.lesions`).
* For each predicted lesion p: K' is the union of reference lesions that p touches, O the
  voxels of the *other* predicted lesions inside K', and
  ``IoU_adj(p) = |p ∩ K'| / |p ∪ (K' \\ O)|`` (0 when p touches no reference lesion). Removing
  O means that a reference lesion split between several predicted lesions does not penalise
  each piece for the others.
* p is a true positive (TP) when ``IoU_adj >= 0.25``, under-segmented (US) when
  ``0 < IoU_adj < 0.25`` and a false positive (FP) when it touches no reference lesion; a
  reference lesion that no predicted voxel touches is a false negative (FN). TP, US and FP
  count predicted lesions, FN counts reference lesions.
* ``F1 = 2TP / (2TP + FP + US + FN)`` (1 when the denominator is 0), ``recall = TP / (TP + FN)``
  (1 when 0), ``precision = TP / (TP + FP + US)`` (when nothing is predicted: 1 if FN = 0 else
  0), ``US-rate = US / (TP + FP + US)`` (0 when nothing is predicted: ``method.md`` leaves
  this case open).
* Voxel-wise Dice (1 when both masks are empty) and normalised Dice with effective lesion load
  ``r = 0.001`` over all voxels of the image.
* Calibration of a probability map: Brier score and expected calibration error (ECE, 30
  equal-width bins), see :mod:`cl_bidsapp.core.calibration`.
* Over scans: the mean with a bootstrap standard error (1000 resamples of 50 % of the scans),
  and scores of the counts pooled over scans.

>>> import numpy as np
>>> ref = np.zeros((8, 8, 8), bool); ref[1:4, 1:4, 1:4] = True
>>> pred = np.zeros_like(ref); pred[1:4, 1:4, 1:3] = True; pred[6, 6, 6:8] = True
>>> result = lesion_detection(pred, ref)
>>> result.tp, result.fp, result.us, result.fn, round(result.f1, 3)
(1, 1, 0, 0, 0.667)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cl_bidsapp.core.calibration import (  # noqa: F401  (re-exported: all scores in one place)
    ECE_BINS,
    brier_score,
    expected_calibration_error,
)
from cl_bidsapp.core.components import as_lesion_mask, lesion_instances

logger = logging.getLogger(__name__)

#: Lowest IoU_adj of a true positive; below it (but above 0) a lesion is under-segmented.
TP_IOU = 0.25
#: Values of the per-lesion error map.
ERROR_TP, ERROR_FP, ERROR_US, ERROR_FN = 1, 2, 3, 4
ERROR_LABELS = {ERROR_TP: "TP", ERROR_FP: "FP", ERROR_US: "US", ERROR_FN: "FN"}
NDSC_LESION_LOAD = 0.001
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_FRACTION = 0.5

_RECORD_COLUMNS = ["kind", "predicted", "reference", "predicted_voxels", "reference_voxels",
                   "overlap_voxels", "iou_adj"]


@dataclass(frozen=True)
class LesionDetection:
    """Lesion-wise evaluation of one scan (see :func:`lesion_detection`).

    Attributes
    ----------
    tp, fp, us : int
        Predicted lesions that are true positives, false positives, under-segmented.
    fn : int
        Reference lesions that no predicted voxel touches.
    n_predicted, n_reference : int
        Lesion counts of each mask.
    f1, recall, precision, us_rate : float
        Scores, with the empty-case conventions of the module docstring.
    error_map : ndarray of uint8
        Same grid as the inputs: predicted lesions coloured 1 (TP), 2 (FP), 3 (US); missed
        reference lesions 4 (FN); 0 elsewhere.
    records : pandas.DataFrame
        One row per predicted lesion and per missed reference lesion: ``kind`` (TP/FP/US/FN),
        ``predicted`` (lesion number in the prediction, largest first as in
        :func:`~cl_bidsapp.core.lesions.lesion_instances`; 0 for FN), ``reference`` (tuple of
        the reference lesion numbers it touches), ``predicted_voxels``, ``reference_voxels``
        (voxels of those reference lesions), ``overlap_voxels`` and ``iou_adj``.
    """

    tp: int
    fp: int
    us: int
    fn: int
    n_predicted: int
    n_reference: int
    f1: float
    recall: float
    precision: float
    us_rate: float
    error_map: np.ndarray = field(repr=False, compare=False)
    records: pd.DataFrame = field(repr=False, compare=False)

    def scores(self) -> dict:
        """Counts and scores as a flat dict (no images), e.g. for one row of a table."""
        return {"n_reference": self.n_reference, "n_predicted": self.n_predicted,
                "tp": self.tp, "fp": self.fp, "us": self.us, "fn": self.fn,
                "f1": self.f1, "recall": self.recall, "precision": self.precision,
                "us_rate": self.us_rate}


def detection_scores(tp: int, fp: int, us: int, fn: int) -> dict:
    """F1, recall, precision and US-rate from lesion counts, with the method's empty cases.

    Examples
    --------
    >>> detection_scores(tp=3, fp=1, us=0, fn=1)["f1"]
    0.75
    >>> detection_scores(0, 0, 0, 0) == {"f1": 1.0, "recall": 1.0, "precision": 1.0,
    ...                                   "us_rate": 0.0}
    True
    >>> detection_scores(0, 0, 0, fn=2)["precision"]
    0.0
    """
    f1_denominator = 2 * tp + fp + us + fn
    n_predicted = tp + fp + us
    return {
        "f1": 2 * tp / f1_denominator if f1_denominator else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "precision": tp / n_predicted if n_predicted else (1.0 if fn == 0 else 0.0),
        "us_rate": us / n_predicted if n_predicted else 0.0,
    }


def lesion_detection(prediction: np.ndarray, reference: np.ndarray,
                     tp_iou: float = TP_IOU) -> LesionDetection:
    """Lesion-wise detection scores of a predicted mask against a reference mask.

    Parameters
    ----------
    prediction, reference : ndarray
        3-D masks of the same shape; every non-zero (non-NaN) voxel is lesion. Instance maps
        work too (they are binarised first).
    tp_iou : float
        Lowest IoU_adj of a true positive (the method uses 0.25).

    Returns
    -------
    LesionDetection

    Examples
    --------
    A prediction that covers two reference lesions at once (and the gap between them) is one
    true positive, and neither reference lesion is missed:

    >>> ref = np.zeros((3, 3, 11), bool); ref[1, 1, 0:5] = ref[1, 1, 6:11] = True
    >>> pred = np.zeros_like(ref); pred[1, 1, :] = True
    >>> r = lesion_detection(pred, ref)
    >>> r.tp, r.fn, round(float(r.records.iou_adj[0]), 3)   # IoU_adj = 10 / 11
    (1, 0, 0.909)
    """
    pred_mask = as_lesion_mask(prediction)
    ref_mask = as_lesion_mask(reference)
    if pred_mask.shape != ref_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from reference "
                         f"shape {ref_mask.shape}")
    error_map = np.zeros(pred_mask.shape, dtype=np.uint8)
    crop = _bounding_box(pred_mask | ref_mask)
    # Labelling only the box around all lesions gives the same components much faster.
    pred_lab = lesion_instances(pred_mask[crop], 0.5, min_size=1).astype(np.int64)
    ref_lab = lesion_instances(ref_mask[crop], 0.5, min_size=1).astype(np.int64)
    n_pred, n_ref = int(pred_lab.max(initial=0)), int(ref_lab.max(initial=0))
    pred_size = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    ref_size = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)

    both = (pred_lab > 0) & (ref_lab > 0)
    codes, overlap = np.unique(pred_lab[both] * (n_ref + 1) + ref_lab[both], return_counts=True)
    pair_pred, pair_ref = np.divmod(codes, n_ref + 1)
    predicted_in_ref = np.bincount(pair_ref, weights=overlap, minlength=n_ref + 1)
    # |p ∩ K'| and |p ∪ (K' \ O)| = |p| + sum over touched r of (|r| - |P ∩ r|).
    inter = np.bincount(pair_pred, weights=overlap, minlength=n_pred + 1)
    uncovered = np.bincount(pair_pred, weights=ref_size[pair_ref] - predicted_in_ref[pair_ref],
                            minlength=n_pred + 1)
    k_size = np.bincount(pair_pred, weights=ref_size[pair_ref], minlength=n_pred + 1)
    touched = inter > 0
    iou = np.where(touched, inter / np.maximum(pred_size + uncovered, 1), 0.0)

    kind = np.full(n_pred + 1, ERROR_FP, dtype=np.uint8)
    kind[touched & (iou >= tp_iou)] = ERROR_TP
    kind[touched & (iou < tp_iou)] = ERROR_US
    kind[0] = 0
    missed = np.flatnonzero(predicted_in_ref == 0)
    missed = missed[missed > 0]
    ref_kind = np.zeros(n_ref + 1, dtype=np.uint8)
    ref_kind[missed] = ERROR_FN
    error_map[crop] = np.where(pred_lab > 0, kind[pred_lab], ref_kind[ref_lab])

    touched_refs = [[] for _ in range(n_pred + 1)]
    for p, r in zip(pair_pred.tolist(), pair_ref.tolist()):
        touched_refs[p].append(r)
    rows = [(ERROR_LABELS[int(kind[p])], p, tuple(touched_refs[p]), int(pred_size[p]),
             int(k_size[p]), int(inter[p]), float(iou[p])) for p in range(1, n_pred + 1)]
    rows += [("FN", 0, (int(r),), 0, int(ref_size[r]), 0, 0.0) for r in missed]
    records = pd.DataFrame(rows, columns=_RECORD_COLUMNS)

    tp = int((kind[1:] == ERROR_TP).sum())
    fp = int((kind[1:] == ERROR_FP).sum())
    us = int((kind[1:] == ERROR_US).sum())
    fn = int(missed.size)
    logger.debug("lesion detection: %d predicted, %d reference: TP %d, FP %d, US %d, FN %d",
                 n_pred, n_ref, tp, fp, us, fn)
    return LesionDetection(tp=tp, fp=fp, us=us, fn=fn, n_predicted=n_pred, n_reference=n_ref,
                           error_map=error_map, records=records,
                           **detection_scores(tp, fp, us, fn))


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Voxel-wise Dice similarity coefficient (1 when both masks are empty).

    >>> a = np.array([1, 1, 0, 0]); b = np.array([1, 0, 0, 0])
    >>> round(dice(a, b), 3)
    0.667
    """
    pred, ref = as_lesion_mask(prediction), as_lesion_mask(reference)
    _same_shape(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    return 2.0 * int((pred & ref).sum()) / total if total else 1.0


def normalised_dice(prediction: np.ndarray, reference: np.ndarray,
                    lesion_load: float = NDSC_LESION_LOAD) -> float:
    """Normalised Dice (nDSC): Dice as if the lesion load were ``lesion_load`` of the image.

    ``k = (1 - r)|Y| / (r (N - |Y|))`` (1 when Y is empty or fills the image) rescales false
    positives, ``nDSC = 2TP / (k FP + 2TP + FN)``; N counts all voxels. 1 when both masks
    are empty.

    >>> ref = np.zeros(1000, bool); ref[:10] = True; pred = ref.copy(); pred[10:20] = True
    >>> round(dice(pred, ref), 3), round(normalised_dice(pred, ref), 3)
    (0.667, 0.165)

    Here the lesion load is 1 %, ten times ``r``, so ``k = 9.99 / 0.99`` and each false
    positive weighs about ten times more than in Dice.
    """
    pred, ref = as_lesion_mask(prediction), as_lesion_mask(reference)
    _same_shape(pred, ref)
    n_ref, n_all = int(ref.sum()), ref.size
    tp = int((pred & ref).sum())
    fp = int(pred.sum()) - tp
    fn = n_ref - tp
    if tp + fp + fn == 0:
        return 1.0
    k = 1.0 if n_ref in (0, n_all) else (1 - lesion_load) * n_ref / (lesion_load * (n_all - n_ref))
    return 2.0 * tp / (k * fp + 2.0 * tp + fn)


def scan_scores(prediction: np.ndarray, reference: np.ndarray,
                probability: np.ndarray | None = None,
                brain_mask: np.ndarray | None = None) -> dict:
    """All per-scan scores: lesion counts and scores, Dice, nDSC, Brier and ECE.

    Brier and ECE are NaN without a probability map.

    >>> y = np.zeros((4, 4, 4), bool); y[1:3, 1:3, 1:3] = True
    >>> s = scan_scores(y, y, probability=y.astype(float))
    >>> s["f1"], s["dsc"], s["ndsc"], s["brier"], s["ece"]
    (1.0, 1.0, 1.0, 0.0, 0.0)
    """
    result = lesion_detection(prediction, reference).scores()
    result["dsc"] = dice(prediction, reference)
    result["ndsc"] = normalised_dice(prediction, reference)
    if probability is None:
        result["brier"] = result["ece"] = float("nan")
    else:
        result["brier"] = brier_score(probability, reference, brain_mask)
        result["ece"] = expected_calibration_error(probability, reference, brain_mask)
    return result


def bootstrap_standard_error(values, n_resamples: int = BOOTSTRAP_RESAMPLES,
                             fraction: float = BOOTSTRAP_FRACTION, seed: int = 0) -> float:
    """Standard error of a mean over scans, by bootstrap.

    ``n_resamples`` times, draw ``fraction`` of the scans (at least one) with replacement and
    take their mean; the standard error is the standard deviation of those means. NaN values
    are left out; NaN when fewer than two values remain. Seeded, so reruns agree.

    >>> bootstrap_standard_error([0.5, 0.5, 0.5])
    0.0
    >>> bootstrap_standard_error([0.2, 0.4, 0.9, 0.7]) > 0
    True
    """
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan")
    size = max(1, int(round(fraction * values.size)))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, size))].mean(axis=1)
    return float(np.std(means, ddof=1))


def summarise_scans(scores: pd.DataFrame, n_resamples: int = BOOTSTRAP_RESAMPLES,
                    fraction: float = BOOTSTRAP_FRACTION, seed: int = 0) -> pd.DataFrame:
    """Group summary of per-scan scores: mean, bootstrap standard error and pooled values.

    Parameters
    ----------
    scores : pandas.DataFrame
        One row per scan, with columns from :func:`scan_scores` (others are ignored).
    n_resamples, fraction, seed
        Passed to :func:`bootstrap_standard_error`.

    Returns
    -------
    pandas.DataFrame
        One row per score (``metric``), with ``mean`` and ``se`` over scans, ``n_scans``
        (scans with a value) and ``pooled``: the sum over scans for lesion counts, and for
        F1, recall, precision and US-rate the score of the pooled counts (NaN for voxel
        scores).

    Examples
    --------
    >>> scans = pd.DataFrame({"tp": [1, 0], "fp": [0, 1], "us": [0, 0], "fn": [0, 1],
    ...                       "f1": [1.0, 0.0]})
    >>> s = summarise_scans(scans).set_index("metric")
    >>> float(s.loc["f1", "mean"]), float(s.loc["f1", "pooled"]), float(s.loc["fn", "pooled"])
    (0.5, 0.5, 1.0)
    """
    count_columns = ["n_reference", "n_predicted", "tp", "fp", "us", "fn"]
    score_columns = ["f1", "recall", "precision", "us_rate", "dsc", "ndsc", "brier", "ece"]
    pooled_scores = {}
    if all(c in scores.columns for c in ("tp", "fp", "us", "fn")):
        totals = {c: int(pd.to_numeric(scores[c]).sum()) for c in ("tp", "fp", "us", "fn")}
        pooled_scores = detection_scores(**totals)
    rows = []
    for metric in count_columns + score_columns:
        if metric not in scores.columns:
            continue
        values = pd.to_numeric(scores[metric], errors="coerce").to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        rows.append({
            "metric": metric,
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "se": bootstrap_standard_error(finite, n_resamples, fraction, seed),
            "n_scans": int(finite.size),
            "pooled": float(finite.sum()) if metric in count_columns
            else float(pooled_scores.get(metric, float("nan"))),
        })
    return pd.DataFrame(rows, columns=["metric", "mean", "se", "n_scans", "pooled"])


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"prediction shape {a.shape} differs from reference shape {b.shape}")


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel (one voxel when none)."""
    if not mask.any():
        return tuple(slice(0, min(1, n)) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)

"""Detection scores by lesion stratum (size bin, cortical involvement, site), pooled over scans.

The error analysis asks which lesions a model misses. Every lesion of the evaluation
(reference and predicted) carries an ``outcome`` and the stratum it is counted in:

* reference lesions: ``TP`` when a true-positive predicted lesion touches it, ``US`` when only
  under-segmented ones do, ``FN`` when none does;
* predicted lesions: ``TP``, ``US`` or ``FP`` as in
  :func:`~cl_bidsapp.core.metrics.lesion_detection`.

Per stratum, over all scans: reference lesions, detected (reference ``TP``) and missed
(``FN``) ones, and the predicted TP, US and FP counts. Scores use the method's formulas on
these pooled counts:

* ``detection_rate = detected / reference lesions`` (the share of reference lesions found);
* ``recall = TP / (TP + FN)``, ``precision = TP / (TP + FP + US)``,
  ``F1 = 2TP / (2TP + FP + US + FN)`` (TP counting predicted lesions, as ``method.md`` does;
  recall and detection rate differ only where lesions are split or merged).

A stratum with nothing to count has n/a, not the per-scan convention of 1. The standard
error is a bootstrap over scans as in ``method.md`` (1000 resamples of 50 % of the scans with
replacement, seed 0): the pooled score of each resample, then their standard deviation.
Because every lesion is in exactly one stratum of a grouping, the counts of the strata add up
to the totals.

>>> lesions = pd.DataFrame({"bids_name": ["a", "a", "a", "b", "b"],
...                         "source": ["reference", "predicted", "predicted", "reference",
...                                    "predicted"],
...                         "outcome": ["TP", "TP", "FP", "FN", "FP"],
...                         "size_bin": ["<10", "<10", "10-30", "10-30", "<10"]})
>>> table = stratified_detection(lesions, pd.DataFrame({"bids_name": ["a", "b"]}),
...                              "size_bin", "size", order=SIZE_BIN_LABELS)
>>> print(table[["group", "n_reference", "detected", "fn", "tp", "fp", "detection_rate",
...              "f1"]].to_string(index=False))
 group  n_reference  detected  fn  tp  fp  detection_rate       f1
   <10            1         1   0   1   1             1.0 0.666667
 10-30            1         0   1   0   1             0.0 0.000000
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cl_bidsapp.core.metrics import BOOTSTRAP_FRACTION, BOOTSTRAP_RESAMPLES

#: Upper edges (mm³) of the lesion-size bins; the last bin is open.
SIZE_BINS_MM3 = (10.0, 30.0, 100.0)
SIZE_BIN_LABELS = ("<10", "10-30", "30-100", ">=100")
#: Upper edges (mm) of the bins of a lesion's depth below the brain-mask surface (its closest
#: voxel); at 2 mm the first bin holds the lesions that touch the surface.
DEPTH_BINS_MM = (3.0, 6.0)
DEPTH_BIN_LABELS = ("<3", "3-6", ">=6")
COUNT_COLUMNS = ("n_reference", "detected", "reference_us", "fn", "tp", "us", "fp")
STRATA_COLUMNS = ("grouping", "group", "n_images", *COUNT_COLUMNS, "detection_rate",
                  "detection_rate_se", "recall", "precision", "f1", "f1_se")


def size_bin(volume_mm3: float | None) -> str | None:
    """The label of the size bin of a volume in mm³ (None when unknown).

    >>> [size_bin(v) for v in (3, 10, 29.9, 30, 150, None)]
    ['<10', '10-30', '10-30', '30-100', '>=100', None]
    """
    return _bin(volume_mm3, SIZE_BINS_MM3, SIZE_BIN_LABELS)


def depth_bin(depth_mm: float | None) -> str | None:
    """The label of the bin of a depth below the brain surface in mm (None when unknown).

    >>> [depth_bin(v) for v in (2.0, 3.0, 5.9, 6.0, None, float("nan"))]
    ['<3', '3-6', '3-6', '>=6', None, None]
    """
    return _bin(depth_mm, DEPTH_BINS_MM, DEPTH_BIN_LABELS)


def _bin(value: float | None, edges, labels) -> str | None:
    if value is None or not np.isfinite(value):
        return None
    return labels[int(np.searchsorted(edges, float(value), "right"))]


def pooled_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of pooled counts; ``counts[..., k]`` in the order of :data:`COUNT_COLUMNS`.

    NaN where a score's denominator is 0.

    >>> s = pooled_scores(np.array([4, 3, 0, 1, 3, 0, 1]))
    >>> float(s["detection_rate"]), float(s["recall"]), float(s["f1"])
    (0.75, 0.75, 0.75)
    >>> bool(np.isnan(pooled_scores(np.zeros(7))["f1"]))
    True
    """
    c = np.asarray(counts, dtype=float)
    n_ref, detected, _, fn, tp, us, fp = (c[..., k] for k in range(len(COUNT_COLUMNS)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"detection_rate": detected / n_ref, "recall": tp / (tp + fn),
                "precision": tp / (tp + fp + us), "f1": 2 * tp / (2 * tp + fp + us + fn)}


def bootstrap_pooled_se(per_scan: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES,
                        fraction: float = BOOTSTRAP_FRACTION, seed: int = 0
                        ) -> dict[str, float]:
    """Bootstrap standard error of the pooled detection rate and F1 over scans.

    Parameters
    ----------
    per_scan : ndarray, shape (n_scans, 7)
        Counts of each scan (columns of :data:`COUNT_COLUMNS`).

    Returns
    -------
    dict
        ``detection_rate`` and ``f1``: the standard deviation of the pooled score over
        resamples where it is defined; NaN with fewer than two scans.

    >>> same = np.tile([2, 1, 0, 1, 1, 0, 0], (4, 1))
    >>> bootstrap_pooled_se(same)["detection_rate"]
    0.0
    """
    per_scan = np.asarray(per_scan, dtype=float)
    nan = {"detection_rate": float("nan"), "f1": float("nan")}
    if len(per_scan) < 2:
        return nan
    size = max(1, int(round(fraction * len(per_scan))))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_scan), size=(n_resamples, size))
    scores = pooled_scores(per_scan[draws].sum(axis=1))
    out = {}
    for name in nan:
        finite = scores[name][np.isfinite(scores[name])]
        out[name] = float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")
    return out


def scan_counts(lesions: pd.DataFrame) -> pd.DataFrame:
    """Counts of :data:`COUNT_COLUMNS` per ``bids_name`` from per-lesion rows.

    >>> rows = pd.DataFrame({"bids_name": ["a", "a"], "source": ["reference", "predicted"],
    ...                      "outcome": ["US", "US"]})
    >>> scan_counts(rows).loc["a"].tolist()
    [1, 0, 1, 0, 0, 1, 0]
    """
    ref = lesions["source"] == "reference"
    outcome = lesions["outcome"]
    flags = pd.DataFrame({
        "bids_name": lesions["bids_name"], "n_reference": ref,
        "detected": ref & (outcome == "TP"), "reference_us": ref & (outcome == "US"),
        "fn": ref & (outcome == "FN"), "tp": ~ref & (outcome == "TP"),
        "us": ~ref & (outcome == "US"), "fp": ~ref & (outcome == "FP")})
    return flags.groupby("bids_name")[list(COUNT_COLUMNS)].sum().astype(int)


def stratified_detection(lesions: pd.DataFrame, images: pd.DataFrame, column: str,
                         grouping: str, order: Sequence[str] | None = None) -> pd.DataFrame:
    """One row of pooled counts and scores per level of ``column``.

    Parameters
    ----------
    lesions : pandas.DataFrame
        Per-lesion rows: ``bids_name``, ``source`` (reference / predicted), ``outcome`` and
        ``column``. Rows where ``column`` is missing are left out.
    images : pandas.DataFrame
        Every evaluated scan (``bids_name``), with ``column`` too when it is a property of
        the scan (e.g. ``site``): the bootstrap then resamples only that level's scans.
    column, grouping : str
        The stratum column, and the name of the grouping written in the ``grouping`` column.
    order : sequence of str, optional
        Levels in this order first (those with no lesion and no scan are left out).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`STRATA_COLUMNS`.
    """
    known = lesions[lesions[column].notna()]
    levels = [str(v) for v in known[column].unique()]
    if column in images.columns:
        levels += [str(v) for v in images[column].dropna().unique()]
    levels = list(dict.fromkeys(levels))
    ranked = list(order or [])
    levels.sort(key=lambda v: (ranked.index(v) if v in ranked else len(ranked), v))
    rows = []
    for level in levels:
        part = known[known[column].astype(str) == level]
        scope = images
        if column in images.columns:
            scope = images[images[column].astype(str) == level]
        rows.append(_stratum_row(grouping, level, part, scope["bids_name"]))
    return pd.DataFrame(rows, columns=list(STRATA_COLUMNS))


def overall_detection(lesions: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The ``all`` row: every lesion of every scan (columns :data:`STRATA_COLUMNS`)."""
    return pd.DataFrame([_stratum_row("all", "all", lesions, images["bids_name"])],
                        columns=list(STRATA_COLUMNS))


def _stratum_row(grouping: str, level: str, part: pd.DataFrame, scans) -> dict:
    scans = pd.Index(pd.unique(pd.Series(scans, dtype=object)))
    counts = scan_counts(part).reindex(scans, fill_value=0)
    totals = counts.sum().to_numpy()
    scores = pooled_scores(totals)
    se = bootstrap_pooled_se(counts.to_numpy())
    row = {"grouping": grouping, "group": level, "n_images": len(scans)}
    row.update({c: int(v) for c, v in zip(COUNT_COLUMNS, totals)})
    row.update({k: float(v) for k, v in scores.items()})
    row["detection_rate_se"] = se["detection_rate"]
    row["f1_se"] = se["f1"]
    return row

"""Out-of-distribution score: how far a scan's network features lie from the training scans'.

Each scan is summarised by a fixed-length feature vector (the segmentation network's encoder
activations, pooled over space and over the sliding-window tiles inside the brain; see
:mod:`cl_bidsapp.models.embedding`). A *reference* describes the vectors of scans the user
calls in-domain: their mean and a shrunk covariance. The distance of a new scan is its
Mahalanobis distance to that reference; the *threshold* is a high quantile (0.95 by default) of
the scores of in-domain scans the reference did not see (held-out scans, else leave-one-out).

Covariance with few scans (tens) and many features (hundreds) is singular, hence
Ledoit-Wolf shrinkage towards a scaled identity (Ledoit and Wolf 2004, J. Multivariate Anal.
88:365; the same estimator as scikit-learn's ``ledoit_wolf``):
``C = (1 - a) S + a mu I``, ``S`` the sample covariance (divided by n), ``mu = trace(S) / d``.
The reference stores ``C`` compactly: the top principal directions of ``S`` with their shrunk
variances, and one variance for every other direction (the shrinkage floor ``a mu`` plus the
mean of the eigenvalues left out, so nothing is lost when every non-zero direction is kept).

A scan's vector may be made of *blocks* (one per network stage: the early stages carry the
image's contrast and texture, the bottleneck what the network makes of it). Each block then
gets its own reference and a *scale*, the median leave-one-out distance of the training scans
(each scan's distance to the block's reference fitted without it); the scan's score is the
largest scaled block distance (1 is a typical in-domain scan), so a scan unlike the training scans at any depth of the network stands out
(the multi-layer Mahalanobis score of Lee et al. 2018, NeurIPS, with an unsupervised
combination: no out-of-domain scans are needed to calibrate it). A reference without blocks is
one block of scale 1: its score is the plain Mahalanobis distance.

Pure numpy (no Nipype, no torch): the model card stores the reference as JSON lists.

>>> rng = np.random.default_rng(0)
>>> train = rng.normal(size=(40, 6))
>>> ref = fit_reference(train)
>>> inside = mahalanobis(ref, rng.normal(size=(3, 6)))
>>> outside = mahalanobis(ref, rng.normal(size=(3, 6)) + 4.0)
>>> bool(inside.max() < outside.min())
True
>>> roc_auc(np.r_[inside, outside], [0, 0, 0, 1, 1, 1])
1.0
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

#: Quantile of held-out in-domain distances used as the threshold.
DEFAULT_QUANTILE = 0.95
#: Principal directions kept in a reference (the rest share one variance).
MAX_COMPONENTS = 64
#: Fields a reference needs (as stored in the model card's ``ood`` section, or in each of its
#: ``blocks``).
REFERENCE_KEYS = ("mean", "components", "variances", "residual_variance")
#: Fields of a block besides the reference's: where its features lie in the vector, its scale.
BLOCK_KEYS = ("name", "start", "stop", "scale")


def _as_matrix(features, name: str = "features") -> np.ndarray:
    x = np.asarray(features, dtype=float)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array (scans x features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has NaN or infinite values")
    return x


def ledoit_wolf_shrinkage(features) -> float:
    """Ledoit-Wolf shrinkage intensity ``a`` in 0..1 for centred-by-mean ``features``.

    Parameters
    ----------
    features : array (n_scans, n_features)

    Returns
    -------
    float
        0 keeps the sample covariance, 1 replaces it by ``mu I``.

    Examples
    --------
    Few scans and many features need strong shrinkage; many scans need little:

    >>> rng = np.random.default_rng(1)
    >>> few = ledoit_wolf_shrinkage(rng.normal(size=(5, 50)))
    >>> many = ledoit_wolf_shrinkage(rng.normal(size=(5000, 5)) * [1, 2, 3, 4, 5])
    >>> bool(few > 0.5), bool(many < 0.05)
    (True, True)
    """
    x = _as_matrix(features)
    n, d = x.shape
    if n < 2:
        return 1.0
    x = x - x.mean(axis=0)
    x2 = x ** 2
    cov_trace = x2.sum(axis=0) / n
    mu = cov_trace.sum() / d
    # Frobenius norms through the n x n Gram matrices (cheaper when d > n)
    gram = x @ x.T
    delta_ = float((gram ** 2).sum()) / n ** 2            # ||S||_F^2
    beta_ = float((x2.sum(axis=1) ** 2).sum())           # sum(X2.T X2)
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * cov_trace.sum() + d * mu ** 2) / d  # ||S - mu I||^2 / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 or delta <= 0 else float(beta / delta)


def fit_reference(features, max_components: int = MAX_COMPONENTS) -> dict[str, Any]:
    """Mean and shrunk covariance of in-domain feature vectors.

    Parameters
    ----------
    features : array (n_scans, n_features)
        At least 2 scans.
    max_components : int
        Principal directions stored; the others share ``residual_variance``.

    Returns
    -------
    dict
        ``mean`` (d), ``components`` (k x d, orthonormal rows), ``variances`` (k, shrunk),
        ``residual_variance`` (every other direction), ``shrinkage``, ``n_scans``,
        ``n_features``: plain lists and floats, ready for JSON.

    Examples
    --------
    The stored form reproduces the full shrunk covariance:

    >>> rng = np.random.default_rng(2)
    >>> x = rng.normal(size=(8, 5)) * [1, 1, 2, 3, 5]
    >>> ref = fit_reference(x)
    >>> full = shrunk_covariance(x)
    >>> bool(np.allclose(reference_covariance(ref), full))
    True
    """
    x = _as_matrix(features)
    n, d = x.shape
    if n < 2:
        raise ValueError("a reference needs the features of at least 2 scans")
    mean = x.mean(axis=0)
    centred = x - mean
    alpha = ledoit_wolf_shrinkage(x)
    # eigen-decomposition of S = centred.T centred / n through the SVD of the data
    _, singular, vt = np.linalg.svd(centred / math.sqrt(n), full_matrices=False)
    eig = singular ** 2
    mu = float(eig.sum() / d)
    floor = alpha * mu
    if floor <= 0:  # all scans identical: any distance from them is infinitely unusual
        floor = max(mu, 1e-12) * 1e-6 or 1e-12
    keep = [i for i in range(len(eig)) if eig[i] > 1e-12 * max(eig[0], 1e-300)]
    keep = keep[:max(1, int(max_components))]
    dropped = float(eig.sum() - eig[keep].sum())
    n_rest = d - len(keep)
    residual = floor + ((1 - alpha) * dropped / n_rest if n_rest else 0.0)
    return {
        "mean": mean.tolist(),
        "components": vt[keep].tolist(),
        "variances": ((1 - alpha) * eig[keep] + floor).tolist(),
        "residual_variance": float(residual),
        "shrinkage": float(alpha),
        "n_scans": int(n),
        "n_features": int(d),
    }


def shrunk_covariance(features) -> np.ndarray:
    """The full Ledoit-Wolf covariance ``(1 - a) S + a mu I`` (for checks; d x d).

    >>> x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]])  # variances 1, 0.25
    >>> round(ledoit_wolf_shrinkage(x), 3), shrunk_covariance(x).round(3).tolist()
    (0.444, [[0.833, 0.0], [0.0, 0.417]])
    """
    x = _as_matrix(features)
    centred = x - x.mean(axis=0)
    s = centred.T @ centred / len(x)
    alpha = ledoit_wolf_shrinkage(x)
    mu = np.trace(s) / x.shape[1]
    return (1 - alpha) * s + alpha * mu * np.eye(x.shape[1])


def reference_covariance(reference: dict) -> np.ndarray:
    """The covariance a stored reference stands for (d x d)."""
    u = np.asarray(reference["components"], dtype=float)
    v = np.asarray(reference["variances"], dtype=float)
    d = len(reference["mean"])
    c = float(reference["residual_variance"]) * np.eye(d)
    if u.size:
        c += u.T @ np.diag(v - float(reference["residual_variance"])) @ u
    return c


def reference_problems(reference: Any) -> list[str]:
    """What is wrong with a stored reference (empty when usable).

    >>> reference_problems({"mean": [0.0], "components": [], "variances": [],
    ...                     "residual_variance": 1.0, "threshold": 2.0})
    []
    >>> reference_problems({"mean": [0.0, 1.0]})[0]
    'ood.components is missing'
    """
    if not isinstance(reference, dict):
        return ["ood must be an object"]
    if "blocks" in reference:
        return _block_problems(reference)
    missing = [f"ood.{k} is missing" for k in REFERENCE_KEYS if k not in reference]
    if missing:
        return missing
    problems = []
    try:
        mean = np.asarray(reference["mean"], dtype=float)
        comps = np.asarray(reference["components"], dtype=float)
        var = np.asarray(reference["variances"], dtype=float)
        residual = float(reference["residual_variance"])
    except (TypeError, ValueError):
        return ["ood has values that are not numbers"]
    if mean.ndim != 1 or not mean.size:
        problems.append("ood.mean must be a non-empty list of numbers")
    elif comps.size and (comps.ndim != 2 or comps.shape[1] != mean.size):
        problems.append(f"ood.components must be k lists of {mean.size} numbers")
    elif var.ndim != 1 or len(var) != (len(comps) if comps.size else 0):
        problems.append("ood.variances must have one value per component")
    if problems:
        return problems
    if not (residual > 0 and np.all(var > 0)):
        problems.append("ood variances must be positive")
    finite = all(np.all(np.isfinite(a)) for a in (mean, comps, var)) and math.isfinite(residual)
    if not finite:
        problems.append("ood has NaN or infinite values")
    return problems + _threshold_problems(reference)


def mahalanobis(reference: dict, features) -> np.ndarray:
    """Mahalanobis distance of each row of ``features`` to the reference.

    Parameters
    ----------
    reference : dict
        From :func:`fit_reference` (or the model card's ``ood`` section).
    features : array (n_features,) or (n_scans, n_features)

    Returns
    -------
    ndarray (n_scans,)

    Examples
    --------
    >>> ref = {"mean": [0.0, 0.0], "components": [[1.0, 0.0]], "variances": [4.0],
    ...        "residual_variance": 1.0}
    >>> mahalanobis(ref, [[2.0, 0.0], [0.0, 2.0]]).tolist()
    [1.0, 2.0]
    """
    x = _as_matrix(features)
    mean = np.asarray(reference["mean"], dtype=float)
    if x.shape[1] != mean.size:
        raise ValueError(f"features have {x.shape[1]} values but the reference has "
                         f"{mean.size}: they come from another network or layer")
    r = x - mean
    u = np.asarray(reference["components"], dtype=float).reshape(-1, mean.size)
    v = np.asarray(reference["variances"], dtype=float)
    residual = float(reference["residual_variance"])
    coef = r @ u.T
    d2 = (coef ** 2 / v).sum(axis=1) + ((r ** 2).sum(axis=1) - (coef ** 2).sum(axis=1)) / residual
    return np.sqrt(np.maximum(d2, 0.0))


def _threshold_problems(reference: dict) -> list[str]:
    """The stored threshold, when there is one, must be a positive finite number."""
    threshold = reference.get("threshold")
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and math.isfinite(threshold) and threshold > 0):
        return ["ood.threshold must be a positive number"]
    return []


def _block_problems(reference: dict) -> list[str]:
    """:func:`reference_problems` for a reference made of blocks."""
    blocks = reference["blocks"]
    if not isinstance(blocks, list) or not blocks:
        return ["ood.blocks must be a non-empty list"]
    problems, end = [], 0
    for i, block in enumerate(blocks):
        where = f"ood.blocks[{i}]"
        if not isinstance(block, dict):
            problems.append(f"{where} must be an object")
            continue
        missing = [k for k in BLOCK_KEYS if k not in block]
        if missing:
            problems.append(f"{where}.{missing[0]} is missing")
            continue
        start, stop = block["start"], block["stop"]
        if not (type(start) is int and type(stop) is int and start == end < stop):
            problems.append(f"{where} must cover features {end}.. (start {start}, stop {stop})")
            continue
        end = stop
        inner = reference_problems({k: v for k, v in block.items() if k in REFERENCE_KEYS})
        problems += [p.replace("ood.", f"{where}.", 1) for p in inner]
        if not problems and len(block["mean"]) != stop - start:
            problems.append(f"{where}.mean must have {stop - start} values")
        scale = block["scale"]
        if isinstance(scale, bool) or not (isinstance(scale, (int, float))
                                           and math.isfinite(scale) and scale > 0):
            problems.append(f"{where}.scale must be a positive number")
    return problems + _threshold_problems(reference)


def n_features(reference: dict) -> int:
    """How many values a scan's vector must have for ``reference``."""
    if "blocks" in reference:
        return int(reference["blocks"][-1]["stop"])
    return len(reference["mean"])


def block_distances(reference: dict, features) -> np.ndarray:
    """Scaled Mahalanobis distance of each scan to each block's reference (scans x blocks).

    A reference without blocks is one block of scale 1.

    >>> ref = {"blocks": [
    ...     {"name": "a", "start": 0, "stop": 1, "scale": 2.0, "mean": [0.0],
    ...      "components": [], "variances": [], "residual_variance": 1.0},
    ...     {"name": "b", "start": 1, "stop": 2, "scale": 1.0, "mean": [10.0],
    ...      "components": [], "variances": [], "residual_variance": 4.0}]}
    >>> block_distances(ref, [[4.0, 10.0], [0.0, 16.0]]).tolist()
    [[2.0, 0.0], [0.0, 3.0]]
    >>> ood_score(ref, [[4.0, 10.0], [0.0, 16.0]]).tolist()
    [2.0, 3.0]
    """
    x = _as_matrix(features)
    if "blocks" not in reference:
        return mahalanobis(reference, x)[:, None]
    if x.shape[1] != n_features(reference):
        raise ValueError(f"features have {x.shape[1]} values but the reference has "
                         f"{n_features(reference)}: they come from another network or layer")
    columns = [mahalanobis(b, x[:, b["start"]:b["stop"]]) / float(b["scale"])
               for b in reference["blocks"]]
    return np.stack(columns, axis=1)


def ood_score(reference: dict, features) -> np.ndarray:
    """The out-of-distribution score of each scan: its largest scaled block distance.

    For a reference without blocks, the Mahalanobis distance (:func:`mahalanobis`).
    """
    return block_distances(reference, features).max(axis=1)


def fit_block_reference(features, blocks: Sequence[tuple[str, int, int]], held_out=None,
                        max_components: int = MAX_COMPONENTS) -> tuple[dict, np.ndarray]:
    """A reference per block of features, each with its scale; and the calibration scores.

    Parameters
    ----------
    features : array (n_scans, n_features)
        In-domain training scans (at least 3).
    blocks : sequence of (name, start, stop)
        Consecutive column ranges covering every feature.
    held_out : array (n_held_out, n_features) or None
        In-domain scans not in ``features``, whose scores calibrate a threshold.

    Each block's scale is the median of the training scans' leave-one-out distances to it, so
    the held-out scans are used once only: for the threshold.

    Returns
    -------
    reference : dict
        ``blocks`` (each :func:`fit_reference`'s fields plus ``name``, ``start``, ``stop``,
        ``scale``), ``n_scans``, ``n_features``, ``scores_from`` (``held-out`` or
        ``leave-one-out``).
    scores : ndarray
        :func:`ood_score` of the held-out scans, else the training scans' leave-one-out
        scores: what a threshold is taken from.

    Examples
    --------
    >>> rng = np.random.default_rng(4)
    >>> train = np.c_[rng.normal(size=(30, 3)), 50 * rng.normal(size=(30, 2))]
    >>> ref, scores = fit_block_reference(train, [("a", 0, 3), ("b", 3, 5)],
    ...                                   held_out=np.c_[rng.normal(size=(9, 3)),
    ...                                                  50 * rng.normal(size=(9, 2))])
    >>> [b["name"] for b in ref["blocks"]], ref["scores_from"], len(scores)
    (['a', 'b'], 'held-out', 9)
    >>> shifted = np.c_[rng.normal(size=(5, 3)) + 6, 50 * rng.normal(size=(5, 2))]
    >>> bool(ood_score(ref, shifted).min() > np.max(scores))  # one block is enough
    True
    """
    x = _as_matrix(features)
    if len(x) < 3:
        raise ValueError("a reference of blocks needs at least 3 scans (leave-one-out scales)")
    held = None if held_out is None else _as_matrix(held_out, "held_out")
    if held is not None and held.shape[1] != x.shape[1]:
        raise ValueError(f"held-out scans have {held.shape[1]} features, the training scans "
                         f"{x.shape[1]}: they come from another network or layer")
    if held is not None and not len(held):
        held = None
    end = 0
    for name, start, stop in blocks:
        if start != end or stop <= start:
            raise ValueError(f"block {name} must start at {end} and end after it")
        end = stop
    if end != x.shape[1]:
        raise ValueError(f"blocks cover {end} features, the scans have {x.shape[1]}")
    out_blocks, loo = [], []
    for name, start, stop in blocks:
        ref = fit_reference(x[:, start:stop], max_components)
        d = leave_one_out_distances(x[:, start:stop], max_components)
        scale = float(np.median(d))
        if not scale > 0:
            scale = 1.0
        out_blocks.append({"name": str(name), "start": int(start), "stop": int(stop),
                           "scale": scale, **ref})
        loo.append(d / scale)
    reference = {"blocks": out_blocks, "n_scans": int(len(x)), "n_features": int(x.shape[1]),
                 "scores_from": "held-out" if held is not None else "leave-one-out"}
    scores = ood_score(reference, held) if held is not None else np.max(np.stack(loo, 1), 1)
    return reference, scores


def leave_one_out_distances(features, max_components: int = MAX_COMPONENTS) -> np.ndarray:
    """Distance of each scan to the reference fitted on all the other scans.

    Stands in for held-out scans when there are none (needs at least 3 scans).

    >>> x = np.random.default_rng(3).normal(size=(10, 4))
    >>> d = leave_one_out_distances(x)
    >>> d.shape, bool(np.all(d > mahalanobis(fit_reference(x), x)))
    ((10,), True)
    """
    x = _as_matrix(features)
    if len(x) < 3:
        raise ValueError("leave-one-out needs at least 3 scans")
    out = np.empty(len(x))
    for i in range(len(x)):
        ref = fit_reference(np.delete(x, i, axis=0), max_components)
        out[i] = mahalanobis(ref, x[i])[0]
    return out


def threshold_from(distances: Sequence[float], quantile: float = DEFAULT_QUANTILE) -> float:
    """The ``quantile`` of in-domain distances (linear interpolation), the OOD threshold.

    >>> threshold_from(np.arange(1, 21), 0.95)
    19.05
    """
    d = np.asarray(distances, dtype=float)
    d = d[np.isfinite(d)]
    if not d.size:
        raise ValueError("no distances to calibrate a threshold on")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    return float(np.quantile(d, quantile))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for telling label 1 from label 0.

    The probability that a random positive scores higher than a random negative, ties
    counting one half (the Mann-Whitney statistic). NaN when a class is empty.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([1, 1], [0, 1]), roc_auc([1, 2], [1, 1])
    (0.5, nan)
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    pos, neg = s[y], s[~y]
    if not pos.size or not neg.size:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with < 3 finite pairs.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3, 4], [4, 3, 2, 1])
    (1.0, -1.0)
    """
    from scipy.stats import rankdata

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = rankdata(a[ok]), rankdata(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def verdict(score: float | None, threshold: float | None) -> str:
    """``inside``, ``outside`` (the model's domain) or ``unknown``.

    >>> verdict(2.0, 3.0), verdict(4.0, 3.0), verdict(None, 3.0)
    ('inside', 'outside', 'unknown')
    """
    if score is None or threshold is None or not (math.isfinite(score)
                                                  and math.isfinite(threshold)):
        return "unknown"
    return "outside" if score > threshold else "inside"

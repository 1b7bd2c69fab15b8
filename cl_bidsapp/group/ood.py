"""The group report's out-of-distribution block: scores by site and protocol, ROC AUC, F1.

Reads only what the group tables already hold: each image's ``ood_score`` (from its record),
its training ``domain`` (the model card's rule, :mod:`cl_bidsapp.group.domain`) and, when
reference masks were given, its lesion-wise F1 from ``group_evaluation.tsv``. It answers three
questions (docs/ood.md): how the scores spread per site and protocol; how well the score
separates out-of-domain from in-domain images (ROC AUC); and whether images scored further out
lose lesion-wise F1 (Spearman correlation, F1 inside and outside the threshold).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cl_bidsapp.core.ood import roc_auc, spearman
from cl_bidsapp.group.records import ImageSummary

logger = logging.getLogger(__name__)


def _f1_by_image(evaluation_tsv: Path | None) -> dict[str, float]:
    if evaluation_tsv is None or not Path(evaluation_tsv).is_file():
        return {}
    out = {}
    try:
        with open(evaluation_tsv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                try:
                    out[row["bids_name"]] = float(row["f1"])
                except (KeyError, TypeError, ValueError):
                    continue
    except (OSError, csv.Error) as exc:
        logger.warning("%s cannot be read (%s): OOD score not compared with F1",
                       evaluation_tsv, exc)
    return out


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def ood_block(summaries: Sequence[ImageSummary], evaluation_tsv: Path | None = None
              ) -> dict[str, Any] | None:
    """Numbers and figure of the report's OOD section; None when no image was scored.

    Returns
    -------
    dict
        ``threshold``, ``n_scored``, ``n_outside``, ``rows`` (per site, protocol, contrast
        and domain: n, median score, range, n outside, mean F1), ``auc`` (text),
        ``f1`` (text lines or empty), ``figure`` (PNG bytes).
    """
    scored = [s for s in summaries if s.status == "ok" and s.values.get("ood_score") is not None]
    if not scored:
        return None
    f1 = _f1_by_image(evaluation_tsv)
    thresholds = sorted({float(s.values["ood_threshold"]) for s in scored
                         if s.values.get("ood_threshold") is not None})
    rows = []
    for column, label in (("site", "site"), ("protocol", "protocol"),
                          ("contrast", "contrast"), ("domain", "domain")):
        def value(s, column=column):
            return s.protocol if column == "protocol" else s.values.get(column)
        if not any(value(s) for s in scored):
            continue
        for level in sorted({str(value(s) or "n/a") for s in scored}):
            part = [s for s in scored if str(value(s) or "n/a") == level]
            x = np.array([float(s.values["ood_score"]) for s in part])
            scores_f1 = [f1[s.bids_name] for s in part if s.bids_name in f1]
            rows.append({"grouping": label, "group": level, "n": len(part),
                         "median": _fmt(float(np.median(x))),
                         "range": f"{_fmt(float(x.min()))}–{_fmt(float(x.max()))}",
                         "outside": sum(s.values.get("ood_verdict") == "outside" for s in part),
                         "f1": _fmt(float(np.mean(scores_f1))) if scores_f1 else "n/a"})
    domains = [s.values.get("domain") for s in scored]
    labelled = [(float(s.values["ood_score"]), d == "out-of-domain") for s, d in
                zip(scored, domains) if d in ("in-domain", "out-of-domain")]
    n_out = sum(lab for _, lab in labelled)
    auc = roc_auc([x for x, _ in labelled], [lab for _, lab in labelled]) if labelled \
        else float("nan")
    auc_text = (f"ROC AUC {auc:.3f} for telling the {n_out} out-of-domain image(s) from the "
                f"{len(labelled) - n_out} in-domain image(s) by their score"
                if np.isfinite(auc) else
                "ROC AUC not computed: the images are not both in-domain and out-of-domain "
                "(by the model card's domain rule)")
    return {"threshold": ", ".join(_fmt(t) for t in thresholds) or "n/a",
            "n_scored": len(scored), "auc": auc_text, "auc_value": auc,
            "n_outside": sum(s.values.get("ood_verdict") == "outside" for s in scored),
            "n_unscored": sum(s.status == "ok" for s in summaries) - len(scored),
            "rows": rows, "f1": _f1_lines(scored, f1),
            "figure": ood_figure(scored, thresholds, f1)}


def _spearman_words(rho: float, n: int) -> str:
    """What the correlation of OOD score with F1 says, by its sign and the number of images.

    >>> _spearman_words(-0.6, 40)
    'negative: here, images further from the training scans scored lower F1'
    >>> _spearman_words(0.4, 4)  # doctest: +ELLIPSIS
    'not negative: here, ... lower F1; with 4 images this is very uncertain'
    """
    if not np.isfinite(rho):
        return "not defined: every image has the same score or the same F1"
    words = ("negative: here, images further from the training scans scored lower F1"
             if rho < 0 else
             "not negative: here, images further from the training scans did not score "
             "lower F1")
    if n < 10:
        words += f"; with {n} images this is very uncertain"
    return words


def _f1_lines(scored: Sequence[ImageSummary], f1: dict[str, float]) -> list[str]:
    pairs = [(float(s.values["ood_score"]), f1[s.bids_name], s.values.get("ood_verdict"))
             for s in scored if s.bids_name in f1]
    if len(pairs) < 3:
        return []
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    lines = [f"Spearman correlation of the OOD score with lesion-wise F1 over {len(pairs)} "
             f"evaluated image(s): {_fmt(rho)} ({_spearman_words(rho, len(pairs))})."]
    inside = [p[1] for p in pairs if p[2] == "inside"]
    outside = [p[1] for p in pairs if p[2] == "outside"]
    if inside and outside:
        lines.append(f"Mean F1 {_fmt(float(np.mean(inside)))} for the {len(inside)} image(s) "
                     f"within the threshold, {_fmt(float(np.mean(outside)))} for the "
                     f"{len(outside)} flagged outside_domain.")
    return lines


def ood_figure(scored: Sequence[ImageSummary], thresholds: Sequence[float],
               f1: dict[str, float]) -> bytes | None:
    """Scores per site/protocol (dots, threshold line) and, with F1, score against F1."""
    from cl_bidsapp.group.figures import _figure, _png

    key = "protocol" if any(s.protocol for s in scored) else "site"
    groups = sorted({str((s.protocol if key == "protocol" else s.values.get("site"))
                         or s.values.get("contrast") or "n/a") for s in scored})
    panels = 2 if sum(s.bids_name in f1 for s in scored) >= 3 else 1
    fig = _figure(4.2 * panels + 1.0, 3.4)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    rng = np.random.default_rng(0)
    colours = {"in-domain": "#1f77b4", "out-of-domain": "#d62728"}
    for i, group in enumerate(groups):
        part = [s for s in scored if str((s.protocol if key == "protocol"
                                          else s.values.get("site"))
                                         or s.values.get("contrast") or "n/a") == group]
        x = i + rng.uniform(-0.15, 0.15, len(part))
        y = [float(s.values["ood_score"]) for s in part]
        c = [colours.get(s.values.get("domain"), "#7f7f7f") for s in part]
        axes[0].scatter(x, y, s=14, c=c, alpha=0.8)
    for t in thresholds:
        axes[0].axhline(t, color="k", ls="--", lw=1)
    axes[0].set_xticks(range(len(groups)), groups, rotation=20, fontsize=8)
    axes[0].set_ylabel("OOD score (1 = typical in-domain scan)")
    axes[0].set_title(f"by {key}; dashed: threshold", fontsize=9)
    if panels == 2:
        pts = [(float(s.values["ood_score"]), f1[s.bids_name],
                colours.get(s.values.get("domain"), "#7f7f7f")) for s in scored
               if s.bids_name in f1]
        axes[1].scatter([p[0] for p in pts], [p[1] for p in pts], s=14,
                        c=[p[2] for p in pts], alpha=0.8)
        for t in thresholds:
            axes[1].axvline(t, color="k", ls="--", lw=1)
        axes[1].set_xlabel("OOD score")
        axes[1].set_ylabel("lesion-wise F1")
        axes[1].set_title("red: out-of-domain, blue: in-domain", fontsize=9)
    return _png(fig)

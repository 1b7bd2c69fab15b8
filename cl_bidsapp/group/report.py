"""The group HTML report: one self-contained page (figures embedded, no scripts, no web fonts).

It shows the lesion-load distributions by site, session and contrast, the flagged images with
their reasons and links to the subject reports, the evaluation table when reference masks were
given, and the lesion frequency map (or why it is missing). The page is written to
``<out>/group/group_report.html``; subject reports are ``<out>/sub-XX.html``.
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cl_bidsapp import __version__
from cl_bidsapp.group.records import ImageSummary, column_dictionary
from cl_bidsapp.io import write_text

logger = logging.getLogger(__name__)

REPORT_NAME = "group_report.html"
#: Flagged images listed in the page; the TSV has them all.
MAX_FLAGGED_ROWS = 500
#: A flag raised on at least this fraction of processed images becomes a banner.
BANNER_FRACTION = 0.5
_TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class ReportInputs:
    """Everything the report shows besides the per-image summaries."""

    dataset: str | None = None
    domain_rule: str = ""
    lesion_rows: int = 0
    figures: dict[str, bytes | None] = field(default_factory=dict)
    evaluation_wide: pd.DataFrame | None = None
    reference_dir: str | None = None
    evaluation_problems: list[str] = field(default_factory=list)
    no_reference: int = 0
    frequency_file: str | None = None
    frequency_images: int = 0
    frequency_left_out: int = 0
    frequency_missing: str = ""
    files: list[str] = field(default_factory=list)
    #: The out-of-distribution block (:func:`cl_bidsapp.group.ood.ood_block`).
    ood: dict[str, Any] | None = None
    #: The error-analysis block (:func:`cl_bidsapp.group.error_analysis.report_block`).
    error_analysis: dict[str, Any] | None = None
    #: What could not be used in participants.tsv (one sentence each).
    dataset_notes: list[str] = field(default_factory=list)


def write_report(summaries: Sequence[ImageSummary], inputs: ReportInputs,
                 group_dir: Path) -> Path:
    """Render and atomically write ``group_report.html``; return its path."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.get_template("group_report.html").render(
        **report_context(summaries, inputs, Path(group_dir).parent))
    return write_text(Path(group_dir) / REPORT_NAME, html)


def report_context(summaries: Sequence[ImageSummary], inputs: ReportInputs,
                   output_dir: Path | None = None) -> dict[str, Any]:
    """The values the template shows (kept apart from rendering so tests can read them).

    Parameters
    ----------
    summaries : sequence of ImageSummary
        One per planned image.
    inputs : ReportInputs
        Everything else the page shows.
    output_dir : Path, optional
        The participant level's output folder: a flagged image that was never processed
        links to its subject report only when that page exists there. Without it, every
        flagged image links to its page.
    """
    rows = [s.values for s in summaries]   # read only: no copies on large datasets
    done = [r for r in rows if r["status"] == "ok"]
    flagged = [s for s in summaries if s.flags]
    levels = column_dictionary("group_images.json")["qc_flags"]["Levels"]
    codes: dict[str, int] = {}
    for s in flagged:
        for code in s.flag_codes:
            codes[code] = codes.get(code, 0) + 1
    banners = []
    for code, n in codes.items():
        if done and n >= BANNER_FRACTION * len(done) and code in ("demo_model",
                                                                  "different_settings"):
            example = next(r for s in flagged for c, r in s.flags if c == code)
            banners.append(f"{n} of {len(rows)} images: {example}")
    n_failed = sum(r["status"] == "failed" for r in rows)
    n_missing = sum(r["status"] == "missing" for r in rows)
    if rows and not done:
        banners.insert(0, f"No image was processed: {n_failed} of {len(rows)} failed at the "
                          f"participant level and {n_missing} have no outputs. There are no "
                          "lesion counts, evaluation or frequency map to show; the flagged "
                          "images below say why, and what to do next.")
    pages: dict[str, bool] = {}

    def page_exists(summary: ImageSummary) -> bool:
        name = str(summary.values["subject_report"])
        if output_dir is not None and name not in pages:
            pages[name] = (Path(output_dir) / name).is_file()
        return pages.get(name, output_dir is None)

    def page_of(summary: ImageSummary) -> str | None:
        # the participant level writes a page for every image it ran, failed ones included;
        # an image it never ran has none, and a link to it would lead nowhere
        if page_exists(summary) or summary.status == "failed":
            return f"../{summary.values['subject_report']}"
        return None

    frequency_missing = inputs.frequency_missing
    if not done and frequency_missing.startswith("no processed image could be registered"):
        frequency_missing = "no image was processed, so there is nothing to map."
    not_evaluated = [s.bids_name for s in summaries
                     if s.status == "ok" and s.has_flag("missing_outputs")]
    context = {
        "dataset": inputs.dataset, "version": __version__,
        "counts": {
            "planned": len(rows), "subjects": len({r["participant_id"] for r in rows}),
            "ok": len(done), "failed": n_failed, "missing": n_missing,
            "flagged": len(flagged),
            "lesions": inputs.lesion_rows if done else "n/a (no image processed)"},
        "models": sorted({str(r["model"]) for r in done if r.get("model")}),
        "app_versions": sorted({str(r["app_version"]) for r in done if r.get("app_version")}),
        "domain_rule": inputs.domain_rule, "banners": banners,
        "dataset_notes": inputs.dataset_notes[:20],
        "figures": {k: base64.b64encode(v).decode("ascii") if v else None
                    for k, v in inputs.figures.items()},
        "by_group": _by_group(done),
        "flag_counts": [{"code": c, "n": codes[c], "meaning": levels.get(c, "")}
                        for c in levels if c in codes],
        "flagged": [{"bids_name": s.bids_name, "status": s.status, "report": page,
                     "flags": s.flag_codes, "reasons": [r for _, r in s.flags],
                     "next": next_steps(s, page_exists(s))}
                    for s, page in ((s, page_of(s)) for s in flagged[:MAX_FLAGGED_ROWS])],
        "flagged_more": max(0, len(flagged) - MAX_FLAGGED_ROWS),
        "evaluation": _evaluation(inputs, not_evaluated),
        "error_analysis": inputs.error_analysis,
        "frequency": {"file": inputs.frequency_file, "n_images": inputs.frequency_images,
                      "n_left_out": inputs.frequency_left_out},
        "frequency_missing": frequency_missing,
        "ood": _ood(inputs.ood),
        "files": inputs.files,
    }
    context["figures"].setdefault("distributions", None)
    context["figures"].setdefault("frequency", None)
    return context


#: What to do about each QC flag; ``{rerun}`` becomes the participant-level command.
NEXT_STEPS = {
    "failed": "fix the cause given in the reason ({details}), then {rerun}",
    "lesion_table_invalid": "the lesion table was edited or damaged: {rerun} to rewrite it",
    "brain_volume_outlier": "check the brain-mask outline in the subject report",
    "lesion_count_outlier": "check the lesions in the subject report",
    "lesion_volume_outlier": "check the lesions in the subject report",
    "intensity_outlier": "check the input image (sequence, intensity scaling, contrast) and "
                         "the intensity histogram in the subject report",
    "demo_model": "install a real model and pass --model; the demo model's lesions on real "
                  "scans mean nothing",
    "noisy_background_fallback": "check the brain mask; add the INV2 image if it exists",
    "different_settings": "rerun these images with the settings of the others, or analyse "
                          "them apart",
    "reference_unusable": "check the reference mask named in the reason (file, grid)",
    "registration_poor": "check the brain mask; the image is left out of the frequency map",
    "outside_domain": "read its lesions with caution: the model was not trained on such "
                      "scans",
}


def next_steps(summary: ImageSummary, has_report: bool = True) -> list[str]:
    """What to do about a flagged image, one sentence per distinct step, in flag order.

    ``has_report`` says whether the subject report exists (a step may point to it).
    """
    from cl_bidsapp.reports.sections import participant_command

    label = str(summary.values.get("participant_id") or "")
    label = label[4:] if label.startswith("sub-") else label
    command = participant_command(label)
    rerun = f"run the participant level for this subject again ({command})"
    steps: list[str] = []
    for code in summary.flag_codes:
        if code == "missing_outputs":
            step = (f"{rerun} to remake the missing files" if summary.status == "ok" else
                    f"run the participant level for this subject ({command})")
        else:
            step = NEXT_STEPS.get(code, "see the reason").format(
                rerun=rerun, details="the subject report shows the error and the end of the "
                                     "crash file" if has_report else
                                     "the crash file named there has the details")
        step = step[0].upper() + step[1:] + "."
        if step not in steps:
            steps.append(step)
    return steps


def _ood(block: dict[str, Any] | None) -> dict[str, Any] | None:
    if not block:
        return None
    figure = block.get("figure")
    return {**block, "figure": base64.b64encode(figure).decode("ascii") if figure else None}


def _by_group(done: list[dict]) -> list[dict[str, Any]]:
    out = []
    for column, label in (("site", "site"), ("session_id", "session"), ("contrast", "contrast")):
        if not any(r.get(column) for r in done):
            continue
        for level in sorted({str(r.get(column) or "n/a") for r in done}):
            part = [r for r in done if str(r.get(column) or "n/a") == level]
            out.append({"grouping": label, "group": level, "n": len(part),
                        "count": _median_iqr([r.get("lesion_count") for r in part], "{:g}"),
                        "volume": _median_iqr([r.get("total_volume_mm3") for r in part],
                                              "{:.1f}")})
    return out


def _median_iqr(values, fmt: str) -> str:
    x = np.array([float(v) for v in values if v is not None], dtype=float)
    if not x.size:
        return "n/a"
    q1, q2, q3 = np.percentile(x, [25, 50, 75])
    return f"{fmt.format(q2)} [{fmt.format(q1)}–{fmt.format(q3)}]"


def _evaluation(inputs: ReportInputs, not_evaluated: Sequence[str] = ()
                ) -> dict[str, Any] | None:
    wide = inputs.evaluation_wide
    if wide is None and not inputs.evaluation_problems:
        return None
    rows = []
    for _, r in (wide if wide is not None else pd.DataFrame()).iterrows():
        label = r["group"] if r["group_by"] != "site" else f"site {r['group']}"
        cells = [_pm(r, "f1"), _num(r.get("f1_pooled")), _pm(r, "recall"), _pm(r, "precision"),
                 _pm(r, "us_rate"), _pm(r, "dsc"), _pm(r, "ndsc")]
        cells += [_num(r.get(c), "{:.0f}") for c in ("n_reference", "tp", "fp", "us", "fn")]
        cells += [_pm(r, "brier", "{:.4f}"), _pm(r, "ece", "{:.4f}")]
        rows.append({"label": label, "n_scans": int(r["n_scans"]), "cells": cells})
    return {"rows": rows, "reference_dir": inputs.reference_dir,
            "n_images": int(wide.loc[wide["group_by"] == "all", "n_scans"].sum())
            if wide is not None and len(wide) else 0,
            "problems": inputs.evaluation_problems, "no_reference": inputs.no_reference,
            "not_evaluated": list(not_evaluated)}


def _num(value, fmt: str = "{:.2f}") -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(value) else fmt.format(value)


def _pm(row, metric: str, fmt: str = "{:.2f}") -> str:
    mean, se = row.get(f"{metric}_mean"), row.get(f"{metric}_se")
    text = _num(mean, fmt)
    if text != "n/a" and _num(se, fmt) != "n/a":
        text += f" ± {_num(se, fmt)}"
    return text

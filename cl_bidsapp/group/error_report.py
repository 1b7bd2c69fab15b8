"""Error analysis over images: the per-lesion and strata tables, the figure, the report block.

:class:`LesionRows` collects the rows of :func:`cl_bidsapp.group.error_analysis.image_lesion_rows`
image by image; :func:`write_error_analysis` writes ``group/group_evaluation_lesions.tsv``,
``group/group_evaluation_strata.tsv`` (detection rate and F1 by lesion-size bin, cortical
involvement, depth below the brain surface and site; :mod:`cl_bidsapp.core.lesion_strata`), their JSON sidecars and
``group/figures/group_desc-erroranalysis_plot.png``, and returns what the report shows.
"""
from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cl_bidsapp.core.lesion_strata import (DEPTH_BIN_LABELS, SIZE_BIN_LABELS,
                                           overall_detection, stratified_detection)
from cl_bidsapp.group.error_analysis import IMAGE_COLUMNS

logger = logging.getLogger(__name__)

LESIONS_TABLE = "group_evaluation_lesions.tsv"
STRATA_TABLE = "group_evaluation_strata.tsv"
FIGURE = "group_desc-erroranalysis_plot.png"
#: (lesion column, grouping name, order of its strata); a grouping whose column is n/a for
#: every lesion (no tissue maps, no brain masks, no sites) is left out.
_GROUPINGS = (("size_bin", "size", SIZE_BIN_LABELS),
              ("stratum_involvement", "involvement", None),
              ("depth_bin", "depth", DEPTH_BIN_LABELS), ("site", "site", None))


class LesionRows:
    """Per-lesion rows of all images, kept compact until the tables are written.

    Each row is kept as its finished TSV line plus the few fields the strata need, not as a
    dict of ~40 values, so that thousands of evaluated images fit in memory.

    >>> rows = LesionRows()
    >>> rows.add({"bids_name": "sub-01_T1w", "site": "A"},
    ...          [{"bids_name": "sub-01_T1w", "source": "reference", "outcome": "FN",
    ...            "size_bin": "<10", "stratum_involvement": None}])
    >>> rows.n_rows, rows.slim()[["site", "outcome"]].values.tolist()
    (1, [['A', 'FN']])
    """

    _SLIM = ("bids_name", "site", "source", "outcome", "size_bin", "stratum_involvement",
             "depth_bin")

    def __init__(self) -> None:
        from cl_bidsapp.group.records import column_dictionary

        self.columns = list(column_dictionary("group_evaluation_lesions.json"))
        self.lines: list[str] = []
        self._slim: list[tuple] = []
        self.notes: list[str] = []

    @property
    def n_rows(self) -> int:
        return len(self.lines)

    def add(self, image: dict[str, Any], lesions: Sequence[dict], notes: Sequence[str] = ()
            ) -> None:
        """Add one image's rows (:func:`image_lesion_rows`); ``image`` is its evaluation row."""
        from cl_bidsapp.group.tables import format_value

        for lesion in lesions:
            row = {**{c: image.get(c) for c in IMAGE_COLUMNS}, **lesion}
            self.lines.append("\t".join(format_value(row.get(c)) for c in self.columns))
            self._slim.append(tuple(row.get(c) for c in self._SLIM))
        self.notes.extend(notes)

    def slim(self) -> pd.DataFrame:
        """The fields the strata need, one row per lesion."""
        return pd.DataFrame(self._slim, columns=list(self._SLIM))


def write_error_analysis(group_dir: Path, images: Sequence[dict], lesions: LesionRows
                         ) -> dict[str, Any]:
    """Write the per-lesion and strata tables and the figure; return the report block.

    Parameters
    ----------
    group_dir : Path
        ``<out>/group``.
    images : sequence of dict
        The rows of ``group_evaluation.tsv`` (one per evaluated image).
    lesions : LesionRows
        Every evaluated image's lesion rows and notes (what could not be used, e.g. tissue
        maps on another grid), shown in the report.
    """
    from cl_bidsapp.group.records import column_dictionary
    from cl_bidsapp.io import atomic_path, write_json

    group_dir = Path(group_dir)
    path = group_dir / LESIONS_TABLE
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(lesions.columns) + "\n")
        fh.writelines(line + "\n" for line in lesions.lines)
    write_json(path.with_suffix(".json"), column_dictionary("group_evaluation_lesions.json"))
    strata = strata_table(lesions.slim(),
                          pd.DataFrame([{c: r.get(c) for c in IMAGE_COLUMNS} for r in images],
                                       columns=list(IMAGE_COLUMNS)))
    dictionary = column_dictionary("group_evaluation_strata.json")
    from cl_bidsapp.group.tables import write_tsv

    write_tsv(group_dir / STRATA_TABLE, list(dictionary), strata.to_dict("records"),
              dictionary)
    png = strata_figure(strata)
    if png is not None:
        with atomic_path(group_dir / "figures" / FIGURE) as tmp:
            tmp.write_bytes(png)
    logger.info("Error analysis: %d lesion row(s) in %s", lesions.n_rows, path)
    return report_block(strata, png, lesions.n_rows, lesions.notes)


def strata_table(lesions: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """All strata rows: ``all``, then by size bin, cortical involvement, depth and site."""
    from cl_bidsapp.core.lesion_properties import INVOLVEMENTS

    parts = [overall_detection(lesions, images)]
    for column, grouping, order in _GROUPINGS:
        if column == "site" and not images["site"].notna().any():
            continue
        if column in ("stratum_involvement", "depth_bin") and not lesions[column].notna().any():
            continue
        if grouping == "involvement":
            order = INVOLVEMENTS
        parts.append(stratified_detection(lesions, images, column, grouping, order=order))
    return pd.concat(parts, ignore_index=True)


_TITLES = {"all": "All lesions", "size": "By lesion size (mm³)",
           "involvement": "By cortical involvement",
           "depth": "By depth below the brain surface (mm)", "site": "By site"}


def report_block(strata: pd.DataFrame, png: bytes | None, n_lesions: int,
                 notes: Sequence[str]) -> dict[str, Any]:
    """What the report's error-analysis block shows (rows already formatted)."""
    tables = []
    for grouping, part in strata.groupby("grouping", sort=False):
        rows = [{"label": r["group"], "n_images": int(r["n_images"]),
                 "counts": [int(r[c]) for c in ("n_reference", "detected", "reference_us",
                                                 "fn", "tp", "us", "fp")],
                 "detection_rate": _pm(r["detection_rate"], r["detection_rate_se"]),
                 "recall": _pm(r["recall"]), "precision": _pm(r["precision"]),
                 "f1": _pm(r["f1"], r["f1_se"])} for _, r in part.iterrows()]
        tables.append({"title": _TITLES.get(grouping, grouping), "rows": rows})
    return {"tables": tables, "n_lesions": n_lesions, "notes": list(notes)[:20],
            "figure": base64.b64encode(png).decode("ascii") if png else None,
            "files": [LESIONS_TABLE, STRATA_TABLE]}


def _pm(value, se=None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    text = f"{value:.2f}"
    if se is not None and np.isfinite(se):
        text += f" ± {se:.2f}"
    return text


def strata_figure(strata: pd.DataFrame) -> bytes | None:
    """Detection rate and F1 (± bootstrap SE) per stratum, one panel per grouping (PNG)."""
    from matplotlib.figure import Figure

    groupings = [g for g in _TITLES if g != "all" and (strata["grouping"] == g).any()]
    if not groupings:
        return None
    widths = [max(2, int((strata["grouping"] == g).sum())) for g in groupings]
    fig = Figure(figsize=(min(3.0 + 1.1 * sum(widths), 13), 3.8), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(groupings), squeeze=False, sharey=True,
                        gridspec_kw={"width_ratios": widths})[0]
    for ax, grouping in zip(axes, groupings):
        part = strata[strata["grouping"] == grouping]
        x = np.arange(len(part))
        for offset, (score, colour) in zip((-0.2, 0.2), (("detection_rate", "#2e86c1"),
                                                         ("f1", "#c0392b"))):
            value = part[score].to_numpy(dtype=float)
            se = part[f"{score}_se"].to_numpy(dtype=float)
            shown = np.isfinite(value)
            ax.bar(x[shown] + offset, value[shown], width=0.38, color=colour)
            bars = shown & np.isfinite(se)
            ax.errorbar(x[bars] + offset, value[bars], yerr=se[bars], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2)
            for position in x[~shown]:
                ax.text(position + offset, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
        ax.set_xticks(x, [f"{g}\nn={n}" for g, n in zip(part["group"], part["n_reference"])],
                      fontsize=8)
        ax.set_title(_TITLES[grouping], fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("pooled over images (± SE)")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="#2e86c1", label="detection rate"),
                        Patch(color="#c0392b", label="F1")], loc="outside upper center",
               ncols=2, fontsize=8, title="n = reference lesions", title_fontsize=8,
               alignment="left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()

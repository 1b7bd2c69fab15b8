"""Group tables: one row per image, one row per lesion, each a TSV with a JSON column sidecar.

The per-lesion table is streamed: each image's ``*_seg-CL_dseg.tsv`` is read, checked and
appended to ``group/group_lesions.tsv`` in turn, so memory does not grow with the number of
lesions. Values are copied as the participant level wrote them (no reformatting).

A per-lesion table that disagrees with the image's record, or is not a lesion table at all
(hand-edited, truncated), is not copied: the image gets the ``lesion_table_invalid`` flag with
a reason that names the file, and the group level carries on.

>>> format_value(None), format_value(float("nan")), format_value(True), format_value(0.1 + 0.2)
('n/a', 'n/a', 'true', '0.3')
"""
from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from cl_bidsapp.core.lesions import LESION_TABLE_COLUMNS, lesion_table_sidecar
from cl_bidsapp.group.records import ImageSummary, column_dictionary
from cl_bidsapp.io import atomic_path, write_json

logger = logging.getLogger(__name__)

NA = "n/a"
IMAGES_TABLE = "group_images.tsv"
LESIONS_TABLE = "group_lesions.tsv"
#: Identifier columns that lead every row of the per-lesion table.
LESION_ID_COLUMNS = tuple(column_dictionary("group_lesions.json"))
#: Largest relative difference allowed between the table's and the record's total volume.
_VOLUME_RTOL = 1e-3


def format_value(value: Any) -> str:
    """One TSV cell: ``n/a`` for missing values, ``true``/``false``, floats to 10 digits."""
    if value is None:
        return NA
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return NA if not math.isfinite(value) else format(value, ".10g")
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return format_value(value.item())
    text = str(value)
    # a tab or newline would shift every later column of the row
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]],
              sidecar: dict[str, Any] | None = None) -> Path:
    """Atomically write rows (dicts) as a TSV with ``columns``; the sidecar beside it."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(columns) + "\n")
        for row in rows:
            fh.write("\t".join(format_value(row.get(c)) for c in columns) + "\n")
    if sidecar is not None:
        write_json(path.with_suffix(".json"), {c: sidecar[c] for c in columns if c in sidecar})
    return path


def write_images_table(summaries: Sequence[ImageSummary], group_dir: Path) -> Path:
    """``group_images.tsv``: one row per planned image, with its QC flags."""
    dictionary = column_dictionary("group_images.json")
    return write_tsv(Path(group_dir) / IMAGES_TABLE, list(dictionary),
                     (s.row() for s in summaries), dictionary)


def lesions_sidecar() -> dict[str, Any]:
    """Column dictionary of ``group_lesions.tsv``: identifiers, then the lesion-table columns."""
    return {**column_dictionary("group_lesions.json"), **lesion_table_sidecar()}


def write_lesions_table(summaries: Sequence[ImageSummary], group_dir: Path,
                        output_dir: Path) -> int:
    """Stream every processed image's lesion rows into ``group_lesions.tsv``.

    Images whose table is unusable are flagged ``lesion_table_invalid`` and left out.

    Returns
    -------
    int
        Number of lesion rows written.
    """
    columns = list(LESION_ID_COLUMNS) + list(LESION_TABLE_COLUMNS)
    path = Path(group_dir) / LESIONS_TABLE
    n_rows = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("\t".join(columns) + "\n")
        for summary in summaries:
            table = summary.output("lesion_table")
            if summary.status != "ok" or table is None or not table.is_file():
                continue
            rows, problem = read_lesion_rows(table, summary.values.get("lesion_count"),
                                             summary.values.get("total_volume_mm3"))
            if problem:
                rel = _relative(table, output_dir)
                summary.flag("lesion_table_invalid", f"{rel}: {problem}; its lesions are left "
                                                     "out of group_lesions.tsv")
                logger.warning("%s: %s (image flagged, lesions left out)", rel, problem)
                continue
            prefix = "\t".join(format_value(summary.values.get(c)) for c in LESION_ID_COLUMNS)
            for cells in rows:
                fh.write(prefix + "\t" + "\t".join(cells) + "\n")
            n_rows += len(rows)
    write_json(path.with_suffix(".json"), lesions_sidecar())
    return n_rows


def read_lesion_rows(path: Path, expected_count: int | None = None,
                     expected_volume: float | None = None
                     ) -> tuple[list[list[str]], str | None]:
    """Read and check one per-lesion table without the images.

    The checks catch tables that were edited by hand or damaged, using only what the record
    says: the columns of ``bids_spec/lesion_table.json``; lesions numbered 1..N once each,
    largest first; positive whole voxel counts and positive volumes; probabilities and fold
    disagreement between 0 and 1 (or ``n/a``); N equal to the record's lesion count and the
    volumes summing to its total volume. (:func:`cl_bidsapp.core.lesions.check_lesion_table`
    checks a table against its instance map when the images are at hand.)

    Parameters
    ----------
    path : Path
        A ``*_seg-CL_dseg.tsv`` file.
    expected_count : int, optional
        The record's lesion count.
    expected_volume : float, optional
        The record's total lesion volume (mm3).

    Returns
    -------
    rows : list of list of str
        Cells in the order of :data:`~cl_bidsapp.core.lesions.LESION_TABLE_COLUMNS`
        (empty when there is a problem).
    problem : str or None
        What is wrong, in plain words.

    Examples
    --------
    >>> import tempfile
    >>> from cl_bidsapp.core.lesions import LESION_TABLE_COLUMNS
    >>> p = Path(tempfile.mkdtemp()) / "t.tsv"
    >>> row = ["1", "CL-001", "5", "40", "0", "0", "0", "1", "1", "1", "0.8", "0.9", "n/a"]
    >>> _ = p.write_text("\\t".join(LESION_TABLE_COLUMNS) + "\\n" + "\\t".join(row) + "\\n")
    >>> rows, problem = read_lesion_rows(p, expected_count=1, expected_volume=40.0)
    >>> len(rows), problem
    (1, None)
    >>> read_lesion_rows(p, expected_count=2)[1]
    'the table lists 1 lesion(s) but the record says 2'
    """
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = next(reader, None)
            raw = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [], f"cannot be read ({exc})"
    if header is None:
        return [], "the file is empty (not even a header line)"
    lost = [c for c in LESION_TABLE_COLUMNS if c not in header]
    if lost:
        return [], f"column(s) {', '.join(lost)} missing"
    where = [header.index(c) for c in LESION_TABLE_COLUMNS]
    rows = []
    for n, cells in enumerate(raw, start=2):
        if len(cells) != len(header):
            return [], f"line {n} has {len(cells)} cells but the header has {len(header)}"
        rows.append([cells[i] for i in where])
    problem = _check_lesion_rows(rows, expected_count, expected_volume)
    return ([], problem) if problem else (rows, None)


def _check_lesion_rows(rows, expected_count, expected_volume) -> str | None:
    col = {c: i for i, c in enumerate(LESION_TABLE_COLUMNS)}
    try:
        index = [_whole(r[col["index"]]) for r in rows]
        voxels = [_whole(r[col["n_voxels"]]) for r in rows]
        volume = [float(r[col["volume_mm3"]]) for r in rows]
    except ValueError as exc:
        return f"a value of index, n_voxels or volume_mm3 is not a number ({exc})"
    if sorted(index) != list(range(1, len(rows) + 1)):
        return "lesion numbers (index) are not 1..N, each once"
    if any(v < 1 for v in voxels) or any(not math.isfinite(v) or v <= 0 for v in volume):
        return "a lesion has no voxels or no volume"
    by_index = [v for _, v in sorted(zip(index, voxels))]
    if any(a < b for a, b in zip(by_index, by_index[1:])):
        return "lesions are not numbered largest first, as the participant level numbers them"
    for name in ("prob_mean", "prob_max", "uncertainty_ddu"):
        for r in rows:
            text = r[col[name]]
            if text in (NA, "", "nan", "NaN"):
                continue
            try:
                value = float(text)
            except ValueError:
                return f"{name} value {text!r} is not a number"
            if not 0.0 <= value <= 1.0:
                return f"{name} value {text} is outside 0..1"
    if expected_count is not None and len(rows) != int(expected_count):
        return f"the table lists {len(rows)} lesion(s) but the record says {int(expected_count)}"
    if expected_volume is not None and rows:
        total = sum(volume)
        if not math.isclose(total, float(expected_volume), rel_tol=_VOLUME_RTOL, abs_tol=0.01):
            return (f"lesion volumes add up to {total:.6g} mm3 but the record says "
                    f"{float(expected_volume):.6g} mm3")
    return None


def _whole(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)

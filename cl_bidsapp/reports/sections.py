"""One image's part of the subject report: its figures, lesion table, provenance and problems.

:func:`image_section` turns a per-image record (plus the derivatives it names) into plain
data for the HTML template. Figures are saved under ``sub-XX/figures/`` and embedded in the
page. A derivative that is missing or unreadable costs its figure, never the page: the
section lists what could not be shown.
"""
from __future__ import annotations

import logging
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from cl_bidsapp.reports import figures
from cl_bidsapp.reports.records import output_file, read_lesion_table, sidecar

logger = logging.getLogger(__name__)

#: Close-ups per image; more lesions are listed in the table only.
MAX_ZOOMS = 12
#: Table rows shown in the page (the TSV has them all).
MAX_TABLE_ROWS = 500
_CARRIED = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run")
_UNREADABLE = (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError)
#: What a failed image's exit code means, and what to do about it (README, "Exit codes").
EXIT_MEANINGS = {
    1: ("an unexpected error", "read the end of the crash file below; if the cause is not "
        "clear, report it with the crash file"),
    64: ("a usage error", "correct the command-line option or configuration value named above"),
    65: ("bad input data (a corrupt or implausible image, images that cannot be told apart, "
         "or a model that fails its check)",
         "follow the hint in the message above, or replace or repair the file it names"),
    66: ("a required input is missing", "provide the file named above (for DataLad datasets, "
         "fetch it with datalad get)"),
    73: ("the output could not be written", "check that the output folder is writable"),
    74: ("an input/output error (e.g. a full disk)", "free disk space or fix the storage"),
    75: ("a temporary failure, usually out of memory",
         "follow the hint in the message above; for memory: set --mem to the memory really "
         "available, run fewer images at once (--nprocs 1), or use --device cpu when GPU memory "
         "is the limit"),
}
STAGE_NAMES = {"prepare": "input checks", "skullstrip": "brain extraction",
               "model_input": "model input", "segment": "segmentation (nnU-Net)",
               "lesions": "lesions and table"}


@dataclass
class Figure:
    """A figure as the template shows it."""

    title: str
    caption: str
    uri: str
    file: str  # relative to the output folder
    anchor: str = ""


@dataclass
class ImageSection:
    """Everything the template shows about one image."""

    anchor: str
    bids_name: str
    session: str | None
    contrast: str
    status: str
    warnings: list[str]
    error: str | None = None
    exit_code: int | None = None
    crash_file: str | None = None
    crash_tail: str | None = None
    next_step: str = ""
    earlier_note: str = ""
    cards: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    zooms: list[Figure] = field(default_factory=list)
    zoom_note: str = ""
    columns: list[tuple[str, str]] = field(default_factory=list)  # (key, heading)
    rows: list[list[tuple[str, str]]] = field(default_factory=list)  # (text, sort key)
    table_note: str = ""
    table_file: str | None = None
    provenance: list[tuple[str, str, str | None]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    is_demo: bool = False


def figure_path(output_dir: Path, record: dict[str, Any], desc: str, suffix: str,
                ext: str) -> Path:
    """``sub-XX/figures/<entities>_desc-<desc>_<suffix>.<ext>`` for the record's image.

    >>> figure_path(Path("/o"), {"subject": "01", "bids_name": "sub-01_ses-1_acq-mp2_UNIT1"},
    ...             "lesions", "mosaic", "png").as_posix()
    '/o/sub-01/figures/sub-01_ses-1_acq-mp2_desc-lesions_mosaic.png'
    """
    from cl_bidsapp.bids.entities import build_name, parse_name

    parsed = parse_name(f"{record['bids_name']}.nii.gz")
    ents = {k: parsed[k] for k in _CARRIED if parsed.get(k)}
    ents["desc"] = desc
    return (output_dir / f"sub-{record['subject']}" / "figures"
            / build_name(ents, suffix, f".{ext}"))


def anchor_of(bids_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", bids_name)


def _rel(output_dir: Path, path: Path | None) -> str | None:
    return None if path is None else path.relative_to(output_dir).as_posix()


def _load(path: Path | None):
    """The image fully in memory (each figure reads the voxels again otherwise)."""
    if path is None:
        return None
    img = nib.load(str(path))
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return f"{float(value):,.{digits}f}"


def ood_line(ood: dict[str, Any]) -> str:
    """The out-of-distribution score in words: score, threshold, verdict (docs/ood.md).

    >>> ood_line({"score": 3.412, "threshold": 1.62, "verdict": "outside"})
    "3.41 (threshold 1.62): outside the model's domain"
    >>> ood_line({"score": None, "verdict": "unknown", "note": "no reference"})
    'not scored: no reference'
    """
    score, threshold = ood.get("score"), ood.get("threshold")
    if score is None:
        return f"not scored: {ood.get('note') or 'no reference distribution'}"
    words = {"inside": "inside the model's domain", "outside": "outside the model's domain"}
    return (f"{_fmt(score, 2)} (threshold {_fmt(threshold, 2)}): "
            f"{words.get(ood.get('verdict'), 'no threshold')}")


def image_section(output_dir: Path, record: dict[str, Any], fmt: str = "png") -> ImageSection:
    """Build the report section of one record (failed or not); write its figures."""
    section = ImageSection(
        anchor=anchor_of(str(record.get("bids_name"))), bids_name=str(record.get("bids_name")),
        session=record.get("session"), contrast=str(record.get("contrast") or "?"),
        status=str(record.get("status") or "failed"),
        warnings=[str(w) for w in record.get("warnings") or []],
        is_demo=bool((record.get("model") or {}).get("IsDemo")))
    if section.status != "ok":
        _failure(output_dir, record, section)
        section.provenance = _provenance(output_dir, record, {})
        return section
    lesions = record.get("lesions") or {}
    volume = lesions.get("total_volume_mm3")
    section.cards = [
        ("lesions", _fmt(lesions.get("count"))),
        ("total lesion volume", f"{_fmt(volume)} mm³" if volume is not None else "n/a"),
        ("brain volume", f"{_fmt((record.get('brain') or {}).get('brain_volume_ml'))} mL"),
    ]
    if record.get("ood"):
        section.cards.append(("model domain (OOD score)", ood_line(record["ood"])))
    table = None
    table_path = output_file(output_dir, record, "lesion_table")
    if table_path is not None:
        table = read_lesion_table(table_path)
    rerun = (f"run the participant level for sub-{record.get('subject')} again to remake it")
    named = record.get("outputs") or {}
    if table is None:
        where = f" ({named['lesion_table']})" if named.get("lesion_table") else ""
        section.problems.append(f"the lesion table{where} is missing or unreadable: the "
                                f"lesion count above is the run's record; {rerun}")
    else:
        _table(section, table)
        section.table_file = _rel(output_dir, table_path)
    images = {}
    for kind in ("preproc", "brain_mask", "probseg", "lesion_dseg"):
        path = output_file(output_dir, record, kind)
        try:
            images[kind] = _load(path)
        except _UNREADABLE as exc:
            images[kind] = None
            section.problems.append(f"{path.name} cannot be read ({exc}): the file is damaged; "
                                    f"{rerun}")
        if path is None:
            what = (f": {named[kind]} was deleted or moved after the run, so its figures are "
                    f"not shown; {rerun}" if named.get(kind) else
                    " (the run's record names no such file)")
            section.problems.append(f"the {kind.replace('_', ' ')} image is missing{what}")
    written = _figures(output_dir, record, section, images, table, fmt)
    _remove_stale_zooms(output_dir, record, written)
    section.provenance = _provenance(output_dir, record, sidecar(
        output_file(output_dir, record, "probseg")))
    return section


def _failure(output_dir: Path, record: dict[str, Any], section: ImageSection) -> None:
    section.error = str(record.get("error") or "failed without a message")
    section.exit_code = record.get("exit_code")
    section.next_step = next_step(record)
    earlier = record.get("earlier_outputs")
    if isinstance(earlier, dict) and earlier.get("files"):
        section.earlier_note = (
            f"The {len(earlier['files'])} derivative file(s) of this image in the output folder "
            f"are from an earlier run ({earlier.get('run_id')}, finished "
            f"{earlier.get('finished')}) that succeeded; they may not match the current input "
            "or settings, and this page does not show them. They are listed under Provenance.")
    crash = record.get("crash_file")
    if crash:
        section.crash_file = str(crash)
        try:
            lines = (Path(output_dir) / crash).read_text(errors="replace").splitlines()
            section.crash_tail = "\n".join(lines[-40:])
        except OSError:
            section.problems.append(f"the crash file {crash} is missing")


def participant_command(label: Any) -> str:
    """The participant-level command for one subject, as reports tell users to run it.

    >>> participant_command("02")
    'cl-bidsapp BIDS_DIR OUTPUT_DIR participant --participant-label 02'
    """
    return f"cl-bidsapp BIDS_DIR OUTPUT_DIR participant --participant-label {label}"


def next_step(record: dict[str, Any]) -> str:
    """What to do about a failed image: the exit code in words, then the command to rerun.

    >>> next_step({"subject": "02", "exit_code": 75})  # doctest: +ELLIPSIS
    'Exit code 75 means a temporary failure, usually out of memory: follow the hint ...'
    >>> next_step({"subject": "02"}).endswith("participant --participant-label 02")
    True
    """
    rerun = f"then run this subject again: {participant_command(record.get('subject'))}"
    meaning = EXIT_MEANINGS.get(record.get("exit_code"))  # type: ignore[arg-type]
    if meaning is None:
        return f"Fix the cause given in the message above, {rerun}"
    return f"Exit code {record.get('exit_code')} means {meaning[0]}: {meaning[1]}, {rerun}"


def _table(section: ImageSection, table) -> None:
    wanted = [("name", "lesion"), ("n_voxels", "voxels"), ("volume_mm3", "volume (mm³)"),
              ("centroid_x", "x (mm)"), ("centroid_y", "y (mm)"), ("centroid_z", "z (mm)"),
              ("prob_mean", "mean p"), ("prob_max", "max p")]
    has_ddu = "uncertainty_ddu" in table and table["uncertainty_ddu"].notna().any()
    if has_ddu:
        wanted.append(("uncertainty_ddu", "fold disagreement"))
        section.cards.append(("median fold disagreement",
                              _fmt(float(table["uncertainty_ddu"].median()), 2)))
    section.columns = [(k, h) for k, h in wanted if k in table]
    digits = {"volume_mm3": 1, "centroid_x": 1, "centroid_y": 1, "centroid_z": 1,
              "prob_mean": 2, "prob_max": 2, "uncertainty_ddu": 2}
    for _, row in table.head(MAX_TABLE_ROWS).iterrows():
        cells = []
        for key, _ in section.columns:
            value = row[key]
            if key == "name":
                cells.append((str(value), str(row.get("index", value))))
            elif key == "n_voxels":
                cells.append((_fmt(int(value)), str(int(value))))
            else:
                number = float(value) if value is not None else math.nan
                cells.append((_fmt(number, digits.get(key, 2)),
                              "" if math.isnan(number) else repr(number)))
        section.rows.append(cells)
    notes = []
    if any(k.startswith("centroid_") for k, _ in section.columns):
        notes.append("x, y, z: the lesion's centre of mass in the scanner (world, RAS+) "
                     "coordinates of the source image, in mm; not template (MNI) coordinates.")
    if "prob_mean" in table:
        notes.append("Mean p and max p: the model's lesion probability (0 to 1) inside the "
                     "lesion.")
    if has_ddu:
        notes.append("Fold disagreement: 0 when every fold finds exactly this lesion, 1 when "
                     "no fold finds it.")
    if len(table) > MAX_TABLE_ROWS:
        notes.append(f"The first {MAX_TABLE_ROWS} of {len(table)} lesions are shown; "
                     "the TSV file lists them all.")
    section.table_note = " ".join(notes)


def _caption(row) -> str:
    parts = [str(row["name"])]
    if "volume_mm3" in row and not math.isnan(float(row["volume_mm3"])):
        parts.append(f"{float(row['volume_mm3']):.0f} mm³")
    if "prob_max" in row and not math.isnan(float(row["prob_max"])):
        parts.append(f"max p {float(row['prob_max']):.2f}")
    if "uncertainty_ddu" in row and not math.isnan(float(row["uncertainty_ddu"])):
        parts.append(f"disagreement {float(row['uncertainty_ddu']):.2f}")
    return "  ·  ".join(parts)


def _figures(output_dir, record, section, images, table, fmt) -> set[Path]:
    """Draw, save and attach the image's figures; return the files written."""
    written: set[Path] = set()

    def keep(desc, suffix, ext, data, title, caption, anchor=""):
        path = figure_path(output_dir, record, desc, suffix, ext)
        figures.save_figure(data, path)
        written.add(path)
        return Figure(title, caption, figures.data_uri(data, ext), _rel(output_dir, path),
                      anchor)

    preproc, mask = images.get("preproc"), images.get("brain_mask")
    dseg, prob = images.get("lesion_dseg"), images.get("probseg")
    if mask is not None:
        source, source_words = _source_image(record), "the source image"
        if source is None:
            source, source_words = preproc, "the model input (source image not found)"
        if source is not None:
            section.figures.append(keep("brain", "mosaic", fmt, figures.mosaic(
                source, mask, contour_labels=["brain mask"], fmt=fmt), "Brain extraction",
                f"The brain mask (cyan outline) on {source_words}, axial slices. The outline "
                "should follow the brain surface without cutting cortex or including skull, "
                f"eyes or dura. {ORIENTATION}"))
    if preproc is None:
        return written
    if dseg is not None:
        section.figures.append(keep("lesions", "mosaic", fmt, figures.mosaic(
            preproc, dseg, extent_img=mask, focus_img=dseg, contour_colors=[
                figures.LESION_COLOUR], contour_labels=["lesions"], contour_fills=[0.45],
            fmt=fmt), "Lesions", lesion_mosaic_caption(
                None if table is None else len(table), (record.get("lesions") or {}).get(
                    "count"))))
    if prob is not None:
        section.figures.append(keep("probability", "mosaic", fmt, figures.mosaic(
            preproc, None, prob, extent_img=mask, focus_img=dseg, fmt=fmt,
            overlay_label="CL probability"), "Lesion probability",
            "The model's cortical-lesion probability (colour scale 0 to 1, shown where at "
            f"least 0.05) on the model input, axial slices; {_lesion_rule(record)}. "
            f"{ORIENTATION}"))
    if dseg is not None and table is not None and len(table):
        shown = table.head(MAX_ZOOMS)
        captions = {int(r["index"]): _caption(r) for _, r in shown.iterrows()}
        names = {int(r["index"]): str(r["name"]) for _, r in shown.iterrows()}
        zooms = figures.lesion_zooms(preproc, dseg, list(captions), probability_img=prob,
                                     extent_img=mask, max_lesions=MAX_ZOOMS, captions=names,
                                     fmt=fmt)
        for label, data in zooms:
            name = names[label]
            section.zooms.append(keep(re.sub(r"[^A-Za-z0-9]", "", name), "zoom", fmt, data,
                                      name, captions[label], anchor=anchor_of(
                                          f"{section.anchor}-{name}")))
        if len(table) > MAX_ZOOMS:
            section.zoom_note = (f"Close-ups of the {MAX_ZOOMS} largest of {len(table)} lesions; "
                                 "the others are in the table.")
    if mask is not None:
        values = np.asanyarray(preproc.dataobj)[np.asanyarray(mask.dataobj) > 0]
        stats = record.get("brain") or {}
        markers = {label: stats[key] for label, key in (("1st pct", "intensity_p01"),
                                                         ("median", "intensity_p50"),
                                                         ("99th pct", "intensity_p99"))
                   if stats.get(key) is not None}
        section.figures.insert(1 if section.figures else 0, keep(
            "intensity", "histogram", "svg", figures.histogram(
            values, xlabel="model input intensity", markers=markers), "Intensities in the brain",
            "Histogram of the model input inside the brain mask. A second peak near zero or a "
            "long bright tail suggests background or skull left in the mask."))
    return written


ORIENTATION = ("Neurological convention: the subject's left is on the left of each panel; "
               "each panel's z is the slice's scanner coordinate in mm.")


def lesion_mosaic_caption(n_table: int | None, n_record: Any = None) -> str:
    """Caption of the lesion mosaic, true to how many lesions there are and how many have a
    close-up (the table's count, else the record's).

    >>> lesion_mosaic_caption(0).split(".")[0]
    'No lesion was detected in this image'
    >>> "the 12 largest of 30 lesions have a close-up" in lesion_mosaic_caption(30)
    True
    """
    n = n_table if n_table is not None else n_record
    if n == 0:
        return ("No lesion was detected in this image. The model input is shown on axial "
                f"slices spread through the brain. {ORIENTATION}")
    text = ("Detected lesions (red) on the model input, axial slices spread through the brain "
            "and moved towards lesions where possible")
    if n_table is None:
        text += " (the lesion table is missing, so there are no close-ups)"
    elif n_table > MAX_ZOOMS:
        text += (f"; the {MAX_ZOOMS} largest of {n_table} lesions have a close-up below, the "
                 "others are in the table")
    else:
        text += "; every lesion has a close-up below"
    return f"{text}. Small lesions may fall between the slices shown. {ORIENTATION}"


def _lesion_rule(record: dict[str, Any]) -> str:
    """How lesions are made from the probability, with the run's threshold and minimum size.

    >>> _lesion_rule({"settings": {"threshold": 0.6}, "lesions": {"min_size_voxels": 3}})[-50:]
    'reaches the threshold (0.6) with at least 3 voxels'
    """
    threshold = (record.get("settings") or {}).get("threshold", "?")
    size = (record.get("lesions") or {}).get("min_size_voxels")
    text = f"lesions are the 26-connected regions where it reaches the threshold ({threshold})"
    if isinstance(size, int) and size > 1:
        text += f" with at least {size} voxels"
    return text


def _source_image(record: dict[str, Any]):
    path = (record.get("inputs") or {}).get("image")
    if not path or not Path(path).is_file():
        return None
    try:
        return _load(Path(path))
    except _UNREADABLE:
        return None


def _remove_stale_zooms(output_dir: Path, record: dict[str, Any], written: set[Path]) -> None:
    """Figures this build did not draw must not linger beside the new ones: close-ups of
    lesions a rerun no longer finds, and mosaics of derivatives deleted since (a reader of
    ``sub-XX/figures/`` would take them for the current results)."""
    probe = figure_path(output_dir, record, "X", "zoom", "png")
    prefix = probe.name[: -len("_desc-X_zoom.png")]
    pattern = re.compile(re.escape(prefix) + r"_desc-(CL\d+_zoom|brain_mosaic|lesions_mosaic|"
                         r"probability_mosaic|intensity_histogram)\.(png|svg)$")
    for path in probe.parent.glob(f"{prefix}_desc-*"):
        if pattern.match(path.name) and path not in written:
            path.unlink(missing_ok=True)


def _provenance(output_dir: Path, record: dict[str, Any],
                probseg_sidecar: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, text, relative link or None) rows of the provenance table."""
    rows: list[tuple[str, str, str | None]] = []
    add = rows.append
    for key, path in (record.get("inputs") or {}).items():
        if path:
            add((f"input {key}", str(path), None))
    add(("contrast", f"{record.get('contrast')} (rule {record.get('rule')})", None))
    model = record.get("model") or {}
    if model:
        add(("model", f"{model.get('Name')} {model.get('Version')}", None))
        add(("model sha256", str(model.get("SHA256")), None))
        if model.get("IsDemo"):
            add(("demo model", "yes: trained on simulated phantoms, for tests and demos only",
                 None))
    settings = record.get("settings") or {}
    if record.get("status") == "ok":
        add(("device", str(record.get("device")), None))
        add(("folds", ", ".join(str(f) for f in record.get("folds") or []) or "n/a", None))
        add(("test-time augmentation", "on" if settings.get("tta") else "off", None))
        add(("tile step", str(settings.get("tile_step_size")), None))
        add(("threshold", str(settings.get("threshold")), None))
        size = (record.get("lesions") or {}).get("min_size_voxels")
        add(("minimum lesion size", f"{size} voxels (asked: {settings.get('min_lesion_size')})",
             None))
        add(("brain extraction", str(record.get("skullstrip_method")), None))
        add(("masking image", str(record.get("masking_method")), None))
        add(("input already skull-stripped", "yes" if record.get("prestripped") else "no",
             None))
    versions = probseg_sidecar.get("SoftwareVersions") or {}
    if versions:
        add(("software", ", ".join(f"{k} {v}" for k, v in versions.items()), None))
    seconds = record.get("seconds") or {}
    if seconds:
        parts = [f"{STAGE_NAMES.get(k, k)} {float(v):.1f} s" for k, v in seconds.items()]
        add(("run time", "; ".join(parts) + f" (total {sum(map(float, seconds.values())):.1f} s)",
             None))
    add(("run", f"{record.get('run_id')}" + (f", finished {record['finished']}"
                                             if record.get("finished") else ""), None))
    settings_file = (Path(output_dir) / f"sub-{record.get('subject')}" / "log"
                     / str(record.get("run_id")) / "cl-bidsapp.toml")
    if settings_file.is_file():
        add(("settings", "cl-bidsapp.toml", _rel(output_dir, settings_file)))
    for kind, rel in (record.get("outputs") or {}).items():
        exists = (Path(output_dir) / rel).is_file()
        add((f"output {kind.replace('_', ' ')}", rel if exists else f"{rel} (missing)",
             rel if exists else None))
    earlier = record.get("earlier_outputs")
    if record.get("status") != "ok" and isinstance(earlier, dict):
        for rel in earlier.get("files") or []:
            exists = (Path(output_dir) / str(rel)).is_file()
            add((f"output of run {earlier.get('run_id')}",
                 str(rel) if exists else f"{rel} (missing)", str(rel) if exists else None))
    return rows

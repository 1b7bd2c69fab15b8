"""What the participant level left behind, one summary per planned image.

The group level never recomputes images: it reads the per-image record
(``sub-XX/log/<bids_name>_record.json``) that the participant level writes last, and the files
the record names. Each planned image becomes an :class:`ImageSummary`: the values of its row in
``group/group_images.tsv`` plus what later steps need (output paths, warnings, model). An image
without a record is kept, with status ``missing``, so that the tables account for every image
that should have been processed; so is an image whose record cannot be read or has fields
of the wrong type (a hand-edited record), with a reason naming the record and the fields.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> s = summarise_image(_Item("01", None, "MP2RAGE", {"sub": "01"}, "UNIT1"), out, {})
>>> s.status, s.flag_codes
('missing', ['missing_outputs'])
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

#: Statistics of the source image inside the brain mask that the record carries.
INTENSITY_KEYS = ("p01", "p25", "p50", "p75", "p99")


@lru_cache(maxsize=None)
def column_dictionary(name: str) -> dict[str, Any]:
    """A column dictionary shipped in ``bids_spec/`` (e.g. ``group_images.json``).

    >>> list(column_dictionary("group_images.json"))[:2]
    ['bids_name', 'participant_id']
    """
    from bids_spec import spec_path

    return json.loads(spec_path(name).read_text(encoding="utf-8"))


def image_columns() -> list[str]:
    """Columns of ``group_images.tsv``, in order."""
    return list(column_dictionary("group_images.json"))


def record_path(output_dir: Path, subject: str, bids_name: str) -> Path:
    """Where the participant level writes an image's record.

    The same rule as :func:`cl_bidsapp.interfaces.derivatives.record_path`, repeated here so
    that the group level does not import Nipype.

    >>> record_path(Path("/out"), "01", "sub-01_T1w").as_posix()
    '/out/sub-01/log/sub-01_T1w_record.json'
    """
    return Path(output_dir) / f"sub-{subject}" / "log" / f"{bids_name}_record.json"


#: What BIDS writes in a TSV cell for a missing value (an empty cell means the same here).
MISSING = "n/a"


def read_participants(bids_dir: str | Path | None, notes: list[str] | None = None
                      ) -> dict[str, dict[str, str | None]]:
    """Rows of ``participants.tsv`` by subject label (without ``sub-``); empty when absent.

    ``n/a`` (BIDS for a missing value) and empty cells are read as None, so that a participant
    whose site or protocol is ``n/a`` gets no site group and an ``unknown`` domain. The file
    never stops the group level (it only adds sites and protocols): what cannot be used is
    logged as a warning naming the file and the line, and the rest is read.

    * a byte-order mark (Excel's "UTF-8" export) is ignored;
    * a row with fewer values than the header: the missing values are None;
    * a row with more values than the header: the extra values are ignored;
    * a row without a participant_id is ignored; a participant listed twice keeps its last row;
    * no ``participant_id`` column, or a file that cannot be read: nothing is used.

    Each warning is also appended to ``notes`` when given (the group report shows them).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "participants.tsv").write_text("participant_id\\tsite\\nsub-01\\tBasel\\n")
    >>> read_participants(d)
    {'01': {'participant_id': 'sub-01', 'site': 'Basel'}}
    >>> _ = (d / "participants.tsv").write_text("participant_id\\tsite\\nsub-01\\tn/a\\n")
    >>> read_participants(d)
    {'01': {'participant_id': 'sub-01', 'site': None}}
    """
    if bids_dir is None:
        return {}
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, str | None]] = {}
    lines: dict[str, int] = {}
    try:
        # utf-8-sig: a byte-order mark would otherwise glue itself to "participant_id"
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter="\t")
            header = [name.strip() for name in next(reader, [])]
            if "participant_id" not in header:
                shown = ", ".join(repr(n) for n in header) if any(header) else "none"
                _warn(notes, "%s has no participant_id column (columns: %s): its sites and "
                      "protocols are not used", path, shown)
                return {}
            for fields in reader:
                line = reader.line_num
                if not any(f.strip() for f in fields):
                    continue  # blank line
                if len(fields) < len(header):
                    _warn(
                        notes, "%s, line %d: %d value(s) where the header has %d column(s); the "
                        "missing value(s) of %s are read as n/a", path, line, len(fields),
                        len(header), ", ".join(header[len(fields):]))
                elif len(fields) > len(header):
                    _warn(
                        notes, "%s, line %d: %d value(s) where the header has %d column(s); the "
                        "extra value(s) %s are ignored (a tab inside a value?)", path, line,
                        len(fields), len(header),
                        ", ".join(repr(f) for f in fields[len(header):]))
                row = {name: _cell(value) for name, value in zip(header, fields) if name}
                row.update((name, None) for name in header[len(fields):] if name)
                pid = row.get("participant_id")
                if not pid:
                    _warn(notes, "%s, line %d: no participant_id; the row is ignored", path,
                          line)
                    continue
                label = pid.removeprefix("sub-")
                if label in lines:
                    _warn(notes, "%s, line %d: %s is listed again (first on line %d); this "
                          "row is used", path, line, pid, lines[label])
                rows[label] = row
                lines[label] = line
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        # participants.tsv only adds the site; a broken one must not stop the group level
        _warn(notes, "%s cannot be read (%s): sites are left empty", path, exc)
        return {}
    return rows


def _warn(notes: list[str] | None, message: str, *args) -> None:
    logger.warning(message, *args)
    if notes is not None:
        notes.append(message % args)


def _cell(value: str) -> str | None:
    """A participants.tsv value, None when missing (``n/a`` or empty)."""
    value = value.strip()
    return None if not value or value.lower() == MISSING else value


@dataclass
class ImageSummary:
    """One planned image as the group level sees it.

    Attributes
    ----------
    values : dict
        Its row of ``group_images.tsv`` (columns of ``bids_spec/group_images.json``).
    entities : dict
        BIDS entities of the source image (short keys), used to name derivatives.
    source_suffix : str
        ``UNIT1`` or ``T1w``: the suffix derivatives inherit.
    outputs : dict
        Absolute paths (as text, lighter than Path objects on many thousand images) of the
        derivatives the record names, by kind (``lesion_mask``, ...); see :meth:`output`.
    warnings : list of str
        The record's warnings (the rest of the record is not kept: memory stays small on
        datasets of many thousand images).
    protocol : str or None
        The participant's ``protocol`` from participants.tsv (used to decide the domain).
    flags : list of (code, reason)
        Quality-control flags raised so far.
    """

    values: dict[str, Any]
    entities: dict[str, str]
    source_suffix: str
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    protocol: str | None = None
    flags: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bids_name(self) -> str:
        return self.values["bids_name"]

    @property
    def subject(self) -> str:
        return self.values["participant_id"].removeprefix("sub-")

    @property
    def status(self) -> str:
        return self.values["status"]

    @property
    def ok(self) -> bool:
        """Processed, with every output the record names present."""
        return self.status == "ok" and not self.has_flag("missing_outputs")

    @property
    def flag_codes(self) -> list[str]:
        return [code for code, _ in self.flags]

    def output(self, kind: str) -> Path | None:
        """Path of derivative ``kind`` named in the record, or None."""
        path = self.outputs.get(kind)
        return None if path is None else Path(path)

    def has_flag(self, code: str) -> bool:
        return any(c == code for c, _ in self.flags)

    def flag(self, code: str, reason: str) -> None:
        """Raise a QC flag (once per code; later reasons for the same code are appended)."""
        for i, (c, r) in enumerate(self.flags):
            if c == code:
                self.flags[i] = (c, f"{r}; {reason}")
                return
        self.flags.append((code, reason))

    def row(self) -> dict[str, Any]:
        """The table row, with the flags filled in."""
        row = dict(self.values)
        row["qc_flags"] = ",".join(self.flag_codes) or None
        row["qc_reasons"] = " | ".join(r for _, r in self.flags) or None
        return row


class _Item(NamedTuple):
    """The fields of :class:`cl_bidsapp.bids.discovery.WorkItem` that the group level reads."""

    subject: str
    session: str | None
    contrast: str
    entities: dict
    source_suffix: str

    @property
    def bids_name(self) -> str:
        return "_".join([f"{k}-{v}" for k, v in self.entities.items()] + [self.source_suffix])


def summarise_image(item, output_dir: Path,
                    participants: dict[str, dict[str, str | None]]) -> ImageSummary:
    """Read one planned image's record and check the files it names.

    Parameters
    ----------
    item : WorkItem
        A planned image (``subject``, ``session``, ``contrast``, ``entities``,
        ``source_suffix``, ``bids_name``).
    output_dir : Path
        The participant level's output folder.
    participants : dict
        From :func:`read_participants`.

    Returns
    -------
    ImageSummary
        Status ``ok``, ``failed`` or ``missing``; flags ``failed`` and ``missing_outputs``
        are raised here, with reasons that name the files. A record that cannot be read, or
        whose fields have the wrong JSON type (:func:`record_type_problems`), gives status
        ``missing`` and ``missing_outputs`` naming the record and the fields: the group level
        goes on with the other images.
    """
    output_dir = Path(output_dir)
    entities = dict(item.entities)
    info = participants.get(item.subject, {})
    values: dict[str, Any] = dict.fromkeys(image_columns())
    values.update(
        bids_name=item.bids_name, participant_id=f"sub-{item.subject}",
        session_id=f"ses-{item.session}" if item.session else None,
        acquisition=entities.get("acq"), run=entities.get("run"),
        contrast=_shared(item.contrast), site=_shared(info.get("site") or None),
        subject_report=f"sub-{item.subject}.html")
    summary = ImageSummary(values=values, entities=entities, source_suffix=item.source_suffix,
                           protocol=info.get("protocol") or None)
    path = record_path(output_dir, item.subject, item.bids_name)
    values["record"] = path.relative_to(output_dir).as_posix()
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        values["status"] = "missing"
        summary.flag("missing_outputs", f"no record {values['record']}: the participant level "
                                        "has not processed this image (or was interrupted)")
        return summary
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        values["status"] = "missing"
        summary.flag("missing_outputs", f"the record {values['record']} cannot be read ({exc}); "
                                        "rerun the participant level for this subject")
        return summary
    status = record.get("status")
    problems = record_type_problems(record)
    if problems:
        values["status"] = "missing"
        summary.flag("missing_outputs", f"the record {values['record']} cannot be used: "
                                        f"{'; '.join(problems)} (edited by hand or damaged?); "
                                        "rerun the participant level for this subject")
        return summary
    summary.warnings = [str(w) for w in record.get("warnings") or []]
    values["status"] = _shared(status) if status in ("ok", "failed") else "missing"
    _fill_provenance(values, record)
    if status == "failed":
        code = record.get("exit_code")
        crash = record.get("crash_file")
        reason = f"the participant level failed: {record.get('error') or 'no message'}"
        if code is not None:
            reason += f" (exit {code})"
        if crash:
            reason += f"; details in {crash}"
        summary.flag("failed", reason)
        return summary
    if status != "ok":
        summary.flag("missing_outputs", f"the record {values['record']} has an unknown status "
                                        f"{status!r}")
        return summary
    _fill_results(values, record)
    outputs = record.get("outputs") or {}
    missing = []
    for kind, rel in outputs.items():
        absolute = os.path.join(output_dir, str(rel))
        summary.outputs[sys.intern(kind)] = absolute
        if not os.path.isfile(absolute):
            missing.append(str(rel))
    if missing:
        summary.flag("missing_outputs", "files named in the record are missing: "
                                        + ", ".join(missing))
    return summary


#: JSON types (as Python decodes them) by the names a user reads in a message.
_TYPE_NAMES = {bool: "true/false", str: "a string", int: "a number", float: "a number",
               dict: "an object", list: "a list"}
_NUMBER = (int, float)

#: The record fields the group level reads (any status), with the JSON type each must have
#: when present and not null; for objects, the type of each member it reads.
_COMMON_FIELDS: dict[str, tuple[type | tuple[type, ...], dict[str, Any] | None]] = {
    "warnings": (list, None),
    "model": (dict, {"Name": (str, int, float), "Version": (str, int, float), "SHA256": str,
                     "IsDemo": bool}),
    "settings": (dict, {"threshold": _NUMBER}),
    "masking_method": (str, None),
    "software": (dict, {"cl-bidsapp": (str, int, float)}),
}
#: Read for a failed image only (in the reason shown to the user).
_FAILED_FIELDS: dict[str, tuple[type | tuple[type, ...], dict[str, Any] | None]] = {
    "error": ((str, int, float), None), "exit_code": ((int, float, str), None),
    "crash_file": (str, None),
}
#: Read for a processed image only.
_OK_FIELDS: dict[str, tuple[type | tuple[type, ...], dict[str, Any] | None]] = {
    "outputs": (dict, None),
    "lesions": (dict, {"count": _NUMBER, "total_volume_mm3": _NUMBER,
                       "min_size_voxels": _NUMBER}),
    "brain": (dict, {"brain_volume_ml": _NUMBER,
                     **{f"intensity_{k}": _NUMBER for k in INTENSITY_KEYS}}),
    "ood": (dict, {"score": _NUMBER, "threshold": _NUMBER, "verdict": str}),
}


def record_type_problems(record: dict[str, Any]) -> list[str]:
    """What in a record has the wrong JSON type, in words; empty when it can be used.

    Only the fields the group level reads are checked, those of the record's status (a failed
    record has no outputs). A field that is absent or null is not a problem (it is left n/a).

    >>> record_type_problems({"status": "ok", "outputs": "lesions.tsv", "lesions": [4, 184]})
    ["field 'outputs' is a string, not an object", "field 'lesions' is a list, not an object"]
    >>> record_type_problems({"status": "ok", "model": {"SHA256": 12, "IsDemo": "no"}})
    ["field 'model.SHA256' is a number, not a string", "field 'model.IsDemo' is a string, \
not true/false"]
    >>> record_type_problems({"status": "failed", "outputs": "ignored", "exit_code": 65})
    []
    """
    fields = dict(_COMMON_FIELDS)
    if record.get("status") == "failed":
        fields.update(_FAILED_FIELDS)
    elif record.get("status") == "ok":
        fields.update(_OK_FIELDS)
    problems = []
    for name, (kind, members) in fields.items():
        value = record.get(name)
        problem = _type_problem(name, value, kind)
        if problem:
            problems.append(problem)
        elif name == "warnings" and value:
            problems += [f"warning {i} in field 'warnings' is {_json_name(w)}, not a string"
                         for i, w in enumerate(value, start=1) if not isinstance(w, str)][:1]
        elif name == "outputs" and value:  # file paths, relative to the output folder
            problems += [f"field 'outputs.{kind_}' is {_json_name(rel)}, not a string"
                         for kind_, rel in value.items() if not isinstance(rel, str)]
        elif members and value:
            problems += [p for member, member_kind in members.items()
                         if (p := _type_problem(f"{name}.{member}", value.get(member),
                                                member_kind))]
    return problems


def _type_problem(name: str, value: Any, kind: type | tuple[type, ...]) -> str | None:
    """``field 'name' is X, not Y`` when ``value`` (not None) is not of type ``kind``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are Python bools, which are ints: a number field must not take them
    if value is None or (isinstance(value, kinds)
                         and (bool in kinds or not isinstance(value, bool))):
        return None
    wanted = " or ".join(dict.fromkeys(_TYPE_NAMES[k] for k in kinds))
    return f"field {name!r} is {_json_name(value)}, not {wanted}"


def _json_name(value: Any) -> str:
    """The JSON type of a decoded value, in words (``a string``, ``an object``...)."""
    if value is None:
        return "null"
    for kind in (bool, str, int, float, dict, list):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return type(value).__name__


def _fill_provenance(values: dict, record: dict) -> None:
    model = record.get("model") or {}
    if model:
        values["model"] = _shared(" ".join(str(model[k]) for k in ("Name", "Version")
                                           if model.get(k)))
        values["model_sha256"] = _shared(model.get("SHA256"))
        values["model_is_demo"] = bool(model.get("IsDemo", False))
    version = (record.get("software") or {}).get("cl-bidsapp")
    values["app_version"] = _shared(str(version)) if version is not None else None
    settings = record.get("settings") or {}
    values["threshold"] = _number(settings.get("threshold"))
    # as asked (e.g. "3" or "10mm3"); the voxel count differs between voxel sizes
    asked = settings.get("min_lesion_size")
    values["min_lesion_size"] = (_shared(str(asked)) if isinstance(asked, (str, int, float))
                                 and not isinstance(asked, bool) else None)
    values["masking_method"] = _shared(record.get("masking_method"))


def _fill_results(values: dict, record: dict) -> None:
    lesions = record.get("lesions") or {}
    values["lesion_count"] = _number(lesions.get("count"), int)
    values["total_volume_mm3"] = _number(lesions.get("total_volume_mm3"))
    values["min_lesion_size_voxels"] = _number(lesions.get("min_size_voxels"), int)
    brain = record.get("brain") or {}
    values["brain_volume_ml"] = _number(brain.get("brain_volume_ml"))
    for key in INTENSITY_KEYS:
        values[f"intensity_{key}"] = _number(brain.get(f"intensity_{key}"))
    ood = record.get("ood") or {}
    if ood:  # out-of-distribution score (docs/ood.md)
        values["ood_score"] = _number(ood.get("score"))
        values["ood_threshold"] = _number(ood.get("threshold"))
        verdict = ood.get("verdict")
        if verdict not in ("inside", "outside") or (
                verdict == "outside" and None in (values["ood_score"], values["ood_threshold"])):
            verdict = "unknown"  # "outside" is reported with its score and threshold
        values["ood_verdict"] = _shared(verdict)


def _shared(value):
    """One copy of a text that repeats on every image (model, method): memory at scale."""
    return sys.intern(value) if isinstance(value, str) else value


def _number(value, kind=float):
    """``value`` as a number, or None when absent, not numeric or not finite.

    JSON from Python may hold ``NaN`` and ``Infinity`` (hand-edited records); they become
    missing values (``n/a``) rather than numbers that spoil the outlier statistics.

    >>> _number(3.0, int), _number(float("inf"), int), _number(float("nan")), _number(True)
    (3, None, None, None)
    """
    if value is None or isinstance(value, bool):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
        return None
    return number if math.isfinite(number) else None


def any_record(output_dir: Path, items) -> bool:
    """True when at least one planned image has a record, or any record exists at all."""
    output_dir = Path(output_dir)
    for item in items:
        if record_path(output_dir, item.subject, item.bids_name).is_file():
            return True
    return any(output_dir.glob("sub-*/log/*_record.json"))

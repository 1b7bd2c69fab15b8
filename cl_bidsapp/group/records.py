"""What the participant level left behind, one summary per planned image.

The group level never recomputes images: it reads the per-image record
(``sub-XX/log/<bids_name>_record.json``) that the participant level writes last, and the files
the record names. Each planned image becomes an :class:`ImageSummary`: the values of its row in
``group/group_images.tsv`` plus what later steps need (output paths, warnings, model). An image
without a record is kept, with status ``missing``, so that the tables account for every image
that should have been processed.

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


def read_participants(bids_dir: str | Path | None) -> dict[str, dict[str, str]]:
    """Rows of ``participants.tsv`` by subject label (without ``sub-``); empty when absent.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "participants.tsv").write_text("participant_id\\tsite\\nsub-01\\tBasel\\n")
    >>> read_participants(d)
    {'01': {'participant_id': 'sub-01', 'site': 'Basel'}}
    """
    if bids_dir is None:
        return {}
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return {}
    rows: dict[str, dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                pid = (row.get("participant_id") or "").strip()
                if pid:
                    rows[pid.removeprefix("sub-")] = {k: (v or "").strip() for k, v in row.items()
                                                      if k is not None}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        # participants.tsv only adds the site; a broken one must not stop the group level
        logger.warning("%s cannot be read (%s): sites are left empty", path, exc)
        return {}
    return rows


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


def summarise_image(item, output_dir: Path, participants: dict[str, dict[str, str]]
                    ) -> ImageSummary:
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
        are raised here, with reasons that name the files.
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
    summary.warnings = [str(w) for w in record.get("warnings") or []]
    status = record.get("status")
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


def _fill_provenance(values: dict, record: dict) -> None:
    model = record.get("model") or {}
    if model:
        values["model"] = _shared(" ".join(str(model[k]) for k in ("Name", "Version")
                                           if model.get(k)))
        values["model_sha256"] = _shared(model.get("SHA256"))
        values["model_is_demo"] = bool(model.get("IsDemo", False))
    settings = record.get("settings") or {}
    values["threshold"] = _number(settings.get("threshold"))
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
        values["ood_verdict"] = _shared(ood.get("verdict") if ood.get("verdict") in (
            "inside", "outside") else "unknown")


def _shared(value):
    """One copy of a text that repeats on every image (model, method): memory at scale."""
    return sys.intern(value) if isinstance(value, str) else value


def _number(value, kind=float):
    """``value`` as a number, or None when absent or not numeric (hand-edited records)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def any_record(output_dir: Path, items) -> bool:
    """True when at least one planned image has a record, or any record exists at all."""
    output_dir = Path(output_dir)
    for item in items:
        if record_path(output_dir, item.subject, item.bids_name).is_file():
            return True
    return any(output_dir.glob("sub-*/log/*_record.json"))

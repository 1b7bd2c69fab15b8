"""Read what the participant level left in the output folder: records, settings, tables.

Reports are built from these files alone (``--reports-only`` works on a finished output
folder, with no work folder and no model). A file that is missing or damaged never stops a
report: the reader returns ``None`` (or a record marked unreadable) and the page says what is
missing.
"""
from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def record_files(output_dir: str | Path, subject: str) -> list[Path]:
    """The per-image records of one subject (``sub-XX/log/*_record.json``), sorted."""
    return sorted((Path(output_dir) / f"sub-{subject}" / "log").glob("*_record.json"))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def subject_records(output_dir: str | Path, subject: str) -> list[dict[str, Any]]:
    """All records of a subject, ordered by session then image name.

    A record that cannot be parsed comes back as a failed record that says so, so the report
    still lists the image.
    """
    records = []
    for path in record_files(output_dir, subject):
        record = read_json(path)
        if record is None:
            bids_name = path.name[: -len("_record.json")]
            record = {"bids_name": bids_name, "subject": subject, "session": None,
                      "status": "failed", "exit_code": None,
                      "error": f"the record {path.name} cannot be read (damaged or "
                               "truncated JSON); run the participant level again"}
        record.setdefault("subject", subject)
        records.append(record)
    return sorted(records, key=lambda r: (str(r.get("session") or ""), str(r.get("bids_name"))))


def all_subjects(output_dir: str | Path) -> list[str]:
    """Subjects that have at least one record in the output folder.

    >>> import tempfile
    >>> all_subjects(tempfile.mkdtemp())
    []
    """
    out = Path(output_dir)
    found = {p.parent.parent.name[4:] for p in out.glob("sub-*/log/*_record.json")}
    return sorted(found)


def run_ids(output_dir: str | Path, subject: str) -> list[str]:
    """Runs that saved settings for this subject (``sub-XX/log/<run-id>/cl-bidsapp.toml``),
    oldest first (run identifiers start with a UTC time stamp)."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    return sorted(p.parent.name for p in log.glob("*/cl-bidsapp.toml"))


def read_settings(output_dir: str | Path, subject: str,
                  run_id: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """(run id, settings sections) of a run; the newest run when ``run_id`` is None.

    Settings come back as the TOML's plain sections (``inputs``, ``execution``,
    ``segmentation``) so that a file from another version still reads.
    """
    if run_id is None:
        runs = run_ids(output_dir, subject)
        if not runs:
            return None, {}
        run_id = runs[-1]
    path = Path(output_dir) / f"sub-{subject}" / "log" / run_id / "cl-bidsapp.toml"
    try:
        return run_id, tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return run_id, {}


def read_lesion_table(path: str | Path):
    """The per-lesion table as a DataFrame (``n/a`` as missing), or None when unreadable."""
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError) as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return None


def output_file(output_dir: str | Path, record: dict[str, Any], kind: str) -> Path | None:
    """Absolute path of a derivative named in the record's ``outputs``, if it exists."""
    rel = (record.get("outputs") or {}).get(kind)
    if not rel:
        return None
    path = Path(output_dir) / rel
    return path if path.is_file() else None


def sidecar(path: Path | None) -> dict[str, Any]:
    """The JSON sidecar of a derivative (empty when absent)."""
    if path is None:
        return {}
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv"):
        if name.endswith(ext):
            return read_json(path.with_name(name[: -len(ext)] + ".json")) or {}
    return {}


def software_versions(output_dir: str | Path, records: list[dict[str, Any]]) -> dict[str, str]:
    """Versions recorded in the probability map's sidecar of the first image that has one."""
    for record in records:
        versions = sidecar(output_file(output_dir, record, "probseg")).get("SoftwareVersions")
        if isinstance(versions, dict) and versions:
            return {str(k): str(v) for k, v in versions.items()}
    return {}

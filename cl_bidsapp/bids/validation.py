"""BIDS validation of the inputs a run will read, with bids-validator-deno (runs offline).

The whole dataset is validated once, then only the errors that concern what this run reads are
kept: dataset-level files (``dataset_description.json``, ``participants.tsv``) and the ``anat/``
folders of the selected participants. An error in an unrelated fMRI run of another subject does
not stop a cortical-lesion analysis.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cl_bidsapp.errors import ValidationFailed

LOGGER = logging.getLogger(__name__)
VALIDATOR = "bids-validator-deno"
# Advice-level codes that are errors for the validator but harmless for our inputs
_IGNORED_CODES = {"SIDECAR_KEY_RECOMMENDED", "JSON_KEY_RECOMMENDED"}


def _relevant(location: str | None, subjects: set[str] | None) -> bool:
    if not location:
        return True
    parts = [p for p in location.strip("/").split("/") if p]
    if len(parts) <= 1:  # dataset-level file
        return True
    if not parts[0].startswith("sub-"):
        return False
    if subjects is not None and parts[0][4:] not in subjects:
        return False
    return "anat" in parts[1:-1]


def relevant_errors(report: dict, subjects: set[str] | None) -> list[dict]:
    """Errors of a validator JSON report that concern the selected participants' anatomy."""
    issues = report.get("issues", {}).get("issues", [])
    return [i for i in issues
            if i.get("severity") == "error" and i.get("code") not in _IGNORED_CODES
            and _relevant(i.get("location"), subjects)]


def find_validator() -> str | None:
    """The validator installed with this Python (pip puts it beside the interpreter, which
    need not be on ``PATH``: ``.venv/bin/cl-bidsapp`` run without activating the venv), else
    the first one on ``PATH``."""
    beside = Path(sys.executable).parent / VALIDATOR
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(VALIDATOR)


def validate(bids_dir: Path, subjects: list[str] | None = None, timeout: float = 600) -> None:
    """Run the validator; raise :class:`ValidationFailed` (exit 16) on relevant errors."""
    exe = find_validator()
    if exe is None:
        raise ValidationFailed(
            f"{VALIDATOR} is not installed, so the dataset cannot be validated",
            hint="install it (pip install bids-validator-deno) or pass --skip-bids-validation")
    LOGGER.info("Validating %s with %s", bids_dir, VALIDATOR)
    try:
        proc = subprocess.run([exe, "--format", "json", str(bids_dir)], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ValidationFailed(f"{VALIDATOR} did not finish within {timeout:.0f} s",
                               path=bids_dir, hint="use --skip-bids-validation") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ValidationFailed(f"{VALIDATOR} failed: {' / '.join(tail) or 'no output'}",
                               path=bids_dir, hint="use --skip-bids-validation") from None
    errors = relevant_errors(report, set(subjects) if subjects else None)
    if not errors:
        LOGGER.info("BIDS validation passed for the selected inputs")
        return
    lines = []
    for issue in errors[:10]:
        where = issue.get("location") or "(dataset)"
        text = issue.get("issueMessage") or report["issues"].get("codeMessages", {}).get(
            issue.get("code"), "")
        text = " ".join(str(text).split())[:160]
        lines.append(f"  {where}: {issue.get('code')} {text}".rstrip())
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    raise ValidationFailed(
        f"BIDS validation found {len(errors)} error(s) in the inputs:\n" + "\n".join(lines)
        + more, path=bids_dir,
        hint="fix the dataset, or pass --skip-bids-validation if you know it is fine")

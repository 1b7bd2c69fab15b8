"""The output dataset: file names, ``dataset_description.json``, ``.bidsignore``, run settings.

Names come from the pybids path patterns in ``bids_spec/outputs.json`` (the role niworkflows'
DerivativesDataSink config plays for fMRIPrep). Every file is written atomically and with
content that does not depend on which job writes it, so several participant jobs can share one
output folder.
"""
from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from bids_spec import spec_path
from cl_bidsapp import __version__
from cl_bidsapp.bids.entities import SHORT_TO_LONG, parse_name
from cl_bidsapp.io import write_json, write_text

LOGGER = logging.getLogger(__name__)

APP_NAME = "cl-bidsapp"
CODE_URL = "https://github.com/cl-bidsapp/cl-bidsapp"
BIDS_VERSION = "1.10.0"


@lru_cache(maxsize=1)
def output_spec() -> dict[str, Any]:
    return json.loads(spec_path("outputs.json").read_text())


def source_entities(source: str | Path, suffix: str | None = None) -> dict[str, str]:
    """pybids-style (long-name) entities of a source file that outputs inherit.

    >>> source_entities("sub-01_ses-01_acq-mp2rage_UNIT1.nii.gz")
    {'subject': '01', 'session': '01', 'acquisition': 'mp2rage', 'source_suffix': 'UNIT1'}
    """
    parsed = parse_name(Path(source).name)
    carry = output_spec()["carry_entities"]
    out = {}
    for short, value in parsed.items():
        long = SHORT_TO_LONG.get(short)
        if long in carry:
            out[long] = value
    out = {k: out[k] for k in carry if k in out}
    out["source_suffix"] = suffix or parsed.get("suffix", "T1w")
    return out


def output_path(output_dir: Path, source: dict[str, str], kind: str,
                extension: str | None = None) -> Path:
    """Path of derivative ``kind`` (a key of outputs.json) for a source's entities.

    >>> src = source_entities("sub-01_ses-01_acq-mp2rage_UNIT1.nii.gz")
    >>> output_path(Path("/out"), src, "lesion_dseg").as_posix()
    '/out/sub-01/ses-01/anat/sub-01_ses-01_acq-mp2rage_seg-CL_dseg.nii.gz'
    >>> output_path(Path("/out"), src, "preproc").name
    'sub-01_ses-01_acq-mp2rage_desc-preproc_UNIT1.nii.gz'
    """
    from bids.layout.writing import build_path

    spec = output_spec()
    definition = dict(spec["outputs"][kind])
    definition.pop("description", None)
    entities = {k: v for k, v in source.items() if k != "source_suffix"}
    suffix = definition.pop("suffix")
    entities["suffix"] = source["source_suffix"] if suffix == "{source}" else suffix
    entities["extension"] = extension or definition.pop("extension", ".nii.gz")
    definition.pop("extension", None)
    entities.update(definition)
    entities["datatype"] = "anat"
    rel = build_path(entities, spec["default_path_patterns"], strict=False)
    if rel is None:  # a pattern bug, not a user error
        raise ValueError(f"no path pattern fits {entities}")
    return Path(output_dir) / rel


def sidecar_path(image_path: Path) -> Path:
    name = image_path.name
    for ext in (".nii.gz", ".nii", ".tsv"):
        if name.endswith(ext):
            return image_path.with_name(name[: -len(ext)] + ".json")
    return image_path.with_suffix(".json")


def dataset_description(raw: dict[str, Any], bids_dir: Path,
                        container: dict[str, str] | None = None) -> dict[str, Any]:
    """The derivative ``dataset_description.json`` content (deterministic: no timestamps)."""
    generated = {"Name": APP_NAME, "Version": __version__, "CodeURL": CODE_URL}
    if container:
        generated["Container"] = container
    desc: dict[str, Any] = {
        "Name": f"{APP_NAME} outputs: cortical-lesion segmentation",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
    }
    source: dict[str, str] = {}
    doi = raw.get("DatasetDOI")
    if doi:
        doi = str(doi)
        source["DOI"] = doi if doi.startswith("doi:") else f"doi:{doi}"
    source["URL"] = Path(bids_dir).absolute().as_uri()
    desc["SourceDatasets"] = [source]
    if raw.get("License"):
        desc["License"] = raw["License"]
    if raw.get("Name"):
        desc["SourceDatasetName"] = raw["Name"]
    return desc


def container_info() -> dict[str, str] | None:
    """Container type and tag when running inside one (set by the Dockerfile).

    An image built from the Dockerfile and run by Apptainer (or Singularity) says so: those
    runtimes set ``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER``.

    >>> import os
    >>> os.environ.update(CL_BIDSAPP_CONTAINER="docker", APPTAINER_CONTAINER="/x/cl.sif")
    >>> container_info()["Type"]
    'apptainer'
    >>> for name in ("CL_BIDSAPP_CONTAINER", "APPTAINER_CONTAINER"):
    ...     del os.environ[name]
    >>> container_info() is None
    True
    """
    import os

    kind = os.environ.get("CL_BIDSAPP_CONTAINER")
    if not kind:
        return None
    for runtime in ("APPTAINER", "SINGULARITY"):
        if os.environ.get(f"{runtime}_CONTAINER"):
            kind = runtime.lower()
            break
    return {"Type": kind, "Tag": os.environ.get("CL_BIDSAPP_CONTAINER_TAG", __version__)}


def write_dataset_files(output_dir: Path, raw_description: dict[str, Any],
                        bids_dir: Path) -> None:
    """Write ``dataset_description.json``, ``.bidsignore`` and ``descriptions.tsv``.

    Safe when several jobs do it at once: the content is the same for all of them and each
    file appears atomically.
    """
    output_dir = Path(output_dir)
    desc = dataset_description(raw_description, bids_dir, container_info())
    target = output_dir / "dataset_description.json"
    if not (target.is_file() and _same_json(target, desc)):
        write_json(target, desc)

    spec = output_spec()
    ignore_file = output_dir / ".bidsignore"
    wanted = spec["bidsignore"]
    existing = []
    if ignore_file.is_file():
        existing = [ln.strip() for ln in ignore_file.read_text().splitlines() if ln.strip()]
    lines = existing + [w for w in wanted if w not in existing]
    if lines != existing:
        write_text(ignore_file, "\n".join(lines) + "\n")

    rows = ["desc_id\tdescription"] + [f"{k}\t{v}" for k, v in spec["descriptions"].items()]
    text = "\n".join(rows) + "\n"
    desc_tsv = output_dir / "descriptions.tsv"
    if not (desc_tsv.is_file() and desc_tsv.read_text() == text):
        write_text(desc_tsv, text)


def _same_json(path: Path, data: Any) -> bool:
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(data))
    except (OSError, json.JSONDecodeError):
        return False


def subject_log_dir(output_dir: Path, subject: str, run_id: str) -> Path:
    """``<out>/sub-XX/log/<run-id>/``: the run's settings, log and crash files for a subject."""
    return Path(output_dir) / f"sub-{subject}" / "log" / run_id


def save_settings(settings, folder: Path) -> Path:
    """Save the run's settings as TOML (``cl-bidsapp.toml``) into ``folder``."""
    return write_text(Path(folder) / "cl-bidsapp.toml", settings.to_toml())

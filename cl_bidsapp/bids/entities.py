"""BIDS file names: parsing entities and resolving sidecar metadata by inheritance.

pybids is indexed without metadata (``index_metadata=False``, several times faster on large
datasets), so the sidecars of the few files we actually use are resolved here, following the
BIDS inheritance principle: JSON files whose entities are a subset of the image's, with the same
suffix, from the dataset root down to the image's folder; nearer files override farther ones.

>>> parse_name("sub-01_ses-1_acq-mp2rage_UNIT1.nii.gz")
{'sub': '01', 'ses': '1', 'acq': 'mp2rage', 'suffix': 'UNIT1', 'extension': '.nii.gz'}
>>> parse_name("acq-mprage_T1w.json")["acq"]
'mprage'
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

# BIDS short keys <-> pybids entity names (what filter files and pybids queries use)
SHORT_TO_LONG = {
    "sub": "subject", "ses": "session", "task": "task", "acq": "acquisition", "ce": "ceagent",
    "rec": "reconstruction", "dir": "direction", "run": "run", "echo": "echo", "flip": "flip",
    "inv": "inv", "mt": "mt", "part": "part", "chunk": "chunk", "space": "space",
    "res": "res", "den": "den", "label": "label", "desc": "desc", "proc": "proc",
}
LONG_TO_SHORT = {v: k for k, v in SHORT_TO_LONG.items()}

# Order of entities in derivative file names (BIDS specification, anat-relevant subset)
ENTITY_ORDER = [
    "sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt",
    "part", "proc", "hemi", "space", "chunk", "seg", "res", "den", "label", "desc",
]

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_EXTENSIONS = (".nii.gz", ".nii", ".json", ".tsv", ".html", ".png", ".svg")


def split_extension(name: str) -> tuple[str, str]:
    """Split a file name into stem and (possibly double) extension."""
    for ext in _EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext) if dot else (name, "")


def parse_name(name: str) -> dict[str, str]:
    """Entities (short keys), ``suffix`` and ``extension`` of a BIDS file name."""
    stem, ext = split_extension(Path(name).name)
    parts = stem.split("_")
    out: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if sep:
            out[key] = value
    last = parts[-1]
    if "-" in last:  # no suffix (unusual); keep the pair
        key, _, value = last.partition("-")
        out[key] = value
    else:
        out["suffix"] = last
    out["extension"] = ext
    return out


def is_valid_label(label: str) -> bool:
    """BIDS labels are alphanumeric only (no ``-``, ``_``, ``/`` or ``.``).

    >>> is_valid_label("01"), is_valid_label("../x"), is_valid_label("")
    (True, False, False)
    """
    return bool(_LABEL_RE.match(label))


def build_name(entities: dict[str, str], suffix: str, extension: str) -> str:
    """Compose a BIDS file name from short-key entities in specification order.

    >>> build_name({"sub": "01", "acq": "mp2rage", "desc": "brain"}, "mask", ".nii.gz")
    'sub-01_acq-mp2rage_desc-brain_mask.nii.gz'
    """
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    pairs = [f"{k}-{entities[k]}" for k in ENTITY_ORDER if entities.get(k) not in (None, "")]
    return "_".join(pairs + [suffix]) + extension


@lru_cache(maxsize=4096)
def _json_files(folder: Path) -> tuple[Path, ...]:
    try:
        return tuple(sorted(p for p in folder.iterdir() if p.name.endswith(".json")))
    except OSError:
        return ()


def sidecar_chain(image: Path, root: Path) -> list[Path]:
    """JSON sidecars that apply to ``image``, farthest (dataset root) first."""
    image = Path(image)
    root = Path(root).resolve()
    target = parse_name(image.name)
    entities = {k: v for k, v in target.items() if k not in ("suffix", "extension")}
    folders = []
    folder = image.parent.resolve()
    while True:
        folders.append(folder)
        if folder == root or folder.parent == folder:
            break
        folder = folder.parent
    chain: list[Path] = []
    for folder in reversed(folders):
        for candidate in _json_files(folder):
            cand = parse_name(candidate.name)
            if cand.get("suffix") != target.get("suffix"):
                continue
            cand_entities = {k: v for k, v in cand.items() if k not in ("suffix", "extension")}
            if all(entities.get(k) == v for k, v in cand_entities.items()):
                chain.append(candidate)
    return chain


def read_metadata(image: Path, root: Path) -> dict[str, Any]:
    """Merged sidecar metadata of ``image`` (BIDS inheritance); unreadable JSON raises ValueError."""
    merged: dict[str, Any] = {}
    for sidecar in sidecar_chain(image, root):
        try:
            data = json.loads(Path(sidecar).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{sidecar}: sidecar is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{sidecar}: sidecar must hold a JSON object")
        merged.update(data)
    return merged


def clear_caches() -> None:
    """Forget cached folder listings (tests that create files between calls)."""
    _json_files.cache_clear()

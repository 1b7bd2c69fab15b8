"""The model card ``cl_model.json``: what a model needs, recommends and contains.

An nnU-Net v2 results folder (``dataset.json``, ``plans.json``, ``fold_K/checkpoint_final.pth``)
says how to run a network; the card adds what the app needs to use it correctly and safely:
which image goes in, whether it must be skull-stripped, the recommended threshold and minimum
lesion size, licence and citation, and the sha256 of every file so that nothing is unpickled
before it has been checked.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "dataset.json").write_text("{}")
>>> sha256_file(d / "dataset.json")
'44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a'
>>> sorted(hash_model_files(d))
['dataset.json']
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from cl_bidsapp.errors import InputDataError
from cl_bidsapp.io import write_json

logger = logging.getLogger(__name__)

CARD_FILENAME = "cl_model.json"
CARD_VERSION = 1
CHECKPOINT_NAME = "checkpoint_final.pth"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
INPUT_IMAGES = ("UNI", "UNI-DEN", "T1w")

# Files of an nnU-Net results folder that inference never reads: not hashed, not installed.
_NOT_MODEL_FILES = {CARD_FILENAME, "progress.png", "debug.json", "network_architecture.pdf"}
_READ_CHUNK = 1 << 20

#: JSON schema of the card (draft 2020-12), published in docs/models.md.
CARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cl-bidsapp model card (cl_model.json)",
    "type": "object",
    "required": ["card_version", "name", "version", "description", "is_demo", "trained_on",
                 "input", "preprocessing", "postprocessing", "nnunet", "licence", "citation",
                 "files"],
    "properties": {
        "card_version": {"const": CARD_VERSION},
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "version": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "is_demo": {"type": "boolean"},
        "trained_on": {"type": "string", "minLength": 1},
        "input": {
            "type": "object", "required": ["contrasts", "image"],
            "properties": {
                "contrasts": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "image": {"enum": list(INPUT_IMAGES)},
            },
        },
        "preprocessing": {
            "type": "object", "required": ["skull_stripped"],
            "properties": {"skull_stripped": {"type": "boolean"},
                           "background_value": {"type": "number"}},
        },
        "postprocessing": {
            "type": "object", "required": ["threshold", "min_lesion_size_voxels"],
            "properties": {
                "threshold": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "min_lesion_size_voxels": {"type": "integer", "minimum": 1},
                "connectivity": {"enum": [6, 18, 26]},
            },
        },
        "nnunet": {
            "type": "object", "required": ["configuration", "trainer", "plans", "folds"],
            "properties": {
                "configuration": {"type": "string"}, "trainer": {"type": "string"},
                "plans": {"type": "string"}, "checkpoint": {"type": "string"},
                "folds": {"type": "array", "minItems": 1,
                          "items": {"anyOf": [{"type": "integer", "minimum": 0},
                                              {"const": "all"}]}},
            },
        },
        "licence": {"type": "string", "minLength": 1},
        "citation": {"type": "string"},
        "training": {"type": "object"},
        "ood": {"type": "object"},
        "files": {"type": "object", "minProperties": 1,
                  "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
}


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of ``data``.

    >>> sha256_bytes(b"")[:12]
    'e3b0c44298fc'
    """
    return hashlib.sha256(data).hexdigest()


def hash_model_files(model_dir: str | Path) -> dict[str, str]:
    """Hash every file inference may read under ``model_dir`` (POSIX relative path -> sha256).

    The card itself and nnU-Net's training by-products (progress plots, debug dumps) are left out.
    """
    model_dir = Path(model_dir)
    hashes = {}
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file() or path.name in _NOT_MODEL_FILES or path.name.startswith("."):
            continue
        hashes[path.relative_to(model_dir).as_posix()] = sha256_file(path)
    return hashes


def fold_checkpoint(fold: int | str, checkpoint: str = CHECKPOINT_NAME) -> str:
    """Relative path of a fold's checkpoint inside a model folder.

    >>> fold_checkpoint(0), fold_checkpoint("all")
    ('fold_0/checkpoint_final.pth', 'fold_all/checkpoint_final.pth')
    """
    return f"fold_{fold}/{checkpoint}"


def _schema_problems(value: Any, schema: dict, where: str) -> list[str]:
    """Check ``value`` against the subset of JSON schema that CARD_SCHEMA uses."""
    problems: list[str] = []
    if "const" in schema and value != schema["const"]:
        return [f"{where} must be {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} must be one of {schema['enum']}, not {value!r}"]
    if "anyOf" in schema:
        if all(_schema_problems(value, option, where) for option in schema["anyOf"]):
            return [f"{where} has an unexpected value {value!r}"]
        return []
    expected = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool,
             "integer": int, "number": (int, float)}
    if expected:
        ok = isinstance(value, types[expected])
        if expected in ("integer", "number") and isinstance(value, bool):
            ok = False
        if not ok:
            return [f"{where} must be of type {expected}"]
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where} must not be empty")
        if "pattern" in schema and not re.match(schema["pattern"], value):
            problems.append(f"{where} {value!r} does not match {schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where} must be >= {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{where} must be > {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            problems.append(f"{where} must be < {schema['exclusiveMaximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{where} must have at least {schema['minItems']} item(s)")
        for i, item in enumerate(value):
            problems += _schema_problems(item, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"{where}.{key} is missing")
        if len(value) < schema.get("minProperties", 0):
            problems.append(f"{where} must not be empty")
        for key, sub in value.items():
            sub_schema = schema.get("properties", {}).get(key, schema.get("additionalProperties"))
            if isinstance(sub_schema, dict):
                problems += _schema_problems(sub, sub_schema, f"{where}.{key}")
    return problems


def card_problems(card: Any) -> list[str]:
    """List what is wrong with a card's fields (empty when it is valid).

    Checks the schema plus the rules a schema cannot say: file paths stay inside the model
    folder, and every fold named has its checkpoint hashed.

    >>> card_problems({"card_version": 1})[:2]
    ['card.name is missing', 'card.version is missing']
    """
    problems = _schema_problems(card, CARD_SCHEMA, "card")
    if problems:
        return problems
    for rel in card["files"]:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel.startswith("~"):
            problems.append(f"card.files has an unsafe path {rel!r}")
    checkpoint = card["nnunet"].get("checkpoint", CHECKPOINT_NAME)
    for fold in card["nnunet"]["folds"]:
        if fold_checkpoint(fold, checkpoint) not in card["files"]:
            problems.append(f"fold {fold} is listed but {fold_checkpoint(fold, checkpoint)} "
                            "is not among card.files")
    for required in ("dataset.json", "plans.json"):
        if required not in card["files"]:
            problems.append(f"card.files does not list {required}")
    if "ood" in card:  # out-of-distribution reference (cl-bidsapp-models calibrate)
        from cl_bidsapp.core.ood import reference_problems

        problems += [f"card.{p}" for p in reference_problems(card["ood"])]
    return problems


def load_card(model_dir: str | Path) -> tuple[dict, bytes]:
    """Read ``cl_model.json`` from a model folder; return the parsed card and its raw bytes.

    Raises
    ------
    InputDataError
        The card is absent, is not JSON, or its fields are invalid (exit 65).
    """
    path = Path(model_dir) / CARD_FILENAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputDataError(
            "not a cl-bidsapp model: the model card is missing", path=path,
            hint="an nnU-Net folder or zip needs a card: install it with "
                 "'cl-bidsapp-models install SRC --card CARD.json' (see docs/models.md)") from None
    try:
        card = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputDataError(f"model card is not valid JSON ({exc})", path=path) from None
    problems = card_problems(card)
    if problems:
        raise InputDataError("invalid model card: " + "; ".join(problems), path=path)
    return card, raw


def verify_files(model_dir: str | Path, card: dict) -> None:
    """Check that every file the card lists exists with the sha256 the card gives.

    Raises
    ------
    InputDataError
        A file is missing or differs from the card: corrupt or tampered (exit 65).
    """
    model_dir = Path(model_dir)
    for rel, expected in card["files"].items():
        path = model_dir / rel
        if not path.is_file():
            raise InputDataError("model file listed in the card is missing (incomplete or "
                                 "corrupt model)", path=path)
        actual = sha256_file(path)
        if actual != expected:
            raise InputDataError(
                f"sha256 mismatch: the card says {expected[:16]}..., the file has "
                f"{actual[:16]}... (corrupt or tampered model; it was not loaded)", path=path,
                hint="reinstall the model from its original source")


def verify_nnunet_files(model_dir: str | Path, card: dict) -> tuple[dict, dict]:
    """Check dataset.json and plans.json against what the app can run; return both.

    One input channel, labels {background: 0, one lesion class: 1}, and the configuration and
    plans the card names must exist.
    """
    model_dir = Path(model_dir)
    dataset = _read_json(model_dir / "dataset.json")
    plans = _read_json(model_dir / "plans.json")
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise InputDataError(f"the model takes {len(channels)} input channels; cl-bidsapp runs "
                             "single-channel models only", path=model_dir / "dataset.json")
    labels = dataset.get("labels", {})
    values = sorted(v for v in labels.values() if isinstance(v, int))
    if values != [0, 1] or len(labels) != 2:
        raise InputDataError(f"labels must be {{background: 0, lesion: 1}}, found {labels}",
                             path=model_dir / "dataset.json")
    configuration = card["nnunet"]["configuration"]
    if configuration not in plans.get("configurations", {}):
        raise InputDataError(f"the card names configuration {configuration!r}, which plans.json "
                             f"does not define ({sorted(plans.get('configurations', {}))})",
                             path=model_dir / "plans.json")
    if plans.get("plans_name") != card["nnunet"]["plans"]:
        raise InputDataError(f"the card names plans {card['nnunet']['plans']!r} but plans.json "
                             f"is {plans.get('plans_name')!r}", path=model_dir / "plans.json")
    return dataset, plans


def write_card(model_dir: str | Path, *, name: str, version: str, description: str,
               licence: str, citation: str, input_contrasts: Iterable[str] = ("UNIT1", "T1w"),
               input_image: str = "UNI", skull_stripped: bool = True,
               background_value: float = 0.0, threshold: float = 0.5,
               min_lesion_size_voxels: int = 3, connectivity: int = 26,
               trained_on: str = "", is_demo: bool = False,
               configuration: str = "3d_fullres", trainer: str | None = None,
               plans: str | None = None, folds: Iterable[int | str] | None = None,
               checkpoint: str = CHECKPOINT_NAME, training: dict | None = None) -> dict:
    """Write ``cl_model.json`` into an nnU-Net model folder, hashing every file in it.

    Parameters
    ----------
    model_dir
        Folder with ``dataset.json``, ``plans.json`` and ``fold_K/<checkpoint>``.
    name, version, description, licence, citation
        Identity of the model, shown by ``cl-bidsapp-models show``.
    input_contrasts
        BIDS suffixes the model accepts (``UNIT1`` for MP2RAGE UNI, ``T1w`` for MPRAGE).
    input_image
        Which image the model wants: ``"UNI"`` (MP2RAGE uniform image), ``"UNI-DEN"``
        (background-denoised UNI) or ``"T1w"`` (MPRAGE-like T1-weighted image).
    skull_stripped, background_value
        Whether the input must be brain-extracted, and the value outside the brain.
    threshold, min_lesion_size_voxels, connectivity
        Recommended post-processing; sizes are in voxels of the source image.
    trained_on, is_demo
        What the training data were; ``is_demo`` makes the app warn on real data.
    configuration, trainer, plans, folds, checkpoint
        nnU-Net identity; trainer/plans/folds default to what the folder holds.
    training
        Free-form record of training settings and seeds.

    Returns
    -------
    dict
        The card as written (validated).
    """
    model_dir = Path(model_dir)
    plans_json = _read_json(model_dir / "plans.json")
    if folds is None:
        names = (p.parent.name[len("fold_"):] for p in model_dir.glob(f"fold_*/{checkpoint}"))
        folds = sorted(names, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0))
        folds = [int(f) if f.isdigit() else f for f in folds]
    card = {
        "card_version": CARD_VERSION,
        "name": name, "version": version, "description": description,
        "is_demo": bool(is_demo), "trained_on": trained_on or "unspecified",
        "input": {"contrasts": list(input_contrasts), "image": input_image},
        "preprocessing": {"skull_stripped": bool(skull_stripped),
                          "background_value": float(background_value)},
        "postprocessing": {"threshold": float(threshold),
                           "min_lesion_size_voxels": int(min_lesion_size_voxels),
                           "connectivity": int(connectivity)},
        "nnunet": {"configuration": configuration,
                   "trainer": trainer or _trainer_from_checkpoint_dirname(model_dir),
                   "plans": plans or plans_json.get("plans_name", "nnUNetPlans"),
                   "folds": list(folds), "checkpoint": checkpoint},
        "licence": licence, "citation": citation,
        "training": dict(training or {}),
        "files": hash_model_files(model_dir),
    }
    problems = card_problems(card)
    if problems:
        raise InputDataError("cannot write model card: " + "; ".join(problems), path=model_dir)
    write_json(model_dir / CARD_FILENAME, card)
    logger.info("wrote %s (%d files hashed)", model_dir / CARD_FILENAME, len(card["files"]))
    return card


def _trainer_from_checkpoint_dirname(model_dir: Path) -> str:
    # nnU-Net names results folders Trainer__Plans__configuration
    parts = model_dir.name.split("__")
    return parts[0] if len(parts) == 3 else "nnUNetTrainer"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputDataError("nnU-Net model file is missing", path=path) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputDataError(f"not valid JSON ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise InputDataError("expected a JSON object", path=path)
    return data

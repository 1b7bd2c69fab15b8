"""The out-of-distribution reference of a model: build it, store it in the card, score scans.

A model card may carry an ``ood`` section: per encoder stage, the mean and Ledoit-Wolf-shrunk
covariance of the stage's features (:mod:`cl_bidsapp.models.embedding`) over scans named as
in-domain and the median leave-one-out distance of those scans (the stage's scale); and a
threshold on the score (the largest scaled stage distance): by default the 0.95 quantile of
the held-out scans' scores (or, without held-out scans, of the training scans' leave-one-out
scores). The math is in :mod:`cl_bidsapp.core.ood`.

The card is not among the files its own sha256 list covers, so the reference can be added to
an installed model without breaking verification; the model's identity (the card's sha256)
changes, as it should: outputs made with and without a reference are told apart.

``cl-bidsapp-models calibrate NAME DIR [--held-out DIR]`` takes the embeddings from a
cl-bidsapp output folder (``*_desc-embedding_features.tsv`` made by the same network; other
scans are embedded from their saved model input ``*_desc-preproc_*``), or runs the app's
participant level on a raw BIDS dataset first, so the scans go through exactly the
preprocessing the app applies.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cl_bidsapp.core import ood
from cl_bidsapp.errors import InputDataError, MissingInputError
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.registry import InstalledModel

logger = logging.getLogger(__name__)

#: Fewest in-domain scans a reference is fitted on (leave-one-out needs 3; under
#: :data:`FEW_SCANS` the threshold is rough and calibrate says so).
MIN_SCANS = 3
FEW_SCANS = 10
_DIGITS = 6


def embedding_fold(model: InstalledModel, folds: Sequence) -> Any:
    """The fold whose network gives the embedding: the reference's fold when it is run,
    else the first fold run.

    >>> class M: card = {"ood": {"fold": 1}}
    >>> embedding_fold(M(), [0, 1]), embedding_fold(M(), [2, 3])
    (1, 2)
    """
    wanted = (model.card.get("ood") or {}).get("fold")
    return wanted if wanted in list(folds) else list(folds)[0]


def embedding_provenance(model: InstalledModel, fold) -> dict[str, Any]:
    """Which network made an embedding: model, version, fold and the fold checkpoint's sha256."""
    rel = cards.fold_checkpoint(fold, model.card["nnunet"].get("checkpoint",
                                                               cards.CHECKPOINT_NAME))
    return {"Model": model.name, "ModelVersion": model.version, "Fold": fold,
            "CheckpointSHA256": model.card["files"].get(rel)}


def ood_record(model: InstalledModel, vector: np.ndarray, info: dict[str, Any]
               ) -> dict[str, Any]:
    """Score, threshold and verdict of one embedding against the card's reference.

    Returns a dict with ``score`` (:func:`~cl_bidsapp.core.ood.ood_score`), ``threshold``, ``verdict``
    (``inside``, ``outside`` or ``unknown``), ``fold``, ``reference_scans`` and, when no
    score could be given, ``note`` saying why.
    """
    ref = model.card.get("ood")
    out: dict[str, Any] = {"score": None, "threshold": None, "verdict": "unknown",
                           "fold": info.get("Fold")}
    if not ref:
        out["note"] = (f"model {model.name} has no reference distribution in its card: "
                       f"run 'cl-bidsapp-models calibrate {model.name} IN_DOMAIN_DIR'")
        return out
    problems = ood.reference_problems(ref)
    if problems:
        out["note"] = "the card's reference is unusable: " + "; ".join(problems)
        return out
    if ref.get("checkpoint_sha256") != info.get("CheckpointSHA256"):
        out["note"] = (f"the card's reference was made with fold {ref.get('fold')}'s network, "
                       f"which this run did not use (folds run: fold {info.get('Fold')} gave "
                       "the embedding)")
        return out
    vector = _legacy_slice(ref, vector, info)
    try:
        score = float(ood.ood_score(ref, vector)[0])
    except ValueError as exc:
        out["note"] = (f"the embedding does not fit the card's reference ({exc}); run "
                       f"'cl-bidsapp-models calibrate {model.name} IN_DOMAIN_DIR' again")
        return out
    threshold = ref.get("threshold")
    out.update(score=round(score, 4), threshold=threshold,
               verdict=ood.verdict(score, threshold), reference_scans=ref.get("n_scans"))
    return out


def _legacy_slice(reference: dict, vector: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """The part of ``vector`` an old-format reference (bottleneck means only, no blocks) was
    made from: the channel means of the last encoder stage; else ``vector`` unchanged.

    >>> info = {"Blocks": [{"name": "stage0", "start": 0, "stop": 4},
    ...                    {"name": "stage1", "start": 4, "stop": 10}]}
    >>> _legacy_slice({"mean": [0.0] * 3}, np.arange(10.0), info).tolist()
    [4.0, 5.0, 6.0]
    """
    blocks = info.get("Blocks") or []
    if "blocks" in reference or not blocks:
        return vector
    last = blocks[-1]
    channels = (int(last["stop"]) - int(last["start"])) // 2
    if len(reference.get("mean", [])) != channels or len(vector) != int(last["stop"]):
        return vector
    return np.asarray(vector)[int(last["start"]):int(last["start"]) + channels]


def build_reference(train: np.ndarray, held_out: np.ndarray | None = None,
                    quantile: float = ood.DEFAULT_QUANTILE,
                    blocks: Sequence | None = None) -> dict[str, Any]:
    """The card's ``ood`` numbers from in-domain embeddings (rows are scans).

    ``blocks`` (the embedding's ``Blocks``: dicts with ``name``, ``start``, ``stop``, or
    tuples) split the vector into parts scored on their own (one block when not given); see
    :func:`cl_bidsapp.core.ood.fit_block_reference`. Each block's scale is the median distance
    of the training scans left out one at a time; the threshold is the ``quantile`` of the
    held-out scans' scores (at least 2 held-out scans), else of the leave-one-out scores.

    >>> rng = np.random.default_rng(0)
    >>> ref = build_reference(rng.normal(size=(12, 4)), rng.normal(size=(6, 4)))
    >>> ref["threshold_from"], ref["n_scans"], ref["n_held_out"], ref["threshold"] > 1
    ('held-out', 12, 6, True)
    >>> ref = build_reference(rng.normal(size=(12, 4)), blocks=[("a", 0, 1), ("b", 1, 4)])
    >>> [b["name"] for b in ref["blocks"]], ref["threshold_from"]
    (['a', 'b'], 'leave-one-out')
    """
    train = np.asarray(train, dtype=float)
    if len(train) < MIN_SCANS:
        raise ValueError(f"a reference needs at least {MIN_SCANS} in-domain scans, got "
                         f"{len(train)}")
    if len(train) < FEW_SCANS:
        logger.warning("only %d in-domain scans: the reference and its threshold are rough; "
                       "use tens of scans for a dependable score", len(train))
    if blocks:
        layout = [(b["name"], int(b["start"]), int(b["stop"])) if isinstance(b, dict)
                  else (str(b[0]), int(b[1]), int(b[2])) for b in blocks]
    else:
        layout = [("all", 0, train.shape[1] if train.ndim == 2 else 0)]
    held = np.asarray(held_out, dtype=float) if held_out is not None and len(held_out) else None
    if held is not None and len(held) < 2:
        logger.warning("one held-out scan cannot set a threshold; using the training scans' "
                       "leave-one-out scores instead")
        held = None
    ref, scores = ood.fit_block_reference(train, layout, held)
    ref["threshold_from"] = ref.pop("scores_from")
    ref["n_held_out"] = int(len(held)) if held is not None else 0
    ref["quantile"] = float(quantile)
    ref["threshold"] = ood.threshold_from(scores, quantile)
    ref["calibration_scores"] = sorted(float(d) for d in scores)
    ref["training_scores_median"] = float(np.median(ood.ood_score(ref, train)))
    return _rounded(ref)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.{_DIGITS}g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_reference(model: InstalledModel, reference: dict[str, Any],
                    info: dict[str, Any], sources: dict[str, Any] | None = None) -> dict:
    """Put ``reference`` into the model's card (``ood``) and write it; return the card."""
    path = model.path / cards.CARD_FILENAME
    card = json.loads(path.read_text(encoding="utf-8"))
    from cl_bidsapp.models.embedding import LAYERS, POOLING

    card["ood"] = {
        "score": "largest, over the encoder stages, of the Mahalanobis distance of the scan's "
                 "stage features to the in-domain reference (Ledoit-Wolf shrunk covariance) "
                 "divided by the stage's scale (the median leave-one-out distance of the "
                 "in-domain scans); see docs/ood.md",
        "layers": info.get("Layers", LAYERS), "pooling": info.get("Pooling", POOLING),
        "fold": info.get("Fold"), "checkpoint_sha256": info.get("CheckpointSHA256"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": dict(sources or {}),
        **reference,
    }
    problems = cards.card_problems(card)
    if problems:
        raise InputDataError("cannot write the reference into the card: "
                             + "; ".join(problems), path=path)
    from cl_bidsapp.io import write_json

    write_json(path, card)
    return card


def embed_images(model: InstalledModel, images: Sequence[Path], device: str = "cpu",
                 threads: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of model-input images (rows follow ``images``) and how they were made.

    Uses the model's first fold (the reference fold), no test-time augmentation (the
    embedding takes only the unmirrored pass anyway).
    """
    import nibabel as nib

    from cl_bidsapp.models.predictor import CLPredictor

    fold = model.folds[0]
    predictor = CLPredictor(model, device=device, folds=[fold], tta=False, threads=threads)
    rows, info = [], {}
    for path in images:
        result = predictor.predict(nib.load(str(path)))
        rows.append(result.embedding)
        info = result.embedding_info
        logger.info("embedded %s", Path(path).name)
    return np.array(rows), info


def collect_embeddings(model: InstalledModel, folder: Path, device: str = "cpu",
                       work_dir: Path | None = None, app_args: Sequence[str] = ()
                       ) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Embeddings of every processed scan under ``folder`` (cl-bidsapp outputs or raw BIDS).

    Returns
    -------
    vectors, names, info
        One row per scan, their BIDS names, and the provenance of the embeddings.

    Raises
    ------
    MissingInputError
        No usable scan in the folder (exit 66).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError("the folder does not exist", path=folder)
    records = sorted(folder.glob("sub-*/log/*_record.json"))
    if not records:
        out = _run_participant(model, folder, work_dir, app_args)
        records = sorted(out.glob("sub-*/log/*_record.json"))
        folder = out
    fold = model.folds[0]
    wanted = embedding_provenance(model, fold)["CheckpointSHA256"]
    vectors, names, to_embed, info = {}, [], {}, {}
    for path in records:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s cannot be read: scan left out", path)
            continue
        if record.get("status") != "ok":
            continue
        name = str(record.get("bids_name"))
        outputs = record.get("outputs") or {}
        emb = folder / outputs["embedding"] if outputs.get("embedding") else None
        if emb is not None and emb.is_file():
            from cl_bidsapp.models.embedding import LAYERS, read_embedding

            try:
                vector, meta = read_embedding(emb)
            except (OSError, ValueError) as exc:
                logger.warning("%s: %s; embedding it again", emb, exc)
            else:
                blocks = meta.get("Blocks") or [{}]
                if (meta.get("CheckpointSHA256") == wanted and meta.get("Layers") == LAYERS
                        and len(vector) == blocks[-1].get("stop")):
                    vectors[name], info = vector, meta
                    names.append(name)
                    continue
        preproc = folder / outputs["preproc"] if outputs.get("preproc") else None
        if preproc is not None and preproc.is_file():
            to_embed[name] = preproc
            names.append(name)
    if to_embed:
        rows, info = embed_images(model, list(to_embed.values()), device=device)
        vectors.update(zip(to_embed, rows))
    if not names:
        raise MissingInputError("no processed scan with an embedding or a model input here",
                                path=folder, hint="give a raw BIDS dataset or the output "
                                                  "folder of a cl-bidsapp participant run")
    info = {k: v for k, v in info.items() if k in ("Layers", "Pooling", "Channels", "Blocks",
                                                   "Fold", "CheckpointSHA256")}
    return np.array([vectors[n] for n in names]), names, info


def _run_participant(model: InstalledModel, bids_dir: Path, work_dir: Path | None,
                     app_args: Sequence[str]) -> Path:
    """Run the app's participant level on ``bids_dir`` with ``model``; return its output."""
    import tempfile

    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cl-calibrate-"))
    out = root / f"calibrate-{bids_dir.name}"
    command = [sys.executable, "-m", "cl_bidsapp", str(bids_dir), str(out), "participant",
               "--model", str(model.path), "-w", str(root / "work"), "--no-tta",
               "--folds", str(model.folds[0]), *app_args]
    logger.info("running the participant level to embed the scans: %s", " ".join(command))
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        logger.warning("the participant level exited with %d; scans it processed are used",
                       done.returncode)
    return out


def calibrate(model: InstalledModel, folder: Path, held_out: Path | None = None,
              device: str = "cpu", quantile: float = ood.DEFAULT_QUANTILE,
              work_dir: Path | None = None, app_args: Sequence[str] = ()) -> dict[str, Any]:
    """Build the reference from ``folder`` (and ``held_out``) and write it into the card."""
    train, names, info = collect_embeddings(model, folder, device, work_dir, app_args)
    held, held_names = None, []
    if held_out is not None:
        held, held_names, _ = collect_embeddings(model, held_out, device, work_dir, app_args)
    try:
        reference = build_reference(train, held, quantile, blocks=info.get("Blocks"))
    except ValueError as exc:
        raise InputDataError(str(exc), path=folder) from None
    sources = {"in_domain": {"folder": str(folder), "n_scans": len(names)},
               "held_out": {"folder": str(held_out), "n_scans": len(held_names)}
               if held_out is not None else None}
    return write_reference(model, reference, info, sources)

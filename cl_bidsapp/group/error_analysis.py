"""Error analysis of the evaluation mode: which lesions does the model find, which does it miss?

Per evaluated image (inside the evaluation job, :func:`image_lesion_rows`), every reference
lesion and every predicted lesion gets the properties of
:mod:`cl_bidsapp.core.lesion_properties` (volume, shape, cortical involvement, distance to the
brain surface, probability) and its outcome (see :mod:`cl_bidsapp.core.lesion_strata`).
Over images (:func:`cl_bidsapp.group.error_report.write_error_analysis`): the per-lesion table
``group/group_evaluation_lesions.tsv`` and the detection rate and F1 by lesion-size bin, by
cortical involvement and by site, ``group/group_evaluation_strata.tsv`` (each with a JSON
column sidecar), a figure, and the report's error-analysis block.

Where the values come from:

* **Tissue** (cortical involvement): ``_label-GM|WM|CSF_probseg`` maps found beside the
  reference masks (``--reference-masks`` folder, same entities as the image, no ``space-``),
  on the image's grid, as the phantom simulator writes them. A GM map alone is used with the
  brain mask (see :func:`~cl_bidsapp.core.lesion_properties.tissue_labels`). Without maps,
  involvement is n/a.
* **Surface distance**: the participant level's brain mask.
* **Probability and uncertainty**: the participant level's probability map and per-lesion
  table (``uncertainty_ddu``, n/a when fewer than two folds were run).

**Strata.** A reference lesion and a false positive are counted in their own size bin and
involvement. A TP or US predicted lesion is counted with the largest reference lesion it
touches, so that a lesion found too small still counts where the lesion belongs.

>>> stratum_source([3, 1], {1: ("<10", "intracortical"), 3: ("30-100", "leukocortical")})
1
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cl_bidsapp.core.lesion_strata import depth_bin, size_bin

logger = logging.getLogger(__name__)

TISSUES = ("GM", "WM", "CSF")
#: Columns copied from the evaluation row of the image onto each of its lesions.
IMAGE_COLUMNS = ("bids_name", "participant_id", "session_id", "contrast", "site", "domain")


def stratum_source(touched: Sequence[int], strata: dict) -> int:
    """The reference lesion a TP/US prediction is counted with: the largest it touches.

    Reference lesions are numbered largest first, so that is the lowest number.
    """
    return min(int(t) for t in touched if int(t) in strata)


def index_tissue_maps(root: str | Path) -> dict[tuple, dict[str, Path]]:
    """Tissue probability maps under ``root`` by reference key, then by tissue (GM, WM, CSF).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "sub-01_label-WM_probseg.nii.gz").write_bytes(b"")
    >>> _ = (d / "sub-01_space-MNI_label-GM_probseg.nii.gz").write_bytes(b"")
    >>> [(k[0], sorted(v)) for k, v in index_tissue_maps(d).items()]
    [('01', ['WM'])]
    """
    from cl_bidsapp.bids.entities import parse_name
    from cl_bidsapp.group.evaluate import reference_key

    index: dict[tuple, dict[str, Path]] = {}
    for path in sorted(Path(root).rglob("sub-*_probseg.nii*")):
        entities = parse_name(path.name)
        label = entities.get("label")
        if label not in TISSUES or "space" in entities or "desc" in entities:
            continue
        index.setdefault(reference_key(entities), {}).setdefault(label, path)
    return index


def match_tissue_maps(index: dict[tuple, dict[str, Path]], entities: dict[str, str]
                      ) -> dict[str, str]:
    """The tissue maps of an image (same entities, else same subject and session)."""
    from cl_bidsapp.group.evaluate import match_reference

    found = match_reference(index, entities) or {}
    return {label: str(path) for label, path in found.items()}


def image_lesion_rows(job: dict[str, Any], predicted: np.ndarray, reference: np.ndarray,
                      records: pd.DataFrame, grid, probability: np.ndarray | None = None,
                      brain: np.ndarray | None = None) -> tuple[list[dict], list[str]]:
    """Per-lesion rows of one evaluated image (reference lesions first), and notes.

    Parameters
    ----------
    job : dict
        The evaluation job: ``bids_name`` and optional ``tissue`` (tissue -> path),
        ``lesion_dseg`` and ``lesion_table`` (the participant level's instance map and table).
    predicted, reference : ndarray
        The masks that were evaluated.
    records : pandas.DataFrame
        :attr:`~cl_bidsapp.core.metrics.LesionDetection.records` of that evaluation.
    grid : nibabel image
        The prediction (affine, and the grid the other maps must share).
    probability, brain : ndarray, optional
        The probability map and brain mask, when the participant level wrote them.
    """
    from cl_bidsapp.core.components import as_lesion_mask, lesion_instances
    from cl_bidsapp.core.lesion_properties import lesion_properties, surface_distance_map
    from cl_bidsapp.core.metrics import _bounding_box

    notes: list[str] = []
    pred_mask, ref_mask = as_lesion_mask(predicted), as_lesion_mask(reference)
    # the box around all lesions (plus their neighbours): same numbering as the evaluation
    crop = _padded(_bounding_box(pred_mask | ref_mask), pred_mask.shape)
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in crop]
    affine = np.asarray(grid.affine, dtype=float) @ shift
    pred_lab = lesion_instances(pred_mask[crop], 0.5, min_size=1)
    ref_lab = lesion_instances(ref_mask[crop], 0.5, min_size=1)
    tissue = _tissue_labels(job, grid, crop, brain, notes)
    distance = None if brain is None else surface_distance_map(brain, grid.affine)[crop]
    prob = None if probability is None else probability[crop]
    props = {source: lesion_properties(lab, affine, tissue=tissue, surface_distance=distance,
                                       probability=prob)
             for source, lab in (("reference", ref_lab), ("predicted", pred_lab))}
    participant = _participant_lesions(job, crop, pred_mask.shape, pred_lab, notes)
    return _rows(job["bids_name"], props, records, pred_lab, ref_lab, participant), notes


def _padded(box: tuple[slice, ...], shape) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, shape))


def _tissue_labels(job, grid, crop, brain, notes: list[str]) -> np.ndarray | None:
    from cl_bidsapp.core.images import compare_grids, load_image
    from cl_bidsapp.core.lesion_properties import tissue_labels
    from cl_bidsapp.errors import CLBidsAppError

    maps = {}
    for label, path in (job.get("tissue") or {}).items():
        try:
            img = load_image(path)
        except CLBidsAppError as exc:
            notes.append(f"{job['bids_name']}: tissue map not used ({exc})")
            continue
        same, message = compare_grids(img, grid, names=(f"tissue map {path}", "the prediction"))
        if not same:
            notes.append(f"{job['bids_name']}: {message}; cortical involvement left n/a")
            continue
        # only the box around the lesions is read (and decompressed only up to it)
        index = crop + (0,) * (len(img.shape) - 3)
        maps[label] = np.asarray(img.dataobj[index], dtype=np.float32)
    if "WM" not in maps and "GM" in maps and brain is None:
        notes.append(f"{job['bids_name']}: a GM map without a WM map needs the brain mask; "
                     "cortical involvement left n/a")
    return tissue_labels(maps.get("GM"), maps.get("WM"), maps.get("CSF"),
                         None if brain is None else brain[crop])


def _participant_lesions(job, crop, shape, pred_lab, notes) -> dict[int, dict[str, Any]]:
    """Participant-level name and DDU of each predicted lesion (by evaluation number)."""
    from cl_bidsapp.core.images import load_image
    from cl_bidsapp.errors import CLBidsAppError

    if not job.get("lesion_dseg") or not job.get("lesion_table"):
        return {}
    try:
        dseg = load_image(job["lesion_dseg"])
        table = pd.read_csv(job["lesion_table"], sep="\t", na_values=["n/a"],
                            keep_default_na=False)
    except (CLBidsAppError, OSError, ValueError) as exc:
        notes.append(f"{job['bids_name']}: participant lesion table not used ({exc})")
        return {}
    if tuple(dseg.shape[:3]) != tuple(shape):
        notes.append(f"{job['bids_name']}: {job['lesion_dseg']} is not on the prediction's "
                     "grid; lesion names and DDU left n/a")
        return {}
    ids = np.asarray(dseg.dataobj).reshape(dseg.shape[:3])[crop]
    inside = pred_lab > 0
    pairs, counts = np.unique(np.stack([pred_lab[inside], ids[inside].astype(np.int64)]),
                              axis=1, return_counts=True)
    by_index = table.set_index("index") if "index" in table else pd.DataFrame()
    out: dict[int, dict[str, Any]] = {}
    for (p, index), n in sorted(zip(pairs.T.tolist(), counts.tolist()), key=lambda x: x[1]):
        if index > 0 and index in by_index.index:   # the largest overlap is written last
            row = by_index.loc[index]
            out[int(p)] = {"name": row.get("name"),
                           "uncertainty_ddu": _float(row.get("uncertainty_ddu"))}
    return out


def _rows(bids_name, props, records, pred_lab, ref_lab, participant) -> list[dict]:
    overlap: dict[tuple[int, int], int] = {}
    both = (pred_lab > 0) & (ref_lab > 0)
    if both.any():
        pairs, counts = np.unique(np.stack([pred_lab[both], ref_lab[both]]), axis=1,
                                  return_counts=True)
        overlap = {(int(p), int(r)): int(n) for (p, r), n in zip(pairs.T, counts)}
    predicted = records[records["kind"] != "FN"].set_index("predicted")
    kind = predicted["kind"].to_dict()
    touched_by: dict[int, list[int]] = {}
    for p, r in overlap:
        touched_by.setdefault(r, []).append(p)
    ref_props, pred_props = props["reference"], props["predicted"]
    strata = {int(r): (size_bin(v["volume_mm3"]), v["involvement"], v["volume_mm3"],
                       v.get("surface_distance_mm"))
              for r, v in ref_props.iterrows()}
    rows = []
    for r, values in ref_props.iterrows():
        hits = sorted(touched_by.get(int(r), []))
        outcome = ("TP" if any(kind.get(p) == "TP" for p in hits) else "US" if hits else "FN")
        best = max(hits, key=lambda p: overlap[(p, int(r))]) if hits else None
        ddu = participant.get(best, {}).get("uncertainty_ddu") if best else None
        rows.append(_row(bids_name, "reference", int(r), values, outcome, hits, None,
                         ddu, None, strata[int(r)]))
    for p, values in pred_props.iterrows():
        outcome = kind.get(int(p), "FP")
        hits = sorted(r for (q, r) in overlap if q == int(p))
        own = (size_bin(values["volume_mm3"]), values["involvement"], values["volume_mm3"],
               values.get("surface_distance_mm"))
        stratum = strata[stratum_source(hits, strata)] if hits else own
        info = participant.get(int(p), {})
        rows.append(_row(bids_name, "predicted", int(p), values, outcome, hits,
                         float(predicted["iou_adj"].get(int(p), np.nan)),
                         info.get("uncertainty_ddu"), info.get("name"), stratum))
    return rows


def _row(bids_name, source, number, values, outcome, matched, iou, ddu, name, stratum
         ) -> dict[str, Any]:
    row = {"bids_name": bids_name, "source": source, "lesion": number, "name": name,
           "outcome": outcome, "matched": ",".join(str(m) for m in matched) or None,
           "iou_adj": iou}
    row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()})
    row["uncertainty_ddu"] = ddu
    (row["size_bin"], row["stratum_involvement"], row["stratum_volume_mm3"],
     row["stratum_surface_distance_mm"]) = stratum
    row["depth_bin"] = depth_bin(row["stratum_surface_distance_mm"])
    return row


def _float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None

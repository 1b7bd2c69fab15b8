"""Telling users loudly when the demo model runs on data that are not phantoms.

The bundled demo model was trained on phantoms from :mod:`cl_bidsapp.simulate`; on a real scan
its lesions are meaningless. Phantom datasets are recognised by what the simulator writes:
``GeneratedBy[0].Name == "cl-bidsapp-simulate"`` in ``dataset_description.json``, or
``ManufacturersModelName == "cl-bidsapp-simulate"`` in an image's JSON sidecar.

>>> is_phantom_metadata({"ManufacturersModelName": "cl-bidsapp-simulate"})
True
>>> is_phantom_metadata({"Manufacturer": "Siemens"})
False
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PHANTOM_GENERATOR = "cl-bidsapp-simulate"


def is_phantom_metadata(metadata: dict | None) -> bool:
    """True when a sidecar or dataset_description says the simulator wrote the data."""
    if not metadata:
        return False
    if metadata.get("ManufacturersModelName") == PHANTOM_GENERATOR:
        return True
    generated = metadata.get("GeneratedBy") or []
    return any(isinstance(g, dict) and g.get("Name") == PHANTOM_GENERATOR for g in generated)


def is_phantom_dataset(bids_dir: str | Path) -> bool:
    """True when ``bids_dir/dataset_description.json`` was written by the simulator."""
    try:
        description = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return False
    return is_phantom_metadata(description)


def demo_model_warning(model, bids_dir: str | Path | None = None,
                       metadata: dict | None = None) -> str | None:
    """The warning to show when a demo model meets data that are not phantoms (else None).

    Also logs it at WARNING level, so callers only need to put it in reports.

    Parameters
    ----------
    model : InstalledModel
        The model about to run.
    bids_dir : path, optional
        The input dataset (its ``dataset_description.json`` is read).
    metadata : dict, optional
        The image's JSON sidecar (BIDS metadata).
    """
    if not model.is_demo:
        return None
    if (bids_dir is not None and is_phantom_dataset(bids_dir)) or is_phantom_metadata(metadata):
        return None
    message = (f"model {model.name} {model.version} is a DEMO model trained on "
               f"{model.card['trained_on']}; these data do not look like phantoms from "
               f"{PHANTOM_GENERATOR}, so its lesions are MEANINGLESS here. Install a real model "
               "('cl-bidsapp-models install ...') and pass it with --model.")
    logger.warning(message)
    return message

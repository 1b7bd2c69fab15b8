"""The thin layer over nnunetv2 internals: quiet import, verified checkpoints, the network.

Everything that depends on nnU-Net's private structure lives here so that a new nnunetv2
release breaks one module. nnunetv2 is imported lazily (it takes seconds and imports torch).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from cl_bidsapp.errors import InputDataError
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.registry import InstalledModel

logger = logging.getLogger(__name__)

_NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@contextlib.contextmanager
def nnunet_environment():
    """Give nnU-Net's path variables harmless values for the duration of the block.

    nnU-Net reads ``nnUNet_raw`` etc. and complains when they are unset, but inference from a
    model folder never uses them. Only variables the user has not set are filled in, and they
    are removed again afterwards, so the user's environment (and that of child processes) is
    unchanged.
    """
    placeholder = str(Path(tempfile.gettempdir()) / "cl-bidsapp-nnunet-unused")
    added = [var for var in _NNUNET_PATH_VARS if var not in os.environ]
    for var in added:
        os.environ[var] = placeholder
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


class _LogWriter(io.TextIOBase):
    """File-like object that turns nnU-Net's print() output into debug log lines."""

    def write(self, text: str) -> int:
        text = text.strip()
        if text:
            logger.debug("nnU-Net: %s", text)
        return len(text)


@contextlib.contextmanager
def quiet_nnunet():
    """Run nnU-Net code with its path variables set and its prints sent to the debug log."""
    with nnunet_environment(), contextlib.redirect_stdout(_LogWriter()):
        yield


def import_nnunet() -> dict[str, Any]:
    """Import the nnunetv2 pieces the predictor uses (quietly); return them by name."""
    with quiet_nnunet():
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape)
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import \
            determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    return {"nnUNetPredictor": nnUNetPredictor, "PlansManager": PlansManager,
            "convert_logits": convert_predicted_logits_to_segmentation_with_correct_shape,
            "determine_num_input_channels": determine_num_input_channels}


def load_verified_checkpoint(model: InstalledModel, fold: int | str) -> dict:
    """Read one fold's checkpoint, check its sha256 against the card, then unpickle it.

    The bytes that are hashed are the bytes that are unpickled: the file is read once into
    memory, so it cannot change between the check and the load.

    Raises
    ------
    InputDataError
        The checkpoint is missing, differs from the card, or cannot be read (exit 65).
    """
    import torch

    rel = cards.fold_checkpoint(fold, model.checkpoint_name)
    path = model.path / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"checkpoint of fold {fold} is missing", path=path) from None
    expected = model.card["files"].get(rel)
    actual = cards.sha256_bytes(data)
    if expected is None or actual != expected:
        raise InputDataError(
            f"checkpoint sha256 {actual[:16]}... does not match the model card "
            f"({(expected or 'not listed')[:16]}...): corrupt or tampered, not loaded",
            path=path, hint="reinstall the model from its original source")
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Full training checkpoints hold numpy scalars in their logs, which the restricted
        # unpickler refuses. The bytes were verified against the card just above.
        logger.debug("%s needs the full unpickler (verified against the card)", path)
        try:
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise InputDataError(f"cannot read checkpoint ({exc})", path=path) from None
    except Exception as exc:
        raise InputDataError(f"cannot read checkpoint ({exc})", path=path) from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise InputDataError("not an nnU-Net checkpoint (no network_weights)", path=path)
    return checkpoint


def build_network(trainer_name: str, plans_manager, configuration_manager, dataset_json: dict,
                  num_input_channels: int, num_output_channels: int):
    """Build the network as the trainer named in the checkpoint would, without deep supervision.

    Trainers not installed here (custom trainers of published models) fall back to the
    architecture in plans.json, which is what nnU-Net's own trainer does.
    """
    trainer_class = None
    try:
        with quiet_nnunet():
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    except Exception as exc:  # nnU-Net raises RuntimeError when the name is unknown
        logger.debug("trainer lookup failed: %s", exc)
    if trainer_class is not None and "plans_manager" in inspect.signature(
            trainer_class.build_network_architecture).parameters:
        return trainer_class.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels,
            enable_deep_supervision=False)
    if trainer_class is None:
        logger.warning("nnU-Net trainer %s is not installed; building the network from "
                       "plans.json (correct unless the trainer changes the architecture)",
                       trainer_name)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels, num_output_channels, allow_init=False, deep_supervision=False)

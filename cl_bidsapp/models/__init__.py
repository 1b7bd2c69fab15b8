"""nnU-Net v2 models: the model card, the registry (install, verify, resolve) and the predictor.

Public API::

    resolve_model(name_or_path=None, models_dir=None) -> InstalledModel
    install_model(source, models_dir=None, *, name=None, sha256=None, card_path=None, force=False)
    CLPredictor(model, device="auto", folds=None, tta=True, tile_step_size=0.5,
                per_fold=False, threads=None).predict(image) -> PredictionResult
    get_predictor(...)  # the same, cached per process
    write_card(model_dir, **fields)
    demo_model_warning(model, bids_dir=None, metadata=None) -> str | None

Test helper: ``cl_bidsapp.models.testing.make_tiny_model``.
"""
from cl_bidsapp.models.card import CARD_FILENAME, CARD_SCHEMA, card_problems, write_card
from cl_bidsapp.models.demo import demo_model_warning, is_phantom_dataset
from cl_bidsapp.models.install import install_model
from cl_bidsapp.models.predictor import (CLPredictor, PredictionResult, clear_predictor_cache,
                                         get_predictor, select_device)
from cl_bidsapp.models.registry import (DEMO_MODEL_NAME, InstalledModel, default_models_dir,
                                        list_models, resolve_model)

__all__ = ["CARD_FILENAME", "CARD_SCHEMA", "CLPredictor", "DEMO_MODEL_NAME", "InstalledModel",
           "PredictionResult", "card_problems", "clear_predictor_cache", "default_models_dir",
           "demo_model_warning", "get_predictor", "install_model", "is_phantom_dataset",
           "list_models", "resolve_model", "select_device", "write_card"]

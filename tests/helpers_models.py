"""Re-export of the model test helpers (the code lives in ``cl_bidsapp.models.testing`` so that
it is importable however pytest is started)."""
from cl_bidsapp.models.testing import make_tiny_model, tiny_dataset_json, tiny_plans

__all__ = ["make_tiny_model", "tiny_dataset_json", "tiny_plans"]

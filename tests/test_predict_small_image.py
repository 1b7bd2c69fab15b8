"""Prediction of an image smaller than the network's patch (nnU-Net pads it first)."""
from __future__ import annotations

import nibabel as nib
import numpy as np


def test_an_image_smaller_than_the_patch_is_predicted_on_its_own_grid(tmp_path):
    from cl_bidsapp.models.predictor import CLPredictor
    from cl_bidsapp.models.testing import make_tiny_model

    model = make_tiny_model(tmp_path, patch=(32, 32, 32), features=(4, 8, 16))
    data = np.zeros((24, 20, 18), np.float32)
    data[4:20, 4:16, 4:14] = np.random.default_rng(0).random((16, 12, 10)) + 1
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    result = CLPredictor(str(model), device="cpu", tta=False).predict(image)
    probability = np.asarray(result.probability.dataobj)
    assert probability.shape == data.shape
    assert 0.0 <= probability.min() and probability.max() <= 1.0

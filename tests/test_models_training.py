"""The demo-model training loop: lesion-centred patches, checkpoints that resume."""
from __future__ import annotations

import numpy as np
import torch

from cl_bidsapp.models.testing import tiny_plans
from cl_bidsapp.models.training import PatchSampler, TrainingSettings, train_network


def toy_cases(n=2, seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        image = np.zeros((24, 24, 24), np.float32)
        image[4:20, 4:20, 4:20] = rng.normal(0, 1, (16, 16, 16))
        lesion = np.zeros(image.shape, bool)
        lesion[10:12, 10:12, 10] = True
        image[lesion] = -3
        cases.append((image, lesion))
    return cases


def test_lesion_patches_hold_lesions_and_background_stays_zero():
    cases = toy_cases()
    x, y = PatchSampler(cases, 16, 1.0, np.random.default_rng(1)).batch(8)
    assert (y.reshape(8, -1).sum(1) > 0).all()
    assert ((x == 0).reshape(8, -1).sum(1) > 0).all()  # the zero background survives jitter
    x, y = PatchSampler(cases, 16, 0.0, np.random.default_rng(1)).batch(8)
    assert x.shape == (8, 1, 16, 16, 16) and y.dtype == np.int64


def test_training_checkpoints_and_resumes(tmp_path):
    arch = tiny_plans(patch=(16, 16, 16))["configurations"]["3d_fullres"]["architecture"]
    checkpoint = tmp_path / "checkpoint_latest.pth"
    settings = TrainingSettings(iterations=4, batch_size=2, patch=16, checkpoint_every=2,
                                threads=1)
    state = train_network(arch, toy_cases(), settings, checkpoint)
    assert state["iteration"] == 4 and checkpoint.is_file()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["iteration"] == 4

    longer = TrainingSettings(iterations=6, batch_size=2, patch=16, checkpoint_every=2,
                              threads=1)
    resumed = train_network(arch, toy_cases(), longer, checkpoint, resume=True)
    assert resumed["iteration"] == 6
    assert not all(torch.equal(resumed["network_weights"][k], state["network_weights"][k])
                   for k in state["network_weights"])


def test_lesion_patches_visit_small_lesions_as_often_as_large_ones():
    # one 1-voxel lesion and one 512-voxel lesion: voxel-weighted sampling would almost never
    # centre a patch on the small one
    image = np.ones((40, 40, 40), np.float32)
    lesion = np.zeros(image.shape, bool)
    lesion[5, 5, 5] = True
    lesion[22:30, 22:30, 22:30] = True
    sampler = PatchSampler([(image, lesion)], 8, 1.0, np.random.default_rng(3))
    x, y = sampler.batch(200)
    # with a jitter of at most 2 voxels, a patch holding voxel (5, 5, 5) cannot reach the cube
    small = sum(1 for patch in y[:, 0] if 0 < patch.sum() <= 1)
    assert 60 <= small <= 140

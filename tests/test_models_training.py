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


def test_hard_lesion_mining_samples_the_missed_lesion_more_often():
    # two lesions in halves of different brightness: after the network is found to miss the
    # second, patches centre on it far more often than on the first
    image = np.ones((40, 40, 40), np.float32)
    image[20:] = 5.0
    lesion = np.zeros(image.shape, bool)
    lesion[6, 6, 6] = lesion[33, 33, 33] = True
    sampler = PatchSampler([(image, lesion)], 8, 1.0, np.random.default_rng(5))

    def second_share():
        x, _ = sampler.batch(400)
        return float((x.reshape(400, -1).mean(1) > 3).mean())

    assert 0.35 < second_share() < 0.65  # before mining: each lesion equally likely
    sampler.set_difficulty(np.array([0.0, 1.0]))
    assert second_share() > 0.75  # 1.2 / 1.4 of lesion patches
    sampler.set_difficulty(np.array([0.0, 0.0]))
    assert 0.35 < second_share() < 0.65  # both found: back to equal


def test_lesion_difficulty_is_high_for_missed_and_low_for_found_lesions():
    arch = tiny_plans(patch=(16, 16, 16))["configurations"]["3d_fullres"]["architecture"]
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from cl_bidsapp.models.training import lesion_difficulty

    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                     arch["_kw_requires_import"], 1, 2, allow_init=True,
                                     deep_supervision=False)
    sampler = PatchSampler(toy_cases(), 16, 1.0, np.random.default_rng(0))
    # a network whose last layer always says "lesion", then one that always says "background"
    last = [m for m in network.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    for bias, expected in (((-20.0, 20.0), 0.0), ((20.0, -20.0), 1.0)):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
        difficulty = lesion_difficulty(network, sampler, batch=1)
        assert difficulty.shape == (2,)
        np.testing.assert_allclose(difficulty, expected, atol=1e-6)
    assert network.training  # left in training mode


def test_mining_runs_on_schedule_for_fresh_fine_tuned_and_resumed_training(tmp_path,
                                                                            monkeypatch):
    import cl_bidsapp.models.training as training

    calls = []

    def fake_difficulty(network, sampler, batch=8):
        calls.append(len(sampler.index))
        return np.linspace(0, 1, len(sampler.index))

    monkeypatch.setattr(training, "lesion_difficulty", fake_difficulty)
    arch = tiny_plans(patch=(16, 16, 16))["configurations"]["3d_fullres"]["architecture"]

    def run(iterations, checkpoint, **kwargs):
        calls.clear()
        settings = TrainingSettings(iterations=iterations, batch_size=1, patch=16,
                                    checkpoint_every=2, threads=1, mine_every=2)
        state = train_network(arch, toy_cases(), settings, checkpoint, **kwargs)
        return list(calls), state

    # a fresh network is not mined at iteration 0 (its guesses are random), then every 2
    fresh, state = run(5, tmp_path / "a.pth")
    assert fresh == [2, 2]  # iterations 2 and 4; two toy lesions each time
    # fine-tuning from given weights mines at once
    tuned, _ = run(3, tmp_path / "b.pth", init_weights=state["network_weights"])
    assert tuned == [2, 2]  # iterations 0 and 2
    # a resumed run mines at the iteration it resumes from (the weights are not saved)
    resumed, _ = run(6, tmp_path / "b.pth", resume=True)
    assert resumed == [2, 2]  # iterations 3 (resume) and 4
    # no mining when mine_every is 0
    calls.clear()
    train_network(arch, toy_cases(), TrainingSettings(iterations=3, batch_size=1, patch=16,
                                                      threads=1), tmp_path / "c.pth")
    assert calls == []


def test_training_on_a_gpu_that_is_absent_says_so_before_any_work(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    arch = tiny_plans(patch=(16, 16, 16))["configurations"]["3d_fullres"]["architecture"]
    settings = TrainingSettings(iterations=2, batch_size=2, patch=16, threads=1,
                                device="cuda")
    with pytest.raises(RuntimeError, match="sees no CUDA GPU here; use --device cpu"):
        train_network(arch, toy_cases(), settings, tmp_path / "checkpoint_latest.pth")
    assert not (tmp_path / "checkpoint_latest.pth").exists()
    with pytest.raises(ValueError, match="use cpu or cuda"):
        train_network(arch, toy_cases(), TrainingSettings(device="tpu"),
                      tmp_path / "checkpoint_latest.pth")


def test_checkpoint_weights_are_saved_on_the_cpu(tmp_path):
    arch = tiny_plans(patch=(16, 16, 16))["configurations"]["3d_fullres"]["architecture"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = TrainingSettings(iterations=2, batch_size=2, patch=16, threads=1, device=device)
    state = train_network(arch, toy_cases(), settings, tmp_path / "checkpoint_latest.pth")
    assert all(w.device.type == "cpu" for w in state["network_weights"].values())

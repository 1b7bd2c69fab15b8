"""The in-process predictor gives nnU-Net's own probabilities on the input's own grid."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from cl_bidsapp.errors import ExitCode, InputDataError, TemporaryFailure, UsageError
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.nnunet_backend import quiet_nnunet
from cl_bidsapp.models.predictor import (CLPredictor, clear_predictor_cache, get_predictor,
                                         select_device)
from cl_bidsapp.models.registry import resolve_model
from cl_bidsapp.models.testing import make_tiny_model


@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory):
    return resolve_model(str(make_tiny_model(tmp_path_factory.mktemp("m"), folds=(0, 1))))


def oblique_lps_image(shape=(22, 26, 18), seed=0) -> nib.Nifti1Image:
    """A skull-stripped-looking block with texture, stored LPS and rotated 20 degrees."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(3, s - 3) for s in shape)
    data[inner] = rng.normal(2000, 400, [s - 6 for s in shape]).astype(np.float32)
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-2.0, -2.0, 2.0])  # L->R and P->A flipped: LPS storage
    affine[:3, 3] = [30.0, 40.0, -20.0]
    return nib.Nifti1Image(data, affine)


def nnunet_own_prediction(model, image_path, out_dir, folds, tta):
    """nnU-Net's own in-process file prediction: segmentation NIfTI + probabilities."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with quiet_nnunet():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=tta,
                                    device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model.path), use_folds=folds)
        predictor.predict_from_files_sequential([[str(image_path)]], [str(out_dir / "case")],
                                                save_probabilities=True)
    seg = nib.load(out_dir / "case.nii.gz")
    probabilities = np.load(out_dir / "case.npz")["probabilities"]  # (c, z, y, x)
    return seg, probabilities


@pytest.mark.parametrize("tta", [False, True])
def test_matches_nnunet_file_prediction_on_oblique_lps_input(two_fold_model, tmp_path, tta):
    image = oblique_lps_image()
    path = tmp_path / "sub-01_UNIT1.nii.gz"
    image.to_filename(path)
    seg, nn_prob = nnunet_own_prediction(two_fold_model, path, tmp_path, (0, 1), tta)

    result = CLPredictor(two_fold_model, device="cpu", tta=tta).predict(nib.load(path))
    ours = result.probability
    assert ours.shape == image.shape
    np.testing.assert_allclose(ours.affine, image.affine)
    assert ours.get_data_dtype() == np.float32
    prob = ours.get_fdata()
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    # nnU-Net's probabilities are in SimpleITK (z, y, x) order; ours in nibabel's voxel order
    np.testing.assert_allclose(prob, nn_prob[1].transpose(2, 1, 0), atol=2e-3)
    # and nnU-Net's written segmentation, read back by nibabel, lies on our map
    seg_data = np.asarray(seg.dataobj)
    assert 0 < seg_data.mean() < 1, "precondition: the random model predicts both classes"
    agree = (prob > 0.5) == (seg_data == 1)
    assert agree.mean() > 0.999
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)


def test_reorienting_reader_maps_back_to_the_input_grid(tmp_path):
    model = resolve_model(str(make_tiny_model(tmp_path / "m", reader="NibabelIOWithReorient")))
    image = oblique_lps_image(shape=(20, 24, 16), seed=3)
    path = tmp_path / "in.nii.gz"
    image.to_filename(path)
    seg, _ = nnunet_own_prediction(model, path, tmp_path, (0,), False)
    prob = CLPredictor(model, device="cpu", tta=False).predict(image).probability.get_fdata()
    seg_data = np.asarray(seg.dataobj)
    assert seg.shape == image.shape and 0 < seg_data.mean() < 1
    assert ((prob > 0.5) == (seg_data == 1)).mean() > 0.999


def test_per_fold_maps_come_from_one_pass_per_fold(two_fold_model):
    image = oblique_lps_image(seed=1)
    calls = {"n": 0}

    def count_forward(module, args, output):
        calls["n"] += 1

    both = CLPredictor(two_fold_model, device="cpu", tta=False, per_fold=True)
    handle = both._nnunet.network.register_forward_hook(count_forward)
    result = both.predict(image)
    handle.remove()
    two_fold_calls = calls["n"]

    calls["n"] = 0
    single = CLPredictor(two_fold_model, device="cpu", tta=False, folds=[1], per_fold=True)
    handle = single._nnunet.network.register_forward_hook(count_forward)
    fold1 = single.predict(image)
    handle.remove()

    assert two_fold_calls == 2 * calls["n"]
    assert result.folds == [0, 1] and len(result.fold_probabilities) == 2
    np.testing.assert_allclose(result.fold_probabilities[1].get_fdata(),
                               fold1.probability.get_fdata(), atol=1e-6)
    assert len(fold1.fold_probabilities) == 1
    # the two random folds disagree, so the ensemble is not simply one of them
    maps = [m.get_fdata() for m in result.fold_probabilities]
    assert np.abs(maps[0] - maps[1]).max() > 0.05


def test_single_fold_without_per_fold_returns_only_the_ensemble(two_fold_model):
    result = CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0]).predict(
        oblique_lps_image())
    assert result.fold_probabilities == []


def test_input_image_is_left_untouched(two_fold_model, tmp_path):
    image = oblique_lps_image()
    path = tmp_path / "in.nii.gz"
    image.to_filename(path)
    loaded = nib.load(path)
    CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0]).predict(loaded)
    assert loaded.get_filename() == str(path)


def test_scaled_integer_and_4d_singleton_inputs(two_fold_model, tmp_path):
    image = oblique_lps_image()
    integers = np.round(np.asarray(image.dataobj) / 2).astype(np.int16)
    predictor = CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0])
    reference = predictor.predict(
        nib.Nifti1Image(integers.astype(np.float32) * 2, image.affine)).probability.get_fdata()

    scaled = nib.Nifti1Image(integers, image.affine)
    scaled.header.set_slope_inter(2.0, 0.0)
    scaled.to_filename(tmp_path / "scaled.nii.gz")
    from_file = predictor.predict(nib.load(tmp_path / "scaled.nii.gz")).probability
    np.testing.assert_allclose(from_file.get_fdata(), reference, atol=1e-5)

    four_d = nib.Nifti1Image(integers[..., None].astype(np.float32) * 2, image.affine)
    np.testing.assert_allclose(predictor.predict(four_d).probability.get_fdata(), reference,
                               atol=1e-5)


def test_bad_images_exit_65(two_fold_model):
    predictor = CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0])
    image = oblique_lps_image()
    data = np.asarray(image.dataobj).copy()
    data[5, 5, 5] = np.nan
    with pytest.raises(InputDataError) as err:
        predictor.predict(nib.Nifti1Image(data, image.affine))
    assert err.value.exit_code == ExitCode.DATA_ERROR
    with pytest.raises(InputDataError):
        predictor.predict(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)))


def test_tampered_checkpoint_is_never_unpickled(tmp_path, monkeypatch):
    model = resolve_model(str(make_tiny_model(tmp_path)))
    checkpoint = model.checkpoint_path(0)
    blob = bytearray(checkpoint.read_bytes())
    blob[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(blob))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on an unverified checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(InputDataError) as err:
        CLPredictor(model, device="cpu")
    assert err.value.exit_code == ExitCode.DATA_ERROR
    assert "tampered" in str(err.value) and str(checkpoint) in str(err.value)


def test_unknown_fold_and_bad_options_are_usage_errors(two_fold_model):
    for kwargs in ({"folds": [3]}, {"tile_step_size": 0}, {"device": "tpu"}, {"threads": 0}):
        with pytest.raises(UsageError) as err:
            CLPredictor(two_fold_model, **{"device": "cpu", **kwargs})
        assert err.value.exit_code == ExitCode.USAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_auto_device_falls_back_to_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cl_bidsapp.models.predictor"):
        assert select_device("auto").type == "cpu"
    assert "no CUDA GPU" in caplog.text and torch.__version__ in caplog.text
    with pytest.raises(UsageError, match="no CUDA GPU"):
        select_device("cuda")


def test_gpu_out_of_memory_becomes_a_temporary_failure(two_fold_model, monkeypatch):
    predictor = CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0])

    def out_of_memory(data):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(predictor._nnunet, "predict_sliding_window_return_logits",
                        out_of_memory)
    with pytest.raises(TemporaryFailure) as err:
        predictor.predict(oblique_lps_image())
    assert err.value.exit_code == ExitCode.TEMPORARY
    assert "--device cpu" in str(err.value)


def test_get_predictor_loads_each_model_once_per_settings(two_fold_model):
    clear_predictor_cache()
    first = get_predictor(two_fold_model, device="cpu", tta=False)
    assert get_predictor(two_fold_model, device="cpu", tta=False) is first
    assert get_predictor(two_fold_model, device="cpu", tta=True) is not first
    assert get_predictor(two_fold_model, device="cpu", tta=False, folds=[0]) is not first
    clear_predictor_cache()


def test_nnunet_path_variables_are_not_left_behind(two_fold_model, monkeypatch):
    import os

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    CLPredictor(two_fold_model, device="cpu", tta=False, folds=[0]).predict(oblique_lps_image())
    assert not any(v in os.environ for v in ("nnUNet_raw", "nnUNet_results"))


def test_card_lists_the_checkpoint_hash(two_fold_model):
    rel = cards.fold_checkpoint(0)
    assert two_fold_model.card["files"][rel] == cards.sha256_file(two_fold_model.path / rel)


def test_full_training_checkpoint_loads_after_verification(tmp_path):
    # nnU-Net's own checkpoint_final.pth keeps numpy scalars in its logs, which the restricted
    # unpickler refuses; a verified one must still load.
    folder = make_tiny_model(tmp_path, with_card=False)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["logging"] = {"ema_fg_dice": [np.float64(0.25)], "epoch": np.int64(3)}
    torch.save(checkpoint, path)
    cards.write_card(folder, name="full-ckpt", version="1", description="x", licence="MIT",
                     citation="x")
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    result = CLPredictor(resolve_model(str(folder)), device="cpu", tta=False).predict(
        oblique_lps_image())
    assert result.probability.shape == oblique_lps_image().shape

"""Tiny, randomly initialised nnU-Net models for tests (not for users).

:func:`make_tiny_model` writes a complete model folder (``dataset.json``, ``plans.json``,
``fold_K/checkpoint_final.pth`` and the card) in well under a second, so that tests of the
registry, the predictor, Nipype interfaces and the CLI can run a real nnU-Net forward pass
without the bundled demo model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from cl_bidsapp.models.card import CHECKPOINT_NAME, write_card

TINY_CONFIGURATION = "3d_fullres"


def tiny_plans(spacing: Sequence[float] = (2.0, 2.0, 2.0), patch: Sequence[int] = (16, 16, 16),
               features: Sequence[int] = (4, 8, 16), reader: str = "SimpleITKIO",
               plans_name: str = "nnUNetPlans", dataset_name: str = "Dataset999_Tiny",
               strides: Sequence[Sequence[int]] | None = None) -> dict:
    """An nnU-Net v2 plans dictionary for a small 3-D PlainConvUNet.

    ``spacing`` and ``patch`` are in nnU-Net's (z, y, x) order; ``strides`` default to 2 in
    every stage after the first. Z-score normalisation within the non-zero mask, as nnU-Net
    plans it for skull-stripped images.

    >>> p = tiny_plans()
    >>> p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_stages"]
    3
    """
    n = len(features)
    conv = "torch.nn.modules.conv.Conv3d"
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n, "features_per_stage": list(features), "conv_op": conv,
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": ([list(map(int, st)) for st in strides] if strides is not None
                        else [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)),
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample_data = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    resample_seg = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    resample_prob = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": f"{plans_name}_{TINY_CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(patch), "median_image_size_in_voxels": [int(p) * 4 for p in patch],
        "spacing": [float(s) for s in spacing],
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample_data, "resampling_fn_seg_kwargs": resample_seg,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": resample_prob,
        "architecture": arch, "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name, "plans_name": plans_name,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) * 4 for p in patch],
        "image_reader_writer": reader, "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "configurations": {TINY_CONFIGURATION: config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 4095.0, "mean": 2000.0, "median": 2000.0, "min": 0.0,
            "percentile_00_5": 100.0, "percentile_99_5": 4000.0, "std": 600.0}},
    }


def tiny_dataset_json(channel: str = "T1w", n_training: int = 1) -> dict:
    """dataset.json of a single-channel, two-label (background, CL) dataset."""
    return {"channel_names": {"0": channel}, "labels": {"background": 0, "CL": 1},
            "numTraining": n_training, "file_ending": ".nii.gz"}


def make_tiny_model(dest: str | Path, *, name: str = "tiny-test", version: str = "0.0.1",
                    folds: Sequence[int] = (0,), seed: int = 0, reader: str = "SimpleITKIO",
                    spacing: Sequence[float] = (2.0, 2.0, 2.0),
                    patch: Sequence[int] = (16, 16, 16), features: Sequence[int] = (4, 8, 16),
                    strides: Sequence[Sequence[int]] | None = None, is_demo: bool = True,
                    with_card: bool = True, threshold: float = 0.5,
                    min_lesion_size_voxels: int = 3) -> Path:
    """Write a random-weight nnU-Net model folder with a card; return the folder.

    The folder is named like nnU-Net's results folders
    (``nnUNetTrainer__nnUNetPlans__3d_fullres``) inside ``dest``. Each fold gets different
    random weights (``seed + fold``); checkpoints are slim (weights, init_args, trainer name,
    mirroring axes), as in the demo model.

    Examples
    --------
    >>> import tempfile
    >>> from cl_bidsapp.models.registry import resolve_model
    >>> folder = make_tiny_model(tempfile.mkdtemp(), folds=(0, 1))
    >>> model = resolve_model(str(folder))
    >>> model.folds, model.input_image, model.is_demo
    ([0, 1], 'UNI', True)
    """
    import torch

    from cl_bidsapp.models.nnunet_backend import quiet_nnunet

    with quiet_nnunet():
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    folder = Path(dest) / f"nnUNetTrainer__nnUNetPlans__{TINY_CONFIGURATION}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = tiny_plans(spacing=spacing, patch=patch, features=features, reader=reader,
                       strides=strides)
    dataset = tiny_dataset_json()
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    arch = plans["configurations"][TINY_CONFIGURATION]["architecture"]
    for fold in folds:
        torch.manual_seed(seed + int(fold))
        network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                         arch["_kw_requires_import"], 1, 2, allow_init=True,
                                         deep_supervision=False)
        checkpoint = {"network_weights": network.state_dict(),
                      "init_args": {"configuration": TINY_CONFIGURATION, "fold": fold},
                      "trainer_name": "nnUNetTrainer",
                      "inference_allowed_mirroring_axes": (0, 1, 2)}
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint, folder / f"fold_{fold}" / CHECKPOINT_NAME)
    if with_card:
        write_card(folder, name=name, version=version,
                   description="tiny random-weight model for tests; predicts noise",
                   licence="Apache-2.0", citation="none (test fixture)",
                   trained_on="nothing (random weights)", is_demo=is_demo,
                   threshold=threshold, min_lesion_size_voxels=min_lesion_size_voxels,
                   input_contrasts=("UNIT1", "T1w"), input_image="UNI",
                   folds=list(folds), training={"seed": seed})
    return folder

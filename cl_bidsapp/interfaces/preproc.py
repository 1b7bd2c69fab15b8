"""Interfaces of the anatomical preprocessing: input checks, brain extraction, model input."""
from __future__ import annotations

import warnings as pywarnings
from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import BaseInterfaceInputSpec, File, traits

from cl_bidsapp.core import preproc, skullstrip
from cl_bidsapp.core.brain import detect_skull_stripped
from cl_bidsapp.core.images import check_image, compare_grids, load_image
from cl_bidsapp.errors import InputDataError
from cl_bidsapp.interfaces.base import StageInterface, StageOutputSpec, defined
from cl_bidsapp.io import save_nifti


def _load_checked(path: str, warnings: list[str]):
    img = load_image(path)
    clean, more = check_image(img, Path(path).name)
    warnings.extend(more)
    return clean, clean is img


def _same_grid(img, other, path: str, reference: str, hint: str) -> None:
    same, message = compare_grids(other, img, names=(Path(path).name, reference))
    if not same:
        raise InputDataError(message, path=path, hint=hint)


def _leave_out_hint(query: str) -> str:
    """How to leave out the companion of input query ``query`` (inv1, inv2)."""
    return ("fix its header, or leave it out with a --bids-filter-file, e.g. "
            f'{{"{query}": {{"acquisition": "none"}}}} (brain extraction then uses the UNI '
            "alone or the other inversion)")


class _PrepareInputsInputSpec(BaseInterfaceInputSpec):
    image = File(exists=True, desc="UNI or T1w image (undefined: compute UNI)")
    contrast = traits.Enum("MP2RAGE", "MPRAGE", mandatory=True)
    inv1 = File(exists=True, desc="INV1 magnitude")
    inv2 = File(exists=True, desc="INV2 magnitude")
    inv1_phase = File(exists=True, desc="INV1 phase (only to compute UNI)")
    inv2_phase = File(exists=True, desc="INV2 phase (only to compute UNI)")


class _PrepareInputsOutputSpec(StageOutputSpec):
    out_image = File(exists=True, desc="the checked UNI/T1w (the original file when unchanged)")
    masking_image = File(exists=True, desc="image for brain extraction")
    masking_method = traits.Str(desc="key of core.preproc.MASKING_METHODS")


class PrepareInputs(StageInterface):
    """Load and check the image and its companions; build the masking image."""

    input_spec = _PrepareInputsInputSpec
    output_spec = _PrepareInputsOutputSpec

    def _run_stage(self, cwd: Path) -> None:
        warnings: list[str] = []
        inv1_path, inv2_path = defined(self.inputs.inv1), defined(self.inputs.inv2)
        image_path = defined(self.inputs.image)
        if image_path is None:
            parts = [load_image(p) for p in (inv1_path, self.inputs.inv1_phase, inv2_path,
                                              self.inputs.inv2_phase)]
            image = preproc.compute_uni(*parts)
            image, _ = check_image(image, "UNI computed from INV1 and INV2")
            warnings.append("No UNI image was stored: UNI was computed from the complex INV1 "
                            "and INV2 images.")
            unchanged, image_path = False, None
        else:
            image, unchanged = _load_checked(image_path, warnings)
        reference = Path(image_path).name if image_path else "the computed UNI"
        companions = {}
        for key, path in (("inv1", inv1_path), ("inv2", inv2_path)):
            if path is not None and self.inputs.contrast == "MP2RAGE":
                img, _ = _load_checked(path, warnings)
                _same_grid(image, img, path, reference, _leave_out_hint(key))
                companions[key] = img
        if unchanged:
            self._results["out_image"] = str(Path(image_path).absolute())
        else:
            self._results["out_image"] = str(save_nifti(image, cwd / "image.nii.gz"))
        masking, method, more = preproc.masking_image(image, self.inputs.contrast,
                                                      companions.get("inv1"),
                                                      companions.get("inv2"))
        warnings.extend(more)
        if masking is image:
            self._results["masking_image"] = self._results["out_image"]
        else:
            self._results["masking_image"] = str(save_nifti(masking, cwd / "masking.nii.gz"))
        self._results["masking_method"] = method
        self._warn(*warnings)


class _SkullStripInputSpec(BaseInterfaceInputSpec):
    in_image = File(exists=True, mandatory=True, desc="the checked UNI/T1w")
    masking_image = File(exists=True, mandatory=True, desc="what brain extraction looks at")
    mode = traits.Enum("auto", "skip", "force", usedefault=True)
    tool = traits.Enum("deepbet", "synthstrip", usedefault=True)
    precomputed_mask = File(exists=True, desc="brain mask from --derivatives")
    device = traits.Str("cpu", usedefault=True)
    threads = traits.Int(1, usedefault=True, nohash=True)  # results do not depend on it


class _SkullStripOutputSpec(StageOutputSpec):
    brain_mask = File(exists=True)
    method = traits.Str(desc="how the mask was made")
    prestripped = traits.Bool(desc="the input was already brain-extracted")


class SkullStrip(StageInterface):
    """Brain mask: precomputed, the non-zero region of a pre-stripped input, or deepbet."""

    input_spec = _SkullStripInputSpec
    output_spec = _SkullStripOutputSpec

    def _run_stage(self, cwd: Path) -> None:
        import torch

        torch.set_num_threads(max(1, self.inputs.threads))
        image = nib.load(self.inputs.in_image)
        precomputed = defined(self.inputs.precomputed_mask)
        stripped, reason = False, ""
        if precomputed is not None:
            mask = load_image(precomputed)
            _same_grid(image, mask, precomputed, Path(self.inputs.in_image).name,
                       "a brain mask given with --derivatives must be on its image's voxel grid; "
                       "resample it to the image, or run without --derivatives")
            mask = preproc.image_like(skullstrip.clean_mask(
                mask.get_fdata().reshape(image.shape[:3]) > 0), image, "uint8")
            method = f"precomputed ({Path(precomputed).name})"
        elif self.inputs.mode == "skip":
            mask, method = skullstrip.nonzero_mask(image), "none (--skull-strip skip)"
        else:
            if self.inputs.mode == "auto":
                stripped, reason = detect_skull_stripped(image)
            if stripped:
                mask, method = skullstrip.nonzero_mask(image), "already brain-extracted"
                self._warn(f"The input looks already brain-extracted ({reason}); it was not "
                           "stripped again (use --skull-strip force to override).")
            else:
                masking = nib.load(self.inputs.masking_image)
                if self.inputs.tool == "synthstrip":
                    mask = skullstrip.synthstrip_mask(masking, threads=self.inputs.threads)
                else:
                    with pywarnings.catch_warnings():  # torch.jit deprecation inside deepbet
                        pywarnings.simplefilter("ignore", FutureWarning)
                        mask = skullstrip.deepbet_mask(masking, device=self.inputs.device)
                method = self.inputs.tool
        self._results["brain_mask"] = str(save_nifti(mask, cwd / "brain_mask.nii.gz"))
        self._results["method"] = method
        self._results["prestripped"] = bool(stripped)


class _ModelInputInputSpec(BaseInterfaceInputSpec):
    in_image = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    background = traits.Float(0.0, usedefault=True)


class _ModelInputOutputSpec(StageOutputSpec):
    out_file = File(exists=True, desc="masked image given to the model")
    stats = traits.Dict(desc="brain volume and intensity percentiles")


class ModelInput(StageInterface):
    """Mask the image as the model card says; record brain statistics."""

    input_spec = _ModelInputInputSpec
    output_spec = _ModelInputOutputSpec

    def _run_stage(self, cwd: Path) -> None:
        image = nib.load(self.inputs.in_image)
        mask = nib.load(self.inputs.brain_mask)
        out = preproc.model_input(image, mask, self.inputs.background)
        self._results["out_file"] = str(save_nifti(out, cwd / "model_input.nii.gz"))
        self._results["stats"] = preproc.brain_statistics(image, mask)

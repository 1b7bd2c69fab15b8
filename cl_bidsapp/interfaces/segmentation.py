"""Interfaces of the segmentation: nnU-Net prediction and lesion extraction."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nipype.interfaces.base import BaseInterfaceInputSpec, File, InputMultiObject, traits

from cl_bidsapp.core.components import lesion_instances, min_size_in_voxels
from cl_bidsapp.core.lesions import lesion_table
from cl_bidsapp.core.preproc import image_like
from cl_bidsapp.errors import TemporaryFailure
from cl_bidsapp.interfaces.base import StageInterface, StageOutputSpec, defined
from cl_bidsapp.io import save_nifti, write_text


class _SegmentInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="model input (masked UNI/T1w)")
    # The folder is not hashed (a zip model unpacks to a new temporary folder in each run);
    # the card's sha256 is, so that a model replaced at the same path (install --force) is
    # run again and the same model in another folder is read from the cache.
    model = traits.Str(mandatory=True, nohash=True,
                       desc="model folder (verified against its card)")
    model_sha256 = traits.Str(desc="sha256 of the model's card when the run started")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    folds = traits.List(traits.Int, desc="folds to ensemble (default: the card's)")
    tta = traits.Bool(True, usedefault=True, desc="mirroring test-time augmentation")
    tile_step_size = traits.Float(0.5, usedefault=True)
    threads = traits.Int(1, usedefault=True, nohash=True,
                         desc="PyTorch CPU threads (not hashed: results do not depend on it)")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tells Nipype's MultiProc this node occupies a GPU")


class _SegmentOutputSpec(StageOutputSpec):
    probability = File(exists=True, desc="CL probability (float32, source grid)")
    fold_probabilities = traits.List(File(exists=True), desc="one map per fold")
    folds = traits.List(traits.Str)
    device_used = traits.Str()
    embedding = File(exists=True, desc="encoder-feature embedding (TSV, see models/embedding.py)")
    embedding_info = traits.Dict(desc="layers, pooling, blocks, fold and checkpoint of the embedding")
    ood = traits.Dict(desc="out-of-distribution score, threshold and verdict")


class Segment(StageInterface):
    """Predict the CL probability map in this process (model cached per process)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_stage(self, cwd: Path) -> None:
        from cl_bidsapp.models.predictor import get_predictor

        predictor = get_predictor(self.inputs.model, device=self.inputs.device,
                                  folds=defined(self.inputs.folds) or None,
                                  tta=self.inputs.tta,
                                  tile_step_size=self.inputs.tile_step_size,
                                  threads=self.inputs.threads)
        expected = defined(self.inputs.model_sha256)
        if expected and predictor.model.sha256 != expected:
            raise TemporaryFailure(
                f"the model changed while the run was going on (card sha256 {expected[:12]}… "
                f"when it started, {predictor.model.sha256[:12]}… now)", path=self.inputs.model,
                hint="run again once the model is installed")
        result = predictor.predict(nib.load(self.inputs.in_file))
        self._results["probability"] = str(save_nifti(result.probability,
                                                      cwd / "probability.nii.gz"))
        self._results["fold_probabilities"] = [
            str(save_nifti(img, cwd / f"probability_fold-{fold}.nii.gz"))
            for fold, img in zip(result.folds, result.fold_probabilities)]
        self._results["folds"] = [str(f) for f in result.folds]
        self._results["device_used"] = result.device
        if result.embedding is not None:
            from cl_bidsapp.models.embedding import embedding_tsv, feature_names

            names = feature_names(result.embedding_info.get("Channels", []))
            self._results["embedding"] = str(write_text(
                cwd / "embedding.tsv",
                embedding_tsv(result.embedding, names if len(names) == len(
                    result.embedding) else None)))
            self._results["embedding_info"] = dict(result.embedding_info)
            self._results["ood"] = dict(result.ood)


class _FindLesionsInputSpec(BaseInterfaceInputSpec):
    probability = File(exists=True, mandatory=True)
    fold_probabilities = InputMultiObject(File(exists=True), desc="per-fold maps (for DDU)")
    threshold = traits.Float(mandatory=True)
    min_size = traits.Str(mandatory=True, desc="voxels ('3') or cubic millimetres ('10mm3')")


class _FindLesionsOutputSpec(StageOutputSpec):
    lesion_mask = File(exists=True)
    lesion_dseg = File(exists=True)
    lesion_table = File(exists=True)
    n_lesions = traits.Int()
    total_volume_mm3 = traits.Float()
    min_size_voxels = traits.Int()


def parse_min_size(text: str, zooms) -> int:
    """``'3'`` -> 3 voxels; ``'10mm3'`` -> voxels for this voxel size.

    >>> parse_min_size("3", (1, 1, 1)), parse_min_size("10mm3", (2, 2, 2))
    (3, 2)
    """
    text = str(text)
    if text.endswith("mm3"):
        return min_size_in_voxels(float(text[:-3]), zooms)
    return int(text)


class FindLesions(StageInterface):
    """Threshold, 26-connected components, minimum size; instance map and lesion table."""

    input_spec = _FindLesionsInputSpec
    output_spec = _FindLesionsOutputSpec

    def _run_stage(self, cwd: Path) -> None:
        prob_img = nib.load(self.inputs.probability)
        prob = np.asarray(prob_img.dataobj, dtype=np.float32)
        zooms = prob_img.header.get_zooms()[:3]
        min_size = parse_min_size(self.inputs.min_size, zooms)
        instances = lesion_instances(prob, self.inputs.threshold, min_size)
        folds = [np.asarray(nib.load(f).dataobj, dtype=np.float32)
                 for f in (defined(self.inputs.fold_probabilities) or [])]
        table = lesion_table(instances, prob_img.affine, prob, folds or None,
                             threshold=self.inputs.threshold, min_size=min_size)
        self._results["lesion_dseg"] = str(save_nifti(
            image_like(instances, prob_img, _label_dtype(int(instances.max()))),
            cwd / "lesion_dseg.nii.gz"))
        self._results["lesion_mask"] = str(save_nifti(
            image_like(instances > 0, prob_img, np.uint8), cwd / "lesion_mask.nii.gz"))
        self._results["lesion_table"] = str(write_text(cwd / "lesion_table.tsv",
                                                       _table_tsv(table)))
        self._results["n_lesions"] = int(len(table))
        self._results["total_volume_mm3"] = float(table["volume_mm3"].sum()) if len(table) \
            else 0.0
        self._results["min_size_voxels"] = int(min_size)


def _label_dtype(n: int):
    return np.uint8 if n < 256 else (np.uint16 if n < 65536 else np.int32)


def _table_tsv(table: pd.DataFrame) -> str:
    """BIDS TSV: tab-separated, ``n/a`` for missing values, 4 decimals for floats."""
    return table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.4f",
                        lineterminator="\n")

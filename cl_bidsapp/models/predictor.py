"""In-process nnU-Net v2 prediction of the cortical-lesion probability map.

nnU-Net's file-based prediction spawns worker pools, which die in containers with a small
``/dev/shm`` and under Nipype's own process pool. This predictor runs every step in the calling
process, yet feeds the network exactly what nnU-Net would from a file: the image is read
through the reader class the model's plans name, preprocessed by the model's preprocessor,
predicted with nnU-Net's sliding window (Gaussian weighting, mirroring TTA), and the
probabilities are mapped back to the voxel order and affine of the input image.

Each fold runs once. The ensemble map averages the folds' logits before the softmax (as
nnU-Net does); per-fold maps come from each fold's own logits, for lesion uncertainty.

During one fold's sliding window hooks record the encoder features of the scan
(:mod:`cl_bidsapp.models.embedding`); their distance to the model card's reference is the
out-of-distribution score (:mod:`cl_bidsapp.models.calibration`).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from cl_bidsapp.errors import InputDataError, TemporaryFailure, UsageError
from cl_bidsapp.models import nnunet_backend as backend
from cl_bidsapp.models.calibration import embedding_fold, embedding_provenance, ood_record
from cl_bidsapp.models.embedding import FeatureCapture
from cl_bidsapp.models.registry import InstalledModel, resolve_model

logger = logging.getLogger(__name__)

#: Reader classes whose axis convention is mapped back exactly (see ``_to_input_order``).
SUPPORTED_READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
LESION_LABEL = 1

_CACHE: dict[tuple, "CLPredictor"] = {}


@dataclass
class PredictionResult:
    """Output of :meth:`CLPredictor.predict`.

    Attributes
    ----------
    probability : nibabel.Nifti1Image
        Lesion probability, float32 in [0, 1], on the input's grid with the input's affine;
        ensemble of the folds (logits averaged before the softmax).
    fold_probabilities : list of nibabel.Nifti1Image
        One map per fold, same grid (empty unless ``per_fold`` or more than one fold).
    folds : list
        The folds used, in the order of ``fold_probabilities``.
    device : str
        Where the network ran (``cpu``, ``cuda:0``).
    seconds : float
        Wall time of the prediction (reading, preprocessing, network, resampling).
    embedding : numpy.ndarray or None
        Encoder feature vector of the scan (None when the predictor was made with
        ``embed=False``).
    embedding_info : dict
        Layers, pooling, channels, blocks, tiles, fold and checkpoint sha256 of the embedding.
    ood : dict
        Out-of-distribution score, threshold and verdict (see
        :func:`cl_bidsapp.models.calibration.ood_record`).
    """

    probability: nib.Nifti1Image
    fold_probabilities: list = field(default_factory=list)
    folds: list = field(default_factory=list)
    device: str = "cpu"
    seconds: float = 0.0
    embedding: np.ndarray | None = None
    embedding_info: dict = field(default_factory=dict)
    ood: dict = field(default_factory=dict)


def select_device(device: str = "auto"):
    """Turn ``auto|cpu|cuda|cuda:N`` into a ``torch.device`` and log what runs where.

    ``auto`` takes the GPU when PyTorch sees one and otherwise warns and uses the CPU.

    >>> select_device("cpu").type
    'cpu'

    Raises
    ------
    UsageError
        Unknown device, or ``cuda`` asked for where no GPU is visible (exit 64).
    """
    import torch

    text = str(device).lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
        if text == "cpu":
            logger.warning("no CUDA GPU visible to PyTorch %s: predicting on the CPU, which is "
                           "much slower (use --device cpu to silence this)", torch.__version__)
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is visible to PyTorch "
                             f"{torch.__version__} (CUDA build {torch.version.cuda})",
                             hint="use --device cpu or --device auto")
        chosen = torch.device(text)
        index = chosen.index if chosen.index is not None else torch.cuda.current_device()
        logger.info("predicting on %s: %s, torch %s, CUDA %s", chosen,
                    torch.cuda.get_device_name(index), torch.__version__, torch.version.cuda)
        return chosen
    if text != "cpu":
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    logger.info("predicting on the CPU with %d threads (torch %s, CUDA build %s)",
                torch.get_num_threads(), torch.__version__, torch.version.cuda)
    return torch.device("cpu")


class CLPredictor:
    """A loaded nnU-Net model that predicts lesion probability maps in this process.

    Parameters
    ----------
    model : InstalledModel, str, Path or None
        A verified model, or a name/path for :func:`resolve_model` (None: the demo model).
    device : str
        ``auto`` (GPU if available, else CPU with a warning), ``cpu``, ``cuda`` or ``cuda:N``.
    folds : list, optional
        Subset of the model's folds (default: all the card lists).
    tta : bool
        Mirroring test-time augmentation (up to 8 network passes per window).
    tile_step_size : float
        Sliding-window step as a fraction of the patch (0.5 is nnU-Net's default; larger is
        faster and slightly less accurate).
    per_fold : bool
        Also return one probability map per fold (always done with several folds).
    threads : int, optional
        CPU threads for PyTorch during prediction (default: leave PyTorch's setting).
    embed : bool
        Capture the encoder embedding and score it against the card's reference.
    """

    def __init__(self, model: InstalledModel | str | Path | None = None, device: str = "auto",
                 folds=None, tta: bool = True, tile_step_size: float = 0.5,
                 per_fold: bool = False, threads: int | None = None, embed: bool = True):
        import torch

        self.model = model if isinstance(model, InstalledModel) else resolve_model(model)
        if not 0 < float(tile_step_size) <= 1:
            raise UsageError(f"tile step size must be in (0, 1], got {tile_step_size}")
        if threads is not None and int(threads) < 1:
            raise UsageError(f"threads must be a positive integer, got {threads}")
        self.folds = self.model.select_folds(folds)
        self.tta, self.tile_step_size = bool(tta), float(tile_step_size)
        self.per_fold, self.threads = bool(per_fold), threads
        self.embed = bool(embed)
        with self._torch_threads():
            self.device = select_device(device)
        nn = backend.import_nnunet()
        self._convert_logits = nn["convert_logits"]
        self._dataset_json = _read_json(self.model.path / "dataset.json")
        self._plans_manager = nn["PlansManager"](_read_json(self.model.path / "plans.json"))
        self._configuration = self._plans_manager.get_configuration(self.model.configuration)
        self._label_manager = self._plans_manager.get_label_manager(self._dataset_json)
        self._reader_name = self._plans_manager.plans.get("image_reader_writer", "SimpleITKIO")
        if self._reader_name not in SUPPORTED_READERS:
            raise InputDataError(f"the model reads images with {self._reader_name}; cl-bidsapp "
                                 f"supports {', '.join(SUPPORTED_READERS)}",
                                 path=self.model.path / "plans.json")
        with backend.quiet_nnunet():
            self._reader = self._plans_manager.image_reader_writer_class()

        checkpoints = [backend.load_verified_checkpoint(self.model, f) for f in self.folds]
        self._parameters = [c["network_weights"] for c in checkpoints]
        first = checkpoints[0]
        trainer_name = first.get("trainer_name", self.model.trainer)
        mirror_axes = first.get("inference_allowed_mirroring_axes")
        n_in = nn["determine_num_input_channels"](self._plans_manager, self._configuration,
                                                  self._dataset_json)
        network = backend.build_network(trainer_name, self._plans_manager, self._configuration,
                                        self._dataset_json, n_in,
                                        self._label_manager.num_segmentation_heads)
        try:
            network.load_state_dict(self._parameters[0])
        except RuntimeError as exc:
            raise InputDataError(f"checkpoint does not fit the network in plans.json ({exc})",
                                 path=self.model.checkpoint_path(self.folds[0])) from None
        with backend.quiet_nnunet():
            self._nnunet = nn["nnUNetPredictor"](
                tile_step_size=self.tile_step_size, use_gaussian=True, use_mirroring=self.tta,
                perform_everything_on_device=self.device.type == "cuda", device=self.device,
                verbose=False, allow_tqdm=False)
            self._nnunet.manual_initialization(
                network, self._plans_manager, self._configuration, self._parameters,
                self._dataset_json, trainer_name, mirror_axes)
        self._warned_demo = False
        if self.device.type == "cpu" and self.tta and mirror_axes:
            logger.warning("test-time augmentation on the CPU runs each window %d times; "
                           "pass --no-tta for a faster, slightly less accurate map",
                           2 ** len(mirror_axes))
        logger.info("model %s %s (sha256 %s), folds %s, TTA %s, tile step %.2f",
                    self.model.name, self.model.version, self.model.sha256[:12], self.folds,
                    "on" if self.tta else "off", self.tile_step_size)

    @contextlib.contextmanager
    def _torch_threads(self):
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def predict(self, image: nib.Nifti1Image) -> PredictionResult:
        """Predict the lesion probability map of one image.

        Parameters
        ----------
        image : nibabel.Nifti1Image
            The model input (skull-stripped when the card says so), any orientation.

        Raises
        ------
        InputDataError
            The image is not 3-D or has non-finite values (exit 65).
        TemporaryFailure
            The GPU ran out of memory (exit 75).
        """
        import torch

        start = time.perf_counter()
        image = _as_3d(image)
        with self._torch_threads():
            data, props = self._read_like_nnunet(image)
            with backend.quiet_nnunet():
                preprocessor = self._configuration.preprocessor_class(verbose=False)
                data, nonzero, props = preprocessor.run_case_npy(
                    data, None, props, self._plans_manager, self._configuration,
                    self._dataset_json)
            data = torch.from_numpy(data)
            embed_fold = embedding_fold(self.model, self.folds) if self.embed else None
            capture = FeatureCapture(nonzero[0] >= 0) if self.embed else None
            fold_logits = [self._fold_logits(params, data,
                                             capture if fold == embed_fold else None)
                           for fold, params in zip(self.folds, self._parameters)]
            if len(fold_logits) == 1:
                ensemble = fold_logits[0].float()
            else:
                ensemble = torch.stack([lg.float() for lg in fold_logits]).mean(0)
            probability = self._to_image(ensemble, props, image)
            fold_maps = []
            if self.per_fold or len(fold_logits) > 1:
                fold_maps = [self._to_image(lg, props, image) for lg in fold_logits]
        vector, info, ood = None, {}, {}
        if capture is not None:
            vector, info = capture.embedding()
            info.update(embedding_provenance(self.model, embed_fold))
            ood = ood_record(self.model, vector, info)
        seconds = time.perf_counter() - start
        logger.info("predicted %s in %.1f s on %s", _describe(image), seconds, self.device)
        return PredictionResult(probability=probability, fold_probabilities=fold_maps,
                                folds=list(self.folds), device=str(self.device),
                                seconds=seconds, embedding=vector, embedding_info=info,
                                ood=ood)

    def _read_like_nnunet(self, image: nib.Nifti1Image):
        # Reading our own temporary file through the model's reader class gives exactly the
        # array, axis order and spacing nnU-Net would get from the user's file.
        values = np.asarray(image.dataobj, dtype=np.float32)
        if not np.all(np.isfinite(values)):
            # SimpleITK would silently read NaN as 0
            raise InputDataError("image has NaN or infinite voxels; the model cannot read it",
                                 path=image.get_filename())
        with tempfile.TemporaryDirectory(prefix="cl-bidsapp-predict-") as tmp:
            path = str(Path(tmp) / "image.nii")
            # A fresh float32 image: saving the caller's object would repoint its file_map, and
            # re-quantising scaled integers could shift values.
            header = image.header.copy()
            header.set_data_dtype(np.float32)
            nib.save(nib.Nifti1Image(values, image.affine, header), path)
            del values
            with backend.quiet_nnunet():
                data, props = self._reader.read_images([path])
        return data, props

    def _fold_logits(self, params, data, capture=None):
        import torch

        self._nnunet.network.load_state_dict(params)
        hooked = capture.attached(self._nnunet) if capture else contextlib.nullcontext()
        try:
            with backend.quiet_nnunet(), hooked:
                return self._nnunet.predict_sliding_window_return_logits(data).to("cpu")
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
                raise TemporaryFailure(
                    f"the GPU ran out of memory ({self.device})",
                    hint="retry on a free GPU, or use --device cpu, fewer folds, or a larger "
                         "tile step / no TTA") from None
            raise

    def _to_image(self, logits, props, image: nib.Nifti1Image) -> nib.Nifti1Image:
        with backend.quiet_nnunet():
            _, probabilities = self._convert_logits(
                logits, self._plans_manager, self._configuration, self._label_manager,
                dict(props), return_probabilities=True,
                num_threads_torch=int(self.threads) if self.threads else _current_threads())
        lesion = _to_input_order(np.asarray(probabilities[LESION_LABEL]), self._reader_name,
                                 image.affine)
        lesion = np.clip(lesion, 0.0, 1.0).astype(np.float32, copy=False)
        header = image.header.copy()
        header.set_data_dtype(np.float32)
        out = nib.Nifti1Image(lesion, image.affine, header)
        out.header.set_slope_inter(1.0, 0.0)
        # the input's display window (e.g. 0..4095) would hide a 0..1 map in viewers
        out.header["cal_min"], out.header["cal_max"] = 0.0, 1.0
        out.header["descrip"] = b"CL probability"
        return out


def _to_input_order(array: np.ndarray, reader_name: str, affine: np.ndarray) -> np.ndarray:
    """Map an array in the reader's axis order back to nibabel's voxel order of the input."""
    array = array.transpose(2, 1, 0)  # all three readers use SimpleITK's (z, y, x) order
    if reader_name == "NibabelIOWithReorient":
        from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

        canonical = np.array([[0, 1], [1, 1], [2, 1]])
        array = apply_orientation(array, ornt_transform(canonical, io_orientation(affine)))
    return np.ascontiguousarray(array)


def _as_3d(image) -> nib.Nifti1Image:
    if not isinstance(image, nib.Nifti1Image):
        if isinstance(image, nib.spatialimages.SpatialImage):
            image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
        else:
            raise TypeError(f"expected a nibabel image, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if image.ndim != 3:
        raise InputDataError(f"the model needs a 3-D image, got shape {image.shape}",
                             path=image.get_filename())
    return image


def _current_threads() -> int:
    import torch

    return torch.get_num_threads()


def _describe(image: nib.Nifti1Image) -> str:
    zooms = "x".join(f"{z:.2g}" for z in image.header.get_zooms()[:3])
    return f"{image.get_filename() or 'image'} ({'x'.join(map(str, image.shape))}, {zooms} mm)"


def _read_json(path: Path) -> dict:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def get_predictor(model: InstalledModel | str | Path | None = None, device: str = "auto",
                  folds=None, tta: bool = True, tile_step_size: float = 0.5,
                  per_fold: bool = False, threads: int | None = None,
                  embed: bool = True) -> CLPredictor:
    """A :class:`CLPredictor` cached per process, so each model is loaded once.

    The cache key holds the model's sha256 and folder, the device asked for, folds, TTA, tile
    step, per-fold output, threads and whether the embedding is captured.
    """
    if not isinstance(model, InstalledModel):
        model = resolve_model(model)
    key = (model.sha256, str(model.path), str(device), tuple(str(f) for f in folds or ()),
           bool(tta), float(tile_step_size), bool(per_fold), threads, bool(embed))
    if key not in _CACHE:
        _CACHE[key] = CLPredictor(model, device=device, folds=folds, tta=tta,
                                  tile_step_size=tile_step_size, per_fold=per_fold,
                                  threads=threads, embed=embed)
    return _CACHE[key]


def clear_predictor_cache() -> None:
    """Forget cached predictors (frees their memory, GPU included)."""
    _CACHE.clear()

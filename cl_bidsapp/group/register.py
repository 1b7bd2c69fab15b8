"""Affine registration of each model input to the template brain, and warping masks with it.

SimpleITK (already a dependency) does the work; see ``docs/group.md`` for why it and not
ANTs. Per image: the brain-extracted model input (``desc-preproc``) is the moving image and
the template T1w masked by the template brain mask the fixed one. A centre-of-mass start, then
a rigid and a 12-parameter affine stage, each over two resolutions (the template sampled at
4 then 2 mm, smoothed with sigma 2 then 1 mm), with Mattes mutual information (the
images differ in contrast: UNI or MPRAGE against the template's T1w) on a fixed random 20 %
of the template brain's voxels, so that reruns give the same transform.

The transform is cached in the work folder, keyed by the sha256 of the model input, the
template files and :data:`REGISTRATION_VERSION`; a rerun only warps.

Masks are warped with nearest-neighbour interpolation onto the template's 1 mm grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from cl_bidsapp.io import atomic_path, write_json

logger = logging.getLogger(__name__)

#: Part of the cache key: change it whenever the registration settings change.
REGISTRATION_VERSION = "sitk-rigid-affine-mattes-2"
SAMPLING_FRACTION = 0.2
RANDOM_SEED = 20250716
#: Template sampling (mm) of the coarse and fine levels of each stage.
LEVEL_SPACINGS_MM = (4.0, 2.0)


def _sitk():
    import SimpleITK as sitk

    return sitk


def set_threads(n: int) -> None:
    """Threads SimpleITK may use in this process (worker initialiser)."""
    _sitk().ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(n)))


@lru_cache(maxsize=2)
def template_images(t1w: str, brain_mask: str):
    """(template brain for the metric, brain mask, 1 mm reference grid) as SimpleITK images."""
    sitk = _sitk()
    head = sitk.ReadImage(t1w, sitk.sitkFloat32)
    mask = sitk.ReadImage(brain_mask, sitk.sitkUInt8) > 0
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    mask.CopyInformation(head)
    brain = sitk.Mask(head, mask)
    return brain, mask, head


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the registration cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def register(moving_path: str | Path, template_t1w: str | Path,
             template_mask: str | Path):
    """Affine transform mapping template (fixed) points to image (moving) points.

    Returns
    -------
    SimpleITK.Transform
        A composite of the rigid and the affine stage (what ``sitk.Resample`` needs to pull
        an image of the moving space onto the template grid).
    """
    sitk = _sitk()
    fixed, fixed_mask, _ = template_images(str(template_t1w), str(template_mask))
    moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
    if moving.GetDimension() == 4:  # a 3-D volume stored 4-D
        size = list(moving.GetSize())
        moving = sitk.Extract(moving, size[:3] + [0], [0, 0, 0, 0])
    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid = _run_stage(fixed, fixed_mask, moving, start)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    return _run_stage(fixed, fixed_mask, moving, affine)


def _run_stage(fixed, fixed_mask, moving, initial):
    sitk = _sitk()
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, RANDOM_SEED)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=100, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    spacing = min(fixed.GetSpacing())
    method.SetShrinkFactorsPerLevel([max(1, int(round(s / spacing))) for s in LEVEL_SPACINGS_MM])
    method.SetSmoothingSigmasPerLevel([s / 2 for s in LEVEL_SPACINGS_MM])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Execute returns a composite holding one transform; unwrap it for the next stage
    if isinstance(result, sitk.CompositeTransform) and result.GetNumberOfTransforms() == 1:
        result = result.GetNthTransform(0)
    return result.Downcast() if hasattr(result, "Downcast") else result


def warp_mask(mask_path: str | Path, transform, reference) -> np.ndarray:
    """A mask of the image's space resampled (nearest neighbour) onto ``reference``'s grid.

    Returns a boolean array in nibabel's (i, j, k) axis order.
    """
    sitk = _sitk()
    mask = sitk.ReadImage(str(mask_path), sitk.sitkUInt8)
    if mask.GetDimension() == 4:
        size = list(mask.GetSize())
        mask = sitk.Extract(mask, size[:3] + [0], [0, 0, 0, 0])
    warped = sitk.Resample(mask, reference, transform, sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    # SimpleITK arrays are (k, j, i); nibabel's are (i, j, k)
    return sitk.GetArrayViewFromImage(warped).transpose(2, 1, 0) > 0


def _cache_files(cache_dir: Path, name: str) -> tuple[Path, Path]:
    tfm = Path(cache_dir) / f"{name}_from-image_to-template_xfm.tfm"
    return tfm, tfm.with_suffix(".json")


def _cache_key(moving_path: Path, template_key: str) -> dict[str, str]:
    return {"version": REGISTRATION_VERSION, "template": template_key,
            "moving_sha256": file_sha256(moving_path)}


def is_cached(job: dict[str, Any]) -> bool:
    """True when the job's transform is in the cache and still valid."""
    tfm, meta = _cache_files(Path(job["cache_dir"]), job["bids_name"])
    if not (tfm.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()) == _cache_key(Path(job["preproc"]),
                                                         job["template_key"])
    except (OSError, ValueError):
        return False


def cached_transform(moving_path: Path, template_key: str, cache_dir: Path,
                     name: str, template_t1w: Path, template_mask: Path):
    """The image's transform from the cache, or registered now and cached.

    Returns
    -------
    transform, cached : SimpleITK.Transform, bool
    """
    sitk = _sitk()
    key = _cache_key(moving_path, template_key)
    tfm, meta = _cache_files(cache_dir, name)
    if tfm.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()) == key:
                return sitk.ReadTransform(str(tfm)), True
        except (OSError, ValueError, RuntimeError):
            logger.debug("cached transform %s unreadable; registering again", tfm)
    transform = register(moving_path, template_t1w, template_mask)
    with atomic_path(tfm) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    write_json(meta, key)
    return transform, False


def register_and_warp(job: dict[str, Any]) -> dict[str, Any]:
    """One image: transform (cached), warped lesion mask and template-brain overlap (a job).

    Parameters
    ----------
    job : dict
        ``bids_name``, ``preproc``, ``lesion_mask``, ``brain_mask`` (paths), ``template_t1w``,
        ``template_mask``, ``template_key``, ``cache_dir``.

    Returns
    -------
    dict
        ``bids_name``; ``lesions`` (bit-packed boolean array on the template grid);
        ``brain_dice`` (warped brain mask against the template brain mask); ``seconds``,
        ``cached``; or ``error`` (a sentence) when registration failed; or ``damaged``
        (naming the file) when a mask cannot be read completely.
    """
    from cl_bidsapp.core.images import load_image
    from cl_bidsapp.errors import CLBidsAppError

    start = time.monotonic()
    out: dict[str, Any] = {"bids_name": job["bids_name"], "error": None}
    try:
        # ITK reads a truncated .nii.gz without complaint (a mask with half its lesions):
        # read the masks through nibabel first, which reads every byte and says what is wrong
        for key in ("lesion_mask", "brain_mask"):
            load_image(job[key])
    except CLBidsAppError as exc:
        out["damaged"] = str(exc)
        return out
    try:
        transform, cached = cached_transform(
            Path(job["preproc"]), job["template_key"], Path(job["cache_dir"]),
            job["bids_name"], Path(job["template_t1w"]), Path(job["template_mask"]))
        _, template_mask, reference = template_images(str(job["template_t1w"]),
                                                      str(job["template_mask"]))
        lesions = warp_mask(job["lesion_mask"], transform, reference)
        brain = warp_mask(job["brain_mask"], transform, reference)
        target = _sitk().GetArrayViewFromImage(template_mask).transpose(2, 1, 0) > 0
        overlap = 2.0 * np.count_nonzero(brain & target) / max(
            1, np.count_nonzero(brain) + np.count_nonzero(target))
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for every ITK exception
        out["error"] = str(exc).strip().splitlines()[-1][:300]
        return out
    out.update(lesions=np.packbits(lesions, axis=None), shape=lesions.shape,
               brain_dice=float(overlap), cached=cached,
               seconds=round(time.monotonic() - start, 2))
    return out

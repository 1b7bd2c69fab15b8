"""Quality-control flags across images: outliers, demo model, fallbacks, mixed settings.

Outliers are found with the robust (modified) z-score of Iglewicz and Hoaglin,
``z = 0.6745 (x - median) / MAD``, which a few bad images cannot hide the way they inflate a
standard deviation; beyond :data:`ROBUST_Z_LIMIT` (3.5, their recommendation) an image is
flagged. When more than half the values are equal (MAD = 0) the mean absolute deviation is
used instead (``z = (x - median) / (1.2533 * meanAD)``), and the spread never counts as less
than :data:`MIN_SCALE` (so that 2 lesions among images with 1 is no outlier). Groups with
fewer than :data:`MIN_IMAGES` processed images are not searched for outliers.

What is compared, among processed images (status ``ok``):

* ``brain_volume_outlier``: the brain mask volume, over all images, both directions (a mask
  that lost the cerebellum or kept the skull).
* ``lesion_count_outlier`` / ``lesion_volume_outlier``: ``log(1 + x)`` of the lesion count and
  total volume, high side only (many images have no lesion at all, so "too few" is no sign of
  trouble); the log keeps the heavy right tail of lesion loads from hiding outliers.
* ``intensity_outlier``: within each contrast (MP2RAGE UNI and MPRAGE intensities have
  different scales), three features of the intensity percentiles inside the brain: the
  spread ``log(p75 - p25)`` (a wrong scaling, e.g. UNI stored in -0.5..0.5), and the lower and
  upper tails ``(p50 - p01) / (p75 - p25)`` and ``(p99 - p50) / (p75 - p25)`` (a different
  sequence, inverted contrast, spikes).

>>> robust_z([10, 11, 9, 10, 10, 50]).round(1).tolist()
[0.0, 1.3, -1.3, 0.0, 0.0, 54.0]
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from cl_bidsapp.group.records import ImageSummary

logger = logging.getLogger(__name__)

ROBUST_Z_LIMIT = 3.5
MIN_IMAGES = 5
#: Smallest spread each comparison divides by (units of the compared value): without it, a
#: dataset where most images have exactly one lesion would call an image with two an outlier.
MIN_SCALE = {"brain_volume_ml": 30.0, "lesion_count": 0.25, "total_volume_mm3": 0.25,
             "spread": 0.05, "lower tail": 0.1, "upper tail": 0.1}
#: Dice between the warped brain mask and the template brain below which a registration is poor.
MIN_TEMPLATE_DICE = 0.8

_DEMO_WORDS = ("demo model",)
_UNI_FALLBACK_WORDS = "Brain extraction ran on the UNI image"


def robust_z(values: Sequence[float], min_scale: float = 0.0) -> np.ndarray:
    """Modified z-scores (NaN stays NaN; all 0 when the values do not vary).

    ``min_scale`` is the smallest spread (in the values' units) the score divides by, so
    that a group of nearly equal values does not turn a small difference into an outlier.

    >>> robust_z([1.0, 1.0, 1.0, 1.0, 5.0]).round(2).tolist()   # MAD = 0: mean abs. deviation
    [0.0, 0.0, 0.0, 0.0, 3.99]
    >>> robust_z([1.0, 1.0, 1.0, 1.0, 5.0], min_scale=2.0).round(2).tolist()
    [0.0, 0.0, 0.0, 0.0, 2.0]
    """
    x = np.asarray(values, dtype=float)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full(x.shape, np.nan)
    median = float(np.median(finite))
    # both estimate the standard deviation of normal data
    scale = float(np.median(np.abs(finite - median))) / 0.6745
    if scale == 0:
        scale = 1.2533 * float(np.mean(np.abs(finite - median)))
    scale = max(scale, float(min_scale))
    if scale == 0:
        return np.where(np.isfinite(x), 0.0, np.nan)
    return (x - median) / scale


def flag_outliers(summaries: Sequence[ImageSummary]) -> None:
    """Flag brain-volume, lesion-load and intensity outliers among processed images."""
    done = [s for s in summaries if s.ok]
    if len(done) >= MIN_IMAGES:
        brain = _column(done, "brain_volume_ml")
        median = _median(brain)
        for s, value, z in zip(done, brain, robust_z(brain, MIN_SCALE["brain_volume_ml"])):
            if np.isfinite(z) and abs(z) > ROBUST_Z_LIMIT:
                s.flag("brain_volume_outlier",
                       f"brain mask volume {value:,.0f} mL is far from the dataset's median "
                       f"{median:,.0f} mL (robust z = {z:+.1f}); check the brain mask")
        for column, code, unit in (("lesion_count", "lesion_count_outlier", "lesion(s)"),
                                   ("total_volume_mm3", "lesion_volume_outlier",
                                    "mm3 of lesions")):
            values = _column(done, column)
            median = _median(values)
            z_values = robust_z(np.log1p(np.maximum(values, 0)), MIN_SCALE[column])
            for s, value, z in zip(done, values, z_values):
                if np.isfinite(z) and z > ROBUST_Z_LIMIT:
                    s.flag(code, f"{value:,.0f} {unit} against a dataset median of "
                                 f"{median:,.0f} (robust z of log(1 + x) = {z:+.1f})")
    for contrast in sorted({str(s.values.get("contrast")) for s in done}):
        group = [s for s in done if str(s.values.get("contrast")) == contrast]
        if len(group) >= MIN_IMAGES:
            _flag_intensity(group, contrast)


def intensity_features(p01, p25, p50, p75, p99) -> dict[str, float]:
    """Scale and tail features of an intensity distribution (see the module docstring).

    >>> f = intensity_features(100, 800, 1000, 1200, 1500)
    >>> round(f["spread"], 3), f["lower tail"], f["upper tail"]
    (5.991, 2.25, 1.25)
    """
    iqr = p75 - p25
    if not (np.isfinite(iqr) and iqr > 0):
        return {"spread": np.nan, "lower tail": np.nan, "upper tail": np.nan}
    return {"spread": float(np.log(iqr)), "lower tail": float((p50 - p01) / iqr),
            "upper tail": float((p99 - p50) / iqr)}


def _flag_intensity(group: list[ImageSummary], contrast: str) -> None:
    features = []
    for s in group:
        p = [s.values.get(f"intensity_{k}") for k in ("p01", "p25", "p50", "p75", "p99")]
        p = [np.nan if v is None else float(v) for v in p]
        features.append(intensity_features(*p))
    for name in ("spread", "lower tail", "upper tail"):
        values = np.array([f[name] for f in features])
        for s, z in zip(group, robust_z(values, MIN_SCALE[name])):
            if np.isfinite(z) and abs(z) > ROBUST_Z_LIMIT:
                detail = ("intensity spread (IQR inside the brain)" if name == "spread"
                          else f"{name} of the intensity histogram")
                s.flag("intensity_outlier", f"{detail} unlike the other {contrast} images "
                                            f"(robust z = {z:+.1f}); check the input image")


def flag_run_conditions(summaries: Sequence[ImageSummary], phantom_dataset: bool) -> None:
    """Flag the demo model on real data, the noisy-background fallback and mixed settings.

    Parameters
    ----------
    summaries : sequence of ImageSummary
    phantom_dataset : bool
        True when the input dataset was written by the phantom simulator (then the demo model
        is expected).
    """
    done = [s for s in summaries if s.status == "ok"]
    for s in done:
        warned = [w for w in s.warnings if any(word in w.lower() for word in _DEMO_WORDS)]
        if s.values.get("model_is_demo") and (warned or not phantom_dataset):
            s.flag("demo_model", f"the demo model {s.values.get('model') or ''} was trained on "
                                 "simulated phantoms only; its lesions on real scans mean "
                                 "nothing")
        if s.values.get("masking_method") == "uni" or any(
                w.startswith(_UNI_FALLBACK_WORDS) for w in s.warnings):
            s.flag("noisy_background_fallback",
                   "brain extraction ran on the UNI image (no INV2 available); its noisy "
                   "background can spoil the brain mask: check it in the subject report")
    _flag_minority(done, "model_sha256", "model",
                   lambda s: f"{s.values.get('model')} "
                             f"(sha256 {str(s.values.get('model_sha256'))[:12]})")
    _flag_minority(done, "threshold", "threshold",
                   lambda s: f"threshold {s.values.get('threshold')}")
    _flag_minority(done, "min_lesion_size", "minimum lesion size",
                   lambda s: _size_words(s.values.get("min_lesion_size")))
    if any(s.values.get("app_version") for s in done):
        # a record without a version was written before records carried one
        _flag_minority(done, "app_version", "cl-bidsapp version",
                       lambda s: (f"cl-bidsapp {s.values['app_version']}" if s.values.get("app_version")
                                  else "a cl-bidsapp that did not record its version"),
                       missing="")


def _size_words(asked) -> str:
    """A minimum lesion size as asked: ``"3"`` -> ``3 voxels``, ``"10mm3"`` -> ``10 mm3``."""
    text = str(asked)
    return f"{text} voxels" if text.isdigit() else text.replace("mm3", " mm3")


def _flag_minority(done: Sequence[ImageSummary], column: str, what: str,
                   shown: Callable[[ImageSummary], str], missing: str | None = None) -> None:
    """Flag ``different_settings`` on the images whose ``column`` differs from most images'.

    Images without a value are left out, or count as the value ``missing`` when it is given.
    """
    def value(s):
        v = s.values.get(column)
        return missing if v is None else v

    values = [value(s) for s in done if value(s) is not None]
    if len(set(values)) < 2:
        return
    usual, _ = Counter(values).most_common(1)[0]
    example = next(s for s in done if value(s) == usual)
    for s in done:
        if value(s) not in (None, usual):
            s.flag("different_settings", f"{what}: {shown(s)} while most images used "
                                         f"{shown(example)}; do not pool them blindly")


def flag_outside_domain(summaries: Sequence[ImageSummary]) -> None:
    """Flag images whose out-of-distribution score exceeds the model card's threshold."""
    for s in summaries:
        if s.status == "ok" and s.values.get("ood_verdict") == "outside":
            s.flag("outside_domain", f"outside the model's domain: OOD score "
                                     f"{s.values['ood_score']:.2f} above the model's threshold "
                                     f"{s.values['ood_threshold']:.2f}; its lesions may be "
                                     "unreliable (docs/ood.md)")


def flag_registration(summary: ImageSummary, dice: float | None, error: str | None) -> None:
    """Flag an image whose template registration failed or overlaps the template poorly."""
    if error:
        summary.flag("registration_poor", f"registration to the template failed ({error}); "
                                          "left out of the lesion frequency map")
    elif dice is not None and dice < MIN_TEMPLATE_DICE:
        summary.flag("registration_poor", f"the warped brain mask overlaps the template brain "
                                          f"with Dice {dice:.2f} (< {MIN_TEMPLATE_DICE}); left "
                                          "out of the lesion frequency map")


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _column(summaries: Sequence[ImageSummary], column: str) -> np.ndarray:
    return np.array([np.nan if s.values.get(column) is None else float(s.values[column])
                     for s in summaries], dtype=float)

"""MP2RAGE image arithmetic: UNI from the two inversions, scanner scaling, robust combination.

Pure numpy, used both by the phantom generator and by the app's preprocessing of real data.

The MP2RAGE "uniform" image (Marques et al. 2010, NeuroImage 49:1271) is

    UNI = Re(conj(INV1) * INV2) / (|INV1|^2 + |INV2|^2)

which lies in [-0.5, 0.5] whatever the receive bias and proton density. Scanners store it
rescaled to 0..4095. Where there is no signal (air outside the head) the ratio of two noise
values is uniformly random: the "salt and pepper" background of every MP2RAGE UNI image.
O'Brien et al. 2014 (PLoS ONE 9:e99676) suppress it by adding a noise-level term ``beta`` to the
numerator and denominator; the signed INV1 needed for that is recovered from UNI and the
magnitude images by solving the UNI equation for INV1 (a quadratic) and keeping the root closer
to the measured magnitude, as the public MP2RAGE RobustCombination scripts do.

>>> import numpy as np
>>> inv1 = np.array([-300.0, 50.0, 0.0])
>>> inv2 = np.array([900.0, 1000.0, 0.0])
>>> uni = uni_from_inversions(inv1, inv2)
>>> [round(float(v), 3) for v in uni]
[-0.3, 0.05, 0.0]
>>> uni_to_scanner(uni)
array([ 819, 2252, 2048], dtype=uint16)
>>> [round(float(v), 3) for v in uni_from_scanner(uni_to_scanner(uni))]
[-0.3, 0.05, 0.0]
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

SCANNER_MAX = 4095
#: Multiple of the background noise level used for ``beta`` when none is given. O'Brien et al.
#: tune it by eye per protocol (their scripts start at 1 and go up to ~10). On the 3T phantoms,
#: 1 lowers the background SD by a third, 3 by a factor of 5 while the white/grey-matter
#: contrast drops by ~1 %, 8 by a factor of 25 at ~7 % contrast loss.
DEFAULT_NOISE_FACTOR = 3.0
#: Fallback noise level, as a fraction of the mean INV2 over the head, for images that have no
#: usable background (already masked or cropped to the head).
FALLBACK_NOISE_FRACTION = 0.02


def uni_from_inversions(inv1, inv2) -> np.ndarray:
    """Compute the MP2RAGE UNI image (-0.5..0.5) from the two inversion images.

    Parameters
    ----------
    inv1 : array_like
        First inversion, complex (phase-sensitive) or real and signed. A magnitude image gives
        only non-negative UNI: use :func:`robust_combination` for magnitude data.
    inv2 : array_like
        Second inversion, complex, signed or magnitude (it is positive in tissue).

    Returns
    -------
    numpy.ndarray
        float32 UNI, 0 where both inputs are 0.

    Examples
    --------
    >>> float(uni_from_inversions(1.0 + 0j, 1.0 + 0j))
    0.5
    >>> float(uni_from_inversions(-1.0, 1.0))
    -0.5
    """
    z1 = np.asarray(inv1)
    z2 = np.asarray(inv2)
    num = np.real(np.conj(z1) * z2)
    den = np.abs(z1) ** 2 + np.abs(z2) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        uni = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    return np.asarray(uni, dtype=np.float32)


def uni_to_scanner(uni) -> np.ndarray:
    """Rescale UNI from -0.5..0.5 to the scanner's 0..4095 integers (uint16).

    >>> uni_to_scanner([-0.5, 0.0, 0.5])
    array([   0, 2048, 4095], dtype=uint16)
    """
    scaled = np.rint((np.asarray(uni, dtype=np.float64) + 0.5) * SCANNER_MAX)
    return np.clip(scaled, 0, SCANNER_MAX).astype(np.uint16)


def uni_from_scanner(arr) -> np.ndarray:
    """Bring a stored UNI image to -0.5..0.5 (float32).

    Data already within [-0.5, 0.5] (up to rounding) are returned unchanged; anything else is
    taken to be on the scanner's 0..4095 scale, as the MP2RAGE scripts assume.

    >>> uni_from_scanner([0, 4095])
    array([-0.5,  0.5], dtype=float32)
    >>> uni_from_scanner([-0.2, 0.3])
    array([-0.2,  0.3], dtype=float32)
    """
    a = np.asarray(arr, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size and finite.min() >= -0.5 - 1e-3 and finite.max() <= 0.5 + 1e-3:
        return a.astype(np.float32)
    if finite.size and (finite.min() < -1e-3 or finite.max() > SCANNER_MAX + 0.5):
        log.warning("UNI values span %.4g..%.4g, outside both -0.5..0.5 and 0..4095; "
                    "assuming the 0..4095 scale", finite.min(), finite.max())
    return (a / SCANNER_MAX - 0.5).astype(np.float32)


def signed_inv1_from_uni(uni, inv1_mag, inv2_mag) -> np.ndarray:
    """Recover the signed INV1 from UNI and the two magnitude images.

    UNI * x^2 - INV2 * x + UNI * INV2^2 = 0 has two roots; the one closer to the measured
    magnitude, given the sign of UNI, is kept (the choice of the public RobustCombination
    scripts). Where UNI is 0 the signed INV1 is 0.

    Parameters
    ----------
    uni : array_like
        UNI in -0.5..0.5 (see :func:`uni_from_scanner`).
    inv1_mag, inv2_mag : array_like
        Magnitude images of the first and second inversion, same shape.

    Returns
    -------
    numpy.ndarray
        float64 signed INV1.

    Examples
    --------
    >>> import numpy as np
    >>> inv1, inv2 = np.array([-300.0, 800.0]), np.array([900.0, 1000.0])
    >>> uni = uni_from_inversions(inv1, inv2).astype(float)
    >>> np.round(signed_inv1_from_uni(uni, np.abs(inv1), inv2), 1)
    array([-300.,  800.])
    """
    u = np.asarray(uni, dtype=np.float64)
    m1 = np.asarray(inv1_mag, dtype=np.float64)
    m2 = np.asarray(inv2_mag, dtype=np.float64)
    guess = np.sign(u) * m1
    disc = np.sqrt(np.clip(m2 ** 2 - 4.0 * u * u * m2 ** 2, 0.0, None))
    small = np.abs(u) < 1e-9
    safe_u = np.where(small, 1.0, u)
    root_a = (m2 + disc) / (2.0 * safe_u)
    root_b = (m2 - disc) / (2.0 * safe_u)
    signed = np.where(np.abs(guess - root_a) <= np.abs(guess - root_b), root_a, root_b)
    return np.where(small, 0.0, signed)


def estimate_background_noise(inv2_mag, head_fraction: float = 0.05) -> float | None:
    """Mean INV2 magnitude in the air around the head (the noise floor), or None.

    Background voxels are those below ``head_fraction`` of the 99th percentile that also lie
    away from the head: the outer tenth of the field of view along every axis. Returns None when
    there are too few of them (image masked or cropped to the head).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> img = np.abs(rng.normal(0, 10, (40, 40, 40)) + 1j * rng.normal(0, 10, (40, 40, 40)))
    >>> img[10:30, 10:30, 10:30] += 1000
    >>> round(estimate_background_noise(img) / 10, 1)  # Rayleigh mean = sigma * sqrt(pi / 2)
    1.3
    """
    a = np.asarray(inv2_mag, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {a.shape}")
    border = np.zeros(a.shape, dtype=bool)
    for axis, n in enumerate(a.shape):
        k = max(1, n // 10)
        index = [slice(None)] * 3
        index[axis] = slice(0, k)
        border[tuple(index)] = True
        index[axis] = slice(n - k, n)
        border[tuple(index)] = True
    high = np.percentile(a, 99)
    if high <= 0:
        return None
    background = a[border & (a < head_fraction * high) & (a > 0)]
    if background.size < 1000:
        return None
    return float(background.mean())


def robust_combination(uni, inv1_mag, inv2_mag, beta: float | None = None,
                       noise_factor: float = DEFAULT_NOISE_FACTOR) -> np.ndarray:
    """Denoised MP2RAGE image (O'Brien et al. 2014), -0.5..0.5.

    robust = (INV1 * INV2 - beta) / (INV1^2 + INV2^2 + 2 beta), with the signed INV1 recovered
    by :func:`signed_inv1_from_uni`. Where signal is high the result equals UNI; where both
    inversions are at the noise level it tends to -0.5 (dark background).

    Parameters
    ----------
    uni : array_like
        UNI image, on the scanner's 0..4095 scale or already -0.5..0.5.
    inv1_mag, inv2_mag : array_like
        Magnitude images of the two inversions, on the same (arbitrary) intensity scale.
    beta : float, optional
        Regularisation, in squared intensity units of the inversions. Default:
        ``(noise_factor * noise)**2`` with ``noise`` the mean INV2 in the background
        (:func:`estimate_background_noise`), or, without a background, ``FALLBACK_NOISE_FRACTION``
        times the mean INV2 over the head.
    noise_factor : float
        Multiple of the noise level used when ``beta`` is None; larger gives a darker background.

    Returns
    -------
    numpy.ndarray
        float32 image in -0.5..0.5.

    Examples
    --------
    >>> import numpy as np
    >>> uni = np.array([0.2, 0.45])           # tissue, then a noisy background voxel
    >>> inv2 = np.array([1000.0, 5.0]); inv1 = np.array([250.0, 4.0])
    >>> np.round(robust_combination(uni, inv1, inv2, beta=100.0), 2)
    array([ 0.2 , -0.36], dtype=float32)
    """
    u = uni_from_scanner(uni).astype(np.float64)
    m2 = np.asarray(inv2_mag, dtype=np.float64)
    if u.shape != m2.shape or np.shape(inv1_mag) != m2.shape:
        raise ValueError(f"UNI {u.shape}, INV1 {np.shape(inv1_mag)} and INV2 {m2.shape} "
                         "must have the same shape")
    if beta is None:
        beta = default_beta(m2, noise_factor)
    inv1 = signed_inv1_from_uni(u, inv1_mag, m2)
    num = inv1 * m2 - beta
    den = inv1 ** 2 + m2 ** 2 + 2.0 * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), -0.5)
    return np.clip(out, -0.5, 0.5).astype(np.float32)


def default_beta(inv2_mag, noise_factor: float = DEFAULT_NOISE_FACTOR) -> float:
    """Regularisation term of :func:`robust_combination` estimated from the INV2 image.

    >>> import numpy as np
    >>> img = np.zeros((20, 20, 20)); img[5:15, 5:15, 5:15] = 500.0
    >>> default_beta(img, noise_factor=1.0)  # no background: 2 % of the mean head INV2, squared
    100.0
    """
    m2 = np.asarray(inv2_mag, dtype=np.float64)
    noise = estimate_background_noise(m2) if m2.ndim == 3 else None
    if noise is None:
        head = m2[m2 > 0.1 * np.percentile(m2, 99)] if np.any(m2 > 0) else m2
        noise = FALLBACK_NOISE_FRACTION * float(head.mean()) if head.size else 0.0
        log.info("no background found in INV2: noise level set to %.3g (%.0f %% of the mean "
                 "head INV2)", noise, 100 * FALLBACK_NOISE_FRACTION)
    return float((noise_factor * noise) ** 2)


def masking_image_from_inv2(inv2_mag) -> np.ndarray:
    """INV2 rescaled to 0..1 (1st to 99.5th percentile): a bias-weighted but noise-free head image.

    INV2 has a proton-density-like contrast with a quiet background, which suits brain
    extraction better than the UNI image.

    >>> import numpy as np
    >>> img = np.zeros((10, 10, 10)); img[2:8, 2:8, 2:8] = 300.0
    >>> out = masking_image_from_inv2(img)
    >>> float(out.min()), float(out.max())
    (0.0, 1.0)
    """
    a = np.asarray(inv2_mag, dtype=np.float32)
    low, high = np.percentile(a, [1, 99.5])
    if high <= low:
        return np.zeros(a.shape, dtype=np.float32)
    return np.clip((a - low) / (high - low), 0.0, 1.0).astype(np.float32)

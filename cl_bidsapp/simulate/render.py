"""From tissue fractions to MR images: signal equations, B1+, receive bias, noise, scaling.

Each voxel's signal is the sum over the tissues it contains of fraction x proton density x the
tissue's signal at the local B1+ (looked up in a table computed from the signal equations),
times the receive bias. Complex Gaussian noise of the same level is added to every inversion;
the magnitudes are stored like scanner magnitude images and UNI is computed from the complex
values as the scanner does, including its noisy background. A shared image phase would cancel
in UNI and in the magnitudes, so it is left out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cl_bidsapp.core.mp2rage import uni_from_inversions, uni_to_scanner
from cl_bidsapp.simulate.anatomy import Pose, SessionAnatomy, upsample_linear
from cl_bidsapp.simulate.physics import block_signals, complex_noise
from cl_bidsapp.simulate.protocols import Protocol, Tissue

log = logging.getLogger(__name__)

#: Stored magnitude of white matter in INV2 (MP2RAGE) or the T1w image (MPRAGE), before bias.
WHITE_MATTER_LEVEL = 1500.0
_B1_RANGE = (0.3, 1.8)
_B1_STEP = 0.01
#: Half-axes (mm) of the head region used to shape B1+ and the receive bias.
_HEAD_RADII = np.array([75.0, 90.0, 85.0])
_FRACTIONS = ("gm", "wm", "csf", "bone", "marrow", "fat", "soft")
_TISSUE_OF = {"gm": "GM", "wm": "WM", "csf": "CSF", "bone": "bone", "marrow": "marrow",
              "fat": "fat", "soft": "soft"}


@dataclass(frozen=True)
class Fields:
    """Smooth scanner fields of one session (full grid, float32)."""

    b1: np.ndarray
    bias: np.ndarray


def draw_fields(anatomy: SessionAnatomy, pose: Pose, protocol: Protocol,
                rng: np.random.Generator) -> Fields:
    """Transmit (B1+) and receive-bias fields, fixed to the scanner and shaped by the head.

    B1+ is highest in the centre of the head and falls towards its edges (the dielectric
    pattern that dominates at 7T), with a random tilt. The receive bias brightens the periphery
    (close to the coil elements) with a random low-order variation. Amplitudes come from the
    protocol.
    """
    step = anatomy.coarse_step
    axes = [np.arange(-(-(n - 1) // step) + 1, dtype=np.float64) * step for n in anatomy.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"))
    mm = np.einsum("ab,b...->a...", anatomy.affine[:3, :3], ijk) \
        + anatomy.affine[:3, 3, None, None, None]
    rel = (mm - pose.translation[:, None, None, None]) / _HEAD_RADII[:, None, None, None]
    rho2 = (rel ** 2).sum(0)
    tilt = np.tensordot(rng.normal(0.0, 0.25, 3), rel, axes=1)
    b1 = 1.0 + protocol.b1_amplitude * (0.6 - rho2 + tilt)
    basis = [rel[0], rel[1], rel[2], rel[0] ** 2, rel[1] ** 2, rel[2] ** 2,
             rel[0] * rel[1], rel[0] * rel[2], rel[1] * rel[2]]
    coef = rng.normal(0.0, 0.35, len(basis))
    log_bias = 0.5 * rho2 + sum(c * b for c, b in zip(coef, basis))
    bias = np.exp(protocol.bias_amplitude * np.clip(log_bias, -3.0, 3.0))
    coarse = np.stack([np.clip(b1, *_B1_RANGE), bias]).astype(np.float32)
    full = upsample_linear(coarse, anatomy.shape, step)
    return Fields(b1=full[0], bias=full[1])


class _B1Lookup:
    """Linear interpolation of tissue signals tabulated over B1+, with shared weights."""

    def __init__(self, b1: np.ndarray):
        self.grid = np.arange(_B1_RANGE[0], _B1_RANGE[1] + _B1_STEP / 2, _B1_STEP)
        pos = (np.clip(b1, *_B1_RANGE) - _B1_RANGE[0]) / _B1_STEP
        self.index = np.minimum(pos.astype(np.intp), len(self.grid) - 2)
        self.weight = (pos - self.index).astype(np.float32)

    def __call__(self, table: np.ndarray) -> np.ndarray:
        table = table.astype(np.float32)
        slope = np.diff(table)
        out = np.take(slope, self.index)
        out *= self.weight
        out += np.take(table, self.index)
        return out


def noise_free_signals(anatomy: SessionAnatomy, tissues: dict, protocol: Protocol,
                       fields: Fields, occupancy=()) -> list:
    """Signed signal of each readout block (float32, arbitrary units, receive bias included).

    Parameters
    ----------
    anatomy : SessionAnatomy
        Tissue fractions.
    tissues : dict of str to Tissue
        T1 and proton density per tissue (``GM``, ``WM``, ``CSF``, ``bone``, ``marrow``, ``fat``,
        ``soft``).
    protocol : Protocol
    fields : Fields
    occupancy : list
        From :func:`cl_bidsapp.simulate.lesions.lesion_occupancy`: lesion tissue replaces that
        fraction of the grey and white matter, with T1 = ratio x grey-matter T1.

    Returns
    -------
    list of numpy.ndarray
    """
    lookup = _B1Lookup(fields.b1)
    n_blocks = len(protocol.inversion_times)
    signals = [np.zeros(anatomy.shape, np.float32) for _ in range(n_blocks)]
    for name in _FRACTIONS:
        tissue: Tissue = tissues[_TISSUE_OF[name]]
        fraction = getattr(anatomy, name)
        tables = block_signals(tissue.t1, protocol, lookup.grid)
        for signal, table in zip(signals, tables):
            values = lookup(tissue.pd * table)
            values *= fraction
            signal += values
    grey, white = tissues["GM"], tissues["WM"]
    gm = anatomy.gm.ravel().copy()
    wm = anatomy.wm.ravel().copy()
    b1 = fields.b1.ravel()
    for flat, frac, ratio in occupancy:
        local_b1 = b1[flat]
        lesion = block_signals(grey.t1 * ratio, protocol, local_b1)
        healthy_gm = block_signals(grey.t1, protocol, local_b1)
        healthy_wm = block_signals(white.t1, protocol, local_b1)
        lost_gm, lost_wm = gm[flat] * frac, wm[flat] * frac
        for signal, les, sg, sw in zip(signals, lesion, healthy_gm, healthy_wm):
            delta = grey.pd * (lost_gm + lost_wm) * les - grey.pd * lost_gm * sg \
                - white.pd * lost_wm * sw
            signal.ravel()[flat] += delta.astype(np.float32)
        gm[flat] -= lost_gm
        wm[flat] -= lost_wm
    for signal in signals:
        signal *= fields.bias
    return signals


def reference_level(tissues: dict, protocol: Protocol) -> float:
    """Magnitude of white matter in the last readout block at nominal B1 (per unit M0)."""
    wm = tissues["WM"]
    return float(abs(block_signals(wm.t1, protocol, 1.0)[-1]) * wm.pd)


def acquire(signals: list, protocol: Protocol, tissues: dict, noise: float,
            rng: np.random.Generator) -> dict:
    """Add noise and produce the stored images.

    Parameters
    ----------
    signals : list of numpy.ndarray
        From :func:`noise_free_signals`.
    protocol : Protocol
    tissues : dict
    noise : float
        Standard deviation of the complex noise (each channel) relative to the white-matter
        signal of INV2 (MP2RAGE) or of the T1w image (MPRAGE).
    rng : numpy.random.Generator

    Returns
    -------
    dict
        ``inv1``, ``inv2`` (uint16 magnitudes) and ``uni`` (uint16, 0..4095) for MP2RAGE;
        ``t1w`` (uint16 magnitude) for MPRAGE.
    """
    ref = reference_level(tissues, protocol)
    sigma = noise * ref
    scale = np.float32(WHITE_MATTER_LEVEL / ref)
    noisy = []
    for signal in signals:
        re, im = complex_noise(signal.shape, sigma, rng)
        re += signal
        noisy.append((re, im))

    def magnitude(re, im):
        mag = np.hypot(re, im)
        mag *= scale
        return np.clip(np.rint(mag), 0, 65535).astype(np.uint16)

    if not protocol.is_mp2rage:
        return {"t1w": magnitude(*noisy[0])}
    (r1, i1), (r2, i2) = noisy
    uni = uni_from_inversions(r1 + 1j * i1, r2 + 1j * i2)
    return {"inv1": magnitude(r1, i1), "inv2": magnitude(r2, i2), "uni": uni_to_scanner(uni)}

"""Signal equations of the MP2RAGE and MPRAGE sequences (steady state, Marques et al. 2010).

Model and simplifications
-------------------------
* Longitudinal magnetisation only, M0 = 1 per unit proton density; perfect spoiling.
* Each readout block is a train of ``number_shots`` small-angle excitations spaced by the echo
  spacing; the k-space centre is read at the middle excitation (linear partition ordering), so
  the block starts ``number_shots / 2`` echo spacings before its inversion time.
* The inversion pulse flips ``-inversion_efficiency`` of the magnetisation; B1+ scales the
  excitation flip angles only (adiabatic inversion is taken as B1-insensitive).
* Signals are evaluated in the sequence's steady state (after many repetitions), with no T2*
  decay (echo times of ~3 ms are short against grey/white matter T2*), no partial Fourier and
  no GRAPPA.

Every step (inversion, free relaxation, a block of excitations) maps the longitudinal
magnetisation M to ``slope * M + offset``; composing the steps over one repetition and solving
``M = slope * M + offset`` gives the steady state.

>>> from cl_bidsapp.simulate.protocols import get_protocol
>>> s1, s2 = mp2rage_signals([0.83, 1.35, 4.0], get_protocol("3T-MP2RAGE"))
>>> import numpy as np
>>> np.round(s1 * s2 / (s1 ** 2 + s2 ** 2), 2)   # UNI of WM, GM, CSF at 3T
array([ 0.2 , -0.07, -0.49])
"""
from __future__ import annotations

import logging

import numpy as np

from cl_bidsapp.simulate.protocols import Protocol

log = logging.getLogger(__name__)


def _relax(t1, duration):
    e = np.exp(-duration / t1)
    return e, 1.0 - e


def _readout(t1, flip_rad, echo_spacing, n):
    """Affine map of ``n`` excitations: M -> q^n M + Mss (1 - q^n), q = cos(a) E1."""
    e1 = np.exp(-echo_spacing / t1)
    q = np.cos(flip_rad) * e1
    steady = (1.0 - e1) / (1.0 - q)
    qn = q ** n
    return qn, steady * (1.0 - qn)


def _then(first, second):
    """Affine map applying ``first`` then ``second``."""
    return second[0] * first[0], second[0] * first[1] + second[1]


def block_gaps(protocol: Protocol) -> tuple:
    """Free-relaxation intervals of one repetition (s): before, between and after the blocks.

    Raises
    ------
    ValueError
        When the readout blocks do not fit between the inversion times.

    >>> from cl_bidsapp.simulate.protocols import get_protocol
    >>> [round(g, 3) for g in block_gaps(get_protocol("3T-MP2RAGE"))]
    [0.084, 0.568, 1.884]
    """
    half = protocol.number_shots / 2 * protocol.repetition_time_excitation
    full = 2 * half
    tis = protocol.inversion_times
    gaps = [tis[0] - half]
    for a, b in zip(tis[:-1], tis[1:]):
        gaps.append(b - a - full)
    gaps.append(protocol.repetition_time_preparation - tis[-1] - half)
    if min(gaps) < 0:
        raise ValueError(f"{protocol.name}: readout blocks of {protocol.number_shots} x "
                         f"{protocol.repetition_time_excitation * 1e3:g} ms do not fit between "
                         f"inversion times {tis} within TR "
                         f"{protocol.repetition_time_preparation} s")
    return tuple(gaps)


def block_signals(t1, protocol: Protocol, b1=1.0) -> list:
    """Signed signal at the k-space centre of each readout block, per unit proton density.

    Parameters
    ----------
    t1 : array_like
        Longitudinal relaxation times, s.
    protocol : Protocol
        Sequence parameters (one block per inversion time).
    b1 : array_like
        Relative transmit field (1 = nominal flip angles); broadcasts with ``t1``.

    Returns
    -------
    list of numpy.ndarray
        One signal array per readout block.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    b1 = np.asarray(b1, dtype=np.float64)
    t1, b1 = np.broadcast_arrays(t1, b1)
    gaps = block_gaps(protocol)
    n = protocol.number_shots
    tau = protocol.repetition_time_excitation
    ones = np.ones_like(t1)
    cycle = (-protocol.inversion_efficiency * ones, 0.0 * ones)
    centre_maps = []
    for k, flip in enumerate(protocol.flip_angles):
        flip_rad = np.deg2rad(flip) * b1
        cycle = _then(cycle, _relax(t1, gaps[k]))
        centre_maps.append((_then(cycle, _readout(t1, flip_rad, tau, n / 2)), flip_rad))
        cycle = _then(cycle, _readout(t1, flip_rad, tau, n))
    cycle = _then(cycle, _relax(t1, gaps[-1]))
    m_before_inversion = cycle[1] / (1.0 - cycle[0])
    return [np.sin(flip_rad) * (cmap[0] * m_before_inversion + cmap[1])
            for cmap, flip_rad in centre_maps]


def mp2rage_signals(t1, protocol: Protocol, b1=1.0):
    """Signed INV1 and INV2 signals of an MP2RAGE protocol (per unit proton density).

    >>> from cl_bidsapp.simulate.protocols import get_protocol
    >>> s1, s2 = mp2rage_signals(1.2, get_protocol("3T-MP2RAGE"))
    >>> abs(float(s1)) < 0.001 < float(s2)    # INV1 crosses zero near T1 = 1.2 s at 3T
    True
    """
    if len(protocol.inversion_times) != 2:
        raise ValueError(f"{protocol.name} is not an MP2RAGE protocol")
    s1, s2 = block_signals(t1, protocol, b1)
    return s1, s2


def mprage_signal(t1, protocol: Protocol, b1=1.0):
    """Signed MPRAGE signal (per unit proton density); the image is its magnitude.

    >>> from cl_bidsapp.simulate.protocols import get_protocol
    >>> wm, gm, csf = mprage_signal([0.83, 1.35, 4.0], get_protocol("3T-MPRAGE"))
    >>> bool(wm > gm > abs(csf))
    True
    """
    if len(protocol.inversion_times) != 1:
        raise ValueError(f"{protocol.name} is not an MPRAGE protocol")
    return block_signals(t1, protocol, b1)[0]


def uni_of_t1(t1, protocol: Protocol, b1=1.0):
    """Noise-free UNI (-0.5..0.5) as a function of T1: the MP2RAGE lookup curve.

    >>> from cl_bidsapp.simulate.protocols import get_protocol
    >>> import numpy as np
    >>> round(float(uni_of_t1(1.3 * 1.35, get_protocol("3T-MP2RAGE"))), 2)  # a cortical lesion
    -0.22
    """
    s1, s2 = mp2rage_signals(t1, protocol, b1)
    return s1 * s2 / (s1 ** 2 + s2 ** 2)


def add_complex_noise(signal, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a real signal plus complex Gaussian noise (Rician), float32.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> air = add_complex_noise(np.zeros(100000), 10.0, rng)
    >>> round(float(air.mean()) / 10.0, 1)     # Rayleigh mean: sigma * sqrt(pi / 2)
    1.3
    """
    re, im = complex_noise(np.shape(signal), sigma, rng)
    re += np.asarray(signal, dtype=np.float32)
    return np.hypot(re, im)


def complex_noise(shape, sigma: float, rng: np.random.Generator):
    """Real and imaginary noise channels (float32), standard deviation ``sigma`` each."""
    re = rng.standard_normal(shape, dtype=np.float32)
    im = rng.standard_normal(shape, dtype=np.float32)
    re *= sigma
    im *= sigma
    return re, im

"""Simulated MP2RAGE / MPRAGE phantoms with cortical-lesion ground truth.

>>> from cl_bidsapp.simulate import simulate_dataset, PROTOCOLS
>>> sorted(PROTOCOLS)
['3T-MP2RAGE', '3T-MPRAGE', '7T-MP2RAGE']

``simulate_dataset(out_dir, n_subjects=3, ...)`` writes a BIDS dataset; see
:func:`cl_bidsapp.simulate.dataset.simulate_dataset` and docs/simulate.md.
"""
from cl_bidsapp.simulate.dataset import DEFAULT_NOISE, simulate_dataset
from cl_bidsapp.simulate.protocols import PROTOCOLS, Protocol, get_protocol

__all__ = ["simulate_dataset", "DEFAULT_NOISE", "PROTOCOLS", "Protocol", "get_protocol"]

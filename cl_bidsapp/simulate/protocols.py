"""Acquisition protocols and tissue properties of the phantoms.

A :class:`Protocol` holds what the signal equations need and what goes into the BIDS sidecars.
Times are in seconds and angles in degrees, as in BIDS.

>>> p = get_protocol("3T-MP2RAGE")
>>> p.sequence, p.field_strength, p.inversion_times
('MP2RAGE', 3.0, (0.7, 2.5))
>>> sorted(PROTOCOLS)
['3T-MP2RAGE', '3T-MPRAGE', '7T-MP2RAGE']
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """One MP2RAGE or MPRAGE acquisition.

    Attributes
    ----------
    name : str
        Preset name, e.g. ``"3T-MP2RAGE"``.
    sequence : str
        ``"MP2RAGE"`` or ``"MPRAGE"``.
    field_strength : float
        Tesla; selects the tissue T1 values.
    repetition_time_preparation : float
        Time between two inversion pulses (the "MP2RAGE TR" / MPRAGE TR), s.
    inversion_times : tuple of float
        Inversion to k-space centre of each readout block, s (two for MP2RAGE, one for MPRAGE).
    flip_angles : tuple of float
        Excitation flip angle of each readout block, degrees.
    repetition_time_excitation : float
        Echo spacing inside a readout block, s.
    number_shots : int
        Excitations per readout block (partition encoding steps).
    inversion_efficiency : float
        Fraction of the longitudinal magnetisation inverted (1 = perfect inversion).
    echo_time : float
        s; written to the sidecars only (T2* decay is not simulated).
    b1_amplitude : float
        Peak relative deviation of the transmit field B1+ (centre brightening at 7T).
    bias_amplitude : float
        Peak relative deviation of the receive bias field.
    """

    name: str
    sequence: str
    field_strength: float
    repetition_time_preparation: float
    inversion_times: tuple
    flip_angles: tuple
    repetition_time_excitation: float
    number_shots: int
    inversion_efficiency: float = 0.96
    echo_time: float = 0.003
    b1_amplitude: float = 0.05
    bias_amplitude: float = 0.2

    @property
    def is_mp2rage(self) -> bool:
        return self.sequence == "MP2RAGE"

    def sidecar(self, block: int | None = None) -> dict:
        """BIDS sidecar fields; ``block`` = 0 or 1 for one MP2RAGE inversion, None otherwise.

        >>> sc = get_protocol("3T-MP2RAGE").sidecar(block=1)
        >>> sc["InversionTime"], sc["FlipAngle"], sc["RepetitionTimePreparation"]
        (2.5, 5.0, 5.0)
        """
        fields = {
            "MagneticFieldStrength": self.field_strength,
            "MRAcquisitionType": "3D",
            "PulseSequenceType": self.sequence,
            "RepetitionTimePreparation": self.repetition_time_preparation,
            "RepetitionTimeExcitation": self.repetition_time_excitation,
            "NumberShots": self.number_shots,
            "EchoTime": self.echo_time,
        }
        if block is not None or not self.is_mp2rage:
            k = 0 if block is None else block
            fields["InversionTime"] = self.inversion_times[k]
            fields["FlipAngle"] = float(self.flip_angles[k])
        return fields


PROTOCOLS: dict[str, Protocol] = {
    # The worked example of ../notes/method.md (Marques et al. 2010 style 3T protocol).
    "3T-MP2RAGE": Protocol(
        name="3T-MP2RAGE", sequence="MP2RAGE", field_strength=3.0,
        repetition_time_preparation=5.0, inversion_times=(0.7, 2.5), flip_angles=(4.0, 5.0),
        repetition_time_excitation=0.007, number_shots=176, echo_time=0.0029,
        b1_amplitude=0.08, bias_amplitude=0.2),
    # A typical 7T research protocol; B1+ varies strongly (centre brightening).
    "7T-MP2RAGE": Protocol(
        name="7T-MP2RAGE", sequence="MP2RAGE", field_strength=7.0,
        repetition_time_preparation=5.0, inversion_times=(0.9, 2.75), flip_angles=(5.0, 3.0),
        repetition_time_excitation=0.0068, number_shots=160, echo_time=0.0025,
        b1_amplitude=0.45, bias_amplitude=0.4),
    # ADNI-like 3T MPRAGE.
    "3T-MPRAGE": Protocol(
        name="3T-MPRAGE", sequence="MPRAGE", field_strength=3.0,
        repetition_time_preparation=2.3, inversion_times=(0.9,), flip_angles=(9.0,),
        repetition_time_excitation=0.0071, number_shots=176, echo_time=0.0029,
        b1_amplitude=0.08, bias_amplitude=0.2),
}


@dataclass(frozen=True)
class Tissue:
    """Longitudinal relaxation time (s) and relative proton density of one tissue."""

    t1: float
    pd: float


#: Tissue properties by field strength. Brain values from ../notes/method.md; head tissues from
#: the MRI relaxometry literature (fat ~0.37-0.45 s, muscle ~1.4 s at 3T). Cortical bone has
#: almost no MR signal at these echo times: its tiny proton density stands in for the T2* decay
#: that is otherwise not simulated, as does the reduced density of the fatty marrow.
TISSUES: dict[float, dict[str, Tissue]] = {
    3.0: {
        "GM": Tissue(1.35, 0.80), "WM": Tissue(0.83, 0.69), "CSF": Tissue(4.0, 1.0),
        "fat": Tissue(0.38, 0.90), "soft": Tissue(1.42, 0.72), "bone": Tissue(0.30, 0.04),
        "marrow": Tissue(0.40, 0.45),
    },
    7.0: {
        "GM": Tissue(1.90, 0.80), "WM": Tissue(1.15, 0.69), "CSF": Tissue(4.4, 1.0),
        "fat": Tissue(0.45, 0.90), "soft": Tissue(1.90, 0.72), "bone": Tissue(0.35, 0.04),
        "marrow": Tissue(0.48, 0.45),
    },
}


def get_protocol(name: str) -> Protocol:
    """Return a preset by name (case-insensitive).

    Raises
    ------
    KeyError
        With the list of known presets.
    """
    for key, protocol in PROTOCOLS.items():
        if key.lower() == str(name).lower():
            return protocol
    raise KeyError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")


def tissues_for(protocol: Protocol) -> dict[str, Tissue]:
    """Tissue table of the field strength closest to the protocol's."""
    field = min(TISSUES, key=lambda b0: abs(b0 - protocol.field_strength))
    return TISSUES[field]

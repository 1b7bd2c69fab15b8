"""Plausibility warnings for MP2RAGE sidecars (never fatal: timings are not used)."""
from cl_bidsapp.core.protocol import mp2rage_protocol_warnings

GOOD = ({}, {"InversionTime": 0.7, "FlipAngle": 4},
        {"InversionTime": 2.5, "FlipAngle": 5, "RepetitionTimePreparation": 5.0,
         "RepetitionTimeExcitation": 0.0071, "NumberShots": 176, "MagneticFieldStrength": 3})


def test_typical_3t_protocol_is_fine():
    assert mp2rage_protocol_warnings(*GOOD) == []


def test_milliseconds_and_swapped_inversions_are_named():
    warnings = mp2rage_protocol_warnings({}, {"InversionTime": 2500}, {"InversionTime": 700})
    text = " ".join(warnings)
    assert "INV1 InversionTime is 2500 s" in text and "milliseconds" in text
    assert "swapped" in text


def test_absurd_values_and_non_numbers():
    warnings = mp2rage_protocol_warnings(
        {"FlipAngle": 90}, {"InversionTime": "long"},
        {"InversionTime": 9.0, "RepetitionTimePreparation": 5.0, "NumberShots": 0})
    text = " ".join(warnings)
    assert "UNI FlipAngle is 90 degrees" in text
    assert "INV1 InversionTime is 'long': not a number" in text
    assert "NumberShots is 0 shots" in text
    assert "not shorter than the MP2RAGE repetition time" in text

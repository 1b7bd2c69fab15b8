"""Plausibility of MP2RAGE/MPRAGE sidecar parameters.

The segmentation does not use the sequence timings, so implausible values never stop a run;
they are reported, because they usually mean a conversion went wrong (milliseconds stored as
seconds, inversion images swapped) and the image deserves a second look.

>>> mp2rage_protocol_warnings({}, {"InversionTime": 0.7}, {"InversionTime": 2.5,
...                            "RepetitionTimePreparation": 5.0, "FlipAngle": 5})
[]
>>> mp2rage_protocol_warnings({}, {"InversionTime": 2500}, {"InversionTime": 700})[0]
'INV1 InversionTime is 2500 s: implausible (expected 0.1-5 s; milliseconds stored as seconds?).'
"""
from __future__ import annotations

from typing import Any

# (low, high, unit) of plausible values
RANGES = {
    "InversionTime": (0.1, 5.0, "s"),
    "RepetitionTimePreparation": (1.0, 12.0, "s"),
    "RepetitionTimeExcitation": (0.002, 0.05, "s"),
    "FlipAngle": (1.0, 30.0, "degrees"),
    "NumberShots": (16, 1024, "shots"),
    "MagneticFieldStrength": (0.5, 11.7, "T"),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return float(value[0])
    return None


def _range_warnings(label: str, meta: dict) -> list[str]:
    out = []
    for key, (low, high, unit) in RANGES.items():
        if key not in meta:
            continue
        value = _number(meta[key])
        if value is None:
            out.append(f"{label} {key} is {meta[key]!r}: not a number.")
        elif not low <= value <= high:
            hint = "; milliseconds stored as seconds?" if unit == "s" and value > high else ""
            out.append(f"{label} {key} is {value:g} {unit}: implausible "
                       f"(expected {low:g}-{high:g} {unit}{hint}).")
    return out


def mp2rage_protocol_warnings(image_meta: dict, inv1_meta: dict, inv2_meta: dict) -> list[str]:
    """Plain-language warnings about implausible MP2RAGE sidecar values (empty when fine)."""
    warnings = _range_warnings("UNI", image_meta)
    warnings += _range_warnings("INV1", inv1_meta)
    warnings += _range_warnings("INV2", inv2_meta)
    ti1 = _number(inv1_meta.get("InversionTime"))
    ti2 = _number(inv2_meta.get("InversionTime"))
    if ti1 is not None and ti2 is not None and ti1 >= ti2:
        warnings.append(f"INV1 InversionTime ({ti1:g}) is not shorter than INV2's ({ti2:g}): "
                        "the inversion images may be swapped.")
    tr = _number(inv2_meta.get("RepetitionTimePreparation")
                 or image_meta.get("RepetitionTimePreparation"))
    if tr is not None and ti2 is not None and ti2 >= tr:
        warnings.append(f"INV2 InversionTime ({ti2:g}) is not shorter than the MP2RAGE "
                        f"repetition time ({tr:g}).")
    return list(dict.fromkeys(warnings))

"""Checks of a work plan that need no pybids index: output-name clashes and file headers.

:func:`mark_name_clashes` runs in every plan: images whose derivatives would overwrite each
other are marked unusable (their ``problem`` says why), the other images go on.
:func:`unreadable_files` runs in ``--dry-run``, which then warns about images that the real run
would refuse at its first step (empty, truncated or not NIfTI), instead of only saying "ok".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cl_bidsapp.bids.entities import SHORT_TO_LONG, parse_name

if TYPE_CHECKING:  # pragma: no cover
    from cl_bidsapp.bids.discovery import WorkItem


_QUERY_OF_SUFFIX = {"UNIT1": "uni", "T1w": "t1w"}


def _source_name(item: WorkItem) -> str:
    """The file name the outputs of ``item`` are named after (as the workflow names them)."""
    return item.image.name if item.image is not None else f"{item.bids_name}.nii.gz"


def _output_key(item: WorkItem) -> tuple:
    """What the names of an item's derivatives depend on (suffix aside: only the model input
    keeps it, the masks and lesion maps do not)."""
    from cl_bidsapp.bids.derivatives import source_entities

    ents = source_entities(_source_name(item), item.source_suffix)
    ents.pop("source_suffix", None)
    return tuple(sorted(ents.items()))


def _clash_filter(group: list[WorkItem]) -> str | None:
    """A filter-file example that keeps one image of a group whose outputs clash: the
    magnitude, the first echo, the ``.nii.gz`` file (None when their suffixes differ)."""
    names = [parse_name(_source_name(it)) for it in group]
    suffixes = {n.get("suffix") for n in names}
    if len(suffixes) > 1:
        return None
    query = _QUERY_OF_SUFFIX.get(suffixes.pop(), "t1w")

    def preference(name: dict) -> tuple:
        echo = name.get("echo", "")
        return (name.get("part") not in (None, "mag"), name.get("extension") != ".nii.gz",
                int(echo) if echo.isdigit() else 0, sorted(name.items()))

    keep = min(names, key=preference)
    keys = sorted({k for n in names for k in n} - {"suffix", "sub", "ses"})
    wanted = {SHORT_TO_LONG.get(k, k): keep.get(k) for k in keys
              if len({n.get(k) for n in names}) > 1}
    return json.dumps({query: wanted}) if wanted else None


def mark_name_clashes(items: list[WorkItem]) -> None:
    """Mark images whose derivatives would have the same names as another image's.

    Output names keep the ``sub``, ``ses``, ``task``, ``acq``, ``ce``, ``rec``, ``dir`` and
    ``run`` entities of the source, not ``echo``, ``part``, ``inv``, ``chunk`` or its suffix:
    ``sub-01_echo-1_T1w`` and ``sub-01_echo-2_T1w``, ``sub-01_T1w.nii`` beside
    ``sub-01_T1w.nii.gz``, or ``sub-01_UNIT1`` beside ``sub-01_T1w`` would write the same
    files, one silently replacing the other. Such images are not processed (their
    ``problem`` says why and how to choose one); the other images are.
    """
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(_output_key(item), []).append(item)
    for group in groups.values():
        if len(group) < 2:
            continue
        example = _clash_filter(group)
        if example is not None:
            # a filter applies to every subject: alone, it would drop the other subjects'
            # images that lack the entity it names (e.g. every T1w without an echo-)
            how = (f"process this subject on its own, keeping one image with a filter file: "
                   f"--participant-label {group[0].subject} --bids-filter-file FILE, FILE "
                   f"holding e.g. {example} (a filter applies to every selected subject)")
        else:
            how = ('segment them in separate runs with different output folders, selecting '
                   'each kind with --bids-filter-file (e.g. {"t1w": {"suffix": null}} '
                   'keeps only the UNIT1 images)')
        for item in group:
            others = ", ".join(_source_name(o) for o in group if o is not item)
            text = (f"{item.image or _source_name(item)}: its outputs would have the same file "
                    f"names as those of {others} (output names keep only the sub, ses, task, "
                    f"acq, ce, rec, dir and run entities), so one would overwrite the other"
                    f"\n  hint: {how}")
            item.problem = item.problem or text


def _header_problem(path: Path) -> str | None:
    """Why the NIfTI file cannot be used, from its size and header only (None: it looks fine).

    Cheap enough for a dry run over a whole dataset: the voxel data are never decompressed.
    """
    import nibabel as nib
    import numpy as np

    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "the file is empty (0 bytes)"
    try:
        img = nib.load(str(path))
        header = img.header
    except Exception as exc:  # noqa: BLE001 - any reason is the same for the user
        text = " ".join(str(exc).split())[:160] or type(exc).__name__
        return f"the NIfTI header cannot be read ({text})"
    if path.name.endswith(".nii") and hasattr(header, "get_data_offset"):
        shape = header.get_data_shape()
        # a single-file NIfTI's data start after its header, whatever vox_offset says
        offset = max(int(header.get_data_offset()), int(getattr(header, "single_vox_offset", 0)))
        need = offset + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
        if size < need:
            return (f"the file is truncated: its header describes {need} bytes "
                    f"({'x'.join(map(str, shape))} voxels), the file holds {size}")
    return None


def unreadable_files(items: list[WorkItem]) -> list[tuple[WorkItem, str]]:
    """Images whose files (image and inversions) are empty, truncated or not NIfTI.

    Only the header of each file is read, never the voxel data. Returns ``(item, reason)``
    pairs, the reason naming the file; the items are not changed (the real run refuses such
    an image at its first step, with the same reason and a crash file).
    """
    found = []
    for item in items:
        if item.problem:
            continue
        for path in (item.image, item.inv1, item.inv2, item.inv1_phase, item.inv2_phase):
            if path is None:
                continue
            problem = _header_problem(Path(path))
            if problem is not None:
                found.append((item, f"{path}: {problem}"))
                break
    return found


__all__ = ["mark_name_clashes", "unreadable_files"]

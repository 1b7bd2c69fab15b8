"""Safe extraction of model zips (the archives ``nnUNetv2_export_model_to_zip`` makes).

A model zip comes from the internet. ``zipfile.extractall`` would follow ``../`` entries out of
the destination, recreate symlinks and inflate a zip bomb until the disk is full; this module
refuses all of those before writing anything, and counts the bytes actually inflated rather
than trusting the sizes the archive declares.

>>> import io, zipfile, tempfile, pathlib
>>> buf = io.BytesIO()
>>> with zipfile.ZipFile(buf, "w") as zf:
...     zf.writestr("../evil.txt", "x")
>>> try:
...     safe_extract_zip(buf, pathlib.Path(tempfile.mkdtemp()))
... except Exception as exc:
...     print(type(exc).__name__, exc.exit_code)
InputDataError 65
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from cl_bidsapp.errors import InputDataError, MissingInputError

logger = logging.getLogger(__name__)

#: Largest total uncompressed size accepted (5 folds of a large nnU-Net with full checkpoints
#: stay well below this).
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_ENTRIES = 10_000
#: A deflated model checkpoint compresses ~1.1x; text ~10x. 200x is a bomb.
MAX_COMPRESSION_RATIO = 200
_CHUNK = 1 << 20


def check_zip_entries(zf: zipfile.ZipFile, label: str = "zip",
                      max_total_bytes: int = MAX_TOTAL_BYTES) -> list[zipfile.ZipInfo]:
    """Return the file entries of ``zf`` after refusing anything unsafe.

    Refused: absolute paths, drive letters, ``..`` components, backslashes, symlinks and other
    special files, too many entries, a declared total above ``max_total_bytes``, or an
    implausible compression ratio.

    Raises
    ------
    InputDataError
        Naming the offending entry (exit 65).
    """
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise InputDataError(f"zip has {len(infos)} entries (limit {MAX_ENTRIES}); refusing "
                             "to extract", path=label)
    total = 0
    files = []
    seen: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for info in infos:
        name = info.filename
        pure = PurePosixPath(name)
        if pure in seen:
            raise InputDataError(f"zip entry {name!r} appears twice; refusing to extract",
                                 path=label)
        seen.add(pure)
        folders.update(pure.parents)
        if (not pure.parts or name.startswith(("/", "\\")) or "\\" in name
                or re.match(r"^[A-Za-z]:", name)):
            raise InputDataError(f"zip entry {name!r} has an absolute or Windows path; refusing "
                                 "to extract", path=label)
        if ".." in pure.parts:
            raise InputDataError(f"zip entry {name!r} points outside the destination ('..'); "
                                 "refusing to extract", path=label)
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no type
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InputDataError(f"zip entry {name!r} is a symbolic link or special file; "
                                 "refusing to extract", path=label)
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise InputDataError(f"zip entry {name!r} is encrypted", path=label)
        total += info.file_size
        ratio = info.file_size / info.compress_size if info.compress_size else 0
        if info.file_size > _CHUNK and ratio > MAX_COMPRESSION_RATIO:
            raise InputDataError(f"zip entry {name!r} inflates {ratio:.0f}x (a zip bomb?); "
                                 "refusing to extract", path=label)
        files.append(info)
    clash = next((info.filename for info in files if PurePosixPath(info.filename) in folders),
                 None)
    if clash is not None:
        raise InputDataError(f"zip entry {clash!r} is both a file and a folder; refusing to "
                             "extract", path=label)
    if total > max_total_bytes:
        raise InputDataError(f"zip would inflate to {total / 1024**3:.1f} GiB (limit "
                             f"{max_total_bytes / 1024**3:.1f} GiB); refusing to extract",
                             path=label)
    return files


def safe_extract_zip(source: str | Path | IO[bytes], dest: str | Path,
                     max_total_bytes: int = MAX_TOTAL_BYTES) -> list[Path]:
    """Extract a zip into ``dest`` after checking every entry; return the files written.

    Parameters
    ----------
    source
        Path of the zip (or an open binary file).
    dest
        Destination folder (created); nothing is written outside it.
    max_total_bytes
        Limit on the inflated size, enforced on the bytes actually written.

    Raises
    ------
    MissingInputError
        The zip does not exist (exit 66).
    InputDataError
        Not a zip, a corrupt zip, or an unsafe entry (exit 65). A partly extracted ``dest`` is
        removed again.
    """
    label = str(source) if isinstance(source, (str, Path)) else "zip"
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise MissingInputError("model zip not found", path=source)
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise InputDataError(f"not a valid zip file ({exc})", path=label) from None
    written: list[Path] = []
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zf:
            budget = max_total_bytes
            for info in check_zip_entries(zf, label, max_total_bytes):
                target = (root / info.filename).resolve()
                if root not in target.parents:
                    raise InputDataError(f"zip entry {info.filename!r} resolves outside the "
                                         "destination; refusing to extract", path=label)
                target.parent.mkdir(parents=True, exist_ok=True)
                budget = _copy_member(zf, info, target, budget, label)
                written.append(target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        _remove_tree(dest)
        raise InputDataError(f"corrupt zip ({exc})", path=label) from None
    except BaseException:
        _remove_tree(dest)
        raise
    logger.debug("extracted %d files from %s", len(written), label)
    return written


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int,
                 label: str) -> int:
    # declared sizes can lie: count what is actually inflated
    with zf.open(info) as src, open(target, "xb") as dst:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            budget -= len(chunk)
            if budget < 0:
                raise InputDataError("zip inflates beyond the size limit; refusing to extract",
                                     path=label)
            dst.write(chunk)
    os.chmod(target, 0o644)
    return budget


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def find_model_folders(root: str | Path) -> list[Path]:
    """Folders under ``root`` that look like an nnU-Net model (``plans.json`` + ``dataset.json``).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> m = d / "Dataset501_CL" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    >>> m.mkdir(parents=True)
    >>> for f in ("plans.json", "dataset.json"):
    ...     _ = (m / f).write_text("{}")
    >>> [p.name for p in find_model_folders(d)]
    ['nnUNetTrainer__nnUNetPlans__3d_fullres']
    """
    root = Path(root)
    return sorted(p.parent for p in root.rglob("plans.json")
                  if (p.parent / "dataset.json").is_file())

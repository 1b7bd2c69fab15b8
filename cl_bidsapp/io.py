"""Atomic file writing: outputs appear complete or not at all.

Several participant jobs may share one output folder, and a run may be killed at any moment.
Every file is written under a hidden temporary name in its destination folder and renamed into
place (``os.replace`` is atomic on POSIX within one file system).

>>> import tempfile, json, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_json(d / "a.json", {"x": 1})
PosixPath('...a.json')
>>> json.loads((d / "a.json").read_text())
{'x': 1}
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from cl_bidsapp.errors import IOFailure, OutputError

TMP_PREFIX = ".cltmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds.

    The temporary name keeps the final suffixes (``.nii.gz``) so that writers that infer the
    format from the name work. On failure the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", path=path.parent) from None
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if exc.errno == errno.ENOSPC:
            raise IOFailure("no space left on device while writing", path=path,
                            hint="free space or point --work-dir/output_dir elsewhere") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise OutputError(f"cannot write ({exc.strerror})", path=path) from None
        raise IOFailure(f"write failed ({exc.strerror or exc})", path=path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON (keys in insertion order)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def save_nifti(img, path: str | Path) -> Path:
    """Atomically save a nibabel image."""
    with atomic_path(path) as tmp:
        img.to_filename(str(tmp))
    return Path(path)


def leftover_temporaries(folder: str | Path) -> list[Path]:
    """List temporary files left by interrupted writes (for cleanup and tests)."""
    return sorted(Path(folder).rglob(f"{TMP_PREFIX}*"))


def _json_default(obj: Any) -> Any:
    import numpy as np  # local: keep this module import-light

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

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
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    except OSError as exc:
        # the folder exists but takes no new file: name the folder, not a temporary name
        raise write_error(exc, path.parent, "cannot create files in this folder") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise write_error(exc, path, "cannot write") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_error(exc: OSError, path: Path, refused: str) -> Exception:
    """The user-facing error for an OSError while writing ``path``.

    >>> import errno
    >>> err = write_error(PermissionError(errno.EACCES, "Permission denied"), Path("out"),
    ...                    "cannot write")
    >>> type(err).__name__, int(err.exit_code), err.message
    ('OutputError', 73, 'cannot write (Permission denied)')
    """
    if exc.errno == errno.ENOSPC:
        return IOFailure("no space left on device while writing", path=path,
                         hint="free space or point --work-dir/output_dir elsewhere")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OutputError(f"{refused} ({exc.strerror})", path=path,
                           hint="check the folder's permissions and that its file system is "
                                "mounted writable (in a container: the bind mount)")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):   # a file is in the way
        return OutputError(f"{refused} ({exc.strerror})", path=path)
    return IOFailure(f"write failed ({exc.strerror or exc})", path=path)


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

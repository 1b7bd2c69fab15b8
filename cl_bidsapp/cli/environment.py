"""Process environment for a run: writable caches, thread limits, what hardware is there.

Under Apptainer the image and often ``$HOME`` are read-only; matplotlib, PyTorch, nnU-Net and
others then fail on their first cache write. Every cache goes to the work folder unless the
user already pointed it at a writable place.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

LOGGER = logging.getLogger(__name__)

CACHE_VARIABLES = ("MPLCONFIGDIR", "XDG_CACHE_HOME", "TORCH_HOME", "NUMBA_CACHE_DIR")
NNUNET_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def _writable(path: str | None) -> bool:
    """True when the user set ``path`` and it can be written (we never create it)."""
    # access(2) also answers "no" on a read-only mount (EROFS); nothing is written to find out:
    # a run writes only to its output and work folders.
    return bool(path) and Path(path).is_dir() and os.access(path, os.W_OK | os.X_OK)


def prepare_environment(work_dir: Path, omp_nthreads: int | None = None) -> dict[str, str]:
    """Send caches and temporary files to ``<work_dir>``; return the variables changed.

    A run writes only to the output and work folders: caches the user did not point
    elsewhere (matplotlib, PyTorch, XDG) and ``TMPDIR`` go under the work folder, and an
    unwritable ``$HOME`` (read-only Apptainer image) is replaced by one there.
    """
    cache = Path(work_dir) / "cache"
    changed: dict[str, str] = {}
    # Installed models live in the user's cache: pin that folder before XDG_CACHE_HOME moves.
    from cl_bidsapp.models.registry import ENV_MODELS_DIR, default_models_dir

    if not os.environ.get(ENV_MODELS_DIR):
        os.environ[ENV_MODELS_DIR] = changed[ENV_MODELS_DIR] = str(default_models_dir())
    # So do pre-fetched TemplateFlow templates (the group level's MNI template).
    from cl_bidsapp.group.template import templateflow_home

    if not os.environ.get("TEMPLATEFLOW_HOME"):
        os.environ["TEMPLATEFLOW_HOME"] = changed["TEMPLATEFLOW_HOME"] = str(templateflow_home())
    for name in CACHE_VARIABLES + ("TMPDIR",):
        if not _writable(os.environ.get(name)):
            target = Path(work_dir) / "tmp" if name == "TMPDIR" else cache / name.lower()
            target.mkdir(parents=True, exist_ok=True)
            os.environ[name] = changed[name] = str(target)
    import tempfile

    tempfile.tempdir = None  # let tempfile see the new TMPDIR
    home = os.environ.get("HOME")
    if not _writable(home):
        os.environ["HOME"] = changed["HOME"] = str(cache / "home")
        Path(os.environ["HOME"]).mkdir(parents=True, exist_ok=True)
    for name in NNUNET_VARIABLES:  # never used for prediction; set so nnU-Net stays quiet
        if not os.environ.get(name):
            os.environ[name] = changed[name] = str(cache / name)
    if not os.environ.get("LOGNAME"):  # Nipype's SLURM/SGE plugins name jobs after it
        os.environ["LOGNAME"] = changed["LOGNAME"] = _user_name()
    if omp_nthreads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, str(omp_nthreads))
    if changed:
        LOGGER.debug("caches redirected: %s", ", ".join(f"{k}={v}" for k, v in changed.items()))
    return changed


def _user_name() -> str:
    """The login name, also for a UID without a passwd entry (``docker run --user 4242``)."""
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def resolve_device(device: str) -> tuple[str, list[str]]:
    """``auto`` becomes ``cuda`` or ``cpu``; also say what torch, CUDA and the GPU are."""
    import torch

    lines = [f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'})"]
    available = torch.cuda.is_available()
    if available:
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} "
                     f"({torch.cuda.device_count()} visible)")
    if device == "auto":
        if available:
            return "cuda", lines
        lines.append("no GPU visible: nnU-Net runs on the CPU (expect minutes per image; "
                     "--no-tta and fewer --folds are much faster)")
        return "cpu", lines
    if device == "cuda" and not available:
        from cl_bidsapp.errors import UsageError

        raise UsageError("--device cuda was asked for but PyTorch sees no GPU",
                         hint="check the driver (nvidia-smi), use --nv with Apptainer or "
                              "--gpus all with Docker, or use --device cpu")
    return device, lines

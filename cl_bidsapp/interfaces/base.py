"""Base class of cl-bidsapp's Nipype interfaces: thin, timed, and quiet about expected errors.

Interfaces wrap functions of :mod:`cl_bidsapp.core` and :mod:`cl_bidsapp.models`; they own no
numerics. Each reports the wall time of its stage (``seconds``) so the per-image record can show
where time went.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from nipype.interfaces.base import SimpleInterface, TraitedSpec, traits


class StageOutputSpec(TraitedSpec):
    seconds = traits.Float(desc="wall time of this stage")
    warnings = traits.List(traits.Str, desc="plain-language warnings for the report")


class StageInterface(SimpleInterface):
    """A :class:`SimpleInterface` whose subclasses implement :meth:`_run_stage`."""

    output_spec = StageOutputSpec

    def _run_interface(self, runtime):
        t0 = time.perf_counter()
        self._results.setdefault("warnings", [])
        inject_fault(type(self).__name__, runtime.cwd)
        self._run_stage(Path(runtime.cwd))
        self._results["seconds"] = round(time.perf_counter() - t0, 3)
        return runtime

    def _run_stage(self, cwd: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _warn(self, *texts: str) -> None:
        self._results.setdefault("warnings", []).extend(t for t in texts if t)


FAULT_VARIABLE = "CL_BIDSAPP_INJECT_FAULT"


def inject_fault(stage: str, cwd: str) -> None:
    """Fail on purpose when ``CL_BIDSAPP_INJECT_FAULT`` asks for it (fault-tolerance tests).

    The variable holds ``Stage:kind[:subject]``: ``Stage`` an interface class name
    (``Segment``), ``kind`` one of ``error``, ``kill`` (SIGKILL of the worker, as the kernel's
    OOM killer does), ``oom`` (MemoryError) or ``cuda-oom``; ``subject`` limits it to one
    participant. Unset (always, outside tests) it does nothing.
    """
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != stage:
        return
    kind = parts[1] if len(parts) > 1 else "error"
    if len(parts) > 2 and f"sub_{parts[2]}_wf" not in str(cwd):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "oom":
        raise MemoryError(f"injected out-of-memory in {stage}")
    if kind == "cuda-oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected in {stage})")
    raise RuntimeError(f"injected fault in {stage}")


def defined(value):
    """The value of a Nipype input, or None when it was not set."""
    from nipype.interfaces.base import isdefined

    return value if isdefined(value) else None

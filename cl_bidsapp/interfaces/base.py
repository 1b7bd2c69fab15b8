"""Base class of cl-bidsapp's Nipype interfaces: thin, timed, and quiet about expected errors.

Interfaces wrap functions of :mod:`cl_bidsapp.core` and :mod:`cl_bidsapp.models`; they own no
numerics. Each reports the wall time of its stage (``seconds``) so the per-image record can show
where time went.
"""
from __future__ import annotations

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
        self._run_stage(Path(runtime.cwd))
        self._results["seconds"] = round(time.perf_counter() - t0, 3)
        return runtime

    def _run_stage(self, cwd: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _warn(self, *texts: str) -> None:
        self._results.setdefault("warnings", []).extend(t for t in texts if t)


def defined(value):
    """The value of a Nipype input, or None when it was not set."""
    from nipype.interfaces.base import isdefined

    return value if isdefined(value) else None

"""Write a subject's HTML report inside the workflow, as soon as its images are saved.

A subject's page used to be written after the whole participant run, one subject after the
other in the main process (about 2 s each). Inside the workflow it is built while other
subjects are still being segmented. The page is never worth failing a run for: an error here
is logged and returned as text, and the main process rebuilds any page this node did not write
(:func:`cl_bidsapp.cli.run.build_reports`), saying what failed if it fails again.
"""
from __future__ import annotations

import logging

from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, InputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)

logger = logging.getLogger(__name__)


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True, desc="the output dataset")
    subject = traits.Str(mandatory=True, desc="subject label, without sub-")
    run_id = traits.Str(desc="run whose settings the page shows")
    records = InputMultiObject(File(exists=True), mandatory=True,
                               desc="the subject's image records of this run (the page waits "
                                    "for all of them)")


class _SubjectReportOutputSpec(TraitedSpec):
    page = traits.Str(desc="the page written; empty when it could not be")
    error = traits.Str(desc="why the page could not be written; empty when it was")


class SubjectReport(SimpleInterface):
    """Build ``<output_dir>/sub-<subject>.html`` from the subject's records."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _run_interface(self, runtime):
        run_id = self.inputs.run_id or None
        try:
            from cl_bidsapp.reports import build_subject_report

            page = build_subject_report(self.inputs.output_dir, self.inputs.subject, run_id)
        except Exception as exc:  # noqa: BLE001 - the main process retries and reports it
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("sub-%s: the report could not be written in the workflow (%s); "
                           "it is retried at the end of the run", self.inputs.subject, error)
            self._results.update(page="", error=error)
        else:
            self._results.update(page=str(page), error="")
        return runtime

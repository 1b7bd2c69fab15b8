"""Reports: the per-subject HTML quality-control page, the methods text, reusable figures.

``build_subject_report(output_dir, subject)`` writes ``<output_dir>/sub-XX.html`` from what the
participant level left in the output folder (it never segments again);
``build_subject_reports`` does it for several subjects (``--reports-only``) and writes
``logs/CITATION.md`` with :func:`write_citation`. Figure functions for any report live in
:mod:`cl_bidsapp.reports.figures`.
"""
from cl_bidsapp.reports.citation import write_citation
from cl_bidsapp.reports.subject import build_subject_report, build_subject_reports

__all__ = ["build_subject_report", "build_subject_reports", "write_citation"]

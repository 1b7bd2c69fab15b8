"""The per-subject HTML quality-control page, ``<output_dir>/sub-XX.html``.

Built from the output folder alone (records, derivatives, sidecars, saved settings): nothing is
segmented again, so ``--reports-only`` can rebuild pages from a finished run. The page is one
self-contained file: figures are embedded as ``data:`` URIs, styles and the table-sorting
script are inline, and it links only to files inside the output folder. Figures are also saved
under ``sub-XX/figures/`` for reuse.
"""
from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from cl_bidsapp import __version__
from cl_bidsapp.errors import MissingInputError
from cl_bidsapp.io import write_text
from cl_bidsapp.reports.citation import REFERENCES, cited_keys, methods_paragraphs
from cl_bidsapp.reports.records import read_settings, software_versions, subject_records
from cl_bidsapp.reports.sections import image_section

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=1)
def template_environment():
    """The Jinja2 environment of the report templates (HTML autoescaping on)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html"]),
                              trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def _subject_label(subject: str) -> str:
    return subject[4:] if subject.startswith("sub-") else subject


def demo_warnings(sections) -> list[str]:
    """Warnings about the demo model meeting real data (the participant level words them)."""
    found: list[str] = []
    for section in sections:
        if not section.is_demo:
            continue
        for text in section.warnings:
            if "demo model" in text.lower() and text not in found:
                found.append(text)
    return found


def subject_page(output_dir: str | Path, subject: str) -> Path:
    """Where a subject's page lives.

    >>> subject_page("/out", "sub-01").as_posix()
    '/out/sub-01.html'
    """
    return Path(output_dir) / f"sub-{_subject_label(subject)}.html"


def build_subject_report(output_dir: str | Path, subject: str,
                         run_id: str | None = None) -> Path:
    """Write ``<output_dir>/sub-<subject>.html`` for every image record of the subject.

    Parameters
    ----------
    output_dir : path
        The output dataset of a participant run.
    subject : str
        Subject label, with or without ``sub-``.
    run_id : str, optional
        Run whose saved settings the page shows (default: the newest run of the subject).
        Records of every run are shown; each says which run made it.

    Returns
    -------
    pathlib.Path
        The page.

    Raises
    ------
    MissingInputError
        The subject has no records (the participant level never ran for it), or ``run_id``
        saved no settings for it.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    subject = _subject_label(subject)
    records = subject_records(output_dir, subject)
    if not records:
        raise MissingInputError(
            "no image records for this subject, so there is nothing to report",
            path=output_dir / f"sub-{subject}" / "log",
            hint="run the participant level for this subject first")
    shown_run, settings = read_settings(output_dir, subject, run_id)
    if run_id is not None and not settings:
        raise MissingInputError(
            f"run {run_id} saved no settings for sub-{subject}",
            path=output_dir / f"sub-{subject}" / "log" / run_id / "cl-bidsapp.toml")
    sections = [image_section(output_dir, record) for record in records]
    versions = software_versions(output_dir, records)
    # a page whose images all failed has no method to describe
    paragraphs = (methods_paragraphs(records, settings, versions)
                  if any(s.status == "ok" for s in sections) else [])
    failed = [s for s in sections if s.status != "ok"]
    html = template_environment().get_template("subject.html").render(
        subject=subject, sections=sections, failed=failed,
        demo_warnings=demo_warnings(sections), run_id=shown_run, version=__version__,
        settings_file=(f"sub-{subject}/log/{shown_run}/cl-bidsapp.toml" if settings else None),
        methods=paragraphs, references=[REFERENCES[k][1] for k in cited_keys(paragraphs)],
        n_warnings=sum(len(s.warnings) for s in sections),
        citation_file="logs/CITATION.md")
    page = write_text(subject_page(output_dir, subject), html)
    logger.info("sub-%s: report written in %.1f s (%d image(s), %d failed): %s", subject,
                time.perf_counter() - start, len(sections), len(failed), page)
    return page


def build_subject_reports(output_dir: str | Path, subjects: Iterable[str],
                          run_id: str | None = None) -> list[Path]:
    """Build the page of each subject, then ``logs/CITATION.md``; return the pages.

    Subjects without records do not stop the others; they are named in one
    :class:`~cl_bidsapp.errors.MissingInputError` raised at the end.
    """
    from cl_bidsapp.reports.citation import write_citation

    pages, missing = [], []
    for subject in subjects:
        try:
            pages.append(build_subject_report(output_dir, subject, run_id))
        except MissingInputError as exc:
            logger.error("%s", exc)
            missing.append(_subject_label(subject))
    if pages:
        write_citation(output_dir)
    if missing:
        raise MissingInputError(
            f"no report for {', '.join('sub-' + s for s in missing)}: no image records "
            "(or no settings for the requested run)", path=output_dir,
            hint="run the participant level for these subjects first")
    return pages

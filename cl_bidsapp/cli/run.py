"""``cl-bidsapp`` entry point: parse, check, plan, run the participant and/or group level.

Every failure becomes a short message naming the file and the problem, and an exit code from
the BIDS-Apps spec; an unexpected error writes its traceback to a crash file and says where.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from cl_bidsapp import __version__
from cl_bidsapp.errors import CLBidsAppError, ExitCode, NoFilesSelected

LOGGER = logging.getLogger("cl_bidsapp")


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity + 1, 2)  # 0 -> INFO, 1+ -> DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
    root = logging.getLogger("cl_bidsapp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # quiet chatty libraries unless debugging
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils", "bids"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)


def _say_error(err: CLBidsAppError) -> None:
    print(f"cl-bidsapp: error: {err}", file=sys.stderr)


def _crash_report(exc: BaseException, settings) -> Path | None:
    """Write the traceback of an unexpected error to a file; return its path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidates = []
    if settings is not None:
        candidates.append(settings.effective_work_dir() / "crash")
    # Not the current folder: it may be inside the BIDS dataset, which is never written to.
    candidates.append(Path(tempfile.gettempdir()))
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"crash-{stamp}-cl-bidsapp.txt"
            path.write_text(f"cl-bidsapp {__version__}\n{' '.join(sys.argv)}\n\n{text}")
            return path
        except OSError:
            continue
    return None


def plan(settings):
    """Index the dataset, check labels and filters, discover the work items."""
    from cl_bidsapp.bids.discovery import (check_filters, check_labels, discover,
                                           missing_content, unmatched_selection)
    from cl_bidsapp.bids.layout import load_layout

    t0 = time.monotonic()
    layout = load_layout(settings.bids_dir, settings.bids_database_dir)
    LOGGER.info("Indexed %s in %.1f s", settings.bids_dir, time.monotonic() - t0)
    check_labels(layout, settings.participant_label, settings.session_label)
    filters = None
    if settings.bids_filters:
        filters = check_filters(settings.bids_filters, set(layout.get_entities()),
                                source=settings.bids_filter_file)
    items = discover(layout, settings.participant_label, settings.session_label, filters)
    empty_subjects, empty_sessions = unmatched_selection(items, settings.participant_label,
                                                         settings.session_label)
    selection = "; ".join(text for text in (
        empty_subjects and f"participant(s) {', '.join(empty_subjects)}",
        empty_sessions and f"session(s) {', '.join(empty_sessions)}") if text)
    if not items:
        what = ("the input queries" if not filters else
                f"the BIDS filter file's queries ({settings.bids_filter_file})"
                if settings.bids_filter_file else "the configuration file's bids_filters")
        where = f" for the selected {selection}" if selection else ""
        raise NoFilesSelected(
            f"{what} selected no MP2RAGE UNI (UNIT1) or T1w image{where}",
            path=settings.bids_dir,
            hint="check --participant-label/--session-label and --bids-filter-file; "
                 "inputs are anat/*_UNIT1 or anat/*_T1w NIfTI files (sessions or "
                 "participants with only functional or diffusion data have none)")
    if selection:
        LOGGER.warning("No UNIT1 or T1w image for the selected %s: nothing to do there",
                       selection)
    missing_content(items)
    return layout, items


def run(settings) -> int:
    from cl_bidsapp.bids.layout import read_dataset_description

    raw_description = read_dataset_description(settings.bids_dir)
    layout, items = plan(settings)
    subjects = sorted({it.subject for it in items})
    LOGGER.info("Work plan: %d image(s) from %d participant(s)", len(items), len(subjects))

    if not settings.skip_bids_validation:
        from cl_bidsapp.bids.validation import validate

        validate(settings.bids_dir, subjects)

    if settings.dry_run:
        from cl_bidsapp.bids.checks import unreadable_files
        from cl_bidsapp.bids.discovery import plan_table

        print(plan_table(items, root=settings.bids_dir))
        _warn_unreadable(unreadable_files(items), len(items))
        unusable = [it for it in items if it.problem]
        if not unusable or "participant" not in settings.levels:
            return ExitCode.OK    # the group level flags such images and goes on
        # what the real run would report as failed, said before anything runs
        print(f"cl-bidsapp: {len(unusable)} of {len(items)} image(s) cannot be processed:",
              file=sys.stderr)
        for item in unusable:
            print(f"  sub-{item.subject} {item.bids_name}: {item.problem}", file=sys.stderr)
        return ExitCode.DATA_ERROR

    from cl_bidsapp.cli.parser import check_writable

    check_writable(settings.output_dir, "output folder")
    check_writable(settings.effective_work_dir(), "work folder")
    from cl_bidsapp.cli.environment import prepare_environment

    prepare_environment(settings.effective_work_dir(), settings.omp_nthreads)
    if settings.boilerplate_only:
        from cl_bidsapp.reports import write_citation

        print(write_citation(settings.output_dir, settings))
        return ExitCode.OK
    if settings.reports_only:
        from cl_bidsapp.reports import build_subject_reports

        for page in build_subject_reports(settings.output_dir, subjects):
            print(page)
        return ExitCode.OK
    code = ExitCode.OK
    if "participant" in settings.levels:
        from cl_bidsapp.cli.participant import run_participant

        started = time.time()
        failures = run_participant(settings, items, raw_description)
        if failures:
            code = report_failures(failures, len(items))
        # the workflow wrote each subject's page once its images were saved; subjects with a
        # failed or unusable image (whose records came later) and pages it could not write
        # are built now
        from cl_bidsapp.reports.subject import subject_page

        failed = {f.item.subject for f in failures}
        done = [s for s in subjects if s not in failed
                and _written_since(subject_page(settings.output_dir, s), started)]
        code = build_reports(settings, [s for s in subjects if s not in done], done) or code
    if "group" in settings.levels:
        from cl_bidsapp.group import run_group_level

        code = run_group_level(settings, items, raw_description) or code
    return code


def _warn_unreadable(found: list, n_items: int, shown: int = 20) -> None:
    """Say which planned images the real run would refuse at once (the plan reads sidecars
    only; these files were found empty, truncated or not NIfTI from their headers)."""
    if not found:
        return
    print(f"cl-bidsapp: warning: {len(found)} of {n_items} planned image(s) cannot be read "
          "and would fail in a real run:", file=sys.stderr)
    for item, reason in found[:shown]:
        print(f"  sub-{item.subject} {item.bids_name}: {reason}", file=sys.stderr)
    if len(found) > shown:
        print(f"  ... and {len(found) - shown} more", file=sys.stderr)


def _written_since(path: Path, started: float) -> bool:
    try:
        return path.stat().st_mtime >= started
    except OSError:
        return False


def build_reports(settings, subjects: list[str], written: list[str] = ()) -> int:
    """Write each subject's HTML page and logs/CITATION.md; a report bug never hides results.

    ``written`` are subjects whose page the workflow has already written in this run.
    """
    from cl_bidsapp.reports import build_subject_reports, write_citation
    from cl_bidsapp.reports.subject import subject_page

    pages = [subject_page(settings.output_dir, s) for s in written]
    try:
        if subjects:
            pages += build_subject_reports(settings.output_dir, subjects, settings.run_id)
        elif pages:
            write_citation(settings.output_dir)
    except CLBidsAppError as err:
        _say_error(err)
        return int(err.exit_code)
    except Exception as exc:  # noqa: BLE001 - the derivatives are written; say what failed
        crash = _crash_report(exc, settings)
        print(f"cl-bidsapp: error: the HTML reports could not be written ({type(exc).__name__}: "
              f"{exc}); the derivatives are complete{'; details in ' + str(crash) if crash else ''}",
              file=sys.stderr)
        return int(ExitCode.UNSPECIFIED)
    LOGGER.info("Reports: %s", ", ".join(str(p) for p in pages))
    return int(ExitCode.OK)


def report_failures(failures, n_items: int) -> int:
    """Print which images failed and why; return the run's exit code."""
    print(f"cl-bidsapp: {len(failures)} of {n_items} image(s) failed:", file=sys.stderr)
    for failure in failures:
        where = f" (details: {failure.crash_file})" if failure.crash_file else ""
        print(f"  sub-{failure.item.subject} {failure.item.bids_name}: {failure.message}{where}",
              file=sys.stderr)
    codes = {f.exit_code for f in failures}
    return codes.pop() if len(codes) == 1 else int(ExitCode.UNSPECIFIED)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    from cl_bidsapp.cli.parser import parse_args

    settings = None
    try:
        settings = parse_args(argv)
        setup_logging(settings.verbosity)
        LOGGER.info("cl-bidsapp %s", __version__)
        return int(run(settings))
    except CLBidsAppError as err:
        _say_error(err)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("cl-bidsapp: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("cl-bidsapp: error: out of memory.\n  hint: lower --nprocs, set --mem to what "
              "the machine has, or process fewer participants at once", file=sys.stderr)
        return int(ExitCode.TEMPORARY)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        crash = _crash_report(exc, settings)
        where = f"; details in {crash}" if crash else ""
        print(f"cl-bidsapp: error: unexpected {type(exc).__name__}: {exc}{where}\n"
              "  hint: this is a bug; please report it with the crash file", file=sys.stderr)
        return int(ExitCode.UNSPECIFIED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

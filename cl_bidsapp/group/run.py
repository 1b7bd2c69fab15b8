"""The group level: from the participant level's outputs to the numbers a study reports.

Order of work (each step reads derivatives only; nothing is segmented again):

1. one summary per planned image from its record (status, lesion load, brain statistics);
2. ``group/group_lesions.tsv``, streamed from the per-image lesion tables (checked on the way);
3. QC flags: outliers, the demo model on real data, the noisy-background fallback, mixed
   settings;
4. with ``--reference-masks``: per-image scores, error maps, and summaries per domain and site;
5. the lesion frequency map in MNI152NLin2009cAsym, when the template is in the TemplateFlow
   cache;
6. ``group/group_images.tsv`` (now with every flag) and ``group/group_report.html``.

Problems that concern only some inputs (a missing template, unusable reference masks) do not
stop the rest: everything else is written first, then the error is raised (exit 66 or 65).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from cl_bidsapp.errors import CLBidsAppError, InputDataError, MissingInputError
from cl_bidsapp.group import evaluate as evaluation
from cl_bidsapp.group.domain import domain_rule, find_model_card
from cl_bidsapp.group.error_report import LesionRows, write_error_analysis
from cl_bidsapp.group.figures import distribution_figure, frequency_figure
from cl_bidsapp.group.parallel import run_jobs
from cl_bidsapp.group.ood import ood_block
from cl_bidsapp.group.qc import flag_outliers, flag_outside_domain, flag_run_conditions
from cl_bidsapp.group.records import (any_record, column_dictionary, read_participants,
                                      summarise_image)
from cl_bidsapp.group.report import REPORT_NAME, ReportInputs, write_report
from cl_bidsapp.group.tables import (IMAGES_TABLE, LESIONS_TABLE, write_images_table,
                                     write_lesions_table, write_tsv)
from cl_bidsapp.io import atomic_path

logger = logging.getLogger(__name__)

GROUP_FOLDER = "group"
LOCK_NAME = ".cl-bidsapp-group.lock"
EVALUATION_TABLE = "group_evaluation.tsv"
EVALUATION_SUMMARY = "group_evaluation_summary.tsv"
EVALUATION_DOMAINS = "group_evaluation_domains.tsv"


def run_group_level(settings, items: Sequence, raw_description: dict, *,
                    frequency_map: bool = True) -> int:
    """Run the group level; return the exit code (0), or raise a user-facing error.

    Parameters
    ----------
    settings : cl_bidsapp.config.Settings
        Uses ``output_dir``, ``bids_dir``, ``reference_masks``, ``nprocs``, ``model``,
        ``models_dir`` and the work folder (registration cache).
    items : sequence of WorkItem
        The images that should have outputs (from input planning).
    raw_description : dict
        The input dataset's ``dataset_description.json``.
    frequency_map : bool
        Make the template-space lesion frequency map (benchmarks turn it off).

    Raises
    ------
    MissingInputError
        No participant outputs at all (exit 66, naming the output folder); or, after
        everything else is written, the template is not in the TemplateFlow cache.
    InputDataError
        After everything else is written: reference masks that could not be used (exit 65).
    TemporaryFailure
        Another group-level run is writing the same output folder (exit 75).
    """
    start = time.monotonic()
    out = Path(settings.output_dir)
    if not any_record(out, items):
        raise MissingInputError(
            "no participant-level outputs here (no sub-*/log/*_record.json)", path=out,
            hint="run the participant level first: cl-bidsapp BIDS_DIR OUTPUT_DIR participant")
    group_dir = out / GROUP_FOLDER
    with _exclusive(group_dir):
        return _group_run(settings, items, raw_description, frequency_map, start, out,
                          group_dir)


def _group_run(settings, items, raw_description, frequency_map: bool, start: float, out: Path,
               group_dir: Path) -> int:
    from cl_bidsapp.models.demo import is_phantom_metadata

    dataset_notes: list[str] = []
    participants = read_participants(settings.bids_dir, dataset_notes)
    summaries = [summarise_image(item, out, participants) for item in items]
    earlier = _earlier_outputs(out, group_dir, summaries)
    logger.info("Group level: %d image(s) planned, %d processed", len(summaries),
                sum(s.status == "ok" for s in summaries))
    has_site = any(s.values.get("site") for s in summaries)
    has_protocol = any(s.protocol for s in summaries)
    shas = [s.values.get("model_sha256") for s in summaries if s.values.get("model_sha256")]
    sha = max(set(shas), key=shas.count) if shas else None
    rule = domain_rule(find_model_card(sha, settings.model, settings.models_dir),
                       has_site, has_protocol)
    for s in summaries:
        s.values["domain"] = rule.classify(s.values.get("site"), s.protocol,
                                           s.values.get("contrast"))

    n_lesions = write_lesions_table(summaries, group_dir, out)
    flag_outliers(summaries)
    flag_run_conditions(summaries, is_phantom_metadata(raw_description))
    flag_outside_domain(summaries)

    problems: list[CLBidsAppError] = []
    inputs = ReportInputs(dataset=raw_description.get("Name"), domain_rule=rule.describe(),
                          lesion_rows=n_lesions, dataset_notes=dataset_notes)
    if settings.reference_masks:
        problem = _evaluate(summaries, Path(settings.reference_masks), out, group_dir,
                            settings.nprocs, inputs)
        if problem:
            problems.append(problem)
    if frequency_map:
        problem = _frequency_map(summaries, settings, group_dir, inputs)
        if problem:
            problems.append(problem)
    else:
        inputs.frequency_missing = "not requested for this run."

    # from here on only this run's files: an earlier run's evaluation must not reach the report
    _remove_unwritten(earlier, keep=group_dir / REPORT_NAME)
    evaluation_table = group_dir / EVALUATION_TABLE
    inputs.ood = ood_block(summaries, evaluation_table if evaluation_table.is_file() else None)
    if inputs.ood and inputs.ood.get("figure"):
        _save_figure(group_dir, "group_desc-ood_plot.png", inputs.ood["figure"])
    write_images_table(summaries, group_dir)
    inputs.figures["distributions"] = distribution_figure([s.values for s in summaries])
    _save_figure(group_dir, "group_desc-distributions_plot.png",
                 inputs.figures["distributions"])
    inputs.files = sorted(p.relative_to(out).as_posix() for p in group_dir.glob("*")
                          if p.is_file() and p.name != REPORT_NAME
                          and not p.name.startswith("."))
    write_report(summaries, inputs, group_dir)
    flagged = sum(bool(s.flags) for s in summaries)
    logger.info("Group level finished in %.1f s: %s, %s, %s (%d image(s) flagged, %d lesion "
                "row(s))", time.monotonic() - start, group_dir / IMAGES_TABLE,
                group_dir / LESIONS_TABLE, group_dir / REPORT_NAME, flagged, n_lesions)
    if problems:
        raise _combined(problems)
    return 0



@contextlib.contextmanager
def _exclusive(group_dir: Path):
    """Hold a lock on ``group/`` for the run: a second group run on the same output folder
    meanwhile would overwrite and remove this run's files, so it stops at once (exit 75)."""
    import fcntl

    from cl_bidsapp.errors import TemporaryFailure
    from cl_bidsapp.io import write_error

    lock = group_dir / LOCK_NAME
    for attempt in range(5):   # a file system whose stat and fstat disagree must not loop
        try:
            group_dir.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError as exc:
            raise write_error(exc, group_dir, "cannot create files in this folder") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise TemporaryFailure("another group-level run is writing this folder now",
                                   path=group_dir,
                                   hint="wait for it to finish, then run again") from None
        except OSError as exc:   # a file system without locks (some NFS mounts): go on
            logger.warning("cannot lock %s (%s): nothing stops a second group-level run on "
                           "this output folder from overwriting this one's files meanwhile",
                           lock, exc.strerror or exc)
            break
        # a run that ended between our open and our lock has removed the file we locked:
        # lock the file that now stands there, or a later run would not see us
        if _same_file(handle, lock) or attempt == 4:
            break
        handle.close()
    with handle:
        try:
            yield
        finally:
            # removed while still held, so that no output list ever shows it; a run that
            # opens it in between finds it locked, one that comes later makes a new one
            with contextlib.suppress(OSError):
                lock.unlink()


def _same_file(handle, path: Path) -> bool:
    """True when the open ``handle`` is the file at ``path`` (not one removed since)."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _evaluate(summaries, reference_dir: Path, out: Path, group_dir: Path, nprocs,
              inputs: ReportInputs) -> CLBidsAppError | None:
    inputs.reference_dir = str(reference_dir)
    if not reference_dir.is_dir():
        message = "the reference-masks folder does not exist"
        inputs.evaluation_problems.append(f"{reference_dir}: {message}")
        return MissingInputError(message, path=reference_dir)
    jobs, unmatched = evaluation.evaluation_jobs(summaries, reference_dir, out)
    inputs.no_reference = len(unmatched)
    if unmatched and not jobs:
        message = (f"no reference mask here matches any of the {len(unmatched)} processed "
                   f"image(s) (e.g. {unmatched[0].bids_name}); nothing was evaluated")
        inputs.evaluation_problems.append(f"{reference_dir}: {message}")
        logger.warning("%s: %s", reference_dir, message)
        return MissingInputError(message, path=reference_dir,
                                 hint="masks are found by the image's entities, e.g. "
                                      f"{unmatched[0].bids_name.rsplit('_', 1)[0]}"
                                      "_label-CL_mask.nii.gz (docs/group.md, Evaluation mode)")
    by_name = {s.bids_name: s for s in summaries}
    job_of = {j["bids_name"]: j for j in jobs}
    rows, unusable, lesion_rows = [], [], LesionRows()
    # about a second per image: a worker pays off only over several images
    for result in run_jobs(evaluation.evaluate_image, jobs, nprocs, jobs_per_worker=4):
        summary = by_name[result["bids_name"]]
        if result["problem"]:
            logger.warning("evaluation of %s skipped: %s", summary.bids_name, result["problem"])
            if result.get("problem_source") == "prediction":   # a damaged participant output
                summary.flag("missing_outputs", result["problem"] + "; not evaluated")
                continue
            summary.flag("reference_unusable", result["problem"])
            unusable.append(result["problem"])
            continue
        job = job_of[summary.bids_name]
        row = {c: summary.values.get(c) for c in ("bids_name", "participant_id", "session_id",
                                                  "contrast", "site", "domain")}
        row.update({c: result.get(c) for c in evaluation.SCORE_COLUMNS})
        row["reference"] = job["reference"]
        row["error_map"] = Path(job["error_map"]).relative_to(out).as_posix()
        rows.append(row)
        lesion_rows.add(row, result.get("lesions") or [], result.get("notes") or [])
    logger.info("Evaluation: %d image(s) scored, %d without a reference mask, %d unusable",
                len(rows), len(unmatched), len(unusable))
    write_tsv(group_dir / EVALUATION_TABLE, list(column_dictionary("group_evaluation.json")),
              rows, column_dictionary("group_evaluation.json"))
    if rows:
        long, wide = evaluation.summarise_evaluation(pd.DataFrame(rows))
        write_tsv(group_dir / EVALUATION_SUMMARY,
                  list(column_dictionary("group_evaluation_summary.json")),
                  long.to_dict("records"), column_dictionary("group_evaluation_summary.json"))
        write_tsv(group_dir / EVALUATION_DOMAINS,
                  list(column_dictionary("group_evaluation_domains.json")),
                  wide.to_dict("records"), column_dictionary("group_evaluation_domains.json"))
        inputs.evaluation_wide = wide
        inputs.error_analysis = write_error_analysis(group_dir, rows, lesion_rows)
    inputs.evaluation_problems = unusable[:20] + (
        [f"… and {len(unusable) - 20} more"] if len(unusable) > 20 else [])
    if unusable:
        return InputDataError(
            f"{len(unusable)} reference mask(s) could not be used (the other images were "
            f"evaluated): " + "; ".join(unusable[:3]) + (" …" if len(unusable) > 3 else ""))
    return None


def _frequency_map(summaries, settings, group_dir: Path, inputs: ReportInputs
                   ) -> CLBidsAppError | None:
    from cl_bidsapp.group.frequency import make_frequency_map
    from cl_bidsapp.group.template import find_template

    try:
        template = find_template()
    except MissingInputError as exc:
        # the full message (file and how to fetch it) is the run's final error
        logger.warning("Lesion frequency map skipped: the template is not in the TemplateFlow "
                       "cache")
        inputs.frequency_missing = str(exc)
        return exc
    cache = Path(settings.effective_work_dir()) / "group" / "registration"
    result = make_frequency_map(summaries, template, group_dir, cache,
                                Path(settings.output_dir), settings.nprocs)
    if result.path is None:
        inputs.frequency_missing = ("no processed image could be registered to the template "
                                    "(see the flags).")
        return None
    inputs.frequency_file = result.path.relative_to(settings.output_dir).as_posix()
    inputs.frequency_images = result.n_images
    inputs.frequency_left_out = result.n_left_out
    figure = frequency_figure(result.path, template.t1w, template.brain_mask,
                              result.n_images)
    inputs.figures["frequency"] = figure
    _save_figure(group_dir, "group_desc-frequency_plot.png", figure)
    return None


def _earlier_outputs(out: Path, group_dir: Path, summaries) -> dict[Path, tuple[int, int]]:
    """Files an earlier group run may have written, with their (inode, mtime) now: the
    ``group_*`` files of ``group/`` and ``group/figures/`` (every group output is named so;
    anything else there is the user's and is left alone) and the error maps of this run's
    images."""
    from cl_bidsapp.bids.derivatives import output_path, source_entities

    files = [p for folder in (group_dir, group_dir / "figures")
             for p in folder.glob(f"{GROUP_FOLDER}_*") if p.is_file()]
    for s in summaries:
        error_map = output_path(out, source_entities(s.bids_name + ".nii.gz", s.source_suffix),
                                "error_map")
        files += [error_map, error_map.with_name(error_map.name.replace(".nii.gz", ".json"))]
    earlier = {}
    for path in files:
        try:
            info = path.stat()
        except OSError:
            continue
        earlier[path] = (info.st_ino, info.st_mtime_ns)
    return earlier


def _remove_unwritten(earlier: dict[Path, tuple[int, int]], keep: Path) -> None:
    """Remove what an earlier run wrote and this one did not rewrite, so that no table,
    map or figure from another run (other masks, template or images) sits beside this one's.
    Every output is written through a new file and a rename, so a rewritten file has a new
    inode or mtime."""
    for path, identity in earlier.items():
        try:
            info = path.stat()
            if path != keep and (info.st_ino, info.st_mtime_ns) == identity:
                path.unlink()
                logger.info("Removed %s: an earlier group run wrote it and this run does not",
                            path)
        except OSError:
            continue


def _save_figure(group_dir: Path, name: str, png: bytes | None) -> None:
    if png is None:
        return
    with atomic_path(group_dir / "figures" / name) as tmp:
        tmp.write_bytes(png)


def _combined(problems: list[CLBidsAppError]) -> CLBidsAppError:
    """One error for the CLI: the first problem's exit code, every message."""
    if len(problems) == 1:
        return problems[0]
    first = problems[0]
    text = "; and ".join(str(p) for p in problems)
    return type(first)(text)

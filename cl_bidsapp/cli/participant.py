"""Run the participant level: resolve the model, build the Nipype workflow, run it, account
for every image (done or failed, and why), and print a summary.

One image failing never stops the others (unless ``--stop-on-first-crash``); the run then exits
non-zero and names the failures. Reruns resume from the work folder's cache.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cl_bidsapp.bids.derivatives import (output_path, save_settings, source_entities,
                                         subject_log_dir, write_dataset_files)
from cl_bidsapp.bids.discovery import WorkItem
from cl_bidsapp.core.protocol import mp2rage_protocol_warnings
from cl_bidsapp.errors import ExitCode, OutputError
from cl_bidsapp.interfaces.derivatives import record_path, software_versions
from cl_bidsapp.io import write_json

LOGGER = logging.getLogger("cl_bidsapp.participant")

STAGE_WORDS = {
    "prepare": "checking the inputs", "skullstrip": "brain extraction",
    "model_input": "building the model input", "segment": "nnU-Net segmentation",
    "find_lesions": "finding lesions", "save_derivatives": "writing derivatives",
}
OOM_ADVICE = ("set --mem to the memory really available, lower --nprocs (e.g. --nprocs 1), "
              "or use --device cpu when the GPU memory is the limit; then rerun (finished "
              "work is reused)")
_EXIT_BY_NAME = {
    "InputDataError": ExitCode.DATA_ERROR, "MissingInputError": ExitCode.NO_INPUT,
    "OutputError": ExitCode.CANNOT_CREATE, "IOFailure": ExitCode.IO_ERROR,
    "TemporaryFailure": ExitCode.TEMPORARY, "UsageError": ExitCode.USAGE,
    "MemoryError": ExitCode.TEMPORARY, "OutOfMemoryError": ExitCode.TEMPORARY,
}


@dataclass
class Failure:
    item: WorkItem
    message: str
    exit_code: int
    crash_file: Path | None = None


def is_phantom_dataset(raw_description: dict) -> bool:
    """True for datasets written by ``cl-bidsapp-simulate``."""
    generated = raw_description.get("GeneratedBy") or []
    return any(isinstance(g, dict) and g.get("Name") == "cl-bidsapp-simulate"
               for g in generated)


def find_precomputed_masks(items: list[WorkItem], derivatives: dict[str, Path]) -> dict:
    """Brain masks named like ours (``*_desc-brain_mask.nii.gz``) in ``--derivatives`` folders."""
    found = {}
    for item in items:
        source = item.image.name if item.image else f"{item.bids_name}.nii.gz"
        ents = source_entities(source, item.source_suffix)
        for root in derivatives.values():
            candidate = output_path(root, ents, "brain_mask")
            if candidate.is_file():
                found[item.bids_name] = candidate
                break
    return found


def _default_threads(settings, n_images: int = 1) -> tuple[int, int]:
    from cl_bidsapp.workflows.multiproc import batch_threads

    nprocs = settings.nprocs or os.cpu_count() or 1
    omp = settings.omp_nthreads or batch_threads(nprocs, n_images)
    return nprocs, min(omp, nprocs)


def build_options(settings, items, model, device: str, raw_description: dict):
    from cl_bidsapp.workflows.base import ParticipantOptions

    nprocs, omp = _default_threads(settings, len(items))
    extra: dict[str, list[str]] = {}
    warnings_all = []
    if model.is_demo and not is_phantom_dataset(raw_description):
        warnings_all.append(
            f"The demo model ({model.name}) was trained on simulated phantoms only: its "
            "lesions on real scans mean nothing. Install a real model and pass --model.")
        LOGGER.warning("!!! %s", warnings_all[-1])
    accepted = set(model.input_contrasts)
    for item in items:
        texts = list(warnings_all)
        if item.contrast == "MP2RAGE":
            texts += mp2rage_protocol_warnings(item.metadata, item.inv1_metadata,
                                               item.inv2_metadata)
        wanted = "UNIT1" if item.contrast == "MP2RAGE" else "T1w"
        if accepted and wanted not in accepted:
            texts.append(f"The model lists {', '.join(sorted(accepted))} as its inputs, not "
                         f"{wanted} ({item.contrast}): expect worse results.")
        for text in texts[len(warnings_all):]:      # the run-wide ones were said above
            LOGGER.warning("%s: %s", item.bids_name, text)
        if texts:
            extra[item.bids_name] = texts
    return ParticipantOptions(
        output_dir=settings.output_dir, bids_dir=settings.bids_dir, run_id=settings.run_id,
        model_path=str(model.path), model_provenance=model.provenance(),
        threshold=settings.threshold or model.recommended_threshold,
        min_size=settings.min_lesion_size or str(model.recommended_min_size_voxels),
        background=model.background_value, device=device, folds=settings.folds,
        tta=settings.tta, tile_step_size=settings.tile_step_size,
        skull_strip=settings.skull_strip, skull_strip_tool=settings.skull_strip_tool,
        omp_nthreads=omp, precomputed_masks=find_precomputed_masks(items, settings.derivatives),
        extra_warnings=extra)


def _plugin(settings) -> tuple[str, dict]:
    nprocs, _ = _default_threads(settings)
    if settings.use_plugin is not None:
        import yaml

        data = yaml.safe_load(Path(settings.use_plugin).read_text())
        return data["plugin"], dict(data.get("plugin_args") or {})
    args: dict = {"n_procs": nprocs, "raise_insufficient": False}
    if settings.mem_gb:
        args["memory_gb"] = settings.mem_gb
    return "MultiProc", args


class _Progress:
    """Nipype status callback: one plain line per stage start and end, in the main process."""

    def __init__(self, items: list[WorkItem]):
        from cl_bidsapp.workflows.base import node_name

        self.by_wf = {f"{node_name(it.bids_name)}_wf": it for it in items}
        self.total = len(items) * len(STAGE_WORDS)
        self.done = 0
        self.started: dict[str, float] = {}

    def item_of(self, fullname: str) -> WorkItem | None:
        for part in fullname.split("."):
            if part in self.by_wf:
                return self.by_wf[part]
        return None

    def __call__(self, node, status):
        stage = node.name
        item = self.item_of(node.fullname)
        if item is None or stage not in STAGE_WORDS:
            return
        key = node.fullname
        if status == "start":
            self.started[key] = time.monotonic()
            LOGGER.info("%s: %s ...", item.bids_name, STAGE_WORDS[stage])
        elif status in ("end", "exception"):
            self.done += 1
            took = time.monotonic() - self.started.pop(key, time.monotonic())
            verb = "done" if status == "end" else "FAILED"
            LOGGER.info("%s: %s %s (%.1f s) [%d/%d stages]", item.bids_name,
                        STAGE_WORDS[stage], verb, took, self.done, self.total)
            if status == "end":
                for text in _stage_warnings(node):
                    LOGGER.warning("%s: %s", item.bids_name, text)


def _stage_warnings(node) -> list[str]:
    """The warnings a finished stage reported (also in the record and the report)."""
    try:
        warnings = getattr(node.result.outputs, "warnings", None)
    except Exception:  # noqa: BLE001 - a progress line must never fail the run
        return []
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def _configure_nipype(wf, settings, crash_dir: Path) -> None:
    from nipype import config as ncfg
    from nipype import logging as nlogging

    log_dir = settings.effective_work_dir() / "nipype-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    # failures are summarised by cl-bidsapp itself; Nipype's own tracebacks only with -vv
    level = "INFO" if settings.verbosity > 1 else "CRITICAL"
    ncfg.update_config({"logging": {"log_directory": str(log_dir), "log_to_file": False,
                                    "workflow_level": level, "interface_level": level,
                                    "utils_level": level},
                        "execution": {"poll_sleep_duration": "0.05"}})
    nlogging.update_logging(ncfg)
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir), "crashfile_format": "txt",
        "poll_sleep_duration": 0.05, "stop_on_first_crash": settings.stop_on_first_crash,
        "hash_method": "timestamp", "remove_unnecessary_outputs": False,
        "parameterize_dirs": False, "check_version": False,
        "resource_monitor": settings.resource_monitor,
    })


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Failure|Exception))\s*:\s*(.*)$")


def _read_crash(path: Path) -> tuple[str, str, str]:
    """(node fullname, exception class, message) from a Nipype text crash file."""
    text = path.read_text(errors="replace")
    node = ""
    match = re.search(r"^Node:\s*(\S+)", text, re.M)
    if match:
        node = match.group(1)
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    cls, message = "Error", lines[-1] if lines else "unknown error"
    for i in range(len(lines) - 1, -1, -1):
        m = _ERROR_LINE.match(lines[i].strip())
        if m and not lines[i].startswith(" ") and "RuntimeError: Traceback" not in lines[i]:
            cls = m.group(1)
            tail = [ln.strip() for ln in lines[i + 1:] if ln.strip().startswith("hint:")]
            message = m.group(2) + ("\n  " + tail[0] if tail else "")
            break
    return node, cls, message


def collect_failures(items, settings, crash_dir: Path, progress: _Progress) -> list[Failure]:
    """Images whose record was not written by this run, with the reason from the crash file."""
    crashes: dict[str, tuple[Path, str, str]] = {}
    for crash in sorted(crash_dir.glob("crash-*.txt")):
        node, cls, message = _read_crash(crash)
        item = progress.item_of(node)
        if item is not None and item.bids_name not in crashes:
            crashes[item.bids_name] = (crash, cls, message)
    failures = []
    for item in items:
        rec = record_path(settings.output_dir, item.subject, item.bids_name)
        ok = False
        if rec.is_file():
            try:
                ok = json.loads(rec.read_text()).get("run_id") == settings.run_id
            except (OSError, json.JSONDecodeError):
                ok = False
        if ok:
            continue
        crash, cls, message = crashes.get(item.bids_name, (None, "Error",
                                                           "did not finish (see the log)"))
        code = int(_EXIT_BY_NAME.get(cls, ExitCode.UNSPECIFIED))
        if code == ExitCode.TEMPORARY and "hint:" not in message:
            if "memory" not in message.lower():
                message = f"out of memory ({message})"
            message = f"{message}\n  hint: {OOM_ADVICE}"
        failures.append(Failure(item, message, code, crash))
    return failures


def _record_failure(failure: Failure, settings) -> None:
    """Write the failed image's record; copy its crash file into the subject's log folder."""
    item = failure.item
    log_dir = subject_log_dir(settings.output_dir, item.subject, settings.run_id)
    crash_copy = None
    if failure.crash_file is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        crash_copy = log_dir / failure.crash_file.name
        shutil.copyfile(failure.crash_file, crash_copy)
        failure.crash_file = crash_copy
    path = record_path(settings.output_dir, item.subject, item.bids_name)
    write_json(path, {
        "bids_name": item.bids_name, "subject": item.subject, "session": item.session,
        "contrast": item.contrast, "rule": item.rule, "status": "failed",
        "run_id": settings.run_id, "error": failure.message, "exit_code": failure.exit_code,
        "crash_file": str(crash_copy.relative_to(settings.output_dir)) if crash_copy else None,
        "inputs": {k: (str(v) if v else None) for k, v in
                   (("image", item.image), ("inv1", item.inv1), ("inv2", item.inv2))},
        "earlier_outputs": _outputs_of_earlier_success(path, settings.output_dir),
        "software": software_versions(),
    })


def _outputs_of_earlier_success(record: Path, output_dir: Path) -> dict | None:
    """What an earlier successful run left of this image, which this failed run did not
    replace (its derivatives are kept: the failure may be passing, e.g. out of memory)."""
    import json

    try:
        earlier = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict):
        return None
    if earlier.get("status") == "failed":       # carried from run to run until one succeeds
        earlier = earlier.get("earlier_outputs")
        if not isinstance(earlier, dict):
            return None
        outputs = earlier.get("files")
    elif earlier.get("status") == "ok":
        outputs = earlier.get("outputs")
        outputs = list(outputs.values()) if isinstance(outputs, dict) else None
    else:
        return None
    files = sorted(str(rel) for rel in outputs or []
                   if isinstance(rel, str) and (Path(output_dir) / rel).is_file())
    if not files:
        return None
    return {"run_id": earlier.get("run_id"), "finished": earlier.get("finished"),
            "files": files}


#: Space one image needs at 1 mm in the work folder (intermediate volumes) and the outputs
WORK_MB_PER_IMAGE = 400
MIN_FREE_MB = 200


def check_free_space(folder: Path, n_items: int, what: str) -> None:
    """Refuse to start (exit 74) when the folder's disk cannot hold even one image."""
    from cl_bidsapp.errors import IOFailure

    usage = shutil.disk_usage(folder)
    free_mb = usage.free / 2**20
    need = WORK_MB_PER_IMAGE * max(1, n_items)
    if free_mb < MIN_FREE_MB:
        raise IOFailure(f"the {what} has only {free_mb:.0f} MB free; at least {MIN_FREE_MB} MB "
                        f"are needed to start (about {WORK_MB_PER_IMAGE} MB per 1 mm image)",
                        path=folder, hint="free space or choose another folder")
    if free_mb < need:
        LOGGER.warning("the %s has %.0f MB free; %d image(s) may need up to %d MB", what,
                       free_mb, n_items, need)


def remove_stale_temporaries(output_dir: Path, subjects: set[str]) -> None:
    """Delete partial files a killed run left in the folders of the subjects about to run."""
    from cl_bidsapp.io import leftover_temporaries

    for subject in subjects:
        folder = Path(output_dir) / f"sub-{subject}"
        if folder.is_dir():
            for path in leftover_temporaries(folder):
                LOGGER.info("removing a partial file from an interrupted run: %s", path)
                path.unlink(missing_ok=True)


def run_participant(settings, items: list[WorkItem], raw_description: dict) -> list[Failure]:
    """Process every planned image; return the failures (empty when all succeeded)."""
    from concurrent.futures.process import BrokenProcessPool

    from cl_bidsapp.cli.environment import prepare_environment, resolve_device
    from cl_bidsapp.models.registry import resolve_model
    from cl_bidsapp.workflows.base import init_cl_wf

    work_dir = settings.effective_work_dir()
    _, omp = _default_threads(settings, len(items))
    prepare_environment(work_dir, omp)
    model = resolve_model(settings.model, settings.models_dir)
    model.select_folds(settings.folds)    # a wrong --folds fails now, not after brain extraction
    check_free_space(work_dir, len(items), "work folder")
    check_free_space(settings.output_dir, len(items), "output folder")
    unusable = [Failure(it, it.problem, int(ExitCode.DATA_ERROR)) for it in items if it.problem]
    subjects = sorted({it.subject for it in items})
    items = [it for it in items if not it.problem]
    remove_stale_temporaries(settings.output_dir, {it.subject for it in items})
    LOGGER.info("Model: %s %s (sha256 %s…)%s", model.name, model.version, model.sha256[:12],
                " — DEMO model trained on phantoms" if model.is_demo else "")
    device, lines = resolve_device(settings.device)
    for line in lines:
        LOGGER.info("%s", line)
    opts = build_options(settings, items, model, device, raw_description)

    write_dataset_files(settings.output_dir, raw_description, settings.bids_dir)
    for subject in subjects:
        save_settings(settings, subject_log_dir(settings.output_dir, subject, settings.run_id))

    if not items:
        for failure in unusable:
            _record_failure(failure, settings)
        return unusable
    wf = init_cl_wf(items, opts)
    wf.base_dir = str(work_dir)
    crash_dir = work_dir / "crash" / settings.run_id
    crash_dir.mkdir(parents=True, exist_ok=True)
    _configure_nipype(wf, settings, crash_dir)
    plugin, plugin_args = _plugin(settings)
    progress = _Progress(items)
    if plugin in ("MultiProc", "Linear"):
        plugin_args["status_callback"] = progress
    LOGGER.info("Participant level: %d image(s), %d subject(s), plugin %s %s", len(items),
                len({it.subject for it in items}), plugin,
                {k: v for k, v in plugin_args.items() if k != "status_callback"})
    t0 = time.monotonic()
    run_error: RuntimeError | None = None
    pool_broken = False
    runner = plugin
    if plugin == "MultiProc":
        from cl_bidsapp.workflows.multiproc import ResilientMultiProcPlugin

        runner = ResilientMultiProcPlugin(plugin_args=plugin_args)
    try:
        wf.run(plugin=runner, plugin_args=plugin_args)
    except BrokenProcessPool:
        pool_broken = True
    except RuntimeError as exc:
        # Nipype re-raises the first node error once every other node has run; the crash
        # files say which images failed and why
        run_error = exc
    except OSError as exc:
        raise OutputError(f"the work folder failed ({exc.strerror or exc})", path=work_dir,
                          hint="check free space and permissions, or choose another -w") from None
    failures = collect_failures(items, settings, crash_dir, progress)
    if pool_broken:
        for failure in failures:
            if failure.crash_file is None:
                failure.message = ("a worker process was killed before this image finished, "
                                   "almost always because the machine ran out of memory\n  "
                                   f"hint: {OOM_ADVICE}")
                failure.exit_code = int(ExitCode.TEMPORARY)
    if run_error is not None and not failures:
        crashed = [_read_crash(c)[0] for c in sorted(crash_dir.glob("crash-*.txt"))]
        if not crashed or any(progress.item_of(node) is not None for node in crashed):
            raise run_error
        # only subject-level nodes (the report) failed: every image is done and the main
        # process rebuilds the pages
        LOGGER.warning("every image was processed, but the workflow could not finish: %s "
                       "failed (the reports are rebuilt at the end of the run)",
                       ", ".join(sorted(set(crashed))))
    failures = unusable + failures
    for failure in failures:
        _record_failure(failure, settings)
    done = len(items) - len(failures)
    LOGGER.info("Participant level finished in %.0f s: %d of %d image(s) processed",
                time.monotonic() - t0, done, len(items))
    return failures

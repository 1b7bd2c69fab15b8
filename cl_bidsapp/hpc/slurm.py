"""SLURM job arrays for cl-bidsapp: one array task per participant, then one group job.

This is the pattern fMRIPrep and MRIQC users run: each task runs the whole app (in Apptainer
or not) with MultiProc on the CPUs SLURM gave it, so nothing inside the task needs ``sbatch``.
Everything about one submission lives in a *job folder* (``<work>/slurm/<stamp>/``):

``participants.txt``
    one label per line; array task ``i`` takes line ``i + 1``.
``participant.sbatch``, ``group.sbatch``
    the job scripts (plain bash: they can be read, edited and resubmitted by hand).
``job.json``
    what was submitted: paths, command, resources, job IDs.
``logs/``
    one log per task (``participant-<array>_<task>.log``) and for the group job.
``status/sub-<label>.json``, ``status/group.json``
    written by each task when the app returns, with its exit code. A task killed by SLURM
    (time limit, memory) writes none; :func:`collect_status` then asks ``scontrol`` why.

>>> plan = ArrayPlan(bids_dir=Path("/data/bids"), output_dir=Path("/data/out"),
...                  work_dir=Path("/scratch/work"), labels=["01", "02"],
...                  job_dir=Path("/scratch/work/slurm/x"), app=["cl-bidsapp"])
>>> "#SBATCH --array=0-1" in participant_script(plan)
True
"""
from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cl_bidsapp import __version__
from cl_bidsapp.errors import ExitCode, UsageError
from cl_bidsapp.io import write_error, write_json, write_text

logger = logging.getLogger(__name__)

PARTICIPANTS_FILE = "participants.txt"
JOB_FILE = "job.json"
FINISHED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                   "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
EXIT_MEANING = {int(code): code.name.lower().replace("_", " ") for code in ExitCode}
EXIT_MEANING.update({65: "bad input data", 66: "required input missing",
                     73: "cannot create output", 74: "I/O error", 75: "temporary failure",
                     137: "killed (SIGKILL; often out of memory)", 143: "terminated (SIGTERM)"})


@dataclass
class ArrayPlan:
    """One submission: what to run, on whom, with which SLURM resources."""

    bids_dir: Path
    output_dir: Path
    work_dir: Path
    labels: list[str]
    job_dir: Path
    app: list[str]                      # command that runs cl-bidsapp (maybe in a container)
    tool: list[str] = field(default_factory=list)  # command that runs cl-bidsapp-slurm
    app_args: list[str] = field(default_factory=list)
    cpus: int = 4
    mem: str | None = "16G"
    time: str | None = "24:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    max_parallel: int | None = None
    group: bool = True

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def participant_labels(bids_dir: Path, requested: Sequence[str] | None = None) -> list[str]:
    """Participants to process: ``requested`` (labels or files of labels, ``sub-`` stripped,
    checked against the dataset), else every ``sub-*`` folder.

    Only folder names are read, so this is instant on the login node even for large datasets.

    Raises
    ------
    UsageError
        A requested label has no ``sub-<label>`` folder, or the dataset has no participants.
    """
    from cl_bidsapp.cli.parser import read_label_file

    present = sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())
    words: list[str] = []
    for value in requested or []:  # a value may be a file with one label per line
        path = Path(value)
        words.extend(read_label_file(path) if path.is_file() else [value])
    requested = words
    if not requested:
        if not present:
            raise UsageError("no sub-* folders: is this the root of a BIDS dataset?",
                             path=bids_dir)
        return present
    labels = []
    for label in requested:
        label = label[4:] if label.startswith("sub-") else label
        if label not in labels:
            labels.append(label)
    unknown = [label for label in labels if label not in present]
    if unknown:
        raise UsageError(f"no such participant(s): {', '.join(unknown)}", path=bids_dir,
                         hint=f"participants here: {', '.join(present[:20]) or 'none'}"
                              + (" ..." if len(present) > 20 else ""))
    return labels


def _q(args: Sequence[str | Path]) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _directive(flag: str, value: str | Path) -> str:
    """An ``#SBATCH`` line; sbatch splits directives at spaces unless the value is quoted.

    >>> _directive("--chdir", "/scratch/my work/job")
    '#SBATCH --chdir="/scratch/my work/job"'
    >>> _directive("--chdir", "/scratch/job")
    '#SBATCH --chdir=/scratch/job'
    """
    text = str(value)
    if '"' in text or "\n" in text:
        raise UsageError(f"a path in a SLURM directive cannot contain '\"' or a line break: "
                         f"{text!r}", hint="use a work folder with a plain name")
    return f'#SBATCH {flag}="{text}"' if any(c.isspace() for c in text) else \
        f"#SBATCH {flag}={text}"


def _header(plan: ArrayPlan, name: str, output: str) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", _directive("--output", output),
             _directive("--chdir", plan.job_dir), f"#SBATCH --cpus-per-task={plan.cpus}"]
    if plan.mem:
        lines.append(f"#SBATCH --mem={plan.mem}")
    if plan.time:
        lines.append(f"#SBATCH --time={plan.time}")
    if plan.partition:
        lines.append(f"#SBATCH --partition={plan.partition}")
    if plan.account:
        lines.append(f"#SBATCH --account={plan.account}")
    lines += [f"#SBATCH {arg}" for arg in plan.sbatch_args]
    return lines


# Bash shared by both scripts: record the app's exit code atomically for collect_status.
_STATUS_FUNCTION = r'''
write_status() {  # write_status NAME EXIT_CODE STARTED LOG
  local tmp="$JOB_DIR/status/.$1.json.$$"
  printf '{"name": "%s", "exit_code": %d, "job_id": "%s", "host": "%s", "started": "%s", "finished": "%s", "log": "%s"}\n' \
    "$1" "$2" "${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}" \
    "$(hostname)" "$3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$4" > "$tmp" && mv -f "$tmp" "$JOB_DIR/status/$1.json"
}
'''


def _resource_flags(plan: ArrayPlan) -> str:
    """--nprocs/--mem from what SLURM granted, unless the user set them."""
    given = set(plan.app_args)
    flags = []
    if not given & {"--nprocs", "--nthreads", "--n_cpus"}:
        flags.append('--nprocs "${SLURM_CPUS_PER_TASK:-1}"')
    if not given & {"--mem", "--mem-mb", "--mem_mb"}:
        flags.append('${SLURM_MEM_PER_NODE:+--mem "$SLURM_MEM_PER_NODE"}')  # MB
    return " ".join(flags)


def participant_script(plan: ArrayPlan) -> str:
    """The array job script: task ``i`` runs the participant level on line ``i + 1``."""
    n = len(plan.labels)
    array = f"0-{n - 1}" + (f"%{plan.max_parallel}" if plan.max_parallel else "")
    lines = _header(plan, "cl-bidsapp", f"{plan.job_dir}/logs/participant-%A_%a.log")
    lines.insert(2, f"#SBATCH --array={array}")
    lines += [
        f"# Written by cl-bidsapp-slurm {__version__}: one participant per array task.",
        "set -uo pipefail",
        f"JOB_DIR={shlex.quote(str(plan.job_dir))}",
        _STATUS_FUNCTION,
        'LABEL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$JOB_DIR/participants.txt")',
        'if [ -z "$LABEL" ]; then echo "no participant for task $SLURM_ARRAY_TASK_ID" >&2; '
        "exit 64; fi",
        'STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)',
        'LOG="$JOB_DIR/logs/participant-${SLURM_ARRAY_JOB_ID:-0}_${SLURM_ARRAY_TASK_ID}.log"',
        'echo "cl-bidsapp-slurm: sub-$LABEL on $(hostname), job '
        '${SLURM_ARRAY_JOB_ID:-?}_${SLURM_ARRAY_TASK_ID}, ${SLURM_CPUS_PER_TASK:-1} CPU(s)"',
        f"{_q(plan.app)} {_q([plan.bids_dir, plan.output_dir])} participant "
        f'--participant-label "$LABEL" -w {shlex.quote(str(plan.work_dir))}/"sub-$LABEL" '
        f"{_resource_flags(plan)} {_q(plan.app_args)}".rstrip(),
        "CODE=$?",
        'write_status "sub-$LABEL" "$CODE" "$STARTED" "$LOG"',
        'echo "cl-bidsapp-slurm: sub-$LABEL finished with exit code $CODE"',
        'exit "$CODE"', ""]
    return "\n".join(lines)


def group_script(plan: ArrayPlan) -> str:
    """The group job: report the array's failures, then run the group level on all outputs."""
    lines = _header(plan, "cl-bidsapp-group", f"{plan.job_dir}/logs/group-%j.log")
    lines += [
        f"# Written by cl-bidsapp-slurm {__version__}: runs after every array task ended "
        "(afterany), whatever their outcome; the group level uses the outputs that exist.",
        "set -uo pipefail",
        f"JOB_DIR={shlex.quote(str(plan.job_dir))}",
        _STATUS_FUNCTION,
        'STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)',
        'LOG="$JOB_DIR/logs/group-${SLURM_JOB_ID:-0}.log"',
    ]
    if plan.tool:
        lines.append(f'{_q(plan.tool)} status "$JOB_DIR" --participants-only || true')
    lines += [
        f"{_q(plan.app)} {_q([plan.bids_dir, plan.output_dir])} group "
        f'--participant-label "$JOB_DIR/{PARTICIPANTS_FILE}" '
        f"-w {shlex.quote(str(plan.work_dir))}/group {_resource_flags(plan)} "
        f"{_q(plan.app_args)}".rstrip(),
        "CODE=$?",
        'write_status group "$CODE" "$STARTED" "$LOG"',
        'exit "$CODE"', ""]
    return "\n".join(lines)


def write_job_folder(plan: ArrayPlan) -> dict[str, Path]:
    """Write the participants list, both scripts and ``job.json``; return the scripts."""
    for sub in ("logs", "status"):
        try:
            (plan.job_dir / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, Path(exc.filename or plan.job_dir),
                              "cannot create the job folder") from None
    write_text(plan.job_dir / PARTICIPANTS_FILE, "".join(f"{x}\n" for x in plan.labels))
    scripts = {"participant": plan.job_dir / "participant.sbatch"}
    write_text(scripts["participant"], participant_script(plan))
    if plan.group:
        scripts["group"] = plan.job_dir / "group.sbatch"
        write_text(scripts["group"], group_script(plan))
    write_json(plan.job_dir / JOB_FILE, {"cl_bidsapp": __version__, "plan": plan.to_json(),
                                         "jobs": {}})
    return scripts


Runner = Callable[[list[str]], str]


def run_command(args: list[str]) -> str:
    """Run a SLURM client; return its stdout, or raise UsageError with its message."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UsageError(f"'{args[0]}' was not found: is this a SLURM login node?",
                         hint="load the SLURM module, or export SLURM_CONF for a local "
                              "cluster") from None
    if proc.returncode != 0:
        raise UsageError(f"{args[0]} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def submit(plan: ArrayPlan, run: Runner = run_command) -> dict[str, str]:
    """Write the job folder and submit the array, then the group job after it (``afterany``)."""
    scripts = write_job_folder(plan)
    jobs = {"participant": run(["sbatch", "--parsable", str(scripts["participant"])])
            .strip().split(";")[0]}
    if plan.group:
        jobs["group"] = run(["sbatch", "--parsable",
                             f"--dependency=afterany:{jobs['participant']}",
                             str(scripts["group"])]).strip().split(";")[0]
    record = json.loads((plan.job_dir / JOB_FILE).read_text())
    record["jobs"] = jobs
    write_json(plan.job_dir / JOB_FILE, record)
    return jobs


def load_job(job_dir: Path) -> dict:
    path = Path(job_dir) / JOB_FILE
    if not path.is_file():
        raise UsageError("not a cl-bidsapp-slurm job folder (no job.json)", path=job_dir,
                         hint="job folders are under <work_dir>/slurm/")
    return json.loads(path.read_text())


def active_jobs(job_ids: Sequence[str], run: Runner = run_command) -> list[tuple[str, str]]:
    """``(job id, state)`` of the jobs (and array tasks) SLURM still queues or runs."""
    if not job_ids:
        return []
    try:
        out = run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(job_ids)])
    except UsageError as exc:
        if "Invalid job id" in str(exc):  # every job already left the queue
            return []
        raise
    return [tuple(line.split()[:2]) for line in out.splitlines() if len(line.split()) >= 2]


def wait(job_ids: Sequence[str], poll_s: float = 5.0, run: Runner = run_command,
         on_change: Callable[[list[tuple[str, str]]], None] | None = None,
         timeout_s: float | None = None) -> None:
    """Poll ``squeue`` until none of ``job_ids`` is pending or running (faster than
    ``sbatch --wait``, and works for jobs submitted earlier)."""
    start, last = time.monotonic(), None
    while True:
        active = active_jobs(job_ids, run)
        if active != last and on_change is not None:
            on_change(active)
        last = active
        if not active:
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"jobs {', '.join(job_ids)} still queued after {timeout_s:.0f} s")
        time.sleep(poll_s)


_TASK_RE = re.compile(r"ArrayTaskId=(\d+)\s.*?JobState=(\S+)")


def slurm_states(array_id: str, run: Runner = run_command) -> dict[int, str]:
    """Array task index -> SLURM state (e.g. TIMEOUT), while the controller remembers them."""
    try:
        out = run(["scontrol", "-o", "show", "job", array_id])
    except UsageError:
        return {}
    states = {}
    for line in out.splitlines():
        match = _TASK_RE.search(line)
        if match:
            states[int(match.group(1))] = match.group(2)
    return states

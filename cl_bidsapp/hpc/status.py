"""Which participants of a SLURM submission succeeded, failed, or never finished, and why.

Reads the job folder written by :mod:`cl_bidsapp.hpc.slurm`: each task's status file (the
app's exit code), the tail of its log (the app's one-paragraph error), and, for tasks that
wrote no status because SLURM killed them, the state ``scontrol`` still remembers (TIMEOUT,
OUT_OF_MEMORY, CANCELLED...).

>>> TaskStatus("01", state="failed", exit_code=65).describe()
'exit 65 (bad input data)'
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cl_bidsapp.hpc.slurm import (EXIT_MEANING, FINISHED_STATES, PARTICIPANTS_FILE, Runner,
                                  active_jobs, load_job, run_command, slurm_states)

#: what a task's SLURM state means when the task itself could not say
KILLED_BY_SLURM = {"TIMEOUT": "killed at the time limit (raise --time)",
                   "OUT_OF_MEMORY": "killed for using more memory than asked (raise --mem)",
                   "CANCELLED": "cancelled", "NODE_FAIL": "its node failed",
                   "PREEMPTED": "preempted", "BOOT_FAIL": "its node did not boot",
                   "DEADLINE": "missed its deadline", "FAILED": "failed before the app ran"}


@dataclass
class TaskStatus:
    """The outcome of one participant (or of the group job)."""

    name: str                     # participant label, or "group"
    state: str                    # ok | failed | running | unknown
    exit_code: int | None = None
    reason: str = ""              # the app's error line or SLURM's verdict
    log: str | None = None

    def describe(self) -> str:
        if self.state == "ok":
            return "ok"
        if self.state == "running":
            return "still queued or running"
        text = ""
        if self.exit_code is not None:
            text = f"exit {self.exit_code} ({EXIT_MEANING.get(self.exit_code, 'error')})"
        if self.reason:
            text = f"{text}: {self.reason}" if text else self.reason
        return text or "unknown"


def error_lines(log: Path, limit: int = 3) -> list[str]:
    """The app's user-facing error lines (``cl-bidsapp: error: ...``) from a task log."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = [ln.strip() for ln in lines if ln.startswith("cl-bidsapp: error:")
             or ln.startswith("  sub-")]
    return found[-limit:]


def _from_file(name: str, path: Path) -> TaskStatus | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    code = int(data.get("exit_code", 1))
    log = data.get("log")
    reason = ""
    if code != 0 and log:
        reason = " | ".join(ln.removeprefix("cl-bidsapp: error: ") for ln in
                            error_lines(Path(log)))
    return TaskStatus(name, "ok" if code == 0 else "failed", code, reason, log)


def collect_status(job_dir: Path, run: Runner = run_command,
                   ask_slurm: bool = True) -> tuple[list[TaskStatus], TaskStatus | None]:
    """The participants' outcomes in array order, and the group job's (None if not submitted).

    ``ask_slurm`` queries ``squeue``/``scontrol`` about tasks without a status file; without
    SLURM (or with ``ask_slurm=False``) they are reported as unknown.
    """
    job_dir = Path(job_dir)
    job = load_job(job_dir)
    labels = (job_dir / PARTICIPANTS_FILE).read_text().split()
    jobs = job.get("jobs", {})
    array_id = jobs.get("participant")
    states: dict[int, str] = {}
    queued: set[str] = set()
    if ask_slurm and array_id:
        try:
            queued = {job_id for job_id, _ in active_jobs(list(jobs.values()), run)}
        except Exception:  # noqa: BLE001 - SLURM unreachable: report from files only
            queued = set()
        states = slurm_states(array_id, run)
    out = []
    for index, label in enumerate(labels):
        log = str(job_dir / "logs" / f"participant-{array_id}_{index}.log")
        status = _from_file(label, job_dir / "status" / f"sub-{label}.json")
        if status is not None:
            out.append(status)
            continue
        state = states.get(index, "")
        if f"{array_id}_{index}" in queued or state in ("PENDING", "RUNNING", "CONFIGURING",
                                                        "COMPLETING"):
            out.append(TaskStatus(label, "running", log=log))
        elif state in FINISHED_STATES or state:
            out.append(TaskStatus(label, "failed", reason=f"SLURM says {state}: "
                                  + KILLED_BY_SLURM.get(state, "no exit code was recorded"),
                                  log=log))
        else:
            out.append(TaskStatus(label, "unknown" if not queued else "running",
                                  reason="no exit code recorded (killed, or not started?)",
                                  log=log))
    group = None
    if job["plan"].get("group"):
        group = _from_file("group", job_dir / "status" / "group.json")
        if group is None:
            group_id = jobs.get("group")
            running = bool(group_id) and group_id in queued
            group = TaskStatus("group", "running" if running else "unknown",
                               reason="" if running else "the group job has not reported")
    return out, group


def format_report(job_dir: Path, statuses: list[TaskStatus], group: TaskStatus | None,
                  participants_only: bool = False) -> str:
    """Plain-text report: one line per participant, then the failures named together."""
    job = load_job(job_dir)
    jobs = job.get("jobs", {})
    lines = [f"cl-bidsapp-slurm: {len(statuses)} participant(s), array job "
             f"{jobs.get('participant', '?')} ({job_dir})"]
    for s in statuses:
        mark = {"ok": "ok", "running": "RUNNING"}.get(s.state, "FAILED")
        where = f"\n            log: {s.log}" if s.state in ("failed", "unknown") and s.log else ""
        lines.append(f"  {mark:8s} sub-{s.name}" + ("" if s.state == "ok" else
                                                      f"  {s.describe()}") + where)
    if group is not None and not participants_only:
        lines.append(f"  group level (job {jobs.get('group', '?')}): {group.describe()}")
    bad = [s.name for s in statuses if s.state in ("failed", "unknown")]
    running = [s.name for s in statuses if s.state == "running"]
    if bad:
        lines.append(f"{len(bad)} of {len(statuses)} participant(s) failed: {' '.join(bad)}")
        lines.append("  rerun them: cl-bidsapp-slurm submit ... --participant-label "
                     + " ".join(bad))
    elif running:
        lines.append(f"{len(running)} participant(s) still queued or running")
    else:
        lines.append(f"all {len(statuses)} participant(s) succeeded")
    return "\n".join(lines)


def report_exit_code(statuses: list[TaskStatus], group: TaskStatus | None,
                     participants_only: bool = False) -> int:
    """0 when everything succeeded; 75 while anything still runs; else 1."""
    everything = list(statuses) + ([group] if group is not None and not participants_only
                                   else [])
    if any(s.state in ("failed", "unknown") for s in everything):
        return 1
    if any(s.state == "running" for s in everything):
        return 75
    return 0

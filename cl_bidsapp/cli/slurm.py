"""``cl-bidsapp-slurm``: run cl-bidsapp on a SLURM cluster, one array task per participant.

Examples::

    # submit: one task per participant (Apptainer image, GPU), then the group level after them
    cl-bidsapp-slurm submit /data/bids /data/out -w /scratch/work \\
        --container cl-bidsapp-0.1.0.sif --gpu --cpus-per-task 8 --mem 32G --time 4:00:00 \\
        -- --model cl-2025 --no-tta
    # later (or add --wait to submit): which participants failed, and why
    cl-bidsapp-slurm status /scratch/work/slurm/20250101-120000
    cl-bidsapp-slurm wait /scratch/work/slurm/20250101-120000

Options after ``--`` go to cl-bidsapp itself (both levels) and are checked before anything is
submitted. ``--nprocs`` and ``--mem`` default to what SLURM grants each task.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from datetime import datetime
from pathlib import Path

from cl_bidsapp import __version__
from cl_bidsapp.cli.parser import positive_int
from cl_bidsapp.errors import CLBidsAppError, ExitCode, MissingInputError, UsageError

LOGGER = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cl-bidsapp-slurm", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Exit codes: 0 all succeeded, 1 some participant or the group failed, "
                       "64 usage, 75 jobs still queued or running.")
    p.add_argument("--version", action="version", version=f"cl-bidsapp-slurm v{__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="submit the participant array and the group job",
                       usage="%(prog)s bids_dir output_dir [options] [-- cl-bidsapp options]")
    s.add_argument("bids_dir", type=Path)
    s.add_argument("output_dir", type=Path)
    s.add_argument("--participant-label", "--participant_label", dest="participant_label",
                   nargs="+", metavar="LABEL",
                   help="participants (default: every sub-* folder), or a file of labels")
    s.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                   help="scratch folder: each participant works in <work>/sub-<label>, the job "
                        "folder is <work>/slurm/<date-time> (default: ./work)")
    g = s.add_argument_group("How the app runs in each task")
    g.add_argument("--container", type=Path, metavar="IMAGE.sif",
                   help="run the app in this Apptainer/Singularity image (default: this "
                        "Python's cl-bidsapp, no container)")
    g.add_argument("--gpu", action="store_true",
                   help="ask SLURM for one GPU per task (--gres=gpu:1) and pass --nv")
    g.add_argument("--bind", nargs="+", default=[], metavar="SRC[:DST[:OPTS]]",
                   help="more Apptainer bind mounts (e.g. a models folder)")
    g.add_argument("--apptainer", default="apptainer", metavar="CMD",
                   help="apptainer or singularity")
    g.add_argument("--app-command", metavar="CMD",
                   help="any other command that runs cl-bidsapp (e.g. a wrapper that loads "
                        "an environment); it gets the usual arguments appended")
    g = s.add_argument_group("SLURM resources (per participant)")
    g.add_argument("--cpus-per-task", type=positive_int, default=4, metavar="N")
    g.add_argument("--mem", default="16G", help="memory per task, SLURM syntax (16G)")
    g.add_argument("--time", default="24:00:00", help="time limit per task")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--max-parallel", type=positive_int, metavar="N",
                   help="at most N participants at once (--array=...%%N)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra sbatch option for both jobs, e.g. --sbatch-arg=--qos=long")
    g = s.add_argument_group("Flow")
    g.add_argument("--no-group", dest="group", action="store_false",
                   help="do not submit the group job")
    g.add_argument("--wait", action="store_true",
                   help="stay until every job ended, then report (polls squeue)")
    g.add_argument("--poll", type=float, default=10.0, metavar="S", help="seconds between polls")
    g.add_argument("--dry-run", action="store_true",
                   help="write the job folder and print the scripts; submit nothing")

    for name, text in (("status", "report which participants failed (and why)"),
                       ("wait", "wait until the jobs ended, then report")):
        c = sub.add_parser(name, help=text)
        c.add_argument("job_dir", type=Path, help="the job folder <work>/slurm/<date-time>")
        c.add_argument("--participants-only", action="store_true",
                       help="leave the group job out of the report and exit code")
        if name == "wait":
            c.add_argument("--poll", type=float, default=10.0, metavar="S")
    return p


def _check_app_args(bids_dir: Path, output_dir: Path, app_args: list[str]) -> None:
    """Refuse options cl-bidsapp would refuse, before anything waits in a queue."""
    from cl_bidsapp.cli.parser import build_parser as app_parser

    for flag in ("--participant-label", "--participant_label", "-w", "--work-dir"):
        if flag in app_args:
            raise UsageError(f"give {flag} to cl-bidsapp-slurm itself, not after '--'")
    return app_parser().parse_args([str(bids_dir), str(output_dir), "participant", *app_args])


def _container_commands(args, paths: list[Path]) -> tuple[list[str], list[str]]:
    binds = []
    for path in paths:
        binds += ["-B", f"{path}:{path}" + (":ro" if path == paths[0] else "")]
    for extra in args.bind:
        binds += ["-B", extra]
    base = [args.apptainer]
    opts = ["--cleanenv", *(["--nv"] if args.gpu else []), *binds]
    image = str(args.container.resolve())
    return ([*base, "run", *opts, image], [*base, "exec", *opts, image, "cl-bidsapp-slurm"])


def make_plan(args, app_args: list[str]):
    from cl_bidsapp.cli.parser import check_output_owner, check_paths
    from cl_bidsapp.hpc.slurm import ArrayPlan, participant_labels

    bids_dir, output_dir = args.bids_dir.resolve(), args.output_dir.resolve()
    work_dir = args.work_dir.resolve()
    if not bids_dir.is_dir():
        raise MissingInputError("the BIDS folder does not exist", path=args.bids_dir)
    check_paths(bids_dir, output_dir, work_dir)
    check_output_owner(output_dir)
    app_opts = _check_app_args(bids_dir, output_dir, app_args)
    labels = participant_labels(bids_dir, args.participant_label)
    if args.container is not None and args.app_command:
        raise UsageError("give --container or --app-command, not both")
    if args.app_command:
        app = shlex.split(args.app_command)
        tool = [sys.executable, "-m", "cl_bidsapp.cli.slurm"]
    elif args.container is not None:
        if not args.container.is_file():
            raise MissingInputError("the container image does not exist", path=args.container)
        app, tool = _container_commands(args, [bids_dir, output_dir, work_dir])
    else:
        app = [sys.executable, "-m", "cl_bidsapp"]
        tool = [sys.executable, "-m", "cl_bidsapp.cli.slurm"]
        # the tasks run this installation: a missing or damaged model fails now, not after
        # hours in the queue (inside a container only the tasks can see its models)
        from cl_bidsapp.models.registry import resolve_model

        resolve_model(app_opts.model, app_opts.models_dir)
    sbatch_args = list(args.sbatch_arg) + (["--gres=gpu:1"] if args.gpu else [])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    job_dir = work_dir / "slurm" / stamp
    n = 1
    while job_dir.exists():
        n += 1
        job_dir = work_dir / "slurm" / f"{stamp}-{n}"
    return ArrayPlan(bids_dir=bids_dir, output_dir=output_dir, work_dir=work_dir,
                     labels=labels, job_dir=job_dir, app=app, tool=tool, app_args=app_args,
                     cpus=args.cpus_per_task, mem=args.mem, time=args.time,
                     partition=args.partition, account=args.account,
                     sbatch_args=sbatch_args, max_parallel=args.max_parallel,
                     group=args.group)


def _report(job_dir: Path, participants_only: bool) -> int:
    from cl_bidsapp.hpc.status import collect_status, format_report, report_exit_code

    statuses, group = collect_status(job_dir)
    print(format_report(job_dir, statuses, group, participants_only))
    return report_exit_code(statuses, group, participants_only)


def _wait(job_dir: Path, poll: float, participants_only: bool) -> int:
    from cl_bidsapp.hpc.slurm import load_job, wait

    jobs = load_job(job_dir).get("jobs", {})

    def progress(active):
        LOGGER.info("%d job(s)/task(s) queued or running: %s", len(active),
                    " ".join(f"{i}:{s}" for i, s in active[:8]) + (" ..." if len(active) > 8
                                                                    else ""))

    wait(list(jobs.values()), poll_s=poll, on_change=progress)
    return _report(job_dir, participants_only)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, app_args = argv[:cut], argv[cut + 1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s",
                        datefmt="%H:%M:%S")
    try:
        args = build_parser().parse_args(argv)
        if app_args and args.command != "submit":
            raise UsageError("options after '--' are for 'submit' only")
        if args.command == "status":
            return _report(args.job_dir, args.participants_only)
        if args.command == "wait":
            return _wait(args.job_dir, args.poll, args.participants_only)
        from cl_bidsapp.hpc.slurm import submit, write_job_folder

        plan = make_plan(args, app_args)
        if args.dry_run:
            scripts = write_job_folder(plan)
            for path in scripts.values():
                print(f"# {path}\n{path.read_text()}")
            print(f"dry run: nothing submitted; job folder {plan.job_dir}")
            return int(ExitCode.OK)
        jobs = submit(plan)
        print(f"submitted {len(plan.labels)} participant(s) as array job {jobs['participant']}"
              + (f", group level as job {jobs['group']} (after the array)"
                 if "group" in jobs else ""))
        print(f"job folder: {plan.job_dir}\nreport:     cl-bidsapp-slurm status "
              f"{shlex.quote(str(plan.job_dir))}")
        if args.wait:
            return _wait(plan.job_dir, args.poll, not plan.group)
        return int(ExitCode.OK)
    except CLBidsAppError as err:
        print(f"cl-bidsapp-slurm: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("cl-bidsapp-slurm: interrupted (submitted jobs keep running; scancel them if "
              "needed)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

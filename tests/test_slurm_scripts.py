"""cl-bidsapp-slurm without a cluster: the job scripts are run with bash as SLURM would run
them (its environment variables set by hand), and the failure report is read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bidsapp.cli.slurm import main
from cl_bidsapp.errors import UsageError
from cl_bidsapp.hpc.slurm import ArrayPlan, participant_labels, submit, write_job_folder
from cl_bidsapp.hpc.status import collect_status, format_report, report_exit_code

# Stands in for cl-bidsapp: records its arguments, fails like the app does for sub-03.
FAKE_APP = r'''
import json, sys
from pathlib import Path
args = sys.argv[1:]
label = args[args.index("--participant-label") + 1] if "--participant-label" in args else None
out = Path(args[1])
out.mkdir(parents=True, exist_ok=True)
(out / f"argv-{args[2]}-{label if label and '/' not in label else 'all'}.json").write_text(
    json.dumps(args))
if label == "03":
    print("cl-bidsapp: error: sub-03_UNIT1.nii.gz: the image file is truncated", file=sys.stderr)
    sys.exit(65)
'''


@pytest.fixture
def dataset(tmp_path):
    bids = tmp_path / "bids data"  # a space: every path in the scripts must be quoted
    for label in ("01", "02", "03"):
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    app = tmp_path / "fake_app.py"
    app.write_text(FAKE_APP)
    return bids, app


def _plan(tmp_path, bids, app, **kw) -> ArrayPlan:
    work = tmp_path / "my work"
    return ArrayPlan(bids_dir=bids, output_dir=tmp_path / "out", work_dir=work,
                     labels=participant_labels(bids), job_dir=work / "slurm" / "job 1",
                     app=[sys.executable, str(app)], app_args=["--no-tta"], **kw)


def _run_task(script: Path, job_dir: Path, index: int, array_id: str = "77") -> int:
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID=array_id,
               SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_NODE="3000")
    log = job_dir / "logs" / f"participant-{array_id}_{index}.log"
    with open(log, "w") as handle:  # SLURM's --output does this
        return subprocess.run(["bash", str(script)], env=env, stdout=handle,
                              stderr=subprocess.STDOUT).returncode


def _record_jobs(job_dir: Path, jobs: dict) -> None:
    record = json.loads((job_dir / "job.json").read_text())
    record["jobs"] = jobs
    (job_dir / "job.json").write_text(json.dumps(record))


def test_participants_are_the_sub_folders_or_the_checked_request(dataset):
    bids, _ = dataset
    assert participant_labels(bids) == ["01", "02", "03"]
    assert participant_labels(bids, ["sub-02", "01", "02"]) == ["02", "01"]
    with pytest.raises(UsageError, match="no such participant.*07") as err:
        participant_labels(bids, ["07"])
    assert "01, 02, 03" in err.value.hint


def test_array_tasks_run_the_app_and_the_report_names_the_broken_participant(tmp_path, dataset):
    bids, app = dataset
    plan = _plan(tmp_path, bids, app)
    scripts = write_job_folder(plan)
    _record_jobs(plan.job_dir, {"participant": "77", "group": "78"})
    codes = [_run_task(scripts["participant"], plan.job_dir, i) for i in range(3)]
    assert codes == [0, 0, 65]  # the task's exit code is the app's: SLURM marks it FAILED

    argv = json.loads((plan.output_dir / "argv-participant-01.json").read_text())
    assert argv[:2] == [str(bids), str(plan.output_dir)]
    assert argv[argv.index("-w") + 1] == str(plan.work_dir / "sub-01")
    # what SLURM granted becomes the app's resources
    assert argv[argv.index("--nprocs") + 1] == "2" and argv[argv.index("--mem") + 1] == "3000"
    assert argv[-1] == "--no-tta"

    statuses, group = collect_status(plan.job_dir, ask_slurm=False)
    assert [(s.name, s.state, s.exit_code) for s in statuses] == [
        ("01", "ok", 0), ("02", "ok", 0), ("03", "failed", 65)]
    assert "the image file is truncated" in statuses[2].reason
    report = format_report(plan.job_dir, statuses, group, participants_only=True)
    assert "1 of 3 participant(s) failed: 03" in report
    assert "exit 65 (bad input data)" in report
    assert report_exit_code(statuses, group, participants_only=True) == 1


def test_group_job_reads_the_same_participants_and_records_its_outcome(tmp_path, dataset):
    bids, app = dataset
    plan = _plan(tmp_path, bids, app, tool=[sys.executable, "-m", "cl_bidsapp.cli.slurm"])
    scripts = write_job_folder(plan)
    _record_jobs(plan.job_dir, {"participant": "77", "group": "78"})
    for i in range(3):
        _run_task(scripts["participant"], plan.job_dir, i)
    env = dict(os.environ, SLURM_JOB_ID="78", SLURM_CPUS_PER_TASK="1")
    proc = subprocess.run(["bash", str(scripts["group"])], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 3 participant(s) failed: 03" in proc.stdout  # logged before the group level
    argv = json.loads((plan.output_dir / "argv-group-all.json").read_text())
    labels_file = Path(argv[argv.index("--participant-label") + 1])
    assert labels_file.read_text().split() == ["01", "02", "03"]
    _, group = collect_status(plan.job_dir, ask_slurm=False)
    assert group.state == "ok"


def test_a_task_killed_by_slurm_is_reported_with_slurms_reason(tmp_path, dataset):
    bids, app = dataset
    plan = _plan(tmp_path, bids, app, group=False)
    scripts = write_job_folder(plan)
    _record_jobs(plan.job_dir, {"participant": "77"})
    _run_task(scripts["participant"], plan.job_dir, 0)  # tasks 1 and 2 never report

    def slurm(args):
        if args[0] == "squeue":
            return "77_2 RUNNING\n"
        return ("JobId=80 ArrayJobId=77 ArrayTaskId=1 JobName=cl-bidsapp JobState=TIMEOUT "
                "Reason=TimeLimit\nJobId=81 ArrayJobId=77 ArrayTaskId=2 JobState=RUNNING\n")

    statuses, group = collect_status(plan.job_dir, run=slurm)
    assert group is None
    assert [s.state for s in statuses] == ["ok", "failed", "running"]
    assert "TIMEOUT" in statuses[1].reason and "--time" in statuses[1].reason
    assert report_exit_code(statuses, group) == 1


def test_still_running_gives_exit_75(tmp_path, dataset):
    bids, app = dataset
    plan = _plan(tmp_path, bids, app, group=False)
    write_job_folder(plan)
    _record_jobs(plan.job_dir, {"participant": "77"})
    statuses, group = collect_status(
        plan.job_dir, run=lambda args: "77_0 RUNNING\n77_1 PENDING\n77_2 PENDING\n"
        if args[0] == "squeue" else "")
    assert {s.state for s in statuses} == {"running"}
    assert report_exit_code(statuses, group) == 75


def test_submit_chains_the_group_job_after_the_whole_array(tmp_path, dataset):
    bids, app = dataset
    plan = _plan(tmp_path, bids, app, max_parallel=2, partition="short")
    calls = []

    def sbatch(args):
        calls.append(args)
        return f"{100 + len(calls)};cluster\n"

    jobs = submit(plan, run=sbatch)
    assert jobs == {"participant": "101", "group": "102"}
    assert calls[1][2] == "--dependency=afterany:101"
    text = Path(calls[0][-1]).read_text()
    assert "#SBATCH --array=0-2%2" in text and "#SBATCH --partition=short" in text
    assert json.loads((plan.job_dir / "job.json").read_text())["jobs"] == jobs


def test_cli_refuses_bad_app_options_before_submitting(tmp_path, dataset, capsys):
    bids, _ = dataset
    work = tmp_path / "w"
    code = main(["submit", str(bids), str(tmp_path / "out"), "-w", str(work), "--",
                 "--no-such-flag"])
    assert code == 64
    assert "--no-such-flag" in capsys.readouterr().err
    assert not (work / "slurm").exists()
    assert main(["submit", str(bids), str(tmp_path / "out"), "-w", str(work),
                 "--participant-label", "09"]) == 64
    assert main(["submit", str(bids), str(bids / "derivatives-not"), "-w", str(work)]) == 64
    # another pipeline's folder as output: refused now, not by every task after the queue
    other = tmp_path / "fmriprep"
    other.mkdir()
    (other / "dataset_description.json").write_text(
        '{"Name": "x", "GeneratedBy": [{"Name": "fMRIPrep"}]}')
    assert main(["submit", str(bids), str(other), "-w", str(work), "--dry-run"]) == 64
    assert "made by fMRIPrep" in capsys.readouterr().err
    # a model typo fails on the login node, not in every task after hours in the queue
    capsys.readouterr()
    assert main(["submit", str(bids), str(tmp_path / "out"), "-w", str(work), "--dry-run",
                 "--", "--model", "no-such-model"]) == 66
    assert "no-such-model" in capsys.readouterr().err
    assert not (work / "slurm").exists()


def test_cli_dry_run_writes_scripts_for_a_container(tmp_path, dataset, capsys):
    bids, _ = dataset
    image = tmp_path / "cl-bidsapp.sif"
    image.write_bytes(b"")
    code = main(["submit", str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "w"),
                 "--container", str(image), "--gpu", "--dry-run", "--", "--no-tta"])
    assert code == 0
    text = capsys.readouterr().out
    assert "apptainer run --cleanenv --nv" in text
    assert f"-B '{bids}:{bids}:ro'" in text
    assert "#SBATCH --gres=gpu:1" in text
    assert "nothing submitted" in text


def test_paths_with_spaces_are_quoted_in_sbatch_directives(tmp_path, dataset, capsys):
    bids, _ = dataset
    work = tmp_path / "my work"
    code = main(["submit", str(bids), str(tmp_path / "out dir"), "-w", str(work), "--dry-run"])
    assert code == 0, capsys.readouterr().err
    script = next((work / "slurm").glob("*/participant.sbatch")).read_text()
    directives = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for flag in ("--output", "--chdir"):
        line = next(ln for ln in directives if ln.startswith(f"#SBATCH {flag}="))
        assert line.startswith(f'#SBATCH {flag}="{work}/') and line.endswith('"'), line
    # sbatch would split an unquoted value at the space: every directive is one word or quoted
    assert all(" " not in ln.split("=", 1)[-1] or ln.split("=", 1)[-1].startswith('"')
               for ln in directives)


@pytest.mark.parametrize("args, message", [
    (["--cpus-per-task", "0"], "expected a positive integer, got '0'"),
    (["--max-parallel", "-1"], "expected a positive integer, got '-1'"),
])
def test_resources_sbatch_would_reject_are_refused_at_once(tmp_path, dataset, capsys, args,
                                                           message):
    bids, _ = dataset
    code = main(["submit", str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "w"),
                 "--dry-run", *args])
    assert code == 64 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_unreadable_label_files_and_work_folders_are_explained(tmp_path, dataset, capsys):
    bids, _ = dataset
    binary = tmp_path / "labels.bin"
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["submit", str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "w"),
                 "--participant-label", str(binary), "--dry-run"]) == 64
    err = capsys.readouterr().err
    assert f"{binary}: cannot read labels" in err and "Traceback" not in err
    blocked = tmp_path / "blocked"
    blocked.write_text("")                # a file where the work folder should be
    code = main(["submit", str(bids), str(tmp_path / "out"), "-w", str(blocked), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 73 and "cannot create the job folder" in err and "Traceback" not in err


def test_labels_can_come_from_a_file(dataset, tmp_path):
    bids, _ = dataset
    listing = tmp_path / "todo.txt"
    listing.write_text("sub-03\n01\n\n")
    assert participant_labels(bids, [str(listing)]) == ["03", "01"]

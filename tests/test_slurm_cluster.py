"""cl-bidsapp-slurm against a real one-node SLURM cluster on localhost (.ci/slurm.sh start).

Skipped unless slurm-wlm and munge are installed and the tests run as root (the cluster runs
with SlurmUser=root and no systemd); .ci/run installs them, so CI runs this. The app is a
stand-in that fails for sub-03 (the real app through SLURM is .ci/slurm.sh's job), so the test
takes seconds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bidsapp.cli.slurm import main

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol")

pytestmark = [
    pytest.mark.skipif(any(shutil.which(t) is None for t in NEEDED),
                       reason="needs slurm-wlm and munge (apt-get install slurm-wlm munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local test cluster runs as root"),
]

FAKE_APP = r'''
import sys, time
args = sys.argv[1:]
label = args[args.index("--participant-label") + 1]
time.sleep(0.5)
if label == "03":
    print("cl-bidsapp: error: sub-03_UNIT1.nii.gz: the image file is truncated", file=sys.stderr)
    sys.exit(65)
'''


@pytest.fixture
def cluster(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh"), "start", str(folder)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh"), "stop", str(folder)])
        pytest.fail(f"the test cluster did not start:\n{proc.stdout}\n{proc.stderr}")
    monkeypatch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
    monkeypatch.setenv("LOGNAME", os.environ.get("LOGNAME") or "root")
    yield folder
    subprocess.run(["bash", str(REPO / ".ci" / "slurm.sh"), "stop", str(folder)], timeout=60)
    for name in ("slurmctld.pid", "slurmd.pid", "munge/munged.pid"):
        pid_file = folder / name
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            assert not Path(f"/proc/{pid}").exists(), f"{name} still running"


def test_array_then_group_and_the_broken_participant_is_reported(cluster, tmp_path, capsys):
    bids = tmp_path / "bids"
    for label in ("01", "02", "03"):
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
    app = tmp_path / "fake_app.py"
    app.write_text(FAKE_APP)
    code = main(["submit", str(bids), str(tmp_path / "out"), "-w", str(tmp_path / "work"),
                 "--app-command", f"{sys.executable} {app}", "--cpus-per-task", "1",
                 "--mem", "500M", "--time", "5:00", "--wait", "--poll", "0.3"])
    out = capsys.readouterr().out
    assert code == 1, out  # one participant failed
    assert "1 of 3 participant(s) failed: 03" in out
    assert "exit 65 (bad input data): sub-03_UNIT1.nii.gz: the image file is truncated" in out

    job_dir = Path(out.split("job folder: ")[1].split()[0])
    status = job_dir / "status"
    tasks = [json.loads((status / f"sub-{x}.json").read_text()) for x in ("01", "02", "03")]
    group = json.loads((status / "group.json").read_text())
    assert group["started"] >= max(t["finished"] for t in tasks)  # afterany, not before
    assert all(t["job_id"].startswith(tasks[0]["job_id"].split("_")[0] + "_") for t in tasks)
    # the group job logged the participants' report before running the group level
    log = (job_dir / "logs" / f"group-{group['job_id']}.log").read_text()
    assert "1 of 3 participant(s) failed: 03" in log

"""A non-editable install (the container's) carries every data file the package reads.

The editable install used for development reads templates and models straight from the source
tree, so a file missing from ``package_data`` only shows up in the container. Build the wheel the
way pip does and compare its contents to the source tree.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cl_bidsapp", "bids_spec")


def _data_files() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if (path.is_file() and path.suffix not in {".py", ".pyc"}
                    and "__pycache__" not in path.parts):
                found.add(path.relative_to(REPO).as_posix())
    return found


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        capture_output=True, text=True, cwd=build, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel, = out.glob("cl_bidsapp-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_has_every_data_file(wheel_names):
    missing = sorted(_data_files() - wheel_names)
    assert not missing, f"package_data in setup.cfg misses {missing}"


def test_wheel_has_the_group_and_subject_report_templates(wheel_names):
    assert "cl_bidsapp/group/templates/group_report.html" in wheel_names
    assert any(n.startswith("cl_bidsapp/reports/templates/") for n in wheel_names)

"""prepare_environment: caches go to the work folder, installed models stay where they are."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cl_bidsapp.cli.environment import CACHE_VARIABLES, NNUNET_VARIABLES, prepare_environment
from cl_bidsapp.group.template import templateflow_home
from cl_bidsapp.models.registry import ENV_MODELS_DIR, default_models_dir


def _isolate(monkeypatch, home: Path) -> None:
    # prepare_environment changes the process's environment and tempfile's cached folder; put
    # both back afterwards, or later tests in this worker write into this test's work folder
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    for name in (*CACHE_VARIABLES, *NNUNET_VARIABLES, "TMPDIR", ENV_MODELS_DIR,
                 "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LOGNAME",
                 "TEMPLATEFLOW_HOME"):
        monkeypatch.setenv(name, "")  # records the original (also "unset") for the undo
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))


def test_caches_move_to_the_work_folder_but_the_models_cache_does_not(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    _isolate(monkeypatch, home)
    before = default_models_dir()  # where `cl-bidsapp-models install` put the user's models
    templates = templateflow_home()  # where `templateflow.api.get` put the user's templates
    work = tmp_path / "work"
    changed = prepare_environment(work, omp_nthreads=2)
    assert Path(os.environ["XDG_CACHE_HOME"]).is_relative_to(work)
    assert Path(os.environ["TMPDIR"]).is_relative_to(work)
    assert default_models_dir() == before and not before.is_relative_to(work)
    assert changed[ENV_MODELS_DIR] == str(before)
    # the group level still finds templates fetched to TemplateFlow's default cache
    assert templateflow_home() == templates and not templates.is_relative_to(work)
    assert os.environ["OMP_NUM_THREADS"] == "2"
    assert os.environ["LOGNAME"]  # Nipype's SLURM plugin fails with KeyError without it


def test_a_users_writable_cache_and_models_folder_are_kept(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    _isolate(monkeypatch, home)
    mine = tmp_path / "xdg"
    mine.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(mine))
    monkeypatch.setenv(ENV_MODELS_DIR, str(tmp_path / "models"))
    changed = prepare_environment(tmp_path / "work")
    assert os.environ["XDG_CACHE_HOME"] == str(mine)
    assert "XDG_CACHE_HOME" not in changed and ENV_MODELS_DIR not in changed
    assert default_models_dir() == tmp_path / "models"

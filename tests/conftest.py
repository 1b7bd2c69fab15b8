"""Shared fixtures.

``shared_data`` points at ../shared/data (test data that is never committed); tests that use it
skip with a reason on a fresh checkout where that folder is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests call the console scripts (cl-bidsapp, cl-bidsapp-models, ...) as users do; make the
# ones installed beside this interpreter win, also when the venv is not activated
# (`.venv/bin/python -m pytest`, as the README's test command runs).
_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _BIN:
    os.environ["PATH"] = os.pathsep.join([_BIN, os.environ.get("PATH", "")])


def _shared_data_dir() -> Path:
    env = os.environ.get("CL_BIDSAPP_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set CL_BIDSAPP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def bids_layouts(shared_data) -> Path:
    return shared_data / "bids-layouts"


@pytest.fixture(scope="session")
def phantom_2mm(tmp_path_factory) -> Path:
    """A 2-subject 3T MP2RAGE phantom dataset at 2 mm (read-only for tests: copy to modify)."""
    from cl_bidsapp.simulate import simulate_dataset

    root = tmp_path_factory.mktemp("phantom") / "bids"
    simulate_dataset(root, n_subjects=2, voxel_size=2.0, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight nnU-Net model with 2 folds (fast; predicts noise)."""
    from cl_bidsapp.models.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models"), folds=(0, 1),
                           patch=(32, 32, 32), features=(4, 8, 16))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test's in-process run changed in the environment.

    ``cl-bidsapp`` called in-process (``cl_bidsapp.cli.run.main``) points TMPDIR and the
    caches into its work folder, as it should in a real process; without this, later tests in
    the same worker would inherit a deleted test's folder (Chromium, for one, fails on the
    long socket path under it).
    """
    import tempfile

    saved, saved_tempdir = dict(os.environ), tempfile.tempdir
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
    tempfile.tempdir = saved_tempdir

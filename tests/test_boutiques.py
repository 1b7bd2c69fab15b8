"""The Boutiques descriptor in bids_spec/ is the parser's, flag for flag."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bids_spec import spec_path
from cl_bidsapp.cli.parser import flag_names
from scripts.make_boutiques import build_descriptor


def test_descriptor_is_up_to_date():
    committed = json.loads(spec_path("boutiques.json").read_text())
    assert committed == json.loads(json.dumps(build_descriptor())), \
        "run: python scripts/make_boutiques.py"


def test_every_flag_in_both():
    descriptor = json.loads(spec_path("boutiques.json").read_text())
    described = {i["command-line-flag"] for i in descriptor["inputs"] if "command-line-flag" in i}
    primary = set()
    from cl_bidsapp.cli.parser import build_parser
    for action in build_parser()._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in ("help", "version"):
            primary.add(longs[0])
    assert primary == described
    assert described <= set(flag_names())
    positional = [i["id"] for i in descriptor["inputs"] if not i["optional"]]
    assert positional == ["bids_dir", "output_dir", "analysis_level"]


def test_numeric_options_are_numbers_with_their_ranges():
    """Platforms that run Boutiques descriptors check values before launching: a count of
    processes must be a positive integer, a threshold a number in [0, 1]."""
    inputs = {i["id"]: i for i in json.loads(spec_path("boutiques.json").read_text())["inputs"]}
    for name in ("nprocs", "omp_nthreads"):
        assert (inputs[name]["type"], inputs[name].get("integer"), inputs[name].get("minimum")
                ) == ("Number", True, 1), name
    for name in ("threshold", "tile_step_size"):
        assert (inputs[name]["type"], inputs[name]["minimum"], inputs[name]["maximum"]) == (
            "Number", 0, 1), name


def test_bosh_validate():
    bosh = shutil.which("bosh")
    if bosh is None:
        pytest.skip("boutiques (bosh) not installed")
    proc = subprocess.run([bosh, "validate", str(spec_path("boutiques.json"))],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr

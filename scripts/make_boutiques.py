#!/usr/bin/env python
"""Regenerate ``bids_spec/boutiques.json`` from the command-line parser.

The descriptor is derived, never edited by hand; ``tests/test_boutiques.py`` fails when it is
out of date with the parser. Run: ``python scripts/make_boutiques.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl_bidsapp import __version__  # noqa: E402
from cl_bidsapp.cli.parser import (_probability, _step, build_parser,  # noqa: E402
                                   positive_int)

_PATHLIKE = {"bids_dir", "output_dir", "bids_filter_file", "bids_database_dir", "work_dir",
             "use_plugin", "config_file", "models_dir", "reference_masks"}
_FILES = {"bids_filter_file", "use_plugin", "config_file"}


def _input(action: argparse.Action) -> dict:
    dest = action.dest
    entry: dict = {"id": dest, "name": dest.replace("_", " "),
                   "description": (action.help or "").replace("%(default)s", str(action.default)),
                   "value-key": f"[{dest.upper()}]"}
    flag = next((s for s in action.option_strings if s.startswith("--")), None)
    if flag:
        entry["command-line-flag"] = flag
    nargs = action.nargs
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        entry["type"] = "Flag"
    elif isinstance(action, argparse._CountAction):
        entry["type"] = "Flag"
    elif dest in _PATHLIKE:
        entry["type"] = "File" if dest in _FILES or dest in ("bids_dir",) else "String"
    elif action.type in (int, positive_int):
        entry["type"] = "Number"
        entry["integer"] = True
        entry["minimum"] = 1
    elif action.type in (_probability, _step):
        entry["type"] = "Number"
        entry["minimum"] = 0
        entry["maximum"] = 1
    else:
        entry["type"] = "String"
    if action.choices and entry["type"] == "String":
        entry["value-choices"] = list(action.choices)
    if nargs in ("+", "*"):
        entry["list"] = True
    entry["optional"] = bool(action.option_strings)
    if dest == "analysis_level":
        entry["value-choices"] = ["participant", "group"]
        entry["list"] = True
    return entry


def build_descriptor() -> dict:
    parser = build_parser()
    inputs = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        inputs.append(_input(action))
    positional = [i for i in inputs if not i["optional"]]
    optional = [i for i in inputs if i["optional"]]
    command = "cl-bidsapp " + " ".join(i["value-key"] for i in positional + optional)
    return {
        "name": "cl-bidsapp",
        "tool-version": __version__,
        "schema-version": "0.5",
        "description": parser.description,
        "author": "cl-bidsapp developers",
        "url": "https://github.com/cl-bidsapp/cl-bidsapp",
        "command-line": command,
        "container-image": {"type": "docker", "image": f"clbidsapp/cl-bidsapp:{__version__}"},
        "inputs": positional + optional,
        "output-files": [
            {"id": "derivatives_dataset", "name": "derivatives dataset", "path-template": "[OUTPUT_DIR]",
             "description": "BIDS derivatives dataset with lesion maps, tables and reports"}],
        "suggested-resources": {"cpu-cores": 2, "ram": 8, "walltime-estimate": 3600},
        "tags": {"domain": ["neuroinformatics", "mri", "multiple-sclerosis", "bids"]},
        "error-codes": [
            {"code": 1, "description": "unspecified error"},
            {"code": 16, "description": "BIDS validation failed"},
            {"code": 17, "description": "unknown analysis level"},
            {"code": 18, "description": "filters selected no files"},
            {"code": 64, "description": "usage error"},
            {"code": 65, "description": "bad input data"},
            {"code": 66, "description": "required input missing"},
            {"code": 73, "description": "cannot create output"},
            {"code": 74, "description": "I/O error"},
            {"code": 75, "description": "temporary failure (e.g. out of memory)"},
        ],
    }


def main() -> int:
    target = ROOT / "bids_spec" / "boutiques.json"
    target.write_text(json.dumps(build_descriptor(), indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

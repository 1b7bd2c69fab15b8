"""The command line: ``cl-bidsapp bids_dir output_dir {participant,group} [options]``.

All argument checks that need no dataset index happen here, once, before any work starts.
Argument errors exit 64 (usage), never argparse's 2; an unknown analysis level exits 17.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import re
import tomllib
from pathlib import Path

from cl_bidsapp import __version__
from cl_bidsapp.bids.entities import is_valid_label
from cl_bidsapp.config import Settings
from cl_bidsapp.errors import (MissingInputError, OutputError, UnknownLevel, UsageError)

LEVELS = ("participant", "group")


class _Parser(argparse.ArgumentParser):
    """argparse with BIDS-App exit codes instead of SystemExit(2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got '{text}'") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got '{text}'")
    return value


def _step(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got '{text}'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got '{text}'")
    return value


_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_memory_gb(text: str) -> float:
    """Memory with optional units, in GB (a bare number means MB, as in fMRIPrep).

    >>> parse_memory_gb("16GB"), parse_memory_gb("16000"), parse_memory_gb("1.5t")
    (16.0, 16.0, 1500.0)
    """
    match = _MEM_RE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read memory '{text}' (examples: 16GB, 8000MB)")
    value, unit = float(match.group(1)), (match.group(2).lower() or "m")
    scale = {"k": 1e-6, "m": 1e-3, "g": 1.0, "t": 1e3}[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory must be positive, got '{text}'")
    return value * scale


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(mm3|vox|voxels?)?\s*$", re.IGNORECASE)


def parse_min_size(text: str) -> str:
    """Minimum lesion size: voxels (``3``, ``3vox``) or cubic millimetres (``10mm3``).

    >>> parse_min_size("3"), parse_min_size("10mm3")
    ('3', '10mm3')
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(
            f"cannot read minimum lesion size '{text}' (examples: 3 for voxels, 10mm3)")
    value, unit = match.group(1), (match.group(2) or "").lower()
    if unit == "mm3":
        return f"{value}mm3"
    if float(value) != int(float(value)):
        raise argparse.ArgumentTypeError("a size in voxels must be a whole number")
    return str(int(float(value)))


def _folds(text: str) -> str:
    if text == "all" or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"folds are integers or 'all', got '{text}'")


def _folds_setting(values: list[str]) -> list[int] | None:
    """The settings' folds from checked ``--folds`` values: None (the model's) for 'all'."""
    return None if "all" in values else sorted({int(f) for f in values})


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: X)`` only where it says something the help text does not."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or isinstance(default, bool) or default in ([], argparse.SUPPRESS)
                or isinstance(action, argparse._CountAction) or "default" in text):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser, with argument groups as in fMRIPrep/MRIQC."""
    p = _Parser(
        prog="cl-bidsapp",
        description="Cortical-lesion segmentation in MP2RAGE/MPRAGE MRI with nnU-Net v2, as a "
                    "BIDS App (method: Molchanova et al. 2025, arXiv 2507.12092).",
        formatter_class=_DefaultsFormatter,
        epilog="Exit codes: 0 ok, 1 unspecified, 16 BIDS validation failed, 17 unknown analysis "
               "level, 18 no files selected, 64 usage, 65 bad input data, 66 input missing, "
               "73 cannot create output, 74 I/O error, 75 temporary failure.")
    p.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset")
    p.add_argument("output_dir", type=Path,
                   help="where derivatives go (e.g. <bids_dir>/derivatives/cl-bidsapp)")
    p.add_argument("analysis_level", nargs="+", metavar="{participant,group}",
                   help="participant: segment each image; group: aggregate all participants' "
                        "outputs (both may be given)")
    p.add_argument("--version", action="version", version=f"cl-bidsapp v{__version__}")

    g = p.add_argument_group("Selecting inputs")
    g.add_argument("--participant-label", "--participant_label", dest="participant_label",
                   nargs="+", metavar="LABEL",
                   help="participants to process (with or without 'sub-'), or a file with one "
                        "label per line; default: all")
    g.add_argument("--session-label", "--session_label", dest="session_label", nargs="+",
                   metavar="LABEL", help="sessions to process (with or without 'ses-')")
    g.add_argument("--bids-filter-file", "--bids_filter_file", dest="bids_filter_file",
                   type=Path, metavar="FILE",
                   help='JSON {query: {entity: value}} overriding the input queries of '
                        'bids_spec/inputs.json (queries: uni, t1w, mprage, inv1, inv2, t1map; '
                        'null = entity absent, "*" = any value)')
    g.add_argument("--skip-bids-validation", "--skip_bids_validation",
                   dest="skip_bids_validation", action="store_true",
                   help="do not run bids-validator-deno on the selected inputs")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="keep (and reuse) the pybids index here; delete it to re-index")
    g.add_argument("-d", "--derivatives", nargs="+", metavar="NAME=PATH", default=[],
                   help="precomputed derivatives to reuse (brain masks named "
                        "*_desc-brain_mask.nii.gz), e.g. -d masks=/data/derivatives/masks")
    g.add_argument("--reference-masks", type=Path, metavar="PATH",
                   help="a derivatives folder of manual CL masks (*_label-CL_mask.nii.gz); "
                        "the group level then evaluates the predictions against them")

    g = p.add_argument_group("Segmentation")
    g.add_argument("--model", metavar="NAME|PATH",
                   help="installed model name, model folder or zip (default: the bundled demo "
                        "model, trained on simulated phantoms only)")
    g.add_argument("--models-dir", type=Path, metavar="DIR",
                   help="model cache folder (default: $CL_BIDSAPP_MODELS or the user cache)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where nnU-Net runs; auto uses a GPU when one is visible")
    g.add_argument("--folds", nargs="+", type=_folds, metavar="K",
                   help="model folds to ensemble ('all' or numbers; default: the model's folds)")
    g.add_argument("--no-tta", dest="tta", action="store_false",
                   help="disable mirroring test-time augmentation (8x faster on CPU)")
    g.add_argument("--tile-step-size", type=_step, default=0.5, metavar="S",
                   help="sliding-window step as a fraction of the patch")
    g.add_argument("--threshold", type=_probability, metavar="P",
                   help="probability threshold (default: the model card's)")
    g.add_argument("--min-lesion-size", type=parse_min_size, metavar="N|Nmm3",
                   help="smallest lesion kept, in voxels or mm3 (default: the model card's)")
    g.add_argument("--skull-strip", choices=("auto", "skip", "force"), default="auto",
                   help="auto: strip unless the input is already brain-extracted")
    g.add_argument("--skull-strip-tool", choices=("deepbet", "synthstrip"), default="deepbet",
                   help="brain-extraction tool (synthstrip must be installed)")

    g = p.add_argument_group("Performance")
    g.add_argument("--nprocs", "--nthreads", "--n_cpus", dest="nprocs", type=positive_int,
                   metavar="N", help="maximum number of parallel processes (default: all CPUs)")
    g.add_argument("--omp-nthreads", type=positive_int, metavar="N",
                   help="threads per process (torch, ITK); default: --nprocs shared by the "
                        "images (all for one image, 1 each when there are --nprocs or more)")
    g.add_argument("--mem", "--mem-mb", "--mem_mb", dest="mem", metavar="MEM",
                   help="memory limit, e.g. 16GB (a bare number means MB)")
    g.add_argument("--use-plugin", type=Path, metavar="FILE",
                   help="Nipype plugin YAML ({plugin: MultiProc, plugin_args: {...}})")
    g.add_argument("--resource-monitor", action="store_true",
                   help="record time and memory of each Nipype node")

    g = p.add_argument_group("Workflow")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="intermediate results; reruns resume from it (default: ./work)")
    g.add_argument("--stop-on-first-crash", action="store_true",
                   help="stop everything at the first failure instead of finishing others")
    g.add_argument("--reports-only", action="store_true",
                   help="rebuild reports from existing derivatives without recomputing")
    g.add_argument("--boilerplate-only", action="store_true",
                   help="write the methods paragraph (logs/CITATION.md) and stop")
    g.add_argument("--dry-run", action="store_true",
                   help="print the work plan (what would be processed, and why) and stop; "
                        "exit 65 when an image's files cannot be used")
    g.add_argument("--config-file", type=Path, metavar="FILE",
                   help="settings TOML saved by an earlier run (command-line flags win)")
    g.add_argument("-v", "--verbose", dest="verbosity", action="count", default=0,
                   help="more log output (-vv for debug)")
    g.add_argument("--notrack", action="store_true",
                   help="accepted for compatibility; cl-bidsapp never sends telemetry")
    return p


def _read_labels(values: list[str] | None, prefix: str) -> list[str] | None:
    if not values:
        return None
    labels: list[str] = []
    for value in values:
        path = Path(value)
        labels.extend(read_label_file(path) if path.is_file() else [value])
    out = []
    for label in labels:
        clean = label[len(prefix):] if label.startswith(prefix) else label
        if not is_valid_label(clean):
            raise UsageError(f"invalid {prefix.rstrip('-')} label '{label}'",
                             hint="BIDS labels contain only letters and digits")
        if clean not in out:
            out.append(clean)
    return out


def read_label_file(path: Path) -> list[str]:
    """The labels in a text file (one per line, or separated by spaces); usage error (64)
    naming the file when it cannot be read as text."""
    try:
        return path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read labels from this file ({exc})", path=path,
                         hint="give a text file with one label per line") from None


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_paths(bids_dir: Path, output_dir: Path, work_dir: Path | None,
                work_given: bool = True) -> None:
    """Refuse outputs or work folders that would write into the raw dataset.

    ``work_given`` False: ``work_dir`` is the default ``./work`` (the message then says so).
    """
    bids = bids_dir.resolve()
    out = output_dir.resolve()
    suggestion = f"use {bids / 'derivatives' / 'cl-bidsapp'} or a folder outside the dataset"
    if out == bids:
        raise UsageError("output_dir is the BIDS dataset itself: outputs would mix with raw "
                         "data", path=output_dir, hint=suggestion)
    if out == bids / "derivatives":
        raise UsageError("output_dir is the dataset's derivatives/ folder itself: each "
                         "pipeline writes into its own folder below it", path=output_dir,
                         hint=suggestion)
    if _inside(out, bids) and not _inside(out, bids / "derivatives"):
        raise UsageError("output_dir is inside the BIDS dataset (outside its derivatives/ "
                         "folder)", path=output_dir, hint=suggestion)
    if _inside(bids, out):
        raise UsageError("output_dir contains the BIDS dataset", path=output_dir,
                         hint=suggestion)
    if work_dir is not None:
        work = work_dir.resolve()
        if _inside(work, bids) or work == bids:
            what = ("the work folder" if work_given else
                    "the default work folder (./work in the current folder)")
            raise UsageError(f"{what} is inside the BIDS dataset", path=work_dir,
                             hint="use a scratch folder outside the dataset, e.g. -w /tmp/work")


def check_output_owner(output_dir: Path) -> None:
    """Refuse an output folder that holds another pipeline's (or a raw) dataset.

    cl-bidsapp rewrites ``dataset_description.json`` and adds files at the top of its output
    folder; in a folder another tool made, that would destroy the other tool's metadata.
    """
    description = output_dir / "dataset_description.json"
    if not description.is_file():
        return
    try:
        data = json.loads(description.read_text(encoding="utf-8"))
        names = [g.get("Name") for g in data.get("GeneratedBy") or [] if isinstance(g, dict)]
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        names = None
    from cl_bidsapp.bids.derivatives import APP_NAME

    if names and names[0] == APP_NAME:
        return
    owner = (f"made by {names[0]}" if names else "not made by cl-bidsapp"
             if names is not None else "with an unreadable dataset_description.json")
    raise UsageError(f"output_dir already holds a dataset {owner}; cl-bidsapp would overwrite "
                     "its dataset_description.json", path=output_dir,
                     hint="give cl-bidsapp a folder of its own, e.g. "
                          "<bids_dir>/derivatives/cl-bidsapp")


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` if needed and prove it is writable (exit 73 otherwise)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cl-bidsapp-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to the {what} ({exc.strerror or exc})", path=folder,
                          hint="check permissions, free space and that the disk is mounted "
                               "read-write") from None


def _parse_derivatives(values: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for i, value in enumerate(values):
        name, sep, path = value.partition("=")
        if not sep:
            name, path = f"deriv{i}", value
        if not name or not path:
            raise UsageError(f"cannot read --derivatives '{value}'", hint="use NAME=PATH")
        path_obj = Path(path)
        if not path_obj.is_dir():
            raise MissingInputError("the derivatives folder does not exist", path=path_obj)
        out[name] = path_obj.resolve()
    return out


def _load_config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        raise MissingInputError("the config file does not exist", path=path)
    try:
        sections = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"the config file is not valid TOML ({exc})", path=path) from None
    return _config_settings(sections, path, parser)


#: Settings with no flag of their own (or a flag that stores another form), as Python types.
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "bids_dir": (str,), "output_dir": (str,), "analysis_levels": (list,),
    "bids_filters": (dict, str), "derivatives": (dict,), "mem_gb": (int, float),
    "run_id": (str,), "version": (str,), "verbosity": (int,),
}


def _config_settings(sections: dict, path: Path, parser: argparse.ArgumentParser) -> dict:
    """A config file's sections with every value checked and converted as its flag would be
    (exit 64 naming the file and the ``[section] key`` otherwise).

    >>> _config_settings({"execution": {"nprocs": "4"}, "segmentation": {"folds": ["all"]}},
    ...                  Path("my.toml"), build_parser())
    {'execution': {'nprocs': 4}, 'segmentation': {'folds': None}}
    >>> _config_settings({"segmentation": {"threshhold": 0.5}}, Path("my.toml"), build_parser())
    Traceback (most recent call last):
    ...
    cl_bidsapp.errors.UsageError: my.toml: [segmentation] threshhold: unknown setting
      hint: did you mean 'threshold'?
    """
    import dataclasses
    import difflib

    fields = {f.name for f in dataclasses.fields(Settings)}
    actions = {a.dest: a for a in parser._actions}
    out: dict[str, dict] = {}
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise UsageError(f"'{section}' is not in a [section]", path=path,
                             hint="write settings under their section, as a run saves them "
                                  "(e.g. [segmentation] then threshold = 0.5)")
        for key, value in values.items():
            where = f"[{section}] {key}"
            if key not in fields:
                close = difflib.get_close_matches(key, sorted(fields), n=1)
                raise UsageError(f"{where}: unknown setting", path=path,
                                 hint=f"did you mean '{close[0]}'?" if close else
                                 "settings are the long options with '_' for '-', "
                                 "e.g. threshold, min_lesion_size, nprocs")
            try:
                out.setdefault(section, {})[key] = _config_value(key, value, actions.get(key))
            except (argparse.ArgumentTypeError, ValueError, UsageError) as exc:
                problem = exc.message if isinstance(exc, UsageError) else str(exc)
                raise UsageError(f"{where} = {value!r}: {problem}", path=path) from None
    return out


def _config_value(key: str, value, action: argparse.Action | None):
    """``value`` from a config file as the flag ``action`` would store it; ValueError (or
    ArgumentTypeError) saying what is wrong otherwise."""
    if key in _CONFIG_TYPES or action is None:
        types = _CONFIG_TYPES.get(key, (str,))
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"expected {' or '.join(t.__name__ for t in types)}")
        if key == "mem_gb" and value <= 0:
            raise ValueError("memory must be positive")
        if key == "analysis_levels" and not set(value) <= set(LEVELS):
            raise ValueError(f"levels are {' and '.join(LEVELS)}")
        if key == "derivatives" and not all(isinstance(v, str) for v in value.values()):
            raise ValueError("expected NAME = \"PATH\" entries")
        if key == "bids_filters" and isinstance(value, str):   # as a run saves it: JSON text
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError("expected a JSON object, as in a --bids-filter-file") from None
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object, as in a --bids-filter-file")
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    many = action.nargs in ("+", "*")
    if many and (not isinstance(value, list) or not value):
        raise ValueError("expected a list, e.g. [\"01\", \"02\"]")
    items = []
    for item in value if many else [value]:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ValueError("expected a number or a string")
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
        if action.type is Path or action.type is None:
            if not isinstance(item, str):
                raise ValueError("expected a string")
            items.append(item)
        else:
            items.append(action.type(str(item)))
    # the forms parse_args gives the flags' values
    if key == "folds":
        return _folds_setting(items)
    if key in ("participant_label", "session_label"):
        return _read_labels(items, "sub-" if key == "participant_label" else "ses-")
    return items if many else items[0]


def _check_plugin(path: Path) -> None:
    import yaml

    if not path.is_file():
        raise MissingInputError("the Nipype plugin file does not exist", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"the plugin file is not valid YAML ({exc})", path=path) from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise UsageError("the plugin file must name a 'plugin' (e.g. plugin: MultiProc)",
                         path=path)


def parse_args(argv: list[str] | None = None) -> Settings:
    """Parse and check the command line; return the run's :class:`Settings`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    opts = parser.parse_args(argv)

    levels = []
    for level in opts.analysis_level:
        if level not in LEVELS:
            raise UnknownLevel(f"unknown analysis level '{level}'",
                               hint="use participant, group, or both")
        if level not in levels:
            levels.append(level)

    base: dict = {}
    if opts.config_file is not None:
        base = _load_config_file(opts.config_file, parser)

    settings = Settings.from_dict(base) if base else Settings()
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
    settings.bids_dir = opts.bids_dir.absolute()
    settings.output_dir = opts.output_dir.absolute()
    settings.analysis_levels = levels

    def take(name: str, value) -> None:
        # a config file provides defaults; flags given on the command line win
        if not base or name in explicit:
            setattr(settings, name, value)

    take("participant_label", _read_labels(opts.participant_label, "sub-"))
    take("session_label", _read_labels(opts.session_label, "ses-"))
    if opts.bids_filter_file is not None:
        from cl_bidsapp.bids.discovery import read_filter_file

        settings.bids_filter_file = opts.bids_filter_file.absolute()
        settings.bids_filters = read_filter_file(opts.bids_filter_file)
    for name in ("skip_bids_validation", "bids_database_dir", "reference_masks", "model",
                 "models_dir", "device", "tta", "tile_step_size", "threshold",
                 "min_lesion_size", "skull_strip", "skull_strip_tool", "nprocs",
                 "omp_nthreads", "use_plugin", "resource_monitor", "work_dir",
                 "stop_on_first_crash", "reports_only", "boilerplate_only", "dry_run",
                 "verbosity", "notrack"):
        take(name, getattr(opts, name))
    if opts.derivatives:
        settings.derivatives = _parse_derivatives(opts.derivatives)
    if opts.folds:
        settings.folds = _folds_setting(opts.folds)
    if opts.mem is not None:
        try:
            settings.mem_gb = parse_memory_gb(opts.mem)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
    for name in ("bids_database_dir", "work_dir", "models_dir", "reference_masks",
                 "use_plugin"):
        value = getattr(settings, name)
        if value is not None:
            setattr(settings, name, Path(value).absolute())

    if settings.use_plugin is not None:
        _check_plugin(settings.use_plugin)
    if settings.reference_masks is not None and not settings.reference_masks.is_dir():
        raise MissingInputError("the reference-masks folder does not exist"
                                if not settings.reference_masks.exists() else
                                "--reference-masks must be a folder (a BIDS derivatives "
                                "dataset of masks), not a file", path=settings.reference_masks)
    if settings.bids_dir.exists():
        if settings.dry_run:      # writes nothing: only an explicit -w can be wrong
            check_paths(settings.bids_dir, settings.output_dir, settings.work_dir)
        else:
            check_paths(settings.bids_dir, settings.output_dir, settings.effective_work_dir(),
                        work_given=settings.work_dir is not None)
            check_output_owner(settings.output_dir)
    if settings.bids_database_dir is not None and settings.bids_dir.exists():
        if _inside(settings.bids_database_dir.resolve(), settings.bids_dir.resolve()):
            raise UsageError("the BIDS database folder is inside the BIDS dataset",
                             path=settings.bids_database_dir,
                             hint="keep it outside, e.g. in the work folder")
    return settings


def flag_names() -> list[str]:
    """Every long option of the parser (the Boutiques descriptor test uses this)."""
    names = []
    for action in build_parser()._actions:
        names.extend(s for s in action.option_strings if s.startswith("--"))
    return names


__all__ = ["build_parser", "parse_args", "parse_memory_gb", "parse_min_size", "check_paths",
           "check_output_owner", "check_writable", "flag_names"]

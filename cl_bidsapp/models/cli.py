"""``cl-bidsapp-models``: install, list, verify and show cortical-lesion models.

Examples::

    cl-bidsapp-models install https://example.org/cl_model.zip --sha256 HEX
    cl-bidsapp-models install Dataset501_CL.zip --card cl_model.json --name cl-2025
    cl-bidsapp-models list
    cl-bidsapp-models verify cl-2025
    cl-bidsapp-models show cl-demo-phantom
    cl-bidsapp-models calibrate cl-2025 /data/in-domain-derivatives --held-out /data/held-out
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from cl_bidsapp import __version__
from cl_bidsapp.errors import CLBidsAppError, ExitCode
from cl_bidsapp.models.install import DOWNLOAD_TIMEOUT_S, install_model
from cl_bidsapp.models.registry import (ENV_MODELS_DIR, InstalledModel, default_models_dir,
                                        list_models, resolve_model)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-bidsapp-models",
        description="Manage the nnU-Net v2 models that cl-bidsapp uses to find cortical lesions. "
                    f"Models live in --models-dir, else ${ENV_MODELS_DIR}, else "
                    f"{default_models_dir()}.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="models cache folder (default: $%(env)s or the user cache)"
                        % {"env": ENV_MODELS_DIR})
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("install", help="install a model folder, zip or URL")
    p.add_argument("source", help="model folder, nnU-Net model zip, or http(s):// URL of a zip")
    p.add_argument("--sha256", help="expected sha256 of the zip/download (or of the card, for "
                                    "a folder); installation stops on a mismatch")
    p.add_argument("--name", help="install under this name (default: the card's name)")
    p.add_argument("--card", type=Path,
                   help="model card (cl_model.json) for a model that comes without one")
    p.add_argument("--force", action="store_true",
                   help="replace an installed model of the same name")
    p.add_argument("--timeout", type=float, default=DOWNLOAD_TIMEOUT_S,
                   help="network timeout in seconds for URLs (default: %(default)s)")

    sub.add_parser("list", help="list installed and bundled models")
    for command, text in (("verify", "check every file of a model against its card"),
                          ("show", "print a model's card and where it is")):
        p = sub.add_parser(command, help=text)
        p.add_argument("model", help="model name, or path to a model folder or zip")
        if command == "show":
            p.add_argument("--json", action="store_true", help="print the card as JSON")

    p = sub.add_parser("calibrate", help="store the out-of-distribution reference of a model "
                                         "(scans you name as in-domain) in its card")
    p.add_argument("model", help="installed model name, or path to a model folder")
    p.add_argument("bids_dir", type=Path,
                   help="in-domain scans: a cl-bidsapp output folder (its embeddings or model "
                        "inputs are used) or a raw BIDS dataset (the participant level runs "
                        "on it first)")
    p.add_argument("--held-out", type=Path, default=None,
                   help="other in-domain scans (same forms) to set the threshold on; without "
                        "them the threshold comes from leave-one-out distances")
    p.add_argument("--quantile", type=float, default=0.95,
                   help="threshold = this quantile of held-out distances (default: "
                        "%(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where participant-level runs on raw BIDS data go (default: a "
                        "temporary folder)")
    p.add_argument("--app-args", default="",
                   help="more participant-level options for raw BIDS data, as one string "
                        "(e.g. \"-d masks=/data/derivatives/masks --nprocs 4\")")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (BIDS-Apps/sysexits codes, see errors.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "install":
            model = install_model(args.source, args.models_dir, name=args.name,
                                  sha256=args.sha256, card_path=args.card, force=args.force,
                                  timeout=args.timeout)
            print(f"installed {model.name} {model.version} at {model.path}")
            print(f"sha256 {model.sha256}")
        elif args.command == "list":
            _print_list(args.models_dir)
        elif args.command == "verify":
            model = resolve_model(args.model, args.models_dir)
            print(f"ok: {model.name} {model.version}: {len(model.card['files'])} files match "
                  f"the card (sha256 {model.sha256})")
        elif args.command == "show":
            model = resolve_model(args.model, args.models_dir)
            if args.json:
                print(json.dumps(model.card, indent=2))
            else:
                print(describe_model(model))
        elif args.command == "calibrate":
            _calibrate(args)
    except CLBidsAppError as exc:
        print(f"cl-bidsapp-models: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.UNSPECIFIED)
    return int(ExitCode.OK)


def describe_model(model: InstalledModel) -> str:
    """Human-readable summary of a model for ``show``."""
    card = model.card
    lines = [
        f"{model.name} {model.version} ({model.source}: {model.path})",
        f"  {card['description']}",
        f"  sha256:        {model.sha256}",
        f"  trained on:    {card['trained_on']}" + ("  [DEMO MODEL: not for real data]"
                                                    if model.is_demo else ""),
        f"  input:         {model.input_image} image; BIDS suffixes "
        f"{', '.join(model.input_contrasts)}; skull-stripped: "
        f"{'yes' if model.skull_stripped else 'no'}",
        f"  recommended:   threshold {model.recommended_threshold}, lesions of at least "
        f"{model.recommended_min_size_voxels} voxels ({model.connectivity}-connectivity)",
        f"  nnU-Net:       {model.trainer} / {card['nnunet']['plans']} / "
        f"{model.configuration}, folds {model.folds}",
        f"  OOD reference: " + (f"{card['ood']['n_scans']} scans, threshold "
                                f"{card['ood']['threshold']}" if card.get("ood") else
                                "none (cl-bidsapp-models calibrate)"),
        f"  licence:       {card['licence']}",
        f"  citation:      {card['citation']}",
    ]
    return "\n".join(lines)


def _calibrate(args) -> None:
    from cl_bidsapp.errors import UsageError
    from cl_bidsapp.models.calibration import calibrate

    if not 0 < args.quantile < 1:
        raise UsageError(f"--quantile must be between 0 and 1, got {args.quantile}")
    model = resolve_model(args.model, args.models_dir)
    card = calibrate(model, args.bids_dir, args.held_out, device=args.device,
                     quantile=args.quantile, work_dir=args.work_dir,
                     app_args=shlex.split(args.app_args))
    print(f"{model.name}: reference of {card['ood']['n_scans']} scans, threshold "
          f"{card['ood']['threshold']:.3f} ({card['ood']['threshold_from']}, quantile "
          f"{card['ood']['quantile']}) written to {model.path / 'cl_model.json'}")


def _print_list(models_dir) -> None:
    entries = list_models(models_dir)
    if not entries:
        print("no models installed")
        return
    for name, path, source, card in entries:
        if card is None:
            print(f"{name:28s} {'?':10s} {source:9s} INVALID CARD (run verify)  {path}")
            continue
        flag = "demo" if card["is_demo"] else ""
        print(f"{name:28s} {card['version']:10s} {source:9s} {flag:5s} {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

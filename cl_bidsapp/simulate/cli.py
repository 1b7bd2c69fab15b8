"""``cl-bidsapp-simulate``: write simulated MP2RAGE/MPRAGE phantoms as a BIDS dataset.

Usage::

    cl-bidsapp-simulate OUT_DIR [--n-subjects 3] [--protocol 3T-MP2RAGE ...] [--seed 0] ...
    cl-bidsapp-simulate montage OUT.png [--seed 0] ...

Errors print one paragraph and exit with the BIDS-Apps codes (64 usage, 73 output, ...).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cl_bidsapp import __version__
from cl_bidsapp.errors import CLBidsAppError, ExitCode

LOGGER = logging.getLogger("cl_bidsapp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse API: usage errors exit 64, not 2
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _protocols(text: str) -> list[str]:
    from cl_bidsapp.simulate.protocols import get_protocol

    names = [t for t in text.replace(",", " ").split() if t]
    try:
        return [get_protocol(name).name for name in names]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(exc.args[0]) from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    from cl_bidsapp.simulate.dataset import DEFAULT_NOISE

    parser.add_argument("--voxel-size", type=float, default=1.0, metavar="MM",
                        help="isotropic voxel size in mm (default 1; 2 gives small test data)")
    parser.add_argument("--lesion-mean", type=float, default=8.0, metavar="N",
                        help="mean number of cortical lesions per subject (default 8)")
    parser.add_argument("--lesion-contrast", type=float, default=1.3, metavar="RATIO",
                        help="lesion T1 / grey-matter T1 (default 1.3: darker than cortex)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE, metavar="SD",
                        help="noise SD relative to the white-matter signal of INV2 or T1w "
                             f"(default {DEFAULT_NOISE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def build_parser() -> argparse.ArgumentParser:
    from cl_bidsapp.simulate.protocols import PROTOCOLS

    parser = _Parser(
        prog="cl-bidsapp-simulate",
        description="Write simulated MP2RAGE/MPRAGE head phantoms with cortical lesions as a BIDS "
                    "dataset, with the ground truth in OUT_DIR/derivatives/reference. "
                    "'cl-bidsapp-simulate montage OUT.png' draws a picture of one phantom "
                    "instead.")
    parser.add_argument("out_dir", help="dataset folder to create (new, empty, or written "
                                        "before by this command)")
    parser.add_argument("--n-subjects", type=int, default=3, metavar="N")
    parser.add_argument("--n-sessions", type=int, default=1, metavar="N")
    parser.add_argument("--protocol", dest="protocols", type=_protocols, action="append",
                        metavar="NAME",
                        help=f"acquisition preset: {', '.join(PROTOCOLS)}; repeat (or give a "
                             "comma-separated list) to mix sites, subjects take them in turn "
                             "(default 3T-MP2RAGE)")
    parser.add_argument("--leukocortical-fraction", type=float, default=0.5, metavar="P",
                        help="share of lesions crossing the grey/white boundary (default 0.5)")
    parser.add_argument("--lesion-volume-scale", type=float, default=1.0, metavar="X",
                        help="multiply lesion volumes (3-300 mm^3 by default); at 2 mm most "
                             "lesions are 3 voxels unless this is raised")
    parser.add_argument("--nprocs", type=int, default=1, metavar="N",
                        help="sessions simulated at once, one process each (about 1.3 GB of "
                             "memory each at 1 mm; default 1)")
    _add_common(parser)
    return parser


def build_montage_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cl-bidsapp-simulate montage",
                     description="Draw INV1, INV2, UNI and MPRAGE of one simulated head with the "
                                 "reference lesions outlined (PNG).")
    parser.add_argument("out_png")
    parser.add_argument("--mp2rage", default="3T-MP2RAGE", help="MP2RAGE preset")
    parser.add_argument("--mprage", default="3T-MPRAGE", help="MPRAGE preset")
    parser.add_argument("--subject", type=int, default=1)
    _add_common(parser)
    return parser


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO)
    LOGGER.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cl-bidsapp-simulate``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    montage = bool(argv) and argv[0] == "montage"
    args = (build_montage_parser() if montage else build_parser()).parse_args(
        argv[1:] if montage else argv)
    _setup_logging(args.verbose)
    start = time.monotonic()
    try:
        if montage:
            from cl_bidsapp.simulate.montage import make_montage

            out = make_montage(args.out_png, args.mp2rage, args.mprage, args.subject, args.seed,
                               args.voxel_size, args.lesion_mean, args.lesion_contrast,
                               args.noise)
        else:
            from cl_bidsapp.simulate.dataset import simulate_dataset

            protocols = [p for group in (args.protocols or [["3T-MP2RAGE"]]) for p in group]
            out = simulate_dataset(args.out_dir, args.n_subjects, args.n_sessions, protocols,
                                   args.voxel_size, args.lesion_mean, args.lesion_contrast,
                                   args.noise, args.seed, args.leukocortical_fraction,
                                   args.lesion_volume_scale, nprocs=args.nprocs)
    except CLBidsAppError as err:
        print(f"cl-bidsapp-simulate: error: {err}", file=sys.stderr)
        return int(err.exit_code)
    except ValueError as err:
        print(f"cl-bidsapp-simulate: error: {err}", file=sys.stderr)
        return int(ExitCode.USAGE)
    except KeyboardInterrupt:
        print("cl-bidsapp-simulate: interrupted; nothing was changed in the target folder",
              file=sys.stderr)
        return 130
    LOGGER.info("wrote %s in %.1f s", out, time.monotonic() - start)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

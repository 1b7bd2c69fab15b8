"""Pre-seed the TemplateFlow folder with the files the group level reads, so runs stay offline.

The group level's lesion frequency map needs MNI152NLin2009cAsym at 1 mm (head T1w and brain
mask) under ``$TEMPLATEFLOW_HOME`` (see :mod:`cl_bidsapp.group.template`). This module puts
them there ahead of time: in the container build, or on an HPC login node before the jobs.

Sources:

``s3``
    TemplateFlow's public S3 bucket. Each download is checked against a sha256 (pinned in
    :data:`PINNED_SHA256`, or given) before it is moved into place; no checksum, no file.
``stand-in``
    For offline tests only. nilearn's MNI152 2009a template and brain mask are saved under the
    MNI152NLin2009cAsym names, with a ``STAND-IN.txt`` notice and a ``template_description.json``
    that say so. Lesion frequency maps made on it are only good for checking the plumbing.
``none``
    Nothing; the group level then writes everything but the frequency map and exits 66.

Command line::

    python -m cl_bidsapp.hpc.templates seed DIR --source s3 [--sha256 "T1W_HEX MASK_HEX"]
    python -m cl_bidsapp.hpc.templates show DIR
    python -m cl_bidsapp.hpc.templates pin DIR      # print the sha256 of files already there

>>> import tempfile
>>> home = Path(tempfile.mkdtemp())
>>> describe(home)
'missing'
>>> parse_sha256s("a" * 64 + " " + "b" * 64)[BRAIN_MASK_NAME][:4]
'bbbb'
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

from cl_bidsapp.errors import CLBidsAppError, InputDataError, TemporaryFailure, UsageError
from cl_bidsapp.group.template import BRAIN_MASK_NAME, T1W_NAME, TEMPLATE
from cl_bidsapp.io import atomic_path, save_nifti, write_json, write_text

logger = logging.getLogger(__name__)

S3_ROOT = "https://templateflow.s3.amazonaws.com"
TEMPLATE_FILES = (T1W_NAME, BRAIN_MASK_NAME)
SOURCES = ("s3", "stand-in", "none")
STAND_IN_NOTICE = "STAND-IN.txt"

#: sha256 of TemplateFlow's files. Unknown until measured on a machine that can reach S3:
#: ``python -m cl_bidsapp.hpc.templates seed DIR --source s3 --trust-first-download`` there,
#: then ``pin DIR`` prints the values to put here. Until then builds pass them explicitly.
PINNED_SHA256: dict[str, str | None] = {T1W_NAME: None, BRAIN_MASK_NAME: None}

_STAND_IN_TEXT = f"""\
TEST STAND-IN, NOT {TEMPLATE}.

The two images in this folder are nilearn's MNI152 2009a template (skull-stripped) and its brain
mask, saved under TemplateFlow's {TEMPLATE} file names so that offline CI can exercise the group
level's template-space lesion frequency map. Maps made on them are for checking the software
only. Build the image with TEMPLATEFLOW=s3 (the default) for real use.
"""


def folder(home: str | Path) -> Path:
    """The template's folder inside a TemplateFlow home."""
    return Path(home) / f"tpl-{TEMPLATE}"


def template_url(name: str, root: str = S3_ROOT) -> str:
    """Where TemplateFlow serves a file.

    >>> template_url(T1W_NAME)
    'https://templateflow.s3.amazonaws.com/tpl-MNI152NLin2009cAsym/tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz'
    """
    return f"{root.rstrip('/')}/tpl-{TEMPLATE}/{name}"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_sha256s(text: str | None) -> dict[str, str]:
    """Checksums from ``"T1W_HEX MASK_HEX"`` (in :data:`TEMPLATE_FILES` order) or ``NAME=HEX``.

    An empty text gives the pinned values that are known.
    """
    out = {name: value for name, value in PINNED_SHA256.items() if value}
    words = (text or "").split()
    for i, word in enumerate(words):
        name, sep, value = word.rpartition("=")
        if not sep:
            if i >= len(TEMPLATE_FILES):
                raise UsageError(f"more sha256 values than template files ({len(TEMPLATE_FILES)})")
            name, value = TEMPLATE_FILES[i], word
        if name not in TEMPLATE_FILES:
            raise UsageError(f"'{name}' is not one of the template files "
                             f"({', '.join(TEMPLATE_FILES)})")
        value = value.lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise UsageError(f"'{value}' is not a sha256 (64 hexadecimal digits)")
        out[name] = value
    return out


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TemporaryFailure(f"cannot download the template ({reason})", path=url,
                               hint="no network here? seed on a machine with one and copy "
                                    "the folder (see docs/hpc.md)") from None


def fetch(home: str | Path, sha256: dict[str, str] | None = None, root: str = S3_ROOT,
          timeout: float = 120.0, trust_first_download: bool = False) -> list[Path]:
    """Download the template files into ``home``, each checked against its sha256.

    Files already in place with the right checksum are kept. A file without a known checksum
    is refused unless ``trust_first_download`` (then its sha256 is logged, to be pinned).

    Raises
    ------
    UsageError
        A file has no checksum to check against.
    InputDataError
        A download does not match its checksum (nothing is put in place).
    TemporaryFailure
        The network failed.
    """
    sums = dict(sha256) if sha256 is not None else parse_sha256s("")
    missing = [name for name in TEMPLATE_FILES if name not in sums]
    if missing and not trust_first_download:
        raise UsageError(
            f"no sha256 to check {', '.join(missing)} against",
            hint="pass the checksums (--sha256 / the TEMPLATEFLOW_SHA256S build argument), or "
                 "pin them in cl_bidsapp/hpc/templates.py after one --trust-first-download")
    paths = []
    for name in TEMPLATE_FILES:
        target = folder(home) / name
        paths.append(target)
        expected = sums.get(name)
        if target.is_file() and expected and sha256_of(target) == expected:
            logger.info("%s is already in place and matches", target)
            continue
        with atomic_path(target) as tmp:
            _download(template_url(name, root), tmp, timeout)
            actual = sha256_of(tmp)
            if expected and actual != expected:
                raise InputDataError(f"downloaded file has sha256 {actual}, expected {expected}",
                                     path=template_url(name, root),
                                     hint="nothing was installed; check the pinned value")
        logger.info("%s sha256 %s%s", target, actual, "" if expected else " (not pinned)")
    return paths


def write_stand_in(home: str | Path) -> list[Path]:
    """Save nilearn's MNI152 2009a template under TemplateFlow's names, marked as a stand-in."""
    import numpy as np
    from nilearn import datasets

    target = folder(home)
    t1w = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    mask_img = mask.__class__(np.asarray(mask.dataobj > 0, dtype=np.uint8), mask.affine)
    mask_img.set_data_dtype(np.uint8)
    paths = [save_nifti(t1w, target / T1W_NAME), save_nifti(mask_img, target / BRAIN_MASK_NAME)]
    write_text(target / STAND_IN_NOTICE, _STAND_IN_TEXT)
    write_json(target / "template_description.json", {
        "Name": f"TEST STAND-IN for {TEMPLATE} (nilearn MNI152 2009a); not the real template",
        "Identifier": TEMPLATE, "StandIn": True,
        "Source": "nilearn.datasets.load_mni152_template(resolution=1)"})
    logger.warning("wrote a TEST STAND-IN for %s in %s", TEMPLATE, target)
    return paths


def describe(home: str | Path) -> str:
    """``'templateflow'``, ``'stand-in'`` or ``'missing'``: what ``home`` holds."""
    target = folder(home)
    if not all((target / name).is_file() and (target / name).stat().st_size
               for name in TEMPLATE_FILES):
        return "missing"
    return "stand-in" if (target / STAND_IN_NOTICE).exists() else "templateflow"


def seed(home: str | Path, source: str, sha256_text: str = "", root: str = S3_ROOT,
         trust_first_download: bool = False) -> list[Path]:
    """Pre-seed ``home`` from ``source`` (one of :data:`SOURCES`); return the files."""
    if source not in SOURCES:
        raise UsageError(f"unknown template source '{source}'",
                         hint=f"choose one of {', '.join(SOURCES)}")
    Path(home).mkdir(parents=True, exist_ok=True)
    if source == "none":
        logger.warning("no templates seeded: the group level will not make frequency maps")
        return []
    if source == "stand-in":
        return write_stand_in(home)
    return fetch(home, parse_sha256s(sha256_text), root=root,
                 trust_first_download=trust_first_download)


def main(argv: list[str] | None = None) -> int:
    """``python -m cl_bidsapp.hpc.templates``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cl_bidsapp.hpc.templates",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seed", help="put the template files in a TemplateFlow folder")
    p.add_argument("home", type=Path, help="the TemplateFlow folder ($TEMPLATEFLOW_HOME)")
    p.add_argument("--source", choices=SOURCES, default="s3")
    p.add_argument("--sha256", default="", help='"T1W_HEX MASK_HEX" or NAME=HEX ...')
    p.add_argument("--s3-root", default=S3_ROOT, help="where TemplateFlow's files are served")
    p.add_argument("--trust-first-download", action="store_true",
                   help="accept files without a known sha256 and print theirs (to pin them)")
    for command, text in (("show", "say what a TemplateFlow folder holds"),
                          ("pin", "print the sha256 of the template files in a folder")):
        sub.add_parser(command, help=text).add_argument("home", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "seed":
            seed(args.home, args.source, args.sha256, args.s3_root, args.trust_first_download)
            print(f"{args.home}: {describe(args.home)}")
        elif args.command == "show":
            print(f"{args.home}: {describe(args.home)}")
        else:
            for name in TEMPLATE_FILES:
                path = folder(args.home) / name
                print(f"{sha256_of(path) if path.is_file() else 'missing':64s}  {name}")
    except CLBidsAppError as exc:
        print(f"cl_bidsapp.hpc.templates: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

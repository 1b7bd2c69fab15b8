"""The MNI152NLin2009cAsym template, read from a pre-seeded TemplateFlow folder, never fetched.

The app does not download anything while it runs. The ``templateflow`` package is not even
imported: importing it with an empty cache starts an S3 synchronisation. The files are looked
up where TemplateFlow keeps them, ``$TEMPLATEFLOW_HOME`` (default: the user cache folder,
``~/.cache/templateflow`` on Linux), and a missing file becomes a
:class:`~cl_bidsapp.errors.MissingInputError` (exit 66) that names it and says how to
pre-fetch it on a machine with internet access. The container image pre-seeds the cache.

>>> import os, tempfile
>>> os.environ["TEMPLATEFLOW_HOME"] = tempfile.mkdtemp()
>>> try:
...     find_template()
... except MissingInputError as err:
...     print(err.exit_code, Path(err.path).name)
66 tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz
>>> del os.environ["TEMPLATEFLOW_HOME"]
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cl_bidsapp.errors import MissingInputError

logger = logging.getLogger(__name__)

TEMPLATE = "MNI152NLin2009cAsym"
RESOLUTION = "01"
T1W_NAME = f"tpl-{TEMPLATE}_res-{RESOLUTION}_T1w.nii.gz"
BRAIN_MASK_NAME = f"tpl-{TEMPLATE}_res-{RESOLUTION}_desc-brain_mask.nii.gz"
PREFETCH_COMMAND = (
    "python -c \"from templateflow import api; "
    f"api.get('{TEMPLATE}', resolution=1, suffix='T1w', desc=None); "
    f"api.get('{TEMPLATE}', resolution=1, desc='brain', suffix='mask')\"")


@dataclass(frozen=True)
class TemplateFiles:
    """The template's head T1w image and its brain mask (1 mm)."""

    t1w: Path
    brain_mask: Path
    name: str = TEMPLATE

    def cache_key(self) -> str:
        """Changes when either file changes (for the registration cache)."""
        parts = []
        for path in (self.t1w, self.brain_mask):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)


def templateflow_home() -> Path:
    """Where TemplateFlow keeps templates: ``$TEMPLATEFLOW_HOME``, else its default cache.

    >>> os.environ["TEMPLATEFLOW_HOME"] = "/opt/templateflow"
    >>> templateflow_home()
    PosixPath('/opt/templateflow')
    >>> del os.environ["TEMPLATEFLOW_HOME"]
    """
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if home:
        return Path(home).expanduser().absolute()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # platformdirs comes with templateflow; be safe without it
        return Path.home() / ".cache" / "templateflow"
    return Path(user_cache_dir("templateflow")).absolute()


def find_template() -> TemplateFiles:
    """The template files, or exit 66 naming the first missing one and how to pre-fetch it.

    Raises
    ------
    MissingInputError
        A file is absent or empty (TemplateFlow leaves a 0-byte file behind when a download
        fails).
    """
    folder = templateflow_home() / f"tpl-{TEMPLATE}"
    paths = (folder / T1W_NAME, folder / BRAIN_MASK_NAME)
    for path in paths:
        if not path.is_file() or path.stat().st_size == 0:
            raise MissingInputError(
                "the MNI152NLin2009cAsym template is not in the TemplateFlow cache, so the "
                "lesion frequency map was not made (everything else was written)", path=path,
                hint="on a machine with internet access run\n    "
                     f"TEMPLATEFLOW_HOME=/some/folder {PREFETCH_COMMAND}\n  then copy that "
                     "folder here and set TEMPLATEFLOW_HOME to it (the container image "
                     "already holds it)")
    logger.debug("template %s found in %s", TEMPLATE, folder)
    return TemplateFiles(*paths)

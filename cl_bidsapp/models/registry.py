"""Where models live, how a name or path becomes a verified model, and what a model offers.

Models are found in three places: the models cache (``--models-dir``, else the environment
variable ``CL_BIDSAPP_MODELS``, else ``~/.cache/cl-bidsapp/models``), the demo model bundled in
the package, or a path to a model folder or zip. Every file is checked against the model card
(sha256) before anything is unpickled.

>>> m = resolve_model(None)          # doctest: +SKIP
>>> m.is_demo, m.input_image         # doctest: +SKIP
(True, 'UNI')
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cl_bidsapp.errors import InputDataError, MissingInputError, OutputError, UsageError
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.archive import find_model_folders, safe_extract_zip

logger = logging.getLogger(__name__)

ENV_MODELS_DIR = "CL_BIDSAPP_MODELS"
DEMO_MODEL_NAME = "cl-demo-phantom"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
UNPACKED_DIRNAME = ".unpacked"


@dataclass(frozen=True)
class InstalledModel:
    """A model whose card and files have been verified.

    Attributes
    ----------
    name : str
        Name the model is known by (its folder in the models cache, else the card's name).
    path : Path
        The model folder (``dataset.json``, ``plans.json``, ``fold_K/...``, ``cl_model.json``).
    card : dict
        The parsed model card.
    sha256 : str
        sha256 of the card file; since the card lists the sha256 of every file, this one value
        identifies the whole model (write it into provenance).
    source : str
        ``"bundled"``, ``"installed"`` or ``"path"``.
    """

    name: str
    path: Path
    card: dict = field(repr=False)
    sha256: str
    source: str = "path"

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def is_demo(self) -> bool:
        """True for models trained on simulated phantoms (the app warns on real data)."""
        return bool(self.card["is_demo"])

    @property
    def recommended_threshold(self) -> float:
        return float(self.card["postprocessing"]["threshold"])

    @property
    def recommended_min_size_voxels(self) -> int:
        """Smallest lesion to keep, in voxels of the source image (26-connected components)."""
        return int(self.card["postprocessing"]["min_lesion_size_voxels"])

    @property
    def connectivity(self) -> int:
        return int(self.card["postprocessing"].get("connectivity", 26))

    @property
    def input_image(self) -> str:
        """Which image the model wants: "UNI" (MP2RAGE), "UNI-DEN" or "T1w" (MPRAGE)."""
        return self.card["input"]["image"]

    @property
    def input_contrasts(self) -> list[str]:
        """BIDS suffixes the model accepts, e.g. ``["UNIT1", "T1w"]``."""
        return list(self.card["input"]["contrasts"])

    @property
    def skull_stripped(self) -> bool:
        """Whether the model input must be brain-extracted (background set to 0)."""
        return bool(self.card["preprocessing"]["skull_stripped"])

    @property
    def background_value(self) -> float:
        return float(self.card["preprocessing"].get("background_value", 0.0))

    @property
    def folds(self) -> list[int | str]:
        return list(self.card["nnunet"]["folds"])

    def select_folds(self, folds=None) -> list[int | str]:
        """The folds to ensemble: ``folds`` (numbers or ``"all"``) checked against the model's,
        or all of the model's when None; a fold the model lacks is a usage error (exit 64).
        """
        available = self.folds
        if folds is None:
            return available
        wanted = []
        for f in folds:
            f = "all" if str(f) == "all" else int(f)
            if f not in available:
                raise UsageError(f"fold {f} is not in model {self.name} "
                                 f"(available: {', '.join(map(str, available))})",
                                 hint="leave out --folds to use all of the model's folds")
            wanted.append(f)
        if not wanted:
            raise UsageError("at least one fold is needed")
        return wanted

    @property
    def configuration(self) -> str:
        return self.card["nnunet"]["configuration"]

    @property
    def trainer(self) -> str:
        return self.card["nnunet"]["trainer"]

    @property
    def checkpoint_name(self) -> str:
        return self.card["nnunet"].get("checkpoint", cards.CHECKPOINT_NAME)

    def checkpoint_path(self, fold: int | str) -> Path:
        return self.path / cards.fold_checkpoint(fold, self.checkpoint_name)

    def provenance(self) -> dict:
        """Name, version and sha256 for JSON sidecars and reports."""
        return {"Name": self.name, "Version": self.version, "SHA256": self.sha256,
                "IsDemo": self.is_demo}


def bundled_models_dir() -> Path:
    """Folder of the models shipped inside the package (the demo model)."""
    return Path(__file__).resolve().parents[1] / "data" / "models"


def default_models_dir() -> Path:
    """The models cache: ``$CL_BIDSAPP_MODELS``, else the user's cache folder.

    >>> import os
    >>> os.environ["CL_BIDSAPP_MODELS"] = "/opt/models"
    >>> str(default_models_dir())
    '/opt/models'
    >>> del os.environ["CL_BIDSAPP_MODELS"]
    """
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("cl-bidsapp", appauthor=False))
    except ImportError:  # platformdirs is a pip dependency, but stay usable without it
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cl-bidsapp"
    return base / "models"


def is_url(text: str) -> bool:
    """True when ``text`` looks like a URL (``https://...``, ``file://...``).

    >>> is_url("https://zenodo.org/model.zip"), is_url("models/cl.zip")
    (True, False)
    """
    return bool(_URL.match(str(text)))


def load_model(path: str | Path, name: str | None = None, source: str = "path",
               verify: bool = True) -> InstalledModel:
    """Read and verify the model in folder ``path``.

    Raises
    ------
    InputDataError
        Card missing or invalid, a file missing or with a wrong sha256, more than one input
        channel, unexpected labels, or a configuration that plans.json lacks (exit 65).
    """
    # absolute: the workflow's nodes run in folders of their own, where a relative path
    # given on the command line (--model ./my-model) would point nowhere
    path = Path(path).absolute()
    card, raw = cards.load_card(path)
    if verify:
        cards.verify_files(path, card)
        cards.verify_nnunet_files(path, card)
    return InstalledModel(name=name or card["name"], path=path, card=card,
                          sha256=cards.sha256_bytes(raw), source=source)


def resolve_model(name_or_path: str | Path | None = None,
                  models_dir: str | Path | None = None) -> InstalledModel:
    """Find a model by name or path and verify it.

    Parameters
    ----------
    name_or_path
        ``None`` for the bundled demo model; a name installed in the models cache (or bundled);
        or a path to a model folder or zip.
    models_dir
        The models cache (default :func:`default_models_dir`).

    Raises
    ------
    MissingInputError
        Nothing found; the message names every place looked in (exit 66).
    InputDataError
        Found but failed verification (exit 65).
    UsageError
        A URL: models are never downloaded at run time (exit 64).
    """
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    if name_or_path is None:
        return load_model(bundled_models_dir() / DEMO_MODEL_NAME, name=DEMO_MODEL_NAME,
                          source="bundled")
    text = str(name_or_path)
    if is_url(text):
        raise UsageError(f"models are not downloaded while the app runs: {text}",
                         hint=f"install it first: cl-bidsapp-models install {text}")
    looked: list[Path] = []
    if re.match(cards.NAME_PATTERN, text) and "/" not in text and not text.endswith(".zip"):
        for folder, source in ((models_dir, "installed"), (bundled_models_dir(), "bundled")):
            candidate = folder / text
            looked.append(candidate)
            if candidate.is_dir():
                return load_model(candidate, name=text, source=source)
    path = Path(text).expanduser()
    looked.append(path.absolute())
    if path.is_dir():
        return _load_model_folder(path)
    if path.is_file():
        return _load_model_zip(path, models_dir)
    raise MissingInputError(
        f"model {text!r} not found; looked in: " + ", ".join(str(p) for p in looked),
        hint="list installed models with 'cl-bidsapp-models list'; install one with "
             "'cl-bidsapp-models install PATH|URL'; omit the model option for the demo model")


def _load_model_folder(path: Path) -> InstalledModel:
    if (path / cards.CARD_FILENAME).is_file():
        return load_model(path, source="path")
    # an nnU-Net dataset folder holding one results folder with a card
    found = [p for p in find_model_folders(path) if (p / cards.CARD_FILENAME).is_file()]
    if len(found) == 1:
        return load_model(found[0], source="path")
    if len(found) > 1:
        raise InputDataError(f"{len(found)} models with a card under this folder; name one of "
                             + ", ".join(str(p) for p in found), path=path)
    return load_model(path, source="path")  # raises: card missing


def _load_model_zip(path: Path, models_dir: Path) -> InstalledModel:
    """Unpack a model zip given by path (not installed) and load it.

    Unpacked copies are kept in ``<models_dir>/.unpacked/<digest>`` and reused, after checking
    that the copy's card is the zip's own. Where that folder cannot be written (a read-only
    cache in a container) the zip goes to a private temporary folder of this process, never
    to a shared predictable one that another user could have filled first.
    """
    digest = cards.sha256_file(path)
    cache = _writable_cache_root(models_dir)
    unpacked = cache / digest[:32] if cache is not None else None
    if unpacked is None or not unpacked.is_dir():
        parent = cache if cache is not None else _private_unpack_root()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
        safe_extract_zip(path, staging)
        if unpacked is None:
            unpacked = staging
        else:
            try:
                os.rename(staging, unpacked)
            except OSError:  # another job unpacked the same zip first
                shutil.rmtree(staging, ignore_errors=True)
    found = [p for p in find_model_folders(unpacked) if (p / cards.CARD_FILENAME).is_file()]
    if len(found) != 1:
        raise InputDataError(
            "the zip holds no model with a card (cl_model.json)" if not found else
            f"the zip holds {len(found)} models with a card; install one with a name",
            path=path, hint="install it with 'cl-bidsapp-models install ZIP --card CARD.json'")
    card = found[0] / cards.CARD_FILENAME
    if not _same_as_in_zip(path, card, card.relative_to(unpacked).as_posix()):
        raise InputDataError("the unpacked copy of this zip has another model card than the zip",
                             path=card, hint=f"delete {unpacked} and run again")
    return load_model(found[0], source="path")


def _same_as_in_zip(archive: Path, file: Path, member: str) -> bool:
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        try:
            return zf.read(member) == file.read_bytes()
        except KeyError:
            return False


def _writable_cache_root(models_dir: Path) -> Path | None:
    """``<models_dir>/.unpacked`` when it can be written, else None."""
    root = models_dir / UNPACKED_DIRNAME
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) else None


_PRIVATE_ROOT: list[Path] = []


def _private_unpack_root() -> Path:
    """A folder only this process uses (mode 0700), removed when the process exits."""
    if _PRIVATE_ROOT and not _PRIVATE_ROOT[0].is_dir():   # removed by a temp-file cleaner
        _PRIVATE_ROOT.clear()
    if not _PRIVATE_ROOT:
        import atexit

        try:
            root = Path(tempfile.mkdtemp(prefix="cl-bidsapp-models-"))
        except OSError as exc:
            raise OutputError(f"cannot unpack the model zip ({exc.strerror})",
                              path=tempfile.gettempdir()) from None
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _PRIVATE_ROOT.append(root)
    return _PRIVATE_ROOT[0]


def list_models(models_dir: str | Path | None = None) -> list[tuple[str, Path, str, dict | None]]:
    """Models in the cache and bundled with the package, without hashing their files.

    Returns
    -------
    list of (name, path, source, card or None)
        ``card`` is None when the folder's card is missing or invalid (``verify`` says why).
    """
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    found = []
    for folder, source in ((models_dir, "installed"), (bundled_models_dir(), "bundled")):
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir()
                           if p.is_dir() and not p.name.startswith(".")):
            try:
                card, _ = cards.load_card(path)
            except InputDataError:
                card = None
            found.append((path.name, path, source, card))
    return found

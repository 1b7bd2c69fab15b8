"""Installing a model into the models cache, from a folder, a zip or a URL.

Installation copies only the files the card lists (checked against their sha256) into
``<models_dir>/<name>/``, through a staging folder renamed into place, so the cache never holds
a half-installed model. Downloading happens here and only here: the app itself never
touches the network.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from cl_bidsapp.errors import (InputDataError, MissingInputError, OutputError,
                               TemporaryFailure, UsageError)
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.archive import MAX_TOTAL_BYTES, find_model_folders, safe_extract_zip
from cl_bidsapp.models.registry import (InstalledModel, default_models_dir, is_url,
                                        load_model)

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0
_OFFLINE_HINT = ("no network here? download the file on a machine that has one, copy it over "
                 "and run 'cl-bidsapp-models install FILE.zip --sha256 HEX'")


def download(url: str, dest_dir: str | Path, timeout: float = DOWNLOAD_TIMEOUT_S,
             max_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Download ``url`` into ``dest_dir``; return the file.

    Raises
    ------
    MissingInputError
        The server says the file does not exist (HTTP 404/410; exit 66).
    TemporaryFailure
        No network, DNS failure, timeout, refused connection or a server error (exit 75);
        the message names the URL and how to install offline.
    """
    dest = Path(dest_dir) / "download.zip"
    logger.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            received = 0
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > max_bytes:
                    raise InputDataError(f"download exceeds {max_bytes / 1024**3:.0f} GiB; "
                                         "refusing", path=url)
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise MissingInputError(f"the server has no such model (HTTP {exc.code})",
                                    path=url) from None
        raise TemporaryFailure(f"download failed (HTTP {exc.code} {exc.reason})", path=url,
                               hint=_OFFLINE_HINT) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, FileNotFoundError):  # file:// URL to nothing
            raise MissingInputError("model file not found", path=url) from None
        raise TemporaryFailure(f"cannot download the model ({reason})", path=url,
                               hint=_OFFLINE_HINT) from None
    except (socket.timeout, TimeoutError, ConnectionError) as exc:
        raise TemporaryFailure(f"cannot download the model ({exc or 'timed out'})", path=url,
                               hint=_OFFLINE_HINT) from None
    return dest


def install_model(source: str | Path, models_dir: str | Path | None = None, *,
                  name: str | None = None, sha256: str | None = None,
                  card_path: str | Path | None = None, force: bool = False,
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> InstalledModel:
    """Install a model folder, zip or URL into the models cache.

    Parameters
    ----------
    source
        A model folder, a zip (``nnUNetv2_export_model_to_zip`` output with or without our
        card), or an ``http(s)://`` / ``file://`` URL of such a zip.
    models_dir
        The models cache (default :func:`~cl_bidsapp.models.registry.default_models_dir`).
    name
        Name to install under (default: the card's name).
    sha256
        Expected sha256: of the zip file for a zip or URL, of the card (the model's sha256,
        as ``show`` prints it) for a folder.
    card_path
        A card for a model that comes without one (e.g. a published nnU-Net zip).
    force
        Replace an installed model of the same name with different content.

    Raises
    ------
    MissingInputError, InputDataError, TemporaryFailure, UsageError, OutputError
        Exit 66 (source missing), 65 (corrupt, tampered, unsafe zip, sha256 mismatch),
        75 (network), 64 (name clash without ``force``), 73 (cache not writable).
    """
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=models_dir))
    except OSError as exc:
        raise OutputError(f"cannot create the models folder ({exc.strerror})",
                          path=models_dir) from None
    try:
        return _install(str(source), models_dir, staging, name, sha256, card_path, force,
                        timeout)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(source: str, models_dir: Path, staging: Path, name: str | None,
             sha256: str | None, card_path, force: bool, timeout: float) -> InstalledModel:
    expected = sha256.lower().strip() if sha256 else None
    if expected is not None and (len(expected) != 64 or
                                 any(c not in "0123456789abcdef" for c in expected)):
        raise UsageError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if is_url(source):
        archive: Path | None = download(source, staging, timeout=timeout)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise MissingInputError("model to install not found", path=path)
        archive = path if path.is_file() else None
    if archive is not None:
        if expected and cards.sha256_file(archive) != expected:
            raise InputDataError(f"sha256 of the download/zip is {cards.sha256_file(archive)}, "
                                 f"not {expected} (corrupt or tampered); not installed",
                                 path=source)
        root = staging / "unpacked"
        safe_extract_zip(archive, root)
    else:
        root = Path(source).expanduser()

    card, raw = _read_given_card(card_path) if card_path else (None, None)
    folder = _pick_model_folder(root, card, source)
    if card is None:
        card, raw = cards.load_card(folder)
    cards.verify_files(folder, card)
    cards.verify_nnunet_files(folder, card)
    model_sha = cards.sha256_bytes(raw)
    if expected and archive is None and model_sha != expected:
        raise InputDataError(f"model sha256 is {model_sha}, not {expected} (corrupt or "
                             "tampered); not installed", path=source)

    install_name = name or card["name"]
    if not re.match(cards.NAME_PATTERN, install_name):
        raise UsageError(f"invalid model name {install_name!r} (letters, digits, '.', '_', '-')")
    stage_model = staging / "model"
    for rel in card["files"]:
        dst = stage_model / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, dst)
    (stage_model / cards.CARD_FILENAME).write_bytes(raw)
    cards.verify_files(stage_model, card)  # the copy, not only the source

    target = models_dir / install_name
    if target.exists():
        try:
            existing = load_model(target, name=install_name, source="installed", verify=False)
        except InputDataError as exc:
            if not force:
                raise UsageError(f"the installed copy of {install_name!r} is damaged "
                                 f"({exc.message})", path=target,
                                 hint="pass --force to replace it with this model") from None
            existing = None
        if existing is not None and existing.sha256 == model_sha:
            try:
                model = load_model(target, name=install_name, source="installed")
            except InputDataError as exc:
                # the same model, but a file of the installed copy changed: repair it
                logger.warning("the installed copy of %s fails verification (%s); replacing it "
                               "with the verified new copy", install_name, exc.message)
            else:
                logger.info("model %s is already installed at %s", install_name, target)
                return model
        elif not force:
            raise UsageError(f"a different model named {install_name!r} is already installed",
                             path=target, hint="choose another --name or pass --force")
        os.rename(target, staging / "replaced")
    os.rename(stage_model, target)
    logger.info("installed %s %s (sha256 %s) at %s", install_name, card["version"],
                model_sha[:12], target)
    return load_model(target, name=install_name, source="installed")


def _read_given_card(card_path) -> tuple[dict, bytes]:
    path = Path(card_path)
    if not path.is_file():
        raise MissingInputError("model card not found", path=path)
    raw = path.read_bytes()
    try:
        card = json.loads(raw)
    except ValueError as exc:
        raise InputDataError(f"model card is not valid JSON ({exc})", path=path) from None
    problems = cards.card_problems(card)
    if problems:
        raise InputDataError("invalid model card: " + "; ".join(problems), path=path)
    return card, raw


def _pick_model_folder(root: Path, card: dict | None, source: str | Path) -> Path:
    """The model folder under ``root`` (``source``, what the user gave, names it in errors:
    ``root`` may be a temporary unpacking folder)."""
    folders = find_model_folders(root)
    if card is None:
        with_card = [f for f in folders if (f / cards.CARD_FILENAME).is_file()]
        if len(with_card) == 1:
            return with_card[0]
        if not with_card:
            raise InputDataError(
                "no model card (cl_model.json) found beside plans.json" if folders else
                "no nnU-Net model (plans.json + dataset.json) found", path=source,
                hint="for a model without a card pass --card CARD.json (see docs/models.md)")
        raise InputDataError(f"{len(with_card)} models with a card found: "
                             + ", ".join(f.relative_to(root).as_posix() for f in with_card),
                             path=source)
    nn = card["nnunet"]
    wanted = f"{nn['trainer']}__{nn['plans']}__{nn['configuration']}"
    matching = [f for f in folders if f.name == wanted] or (folders if len(folders) == 1 else [])
    if len(matching) != 1:
        raise InputDataError(f"cannot tell which folder the card describes (expected one named "
                             f"{wanted}, found {[f.name for f in folders]})", path=source)
    return matching[0]

"""Installing models: from folders, nnU-Net zips and URLs, and refusing unsafe ones."""
from __future__ import annotations

import io
import json
import shutil
import stat
import warnings
import zipfile

import pytest

from cl_bidsapp.errors import (ExitCode, InputDataError, MissingInputError, TemporaryFailure,
                               UsageError)
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.archive import safe_extract_zip
from cl_bidsapp.models.cli import main
from cl_bidsapp.models.install import install_model
from cl_bidsapp.models.registry import resolve_model
from cl_bidsapp.models.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), name="tiny-install")


def export_zip(folder, dest, with_card=True, extra=()):
    """A zip laid out like nnUNetv2_export_model_to_zip's (Dataset/Trainer__Plans__conf/...)."""
    prefix = f"Dataset999_Tiny/{folder.name}/"
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (with_card or path.name != cards.CARD_FILENAME):
                zf.write(path, prefix + path.relative_to(folder).as_posix())
        zf.writestr(prefix + "fold_0/progress.png", b"not needed at inference")
        for name, data in extra:
            zf.writestr(name, data)
    return dest


def test_install_zip_keeps_only_card_files_and_is_found_by_name(tiny_folder, tmp_path):
    archive = export_zip(tiny_folder, tmp_path / "m.zip")
    model = install_model(archive, tmp_path / "cache")
    assert model.path == tmp_path / "cache" / "tiny-install"
    installed = sorted(p.relative_to(model.path).as_posix() for p in model.path.rglob("*")
                       if p.is_file())
    assert installed == sorted([*model.card["files"], cards.CARD_FILENAME])
    assert resolve_model("tiny-install", tmp_path / "cache").sha256 == model.sha256
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".staging")]


def test_zip_with_dotdot_entry_is_refused_and_nothing_escapes(tiny_folder, tmp_path):
    archive = export_zip(tiny_folder, tmp_path / "evil.zip",
                         extra=[("../../escaped.txt", b"owned")])
    with pytest.raises(InputDataError) as err:
        install_model(archive, tmp_path / "cache" / "models")
    assert err.value.exit_code == ExitCode.DATA_ERROR and "'..'" in str(err.value)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "cache" / "models" / "tiny-install").exists()


@pytest.mark.parametrize("entry", ["/etc/cron.d/evil", "C:/evil.txt", "a\\..\\..\\evil.txt"])
def test_zip_with_absolute_or_windows_path_is_refused(tmp_path, entry):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(entry), b"x")
    with pytest.raises(InputDataError, match="absolute or Windows"):
        safe_extract_zip(buf, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_zip_with_symlink_is_refused(tmp_path):
    info = zipfile.ZipInfo("model/plans.json")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputDataError, match="symbolic link"):
        safe_extract_zip(buf, tmp_path / "out")


def test_zip_bomb_and_oversize_are_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (64 * 1024 * 1024))
    with pytest.raises(InputDataError, match="zip bomb"):
        safe_extract_zip(buf, tmp_path / "bomb")
    small = io.BytesIO()
    with zipfile.ZipFile(small, "w") as zf:
        zf.writestr("data.bin", b"x" * 4096)
    with pytest.raises(InputDataError, match="limit"):
        safe_extract_zip(small, tmp_path / "big", max_total_bytes=1024)
    assert not (tmp_path / "big").exists()


def _corrupt_deflate_zip() -> io.BytesIO:
    """A zip whose entry's compressed stream starts with an invalid deflate block type."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/plans.json", b"{}" * 5000)
    raw = bytearray(buf.getvalue())
    raw[30 + len("model/plans.json")] = 0xFF    # first byte after the local file header
    return io.BytesIO(bytes(raw))


def _zip_of(*entries) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")         # zipfile warns about a duplicate name
        for name in entries:
            zf.writestr(name, b"x")
    return buf


@pytest.mark.parametrize("make, message", [
    (lambda: _zip_of("model/plans.json", "model/plans.json"), "appears twice"),
    (lambda: _zip_of("model/fold_0", "model/fold_0/checkpoint_final.pth"),
     "both a file and a folder"),
    (_corrupt_deflate_zip, "corrupt zip"),
], ids=["duplicate", "file-and-folder", "bad-deflate"])
def test_malformed_zips_are_refused_as_bad_data(tmp_path, make, message):
    with pytest.raises(InputDataError, match=message) as err:
        safe_extract_zip(make(), tmp_path / "out")
    assert err.value.exit_code == ExitCode.DATA_ERROR
    assert not (tmp_path / "out").exists()


def test_a_zip_without_a_model_is_named_not_its_unpacking_folder(tmp_path):
    archive = tmp_path / "notes.zip"
    archive.write_bytes(_zip_of("notes/readme.txt").getvalue())
    with pytest.raises(InputDataError, match="no nnU-Net model") as err:
        install_model(archive, tmp_path / "cache")
    assert err.value.path == str(archive) and ".staging" not in str(err.value)


def test_wrong_sha256_is_refused_and_not_installed(tiny_folder, tmp_path):
    archive = export_zip(tiny_folder, tmp_path / "m.zip")
    with pytest.raises(InputDataError, match="sha256") as err:
        install_model(archive, tmp_path / "cache", sha256="0" * 64)
    assert err.value.exit_code == ExitCode.DATA_ERROR
    assert not (tmp_path / "cache" / "tiny-install").exists()
    good = cards.sha256_file(archive)
    assert install_model(archive, tmp_path / "cache", sha256=good.upper()).name == "tiny-install"
    with pytest.raises(UsageError):
        install_model(archive, tmp_path / "cache", sha256="xyz")


def test_tampered_checkpoint_in_zip_is_refused(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad / tiny_folder.name)
    checkpoint = bad / tiny_folder.name / "fold_0" / "checkpoint_final.pth"
    blob = bytearray(checkpoint.read_bytes())
    blob[200] ^= 0x01
    checkpoint.write_bytes(bytes(blob))
    archive = export_zip(bad / tiny_folder.name, tmp_path / "bad.zip")
    with pytest.raises(InputDataError, match="tampered"):
        install_model(archive, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-install").exists()


def test_plain_nnunet_zip_needs_a_card_and_installs_with_one(tiny_folder, tmp_path):
    archive = export_zip(tiny_folder, tmp_path / "plain.zip", with_card=False)
    with pytest.raises(InputDataError, match="--card"):
        install_model(archive, tmp_path / "cache")
    card = tmp_path / "card.json"
    shutil.copy(tiny_folder / cards.CARD_FILENAME, card)
    model = install_model(archive, tmp_path / "cache", card_path=card, name="published")
    assert model.name == "published" and (model.path / cards.CARD_FILENAME).is_file()


def test_name_clash_needs_force(tiny_folder, tmp_path):
    install_model(tiny_folder, tmp_path / "cache")
    again = install_model(tiny_folder, tmp_path / "cache")  # same content: no-op
    assert again.name == "tiny-install"
    other = make_tiny_model(tmp_path / "other", name="tiny-install", seed=7)
    with pytest.raises(UsageError, match="--force"):
        install_model(other, tmp_path / "cache")
    replaced = install_model(other, tmp_path / "cache", force=True)
    assert replaced.sha256 == resolve_model(str(other)).sha256


def test_file_url_installs_and_unreachable_url_fails_clearly(tiny_folder, tmp_path):
    archive = export_zip(tiny_folder, tmp_path / "m.zip")
    model = install_model(archive.as_uri(), tmp_path / "cache", name="from-url")
    assert model.name == "from-url"
    with pytest.raises(MissingInputError):
        install_model((tmp_path / "absent.zip").as_uri(), tmp_path / "cache")
    url = "http://127.0.0.1:9/cl_model.zip"  # nothing listens on the discard port
    with pytest.raises(TemporaryFailure) as err:
        install_model(url, tmp_path / "cache", timeout=5)
    assert err.value.exit_code == ExitCode.TEMPORARY
    assert url in str(err.value) and "install FILE.zip" in str(err.value)


def test_cli_install_list_verify_show(tiny_folder, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    archive = export_zip(tiny_folder, tmp_path / "m.zip")
    assert main(["--models-dir", cache, "install", str(archive)]) == 0
    assert main(["--models-dir", cache, "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-install" in out and "installed" in out
    assert main(["--models-dir", cache, "verify", "tiny-install"]) == 0
    assert main(["--models-dir", cache, "show", "tiny-install"]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.5" in out and "DEMO MODEL" in out
    assert main(["--models-dir", cache, "show", "--json", "tiny-install"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny-install"


def test_cli_exit_codes_for_missing_and_tampered_models(tiny_folder, tmp_path, capsys,
                                                        caplog):
    cache = tmp_path / "cache"
    assert main(["--models-dir", str(cache), "verify", "absent"]) == ExitCode.NO_INPUT
    assert "absent" in capsys.readouterr().err
    install_model(tiny_folder, cache)
    checkpoint = cache / "tiny-install" / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-1])
    assert main(["--models-dir", str(cache), "verify", "tiny-install"]) == ExitCode.DATA_ERROR
    assert "sha256 mismatch" in capsys.readouterr().err
    # a copy whose card is unreadable cannot be told apart from another model: --force
    card_file = cache / "tiny-install" / cards.CARD_FILENAME
    card_text = card_file.read_text()
    card_file.write_text("{")
    assert main(["--models-dir", str(cache), "install", str(tiny_folder)]) == ExitCode.USAGE
    assert "is damaged" in capsys.readouterr().err
    card_file.write_text(card_text)
    # the hint says to reinstall from the original source: that repairs the installed copy
    assert main(["--models-dir", str(cache), "install", str(tiny_folder)]) == 0
    assert "tiny-install fails verification" in caplog.text
    assert main(["--models-dir", str(cache), "verify", "tiny-install"]) == 0
    evil = export_zip(tiny_folder, tmp_path / "evil.zip", extra=[("../x", b"x")])
    assert main(["--models-dir", str(cache), "install", str(evil)]) == ExitCode.DATA_ERROR

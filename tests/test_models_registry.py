"""Finding and verifying models: names, paths, zips, and refusals with the right exit codes."""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from cl_bidsapp.errors import ExitCode, InputDataError, MissingInputError, UsageError
from cl_bidsapp.models import card as cards
from cl_bidsapp.models.registry import (DEMO_MODEL_NAME, bundled_models_dir,
                                        default_models_dir, list_models, resolve_model)
from cl_bidsapp.models.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), folds=(0, 1))


@pytest.fixture
def model_copy(tiny_folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_folder, dst)
    return dst


def rewrite_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_folder_path_gives_a_verified_model_with_the_card_fields(tiny_folder):
    model = resolve_model(str(tiny_folder))
    assert (model.name, model.version, model.folds) == ("tiny-test", "0.0.1", [0, 1])
    assert model.recommended_threshold == 0.5 and model.recommended_min_size_voxels == 3
    assert model.input_image == "UNI" and model.skull_stripped and model.is_demo
    assert model.sha256 == cards.sha256_file(tiny_folder / cards.CARD_FILENAME)
    assert model.provenance()["SHA256"] == model.sha256


def test_a_relative_model_path_is_kept_absolute_for_the_workflow_nodes(tiny_folder, tmp_path,
                                                                      monkeypatch):
    """``--model ./my-model`` must still point at the model from a node's own folder."""
    shutil.copytree(tiny_folder, tmp_path / "models" / "my-model")
    monkeypatch.chdir(tmp_path)
    model = resolve_model("models/my-model")
    monkeypatch.chdir(tmp_path / "models")               # a node runs somewhere else
    assert model.path.is_absolute() and model.path == tmp_path / "models" / "my-model"
    assert resolve_model(str(model.path)).sha256 == model.sha256


def test_name_is_found_in_the_models_dir_and_env_variable(tiny_folder, tmp_path, monkeypatch):
    shutil.copytree(tiny_folder, tmp_path / "cache" / "my-model")
    assert resolve_model("my-model", tmp_path / "cache").path == tmp_path / "cache" / "my-model"
    monkeypatch.setenv("CL_BIDSAPP_MODELS", str(tmp_path / "cache"))
    assert default_models_dir() == tmp_path / "cache"
    model = resolve_model("my-model")
    assert model.name == "my-model" and model.source == "installed"


def test_missing_name_exits_66_naming_every_place_looked(tmp_path):
    with pytest.raises(MissingInputError) as err:
        resolve_model("no-such-model", tmp_path / "cache")
    message = str(err.value)
    assert err.value.exit_code == ExitCode.NO_INPUT
    assert str(tmp_path / "cache" / "no-such-model") in message
    assert str(bundled_models_dir() / "no-such-model") in message
    with pytest.raises(MissingInputError, match="nowhere.zip"):
        resolve_model(str(tmp_path / "nowhere.zip"), tmp_path / "cache")


def test_url_is_never_downloaded_at_run_time(tmp_path):
    with pytest.raises(UsageError, match="cl-bidsapp-models install"):
        resolve_model("https://example.org/model.zip", tmp_path)


@pytest.mark.parametrize("problem, change", [
    ("sha256", lambda d: d.write_bytes(b"not the json the card hashed")),
    ("missing", lambda d: None),
])
def test_tampered_or_missing_file_exits_65(model_copy, problem, change):
    target = model_copy / "dataset.json"
    if problem == "missing":
        target.unlink()
    else:
        change(target)
    with pytest.raises(InputDataError) as err:
        resolve_model(str(model_copy))
    assert err.value.exit_code == ExitCode.DATA_ERROR
    assert str(target) in str(err.value)


def test_tampered_checkpoint_exits_65_at_resolve(model_copy):
    checkpoint = model_copy / "fold_1" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(InputDataError, match="sha256 mismatch"):
        resolve_model(str(model_copy))


def recard(folder, **overrides):
    """Rewrite the card after changing model files, as a careless model author would."""
    card = json.loads((folder / cards.CARD_FILENAME).read_text())
    (folder / cards.CARD_FILENAME).unlink()
    fields = dict(name=card["name"], version=card["version"], description="x",
                  licence="MIT", citation="x", folds=card["nnunet"]["folds"])
    fields.update(overrides)
    return cards.write_card(folder, **fields)


def test_two_channel_model_exits_65(model_copy):
    rewrite_json(model_copy / "dataset.json",
                 lambda d: d.update(channel_names={"0": "T1w", "1": "FLAIR"}))
    recard(model_copy)
    with pytest.raises(InputDataError, match="2 input channels"):
        resolve_model(str(model_copy))


def test_unknown_configuration_and_extra_labels_exit_65(model_copy):
    recard(model_copy, configuration="3d_lowres")
    with pytest.raises(InputDataError, match="3d_lowres"):
        resolve_model(str(model_copy))
    rewrite_json(model_copy / "dataset.json",
                 lambda d: d.update(labels={"background": 0, "CL": 1, "WML": 2}))
    recard(model_copy)
    with pytest.raises(InputDataError, match="labels"):
        resolve_model(str(model_copy))


@pytest.mark.parametrize("field", ["licence", "postprocessing", "files", "is_demo"])
def test_card_missing_a_field_exits_65(model_copy, field):
    rewrite_json(model_copy / cards.CARD_FILENAME, lambda d: d.pop(field))
    with pytest.raises(InputDataError, match=field):
        resolve_model(str(model_copy))


def test_card_with_unsafe_path_or_unlisted_fold_is_invalid(model_copy):
    def unsafe(card):
        card["files"]["../../etc/passwd"] = "0" * 64

    rewrite_json(model_copy / cards.CARD_FILENAME, unsafe)
    with pytest.raises(InputDataError, match="unsafe path"):
        resolve_model(str(model_copy))
    rewrite_json(model_copy / cards.CARD_FILENAME, lambda c: c["nnunet"].update(folds=[0, 4]))
    with pytest.raises(InputDataError, match="fold 4"):
        resolve_model(str(model_copy))


def test_folder_without_card_says_how_to_add_one(model_copy):
    (model_copy / cards.CARD_FILENAME).unlink()
    with pytest.raises(InputDataError) as err:
        resolve_model(str(model_copy))
    assert "--card" in str(err.value)


def _zip_model(folder, archive):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.rglob("*"):
            zf.write(path, "Dataset999_Tiny/" + folder.name + "/"
                     + path.relative_to(folder).as_posix())
    return archive


def test_zip_path_is_unpacked_once_and_verified(tiny_folder, tmp_path):
    archive = _zip_model(tiny_folder, tmp_path / "model.zip")
    first = resolve_model(str(archive), tmp_path / "cache")
    second = resolve_model(str(archive), tmp_path / "cache")
    assert first.path == second.path and first.sha256 == second.sha256
    assert first.path.is_relative_to(tmp_path / "cache")


def test_an_unpacked_copy_whose_card_differs_from_the_zip_is_not_used(tiny_folder, tmp_path):
    archive = _zip_model(tiny_folder, tmp_path / "model.zip")
    model = resolve_model(str(archive), tmp_path / "cache")
    # someone swaps the cached copy for another model, card and files consistent with each other
    other = make_tiny_model(tmp_path / "other", name="tiny-test", seed=9)
    shutil.rmtree(model.path)
    shutil.copytree(other, model.path)
    with pytest.raises(InputDataError, match="another model card than the zip") as err:
        resolve_model(str(archive), tmp_path / "cache")
    assert err.value.exit_code == ExitCode.DATA_ERROR


def test_with_a_read_only_cache_a_zip_is_unpacked_privately(tiny_folder, tmp_path,
                                                            monkeypatch):
    import os
    import stat
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    archive = _zip_model(tiny_folder, tmp_path / "model.zip")
    # where an earlier version unpacked: a shared, predictable name another user could fill
    squatted = tmp_path / "tmp" / f"cl-bidsapp-models-{os.getuid()}" / cards.sha256_file(
        archive)[:32]
    shutil.copytree(make_tiny_model(tmp_path / "evil", name="tiny-test", seed=3), squatted)
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("")
    model = resolve_model(str(archive), not_a_folder)
    assert model.sha256 == resolve_model(str(tiny_folder)).sha256
    assert not model.path.is_relative_to(squatted.parent)
    private = model.path.relative_to(tmp_path / "tmp").parts[0]
    assert private.startswith("cl-bidsapp-models-") and private != squatted.parent.name
    assert stat.S_IMODE((tmp_path / "tmp" / private).stat().st_mode) == 0o700


def test_list_shows_installed_and_bundled_and_flags_bad_cards(tiny_folder, tmp_path):
    shutil.copytree(tiny_folder, tmp_path / "good")
    (tmp_path / "broken").mkdir()
    entries = {name: (source, card) for name, _, source, card in list_models(tmp_path)}
    assert entries["good"][0] == "installed" and entries["good"][1]["name"] == "tiny-test"
    assert entries["broken"][1] is None


def test_default_model_is_the_bundled_demo():
    if not (bundled_models_dir() / DEMO_MODEL_NAME).is_dir():
        pytest.skip("demo model not built yet")
    model = resolve_model(None)
    assert model.is_demo and model.source == "bundled" and model.name == DEMO_MODEL_NAME
    assert "phantom" in model.card["trained_on"]

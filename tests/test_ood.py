"""Out-of-distribution score: the math, the encoder hooks, and calibrating a model's card."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cl_bidsapp.core import ood
from cl_bidsapp.models import cli as models_cli
from cl_bidsapp.models.calibration import build_reference
from cl_bidsapp.models.embedding import encoder_stages, read_embedding
from cl_bidsapp.models.predictor import CLPredictor
from cl_bidsapp.models.registry import resolve_model
from cl_bidsapp.models.testing import make_tiny_model


# --- the math ---------------------------------------------------------------------------

def _literal_ledoit_wolf(x):
    """Ledoit and Wolf (2004), lemmas 3.2-3.4, written out with d x d matrices."""
    n, d = x.shape
    c = x - x.mean(0)
    s = c.T @ c / n
    m = np.trace(s) / d
    d2 = np.sum((s - m * np.eye(d)) ** 2) / d
    b2 = sum(np.sum((np.outer(row, row) - s) ** 2) for row in c) / d / n ** 2
    return min(b2, d2) / d2


@pytest.mark.parametrize("shape", [(6, 40), (30, 96), (200, 5)])
def test_shrinkage_matches_the_published_estimator(shape):
    x = np.random.default_rng(sum(shape)).normal(size=shape) * np.linspace(0.5, 3, shape[1])
    assert ood.ledoit_wolf_shrinkage(x) == pytest.approx(_literal_ledoit_wolf(x), rel=1e-9)


def test_distance_equals_the_full_inverse_covariance_and_truncation_is_close():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(25, 12)) @ rng.normal(size=(12, 12))
    new = rng.normal(size=(5, 12)) * 3
    inverse = np.linalg.inv(ood.shrunk_covariance(x))
    r = new - x.mean(0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", r, inverse, r))
    assert ood.mahalanobis(ood.fit_reference(x), new) == pytest.approx(expected, rel=1e-9)
    # keeping 4 of 12 directions changes distances by little, never to nonsense
    short = ood.mahalanobis(ood.fit_reference(x, max_components=4), new)
    assert np.all(np.abs(short / expected - 1) < 0.5)


def test_auc_matches_counting_pairs_and_threshold_is_the_quantile():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=40), 1)   # ties on purpose
    labels = rng.integers(0, 2, 40)
    pairs = [(a > b) + 0.5 * (a == b) for a, la in zip(scores, labels) if la
             for b, lb in zip(scores, labels) if not lb]
    assert ood.roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert ood.threshold_from([1, 2, 3, 4, 5], 0.5) == 3.0
    with pytest.raises(ValueError):
        ood.fit_reference(np.ones((1, 3)))


def test_held_out_scans_from_the_same_distribution_rarely_exceed_the_threshold():
    rng = np.random.default_rng(6)
    basis = rng.normal(size=(8, 30))
    def draw(n):
        return rng.normal(size=(n, 8)) @ basis + rng.normal(scale=0.3, size=(n, 30))
    ref = build_reference(draw(60), draw(40))
    fresh = ood.ood_score(ref, draw(400))
    shifted = ood.ood_score(ref, draw(50) + 2.0 * rng.normal(size=30))
    assert np.mean(fresh > ref["threshold"]) < 0.15
    assert np.mean(shifted > ref["threshold"]) > 0.9
    assert ood.roc_auc(np.r_[fresh, shifted], [0] * 400 + [1] * 50) > 0.95


def test_a_shift_in_one_stage_alone_is_flagged_and_broken_blocks_are_named():
    """The score is the largest scaled stage distance: a scan that differs from the training
    scans only in its first-stage features (contrast, texture) must stand out even when the
    deeper, larger blocks look in-domain; averaging all features together would drown it."""
    rng = np.random.default_rng(7)
    def draw(n, shift=0.0):
        shallow = rng.normal(size=(n, 4)) + shift
        deep = rng.normal(scale=3.0, size=(n, 60))
        return np.c_[shallow, deep]
    blocks = [("stage0", 0, 4), ("stage1", 4, 64)]
    ref = build_reference(draw(40), draw(20), blocks=blocks)
    assert ood.reference_problems(ref) == []
    fresh, shifted = ood.ood_score(ref, draw(300)), ood.ood_score(ref, draw(40, shift=3.0))
    assert np.mean(fresh > ref["threshold"]) < 0.15
    assert np.mean(shifted > ref["threshold"]) > 0.9
    assert np.median(fresh) == pytest.approx(1.0, abs=0.25)    # 1 = a typical in-domain scan
    one = build_reference(draw(40), draw(20))                  # the same, as one block
    assert ood.roc_auc(np.r_[ood.ood_score(one, draw(300)), ood.ood_score(one, draw(40, 3.0))],
                       [0] * 300 + [1] * 40) < ood.roc_auc(np.r_[fresh, shifted],
                                                          [0] * 300 + [1] * 40)
    broken = json.loads(json.dumps(ref))
    broken["blocks"][1]["start"] = 5
    assert "ood.blocks[1] must cover features 4.." in ood.reference_problems(broken)[0]
    del broken["blocks"][0]["scale"]
    assert ood.reference_problems(broken)[0] == "ood.blocks[0].scale is missing"
    with pytest.raises(ValueError, match="13 values but the reference has 64"):
        ood.ood_score(ref, np.zeros(13))


# --- the hook during prediction -------------------------------------------------------------

def _head(checkered=False, seed=0, shape=(32, 32, 28)):
    """A blob of 'brain' in an empty field, like a skull-stripped 2 mm image; ``checkered``
    gives it a texture the in-domain blobs never have."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    brain = ((zz - 16) / 11) ** 2 + ((yy - 16) / 12) ** 2 + ((xx - 14) / 10) ** 2 < 1
    brain |= (zz < 3) & (yy < 3) & (xx > 25)   # a far speck: the crop keeps empty corners
    texture = 2000 + 400 * np.sin(zz / 3.0) * np.cos(xx / 4.0)
    if checkered:
        texture = 2000 + 1500 * (((zz // 2) + (yy // 2) + (xx // 2)) % 2)
    data[brain] = (texture + rng.normal(0, 150, shape))[brain]
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m"), folds=(0, 1), patch=(16, 16, 16),
                           features=(4, 8, 16))


def test_embedding_pools_every_encoder_stage_over_brain_tiles_and_ignores_tta(model_dir):
    model = resolve_model(str(model_dir))
    image = _head()
    plain = CLPredictor(model, device="cpu", folds=[0, 1], tta=False).predict(image)
    mirrored = CLPredictor(model, device="cpu", folds=[0], tta=True).predict(image)
    info = plain.embedding_info
    # mean and standard deviation of each channel of the three stages (4, 8, 16 channels)
    assert info["Channels"] == [4, 8, 16] and plain.embedding.shape == (56,)
    assert [(b["name"], b["start"], b["stop"]) for b in info["Blocks"]] == [
        ("stage0", 0, 8), ("stage1", 8, 24), ("stage2", 24, 56)]
    stds = np.r_[plain.embedding[4:8], plain.embedding[16:24], plain.embedding[40:56]]
    assert np.all(stds >= 0) and stds.max() > 0
    np.testing.assert_allclose(plain.embedding, mirrored.embedding, rtol=1e-5)
    assert info["Fold"] == 0 and info["Layers"] == "encoder.stages[0..-1]"
    assert 0 < info["TilesUsed"] < info["TilesTotal"]   # corner tiles outside the blob
    assert info["CheckpointSHA256"] == model.card["files"]["fold_0/checkpoint_final.pth"]
    other = CLPredictor(model, device="cpu", folds=[1], tta=False).predict(image)
    assert other.embedding_info["Fold"] == 1
    assert not np.allclose(other.embedding, plain.embedding)  # another network
    # the hook is gone after prediction, and switching embedding off gives none
    net = CLPredictor(model, device="cpu", folds=[0], tta=False, embed=False)
    assert net.predict(image).embedding is None
    assert not any(stage._forward_hooks for stage in encoder_stages(net._nnunet.network))
    assert plain.ood["verdict"] == "unknown" and "calibrate" in plain.ood["note"]


# --- calibrate ------------------------------------------------------------------------------

def _fake_outputs(root: Path, images) -> Path:
    """A cl-bidsapp output folder with records and model inputs only (no embeddings)."""
    for i, image in enumerate(images):
        sub = f"{i + 1:02d}"
        rel = f"sub-{sub}/anat/sub-{sub}_desc-preproc_UNIT1.nii.gz"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, root / rel)
        record = {"bids_name": f"sub-{sub}_UNIT1", "status": "ok",
                  "outputs": {"preproc": rel}}
        (root / f"sub-{sub}" / "log").mkdir(parents=True, exist_ok=True)
        (root / f"sub-{sub}/log/sub-{sub}_UNIT1_record.json").write_text(json.dumps(record))
    return root


def test_calibrate_writes_a_card_that_verifies_and_scores_shifted_scans_outside(
        model_dir, tmp_path, capsys):
    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    train = _fake_outputs(tmp_path / "train", [_head(seed=s) for s in range(5)])
    held = _fake_outputs(tmp_path / "held", [_head(seed=s) for s in range(10, 13)])
    code = models_cli.main(["calibrate", str(model_copy), str(train), "--held-out", str(held)])
    assert code == 0
    assert "reference of 5 scans" in capsys.readouterr().out
    card = json.loads((model_copy / "cl_model.json").read_text())
    assert card["ood"]["n_scans"] == 5 and card["ood"]["threshold_from"] == "held-out"
    assert card["ood"]["fold"] == 0 and card["ood"]["n_features"] == 56
    assert [b["name"] for b in card["ood"]["blocks"]] == ["stage0", "stage1", "stage2"]
    assert models_cli.main(["verify", str(model_copy)]) == 0   # the card is not self-hashed

    predictor = CLPredictor(resolve_model(str(model_copy)), device="cpu", tta=False)
    near = predictor.predict(_head(seed=99)).ood
    far = predictor.predict(_head(checkered=True, seed=99)).ood
    assert near["threshold"] == card["ood"]["threshold"]
    assert far["score"] > near["score"] and far["verdict"] == "outside"


def test_calibrate_refuses_empty_folders_and_broken_references(model_dir, tmp_path, capsys):
    model_copy = tmp_path / "model"
    shutil.copytree(model_dir, model_copy)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sub-01" / "log").mkdir(parents=True)
    (tmp_path / "empty" / "sub-01" / "log" / "sub-01_UNIT1_record.json").write_text(
        json.dumps({"bids_name": "sub-01_UNIT1", "status": "ok", "outputs": {}}))
    assert models_cli.main(["calibrate", str(model_copy), str(tmp_path / "empty")]) == 66
    err = capsys.readouterr().err
    assert "no processed scan" in err and "Traceback" not in err
    assert models_cli.main(["calibrate", str(model_copy), str(tmp_path / "nope")]) == 66
    card = json.loads((model_copy / "cl_model.json").read_text())
    card["ood"] = {"mean": [0.0, 1.0], "components": [[1.0]], "variances": [1.0],
                   "residual_variance": 1.0}
    (model_copy / "cl_model.json").write_text(json.dumps(card))
    assert models_cli.main(["verify", str(model_copy)]) == 65
    assert "ood.components" in capsys.readouterr().err


def test_embedding_table_round_trips(tmp_path):
    from cl_bidsapp.models.embedding import embedding_sidecar, embedding_tsv

    vector = np.array([0.25, -1.5, 3e-7])
    (tmp_path / "e_features.tsv").write_text(embedding_tsv(vector))
    (tmp_path / "e_features.json").write_text(json.dumps(embedding_sidecar({"Fold": 0})))
    back, meta = read_embedding(tmp_path / "e_features.tsv")
    np.testing.assert_allclose(back, vector)
    assert meta["Fold"] == 0
    (tmp_path / "bad_features.tsv").write_text("feature\tvalue\nstage0_mean_000\tnan\n")
    with pytest.raises(ValueError, match="NaN"):
        read_embedding(tmp_path / "bad_features.tsv")


def test_a_card_calibrated_on_bottleneck_means_only_is_still_scored(model_dir, tmp_path):
    """Cards calibrated before every stage was pooled hold one reference of the bottleneck's
    channel means (no blocks); their scans are scored on that part of the new vector."""
    from cl_bidsapp.models.calibration import ood_record

    shutil.copytree(model_dir, tmp_path / "model")
    model = resolve_model(str(tmp_path / "model"))
    predictor = CLPredictor(model, device="cpu", folds=[0], tta=False)
    results = [predictor.predict(_head(seed=s)) for s in range(4)]
    last = results[0].embedding_info["Blocks"][-1]
    bottleneck = np.array([r.embedding[last["start"]:last["start"] + 16] for r in results])
    legacy = ood.fit_reference(bottleneck[:3])
    legacy.update(threshold=5.0, checkpoint_sha256=results[0].embedding_info["CheckpointSHA256"])
    model.card["ood"] = legacy
    record = ood_record(model, results[3].embedding, results[3].embedding_info)
    assert record["score"] == pytest.approx(float(ood.mahalanobis(legacy, bottleneck[3])[0]),
                                            rel=1e-3)
    legacy["mean"] = legacy["mean"][:10]                     # made from other features
    legacy["components"] = [c[:10] for c in legacy["components"]]
    record = ood_record(model, results[3].embedding, results[3].embedding_info)
    assert record["verdict"] == "unknown" and "calibrate" in record["note"]

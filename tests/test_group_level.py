"""The group level end to end on a two-protocol phantom dataset (two sites).

Participant outputs are written from the phantoms' ground truth with known changes (one lesion
dropped, one blob added per image; :func:`cl_bidsapp.group.testing.phantom_outputs`), so the
evaluation's answer is known without running nnU-Net.

TEST STAND-IN for TemplateFlow: the real MNI152NLin2009cAsym files cannot be downloaded here, so
nilearn's MNI152 2009a template and brain mask (2 mm, shipped inside the nilearn package) are
written under the MNI152NLin2009cAsym ``res-01`` file names in a temporary TemplateFlow folder.
The app only reads files by those names; the maps made in these tests are NOT on the real
template.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cl_bidsapp import __version__
from cl_bidsapp.cli.run import plan
from cl_bidsapp.config import Settings
from cl_bidsapp.errors import InputDataError, MissingInputError
from cl_bidsapp.group import run_group_level
from cl_bidsapp.group.frequency import MAP_NAME
from cl_bidsapp.group.template import BRAIN_MASK_NAME, T1W_NAME
from cl_bidsapp.group.testing import FAKE_MODEL, phantom_outputs
from cl_bidsapp.models.card import sha256_bytes
from cl_bidsapp.simulate import simulate_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stand_in_templateflow(tmp_path_factory):
    """TEST STAND-IN: nilearn's MNI152 2009a (2 mm) under the 2009cAsym res-01 names."""
    from nilearn import datasets

    home = tmp_path_factory.mktemp("templateflow")
    folder = home / "tpl-MNI152NLin2009cAsym"
    folder.mkdir()
    t1w = datasets.load_mni152_template(resolution=2)
    mask = datasets.load_mni152_brain_mask(resolution=2)
    nib.save(nib.Nifti1Image(np.asarray(t1w.dataobj, np.float32), t1w.affine),
             str(folder / T1W_NAME))
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj, np.uint8), mask.affine),
             str(folder / BRAIN_MASK_NAME))
    return home


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """3 phantoms (site01: 3T-MP2RAGE x2, site02: 3T-MPRAGE), outputs, a model card."""
    root = tmp_path_factory.mktemp("study")
    bids, out = root / "bids", root / "out"
    simulate_dataset(bids, n_subjects=3, protocols=("3T-MP2RAGE", "3T-MPRAGE"),
                     voxel_size=2.0, seed=11)
    card = json.dumps({"name": "phantom-model", "input": {"contrasts": ["UNIT1"]},
                       "training": {"simulator": {"protocols": ["3T-MP2RAGE"]}}}).encode()
    (root / "models" / "phantom-model").mkdir(parents=True)
    (root / "models" / "phantom-model" / "cl_model.json").write_bytes(card)
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=root / "work", nprocs=2,
                        models_dir=root / "models", skip_bids_validation=True,
                        reference_masks=bids / "derivatives" / "reference")
    _, items = plan(settings)
    model = FAKE_MODEL | {"Name": "phantom-model", "SHA256": sha256_bytes(card)}
    phantom_outputs(bids, out, items, seed=0, model=model)
    return settings, items


@pytest.fixture(scope="module")
def finished(study, stand_in_templateflow):
    settings, items = study
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPLATEFLOW_HOME", str(stand_in_templateflow))
        code = run_group_level(settings, items, {"Name": "phantoms"})
    return settings, items, code


def _tsv(path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=["n/a"])


def test_the_group_level_writes_every_output(finished):
    settings, items, code = finished
    assert code == 0
    group = settings.output_dir / "group"
    for name in ("group_images.tsv", "group_lesions.tsv", "group_evaluation.tsv",
                 "group_evaluation_summary.tsv", "group_evaluation_domains.tsv", MAP_NAME,
                 "group_report.html", "figures/group_desc-distributions_plot.png",
                 "figures/group_desc-frequency_plot.png"):
        assert (group / name).is_file(), name
    images = _tsv(group / "group_images.tsv")
    assert len(images) == len(items) and set(images["status"]) == {"ok"}
    assert set(images["site"]) == {"site01", "site02"}


def test_evaluation_finds_exactly_the_changes_made_to_the_truth(finished):
    settings, items, _ = finished
    scores = _tsv(settings.output_dir / "group" / "group_evaluation.tsv").set_index("bids_name")
    assert len(scores) == len(items)
    for item in items:
        folder = settings.reference_masks / f"sub-{item.subject}" / "anat"
        truth = np.asarray(nib.load(str(folder / f"sub-{item.subject}_label-CL_mask.nii.gz"))
                           .dataobj) > 0
        _, n = ndimage.label(truth, np.ones((3, 3, 3)))
        row = scores.loc[item.bids_name]
        # one reference lesion dropped, one blob added far from every lesion
        assert (row["n_reference"], row["tp"], row["fn"], row["fp"], row["us"]) == (
            n, n - 1, 1, 1, 0)
        error_map = settings.output_dir / row["error_map"]
        assert error_map.is_file() and error_map.name.endswith("_label-CL_desc-errors_dseg.nii.gz")
        values = set(np.unique(np.asarray(nib.load(str(error_map)).dataobj)).tolist())
        assert values == {0, 1, 2, 4}


def test_evaluation_is_summarised_per_domain_and_per_site(finished):
    settings, _, _ = finished
    wide = _tsv(settings.output_dir / "group" / "group_evaluation_domains.tsv")
    assert list(wide["group"]) == ["all", "in-domain", "out-of-domain", "site01", "site02"]
    # the card was trained on 3T-MP2RAGE, which is site01's protocol
    rows = wide.set_index("group")
    assert rows.loc["in-domain", "n_scans"] == rows.loc["site01", "n_scans"] == 2
    assert rows.loc["out-of-domain", "n_scans"] == rows.loc["site02", "n_scans"] == 1
    assert rows.loc["all", "fn"] == rows.loc["site01", "fn"] + rows.loc["site02", "fn"]
    assert rows.loc["all", "f1_se"] > 0


def test_the_frequency_map_is_a_fraction_of_images_inside_the_template_brain(
        finished, stand_in_templateflow):
    settings, items, _ = finished
    group = settings.output_dir / "group"
    img = nib.load(str(group / MAP_NAME))
    frequency = np.asarray(img.dataobj)
    n = len(items)
    assert 0 < frequency.max() <= 1
    assert np.allclose(frequency * n, np.round(frequency * n), atol=1e-5)   # k / N only
    brain = np.asarray(nib.load(str(stand_in_templateflow / "tpl-MNI152NLin2009cAsym" /
                                    BRAIN_MASK_NAME)).dataobj) > 0
    # cortical lesions sit at the brain's edge: nearly all within one voxel of the template
    # brain, while the brain fills only about a fifth of the grid
    assert frequency[ndimage.binary_dilation(brain)].sum() / frequency.sum() > 0.95
    assert frequency[brain].sum() / frequency.sum() > 0.8
    sidecar = json.loads((group / MAP_NAME.replace(".nii.gz", ".json")).read_text())
    assert sidecar["NumberOfImages"] == n and len(sidecar["Sources"]) == n
    dice = _tsv(group / "group_images.tsv")["template_brain_dice"]
    assert (dice > 0.8).all()


def test_the_report_is_self_contained_and_shows_everything(finished):
    settings, _, _ = finished
    html = (settings.output_dir / "group" / "group_report.html").read_text()
    # distributions, error analysis, frequency map
    assert html.count("data:image/png;base64,") == 3
    assert "Evaluation against reference masks" in html and "out-of-domain" in html
    assert "Error analysis: which lesions are found" in html
    assert "<script" not in html and "src=\"http" not in html
    assert f"Participant level run with cl-bidsapp {__version__};" in html


def test_a_rerun_reuses_the_registrations(finished, stand_in_templateflow):
    settings, items, _ = finished
    cache = settings.work_dir / "group" / "registration"
    transforms = {p: p.stat().st_mtime_ns for p in cache.glob("*.tfm")}
    assert len(transforms) == len(items)
    before = (settings.output_dir / "group" / MAP_NAME).read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEMPLATEFLOW_HOME", str(stand_in_templateflow))
        assert run_group_level(settings, items, {"Name": "phantoms"}) == 0
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.tfm")} == transforms
    assert (settings.output_dir / "group" / MAP_NAME).read_bytes() == before


def test_without_the_template_everything_else_is_written_then_exit_66(study, tmp_path,
                                                                     monkeypatch):
    settings, items = study
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty-templateflow"))
    report = settings.output_dir / "group" / "group_report.html"
    report.unlink(missing_ok=True)
    with pytest.raises(MissingInputError) as caught:
        run_group_level(settings, items, {"Name": "phantoms"})
    message = str(caught.value)
    assert caught.value.exit_code == 66
    assert T1W_NAME in message and "api.get('MNI152NLin2009cAsym'" in message
    assert report.is_file() and "The lesion frequency map is missing" in report.read_text()
    assert (settings.output_dir / "group" / "group_evaluation.tsv").is_file()


def test_a_reference_on_another_grid_is_exit_65_after_the_others(study, tmp_path):
    settings, items = study
    refs = tmp_path / "refs"
    for item in items:
        src = settings.reference_masks / f"sub-{item.subject}" / "anat"
        dst = refs / f"sub-{item.subject}" / "anat"
        dst.mkdir(parents=True)
        img = nib.load(str(src / f"sub-{item.subject}_label-CL_mask.nii.gz"))
        if item is items[0]:   # a reference resampled to 1 mm by someone
            img = nib.Nifti1Image(np.asarray(img.dataobj)[::2], img.affine @ np.diag(
                [2, 1, 1, 1]))
        nib.save(img, str(dst / f"sub-{item.subject}_label-CL_mask.nii.gz"))
    bad = settings.__class__(**{**settings.__dict__, "reference_masks": refs})
    with pytest.raises(InputDataError) as caught:
        run_group_level(bad, items, {"Name": "phantoms"}, frequency_map=False)
    assert caught.value.exit_code == 65
    assert f"sub-{items[0].subject}_label-CL_mask.nii.gz" in str(caught.value)
    assert "_label-CL_mask.nii.gz" in str(caught.value).split("prediction")[1]
    scores = _tsv(settings.output_dir / "group" / "group_evaluation.tsv")
    assert len(scores) == len(items) - 1
    images = _tsv(settings.output_dir / "group" / "group_images.tsv").set_index("bids_name")
    assert "reference_unusable" in images.loc[items[0].bids_name, "qc_flags"]


def _copy_of(study, tmp_path, **changes):
    """The study's settings with its own copy of the participant outputs."""
    import shutil

    settings, items = study
    out = tmp_path / "out"
    shutil.copytree(settings.output_dir, out, ignore=shutil.ignore_patterns("group"))
    fields = {**settings.__dict__, "output_dir": out, "work_dir": tmp_path / "work", **changes}
    return settings.__class__(**fields), items


def test_a_rerun_leaves_no_results_of_the_earlier_run_beside_its_own(study, tmp_path):
    settings, items = _copy_of(study, tmp_path)
    group = settings.output_dir / "group"
    assert run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False) == 0
    error_maps = sorted(settings.output_dir.rglob("*_desc-errors_dseg.*"))
    assert (group / "group_evaluation_strata.tsv").is_file() and len(error_maps) == 6
    (group / "figures" / "group_desc-erroranalysis_plot.png").stat()
    unrelated = settings.output_dir / "sub-01" / "anat" / "my_notes.txt"
    unrelated.write_text("not the group level's")
    mine = group / "my_stats.R"            # a user's own file beside the group outputs
    mine.write_text("summary(read.delim('group_images.tsv'))")
    # the same outputs evaluated again without reference masks: no evaluation at all now
    plain = settings.__class__(**{**settings.__dict__, "reference_masks": None})
    assert run_group_level(plain, items, {"Name": "phantoms"}, frequency_map=False) == 0
    assert not list(group.rglob("group_evaluation*")) and not list(group.rglob("*erroranalysis*"))
    assert not list(settings.output_dir.rglob("*_desc-errors_dseg.*"))
    assert (group / "group_images.tsv").is_file() and unrelated.is_file() and mine.is_file()
    html = (group / "group_report.html").read_text()
    assert "group_evaluation" not in html and "desc-errors" not in html


def test_reference_masks_matching_no_image_exit_66_and_the_report_says_so(study, tmp_path):
    empty = tmp_path / "masks"
    (empty / "sub-07" / "anat").mkdir(parents=True)   # masks of a participant not processed
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)),
             str(empty / "sub-07" / "anat" / "sub-07_label-CL_mask.nii.gz"))
    settings, items = _copy_of(study, tmp_path, reference_masks=empty)
    with pytest.raises(MissingInputError) as caught:
        run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False)
    assert caught.value.exit_code == 66 and caught.value.path == str(empty)
    assert f"matches any of the {len(items)} processed image(s)" in str(caught.value)
    assert "_label-CL_mask.nii.gz" in str(caught.value)       # says what name it looks for
    html = (settings.output_dir / "group" / "group_report.html").read_text()
    assert f"matches any of the {len(items)} processed image(s)" in html


def test_a_damaged_lesion_mask_is_flagged_not_blamed_on_the_reference_nor_mapped(
        study, tmp_path, stand_in_templateflow, monkeypatch):
    settings, items = _copy_of(study, tmp_path)
    name = items[0].bids_name
    mask = next(settings.output_dir.glob(f"sub-{items[0].subject}/anat/*_label-CL_mask.nii.gz"))
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) * 2 // 3])        # a copy that did not finish
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(stand_in_templateflow))

    def flags_and_reasons():
        images = _tsv(settings.output_dir / "group" / "group_images.tsv").set_index("bids_name")
        return images.loc[name, "qc_flags"], images.loc[name, "qc_reasons"]

    # the map alone (ITK would read the cut file without complaint, with half its lesions)
    plain = settings.__class__(**{**settings.__dict__, "reference_masks": None})
    assert run_group_level(plain, items, {"Name": "phantoms"}) == 0
    flags, reasons = flags_and_reasons()
    assert flags == "missing_outputs" and mask.name in reasons and "truncated" in reasons
    assert "left out of the lesion frequency map" in reasons
    sidecar = json.loads((settings.output_dir / "group" / MAP_NAME.replace(".nii.gz", ".json"))
                         .read_text())
    assert (sidecar["NumberOfImages"], sidecar["ImagesLeftOut"]) == (len(items) - 1, 1)
    # with reference masks: the prediction is at fault, not the reference
    assert run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False) == 0
    flags, reasons = flags_and_reasons()
    assert flags == "missing_outputs" and "not evaluated" in reasons
    scores = _tsv(settings.output_dir / "group" / "group_evaluation.tsv")
    assert name not in set(scores["bids_name"]) and len(scores) == len(items) - 1


def test_a_second_group_run_on_the_same_folder_meanwhile_stops_with_exit_75(study, tmp_path):
    import fcntl

    from cl_bidsapp.errors import TemporaryFailure
    from cl_bidsapp.group.run import LOCK_NAME

    settings, items = _copy_of(study, tmp_path, reference_masks=None)
    group = settings.output_dir / "group"
    group.mkdir()
    with open(group / LOCK_NAME, "a") as running:          # the first run holds the folder
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TemporaryFailure) as caught:
            run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False)
        assert caught.value.exit_code == 75 and "another group-level run" in str(caught.value)
        assert sorted(p.name for p in group.iterdir()) == [LOCK_NAME]    # wrote nothing
        assert (group / LOCK_NAME).exists()               # the first run's lock is left alone
    (group / LOCK_NAME).unlink()                            # as the first run does at its end
    assert run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False) == 0
    assert not (group / LOCK_NAME).exists()                 # no lock file among the outputs


def test_the_group_lock_follows_a_lock_file_replaced_between_open_and_lock(tmp_path,
                                                                            monkeypatch):
    """A run that ends between this run's open and lock removes the file this run locks;
    the lock must be taken on the file that stands there now, where a third run looks."""
    import fcntl

    from cl_bidsapp.errors import TemporaryFailure
    from cl_bidsapp.group import run as group_run

    group = tmp_path / "group"
    lock = group / group_run.LOCK_NAME
    real_flock, calls = fcntl.flock, []

    def flock_after_the_other_run_ended(handle, flags):
        if not calls:                                  # the other run ends, a new file appears
            lock.unlink()
            lock.write_text("")
        calls.append(handle.fileno())
        return real_flock(handle, flags)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_other_run_ended)
    with group_run._exclusive(group):
        assert len(calls) == 2                         # locked again, on the new file
        monkeypatch.setattr(fcntl, "flock", real_flock)
        with open(lock, "a") as third, pytest.raises(BlockingIOError):
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TemporaryFailure):
            with group_run._exclusive(group):
                pass
    assert not lock.exists()


def test_a_folder_that_cannot_be_locked_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from cl_bidsapp.group import run as group_run

    def no_locks(handle, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"), group_run._exclusive(tmp_path / "group"):
        pass
    assert "nothing stops a second group-level run" in caplog.text
    assert "No locks available" in caplog.text

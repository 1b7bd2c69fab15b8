"""What an MS imaging researcher reads in the reports: captions, next steps, units, methods.

Each test pins one fix from an audit of the subject and group reports: a caption that claimed
close-ups of lesions that have none, a failed image without a next step, a methods paragraph
that said "averaging the probability maps of fold all", a group report that linked pages that
do not exist or pointed to documentation outside the output folder, and so on. Outputs come
from :mod:`cl_bidsapp.reports.testing` and :mod:`cl_bidsapp.group.testing` (2 mm phantoms, no
nnU-Net), so the whole file takes seconds.
"""
from __future__ import annotations

import json
import re
import shutil
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cl_bidsapp.config import Settings
from cl_bidsapp.group import run_group_level
from cl_bidsapp.group.records import ImageSummary, image_columns
from cl_bidsapp.group.records import record_path as group_record_path
from cl_bidsapp.group.report import ReportInputs, report_context
from cl_bidsapp.group.testing import phantom_outputs, record, work_item, write_table_outputs
from cl_bidsapp.io import write_json
from cl_bidsapp.reports import build_subject_report
from cl_bidsapp.reports.citation import citation_markdown
from cl_bidsapp.reports.records import subject_records
from cl_bidsapp.reports.sections import MAX_ZOOMS
from cl_bidsapp.reports.testing import fake_failed_image, fake_participant_outputs


class _Refs(HTMLParser):
    """Links and image sources of a page."""

    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "href":
                self.hrefs.append(value or "")


def _hrefs(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.hrefs


def _text(html: str) -> str:
    """The page's words, without tags and embedded figures."""
    html = re.sub(r"<(style|script)>.*?</\1>", "", html, flags=re.S)
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def _record_file(out: Path, subject: str) -> Path:
    return next((out / f"sub-{subject}" / "log").glob("*_record.json"))


# -- subject report -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pages(phantom_2mm, tmp_path_factory):
    """sub-01: many lesions (more than the close-ups); sub-02: none (threshold 1)."""
    out = tmp_path_factory.mktemp("audit") / "out"
    fake_participant_outputs(out, phantom_2mm, "01", extra_lesions=20)
    fake_participant_outputs(out, phantom_2mm, "02", threshold=1.0, seed=3)
    for subject in ("01", "02"):
        build_subject_report(out, subject)
    return out


def test_a_page_without_lesions_says_so_instead_of_promising_close_ups(pages):
    assert subject_records(pages, "02")[0]["lesions"]["count"] == 0
    text = _text((pages / "sub-02.html").read_text())
    assert "No lesion was detected in this image" in text
    assert "every lesion has a close-up" not in text
    assert "Detected lesions (red)" not in text
    assert "Click a heading to sort" not in text     # there is no table to sort
    assert "has a header and no rows" in text


def test_the_lesion_mosaic_says_only_the_largest_lesions_have_close_ups(pages):
    n = subject_records(pages, "01")[0]["lesions"]["count"]
    assert n > MAX_ZOOMS
    text = _text((pages / "sub-01.html").read_text())
    assert f"the {MAX_ZOOMS} largest of {n} lesions have a close-up below" in text
    assert "every lesion has a close-up" not in text
    assert text.count('alt="close-up of') <= MAX_ZOOMS


def test_captions_state_orientation_units_and_the_lesion_rule(pages):
    html = (pages / "sub-01.html").read_text()
    text = _text(html)
    # every figure (mosaics, histogram, close-ups) sits in a <figure> with a caption
    assert html.count("<img") == html.count("<figcaption>") > 0
    assert "Neurological convention: the subject's left is on the left" in text
    assert "sagittal views put anterior on the left" in text
    # the probability caption gives the whole rule, minimum size included
    assert "reaches the threshold (0.5) with at least 3 voxels" in text
    # lesion centroids are scanner coordinates, not template ones
    assert "scanner (world, RAS+) coordinates of the source image, in mm" in text
    assert "not template (MNI) coordinates" in text


def test_a_failed_image_gets_the_meaning_of_its_exit_code_and_a_next_step(phantom_2mm,
                                                                          tmp_path):
    out = tmp_path / "out"
    fake_failed_image(out, phantom_2mm, "02", exit_code=75, message="killed (out of memory)")
    text = _text(build_subject_report(out, "02").read_text())
    assert "Next step:" in text
    assert "Exit code 75 means a temporary failure, usually out of memory" in text
    assert "set --mem to the memory really available" in text
    assert "more memory (--mem)" not in text
    assert "--mem" in text and "participant --participant-label 02" in text


def test_a_failed_rerun_lists_the_earlier_runs_files_apart_from_the_error(phantom_2mm,
                                                                         tmp_path):
    out = tmp_path / "out"
    fake_participant_outputs(out, phantom_2mm, "01")
    ok = json.loads(_record_file(out, "01").read_text())
    # what the CLI writes when a rerun of this image fails (cli/participant.py)
    files = sorted(ok["outputs"].values())
    failed = {k: ok[k] for k in ("bids_name", "subject", "session", "contrast", "rule",
                                 "inputs")}
    failed.update(status="failed", run_id="20260202-000000_0rerun00", exit_code=65,
                  error="sub-01_UNIT1.nii.gz: the image data are incomplete", crash_file=None,
                  earlier_outputs={"run_id": ok["run_id"], "finished": ok["finished"],
                                   "files": files})
    write_json(_record_file(out, "01"), failed)
    html = build_subject_report(out, "01").read_text()
    message = re.search(r'<div class="message">(.*?)</div>', html, re.S).group(1)
    assert "earlier run" not in message, "the error message is the error alone"
    assert f"are from an earlier run ({ok['run_id']}" in _text(html)
    hrefs = _hrefs(html)
    for rel in files:
        assert rel in hrefs and (out / rel).is_file()
    assert f"output of run {ok['run_id']}" in _text(html)


def test_deleted_derivatives_are_named_with_a_next_step_and_their_old_figures_go(pages,
                                                                                  tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pages, out)
    rec = subject_records(out, "01")[0]
    figures = out / "sub-01" / "figures"
    old_mosaic = figures / "sub-01_desc-lesions_mosaic.png"
    assert old_mosaic.is_file()
    for kind in ("preproc", "probseg"):
        (out / rec["outputs"][kind]).unlink()
    text = _text(build_subject_report(out, "01").read_text())
    for kind in ("preproc", "probseg"):
        assert (f"the {kind} image is missing: {rec['outputs'][kind]} was deleted or moved "
                "after the run") in text
    assert "run the participant level for sub-01 again to remake it" in text
    # figures drawn from the deleted files must not stay beside the page's
    assert not old_mosaic.exists()
    assert not list(figures.glob("*_zoom.png"))
    assert (figures / "sub-01_desc-brain_mosaic.png").is_file()   # still drawn


def test_mosaic_slice_labels_never_read_minus_zero(monkeypatch):
    from cl_bidsapp.reports import figures

    labels: list[str] = []
    real = figures.panel_label
    monkeypatch.setattr(figures, "panel_label",
                        lambda ax, text: (labels.append(text), real(ax, text))[1])
    data = np.zeros((10, 10, 10), np.float32)
    data[2:8, 2:8, 2:8] = 100
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, -10, -8.2]          # slice 4 sits at z = -0.2 mm
    figures.mosaic(nib.Nifti1Image(data, affine), n_slices=6)
    assert labels and not any("-0 mm" in label for label in labels), labels


# -- methods paragraph --------------------------------------------------------------------------
_BASE = {"status": "ok", "contrast": "MP2RAGE", "skullstrip_method": "deepbet",
         "masking_method": "robust-combination",
         "model": {"Name": "m", "Version": "1", "SHA256": "f" * 64},
         "settings": {"threshold": 0.6, "tta": True, "min_lesion_size": "1"},
         "folds": ["all"], "device": "cpu", "lesions": {"min_size_voxels": 1}}


def test_methods_describe_fold_all_and_no_minimum_size_in_words():
    text = citation_markdown([_BASE])
    assert "averaging the probability maps of fold all" not in text
    assert 'the single model trained on all training cases (nnU-Net fold "all")' in text
    assert "at least 1 voxels" not in text and "no minimum lesion size" in text
    one = citation_markdown([_BASE | {"folds": ["3"]}])
    assert "using the fold 3 model alone" in one and "averaging" not in one


def test_methods_say_when_images_used_different_folds_and_how_the_size_was_asked():
    other = _BASE | {"folds": ["0", "1"], "lesions": {"min_size_voxels": 2},
                     "settings": {**_BASE["settings"], "min_lesion_size": "16mm3"}}
    text = citation_markdown([_BASE | {"lesions": {"min_size_voxels": 2},
                                       "settings": other["settings"]}, other])
    assert "(the folds differed between images)" in text
    assert "averaging the probability maps of folds 0, 1" in text
    assert "at least 2 voxels (from a requested minimum of 16mm3)" in text


# -- group report -------------------------------------------------------------------------------
def _group(tmp_path, names, failed=(), never=()):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    items = []
    for seed, name in enumerate(names):
        item = work_item(name)
        write_table_outputs(out, item, n_lesions=seed + 1, seed=seed)
        items.append(item)
    for name in failed:
        item = work_item(name)
        write_json(group_record_path(out, item.subject, item.bids_name), record(
            item, {}, lesion_count=0, total_volume_mm3=0, status="failed"))
        items.append(item)
    items += [work_item(name) for name in never]
    settings = Settings(bids_dir=bids, output_dir=out, work_dir=tmp_path / "work", nprocs=1)
    return settings, items


def test_a_group_where_every_image_failed_says_so_and_what_to_do(tmp_path):
    settings, items = _group(tmp_path, [], failed=["sub-01_UNIT1", "sub-02_UNIT1"])
    assert run_group_level(settings, items, {"Name": "t"}, frequency_map=False) == 0
    text = _text((settings.output_dir / "group" / "group_report.html").read_text())
    assert "No image was processed: 2 of 2 failed at the participant level" in text
    assert "n/a (no image processed)" in text      # not "0 lesions"
    assert "Next step" in text
    assert "participant --participant-label 01" in text
    assert "participant --participant-label 02" in text


def test_an_image_never_run_has_no_dead_link_and_gets_the_command_to_run(tmp_path):
    settings, items = _group(tmp_path, ["sub-01_UNIT1"], failed=["sub-02_UNIT1"],
                             never=["sub-03_UNIT1"])
    run_group_level(settings, items, {"Name": "t"}, frequency_map=False)
    html = (settings.output_dir / "group" / "group_report.html").read_text()
    hrefs = _hrefs(html)
    assert "../sub-03.html" not in hrefs and "(no subject report)" in html
    assert "../sub-02.html" in hrefs            # the participant level writes failed pages
    text = _text(html)
    assert ("Run the participant level for this subject (cl-bidsapp BIDS_DIR OUTPUT_DIR "
            "participant --participant-label 03).") in text
    # a page for sub-03 that exists is linked
    (settings.output_dir / "sub-03.html").write_text("<html></html>")
    run_group_level(settings, items, {"Name": "t"}, frequency_map=False)
    assert "../sub-03.html" in _hrefs(
        (settings.output_dir / "group" / "group_report.html").read_text())


def test_median_lesion_counts_are_not_rounded_away():
    summaries = []
    for n, count in enumerate((1, 21, 22, 12)):
        values = dict.fromkeys(image_columns())
        values.update(bids_name=f"sub-0{n}_UNIT1", participant_id=f"sub-0{n}", status="ok",
                      contrast="MP2RAGE", lesion_count=count, total_volume_mm3=8.0 * count,
                      subject_report=f"sub-0{n}.html")
        summaries.append(ImageSummary(values=values, entities={}, source_suffix="UNIT1"))
    rows = report_context(summaries, ReportInputs())["by_group"]
    assert rows[0]["count"] == "16.5 [9.25–21.25]"


@pytest.fixture(scope="module")
def evaluated(phantom_2mm, tmp_path_factory):
    """Both phantom images with outputs, sub-02's lesion mask deleted; with reference masks."""
    from cl_bidsapp.cli.run import plan

    root = tmp_path_factory.mktemp("audit-group")
    out = root / "out"
    settings = Settings(bids_dir=phantom_2mm, output_dir=out, work_dir=root / "work",
                        nprocs=1, models_dir=root / "models", skip_bids_validation=True,
                        reference_masks=phantom_2mm / "derivatives" / "reference")
    _, items = plan(settings)
    phantom_outputs(phantom_2mm, out, items, seed=1)
    rec = json.loads(next((out / "sub-02" / "log").glob("*_record.json")).read_text())
    (out / rec["outputs"]["lesion_dseg"]).unlink()
    run_group_level(settings, items, {"Name": "phantoms"}, frequency_map=False)
    return out / "group" / "group_report.html"


def test_the_group_report_points_to_nothing_outside_the_output_folder(evaluated):
    html = evaluated.read_text()
    assert "docs/" not in html and not re.search(r"https?://", html)
    assert "group_images.json" in html            # where the flag rules are, beside the page
    for href in _hrefs(html):
        assert href.startswith(("#", "../sub-")), href


def test_every_group_figure_has_a_caption(evaluated):
    html = evaluated.read_text()
    images = re.findall(r"<img [^>]*>\s*(<[^>]+>)", html)
    assert len(images) >= 2, "distributions and error analysis"
    assert all(tag == '<p class="muted">' for tag in images), images
    text = _text(html)
    assert "total lesion volume per image in mm³" in text
    assert "Detection rate (blue) and lesion-wise F1 (red)" in text


def test_a_processed_image_left_out_of_the_evaluation_is_named(evaluated):
    text = _text(evaluated.read_text())
    assert "1 image(s) compared" in text
    assert ("1 processed image(s) were not evaluated because outputs they need are missing "
            "or damaged") in text
    assert "sub-02_UNIT1" in text

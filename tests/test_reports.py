"""The per-subject HTML report and CITATION.md, on outputs made without nnU-Net (fast).

Outputs come from :mod:`cl_bidsapp.reports.testing`: the app's own lesion code and derivatives
writer on a 2 mm phantom, with the reference lesions standing in for the model's.
"""
from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from cl_bidsapp.errors import MissingInputError
from cl_bidsapp.io import leftover_temporaries
from cl_bidsapp.reports import build_subject_report, build_subject_reports, write_citation
from cl_bidsapp.reports.citation import REFERENCES, citation_markdown
from cl_bidsapp.reports.records import subject_records
from cl_bidsapp.reports.testing import DEMO_WARNING, fake_failed_image, fake_participant_outputs

NOISY = "sub-01_UNIT1.nii.gz: the UNI background is noisy (salt and pepper)"


@pytest.fixture(scope="module")
def outputs(phantom_2mm, tmp_path_factory):
    """sub-01 processed by the demo model on data the app took as real, with 20 extra
    lesions; sub-02 failed."""
    out = tmp_path_factory.mktemp("reports") / "out"
    fake_participant_outputs(out, phantom_2mm, "01", is_demo=True, extra_lesions=20,
                             warnings=[NOISY, DEMO_WARNING])
    fake_failed_image(out, phantom_2mm, "02", message="image has NaN voxels", exit_code=65)
    pages = build_subject_reports(out, ["01", "02"])
    return out, pages


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "action", "data", "poster", "srcset"):
                self.refs.append((tag, name, value or ""))
            if name == "id":
                self.ids.add(value)


def _page(out: Path, subject: str) -> str:
    return (out / f"sub-{subject}.html").read_text(encoding="utf-8")


def _embedded(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/[a-z+]+;base64,([^"]+)"',
                                                     html)]


def test_one_page_per_subject_and_valid_html(outputs):
    import html5lib

    out, pages = outputs
    assert pages == [out / "sub-01.html", out / "sub-02.html"]
    for page in pages:
        html5lib.HTMLParser(strict=True).parse(page.read_text(encoding="utf-8"))
    assert leftover_temporaries(out) == []


def test_page_links_nothing_outside_the_output_folder(outputs):
    out, _ = outputs
    for subject in ("01", "02"):
        html = _page(out, subject)
        assert not re.search(r"https?:|//cdn|@import|url\(", html, re.I)
        parser = _Links()
        parser.feed(html)
        assert parser.refs, "the page has figures and links"
        for tag, attribute, value in parser.refs:
            assert tag in ("img", "a"), f"no {tag} {attribute}= (scripts and styles are inline)"
            if value.startswith("data:image/"):
                continue
            if value.startswith("#"):
                assert value[1:] in parser.ids, f"dangling anchor {value}"
                continue
            assert not value.startswith(("/", "file:")) and ".." not in value
            assert (out / value).is_file(), f"{value} is not in the output folder"


def test_figures_are_embedded_and_saved_with_bids_names(outputs):
    out, _ = outputs
    html = _page(out, "01")
    embedded = _embedded(html)
    pngs = [b for b in embedded if b.startswith(b"\x89PNG")]
    svgs = [b for b in embedded if b.lstrip().startswith(b"<?xml")]
    assert len(pngs) == 3 + 12 and len(svgs) == 1  # mosaics, capped close-ups; histogram
    saved = sorted(p.name for p in (out / "sub-01" / "figures").iterdir())
    for name in ("sub-01_desc-brain_mosaic.png", "sub-01_desc-lesions_mosaic.png",
                 "sub-01_desc-probability_mosaic.png", "sub-01_desc-intensity_histogram.svg",
                 "sub-01_desc-CL001_zoom.png", "sub-01_desc-CL012_zoom.png"):
        assert name in saved
    assert "sub-01_desc-CL013_zoom.png" not in saved
    for path in (out / "sub-01" / "figures").iterdir():
        assert path.read_bytes() in embedded, f"{path.name} differs from the page's copy"


def test_summary_warnings_table_and_provenance(outputs):
    out, _ = outputs
    html = _page(out, "01")
    record = subject_records(out, "01")[0]
    table = pd.read_csv(out / record["outputs"]["lesion_table"], sep="\t")
    assert len(table) > 12
    assert f"Close-ups of the 12 largest of {len(table)} lesions" in html
    body = html.split('class="data sortable"')[1].split("</table>")[0]
    names = re.findall(r"<tr><td[^>]*>(?:<a [^>]*>)?(CL-\d+)", body)
    assert names == list(table["name"]), "every lesion listed once, largest first"
    assert "fold disagreement" in body
    assert NOISY.replace("(", "(") in html and "Warnings" in html
    for text in (record["model"]["SHA256"], "deepbet", "robust-combination",
                 "segmentation (nnU-Net) 95.0 s", record["run_id"], "off"):
        assert text in html
    assert f'href="{record["outputs"]["probseg"]}"' in html


def test_demo_model_on_real_data_gets_a_banner(outputs, phantom_2mm, tmp_path):
    out, _ = outputs
    assert 'class="banner danger"' in _page(out, "01")
    assert DEMO_WARNING in _page(out, "01")
    # the same demo model on phantoms (no warning recorded): no banner, provenance still says
    fake_participant_outputs(tmp_path, phantom_2mm, "01", is_demo=True, folds=(0,))
    html = build_subject_report(tmp_path, "01").read_text()
    assert 'class="banner danger"' not in html
    assert "trained on simulated phantoms, for tests and demos only" in html
    assert "fold disagreement" not in html.split('class="data sortable"')[1]


def test_failed_image_shows_its_error_and_crash_file(outputs):
    out, _ = outputs
    html = _page(out, "02")
    record = subject_records(out, "02")[0]
    assert record["status"] == "failed"
    assert "This image failed (exit code 65)" in html
    assert "image has NaN voxels" in html
    assert f'href="{record["crash_file"]}"' in html and (out / record["crash_file"]).is_file()
    assert "InputDataError" in html  # the end of the crash file is shown
    assert "<img" not in html
    assert 'id="methods"' not in html, "no methods text for a subject with no result"


def test_reports_only_rebuild_reads_outputs_and_changes_no_derivative(outputs, tmp_path):
    src, _ = outputs
    out = tmp_path / "out"
    shutil.copytree(src, out)

    def digests():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in out.rglob("*") if p.is_file() and "figures" not in p.parts
                and not p.name.endswith(".html") and p.parent.name != "logs"}

    before = digests()
    stale = out / "sub-01" / "figures" / "sub-01_desc-CL099_zoom.png"
    stale.write_bytes(b"old")
    for page in out.glob("*.html"):
        page.unlink()
    pages = build_subject_reports(out, ["sub-01", "02"])
    assert [p.name for p in pages] == ["sub-01.html", "sub-02.html"]
    assert digests() == before
    assert not stale.exists(), "close-ups of lesions a rerun no longer has are removed"
    assert _page(out, "01") == _page(src, "01"), "same outputs, same page"


def test_missing_or_damaged_outputs_do_not_stop_the_page(outputs, tmp_path):
    src, _ = outputs
    out = tmp_path / "out"
    shutil.copytree(src, out)
    record = subject_records(out, "01")[0]
    (out / record["outputs"]["probseg"]).unlink()
    (out / record["outputs"]["lesion_dseg"]).write_bytes(b"\x1f\x8b not really gzip")
    html = build_subject_report(out, "01").read_text()
    assert "the probseg image is missing" in html
    assert "sub-01_seg-CL_dseg.nii.gz cannot be read" in html
    assert "(missing)" in html
    assert "Brain extraction" in html  # the figures that can be drawn still are


def test_subject_without_records_is_an_error_naming_the_folder(outputs, tmp_path):
    out, _ = outputs
    with pytest.raises(MissingInputError) as info:
        build_subject_report(out, "07")
    assert info.value.exit_code == 66 and "sub-07" in str(info.value)
    with pytest.raises(MissingInputError, match="sub-07"):
        build_subject_reports(out, ["02", "07"])
    assert (out / "sub-02.html").is_file()


def test_citation_is_deterministic_and_cites_what_was_used(outputs):
    out, _ = outputs
    path = out / "logs" / "CITATION.md"
    first = path.read_bytes()
    assert write_citation(out) == path and path.read_bytes() == first
    text = first.decode()
    record = subject_records(out, "01")[0]
    for fact in (record["model"]["SHA256"], "thresholded at 0.5", "at least 3 voxels",
                 "folds 0, 1", "without test-time augmentation", "the CPU", "deepbet",
                 "nnunetv2", "arXiv:2507.12092", "doi:10.1038/s41592-020-01008-z",
                 "demo model"):
        assert fact in text, fact
    assert "SynthStrip" not in text
    # each in-text citation has its reference and nothing else is listed
    body, refs = text.split("## References")
    for short, full in REFERENCES.values():
        assert (f"({short}" in body) == (full in refs)


def test_citation_follows_the_tools_recorded():
    base = {"status": "ok", "contrast": "MPRAGE", "skullstrip_method": "synthstrip",
            "masking_method": "t1w", "model": {"Name": "m", "Version": "1", "SHA256": "f" * 64},
            "settings": {"threshold": 0.55, "tta": True}, "folds": ["0"], "device": "cuda",
            "lesions": {"min_size_voxels": 4}}
    text = citation_markdown([base])
    assert "Hoopes" in text and "Fisch et al" not in text and "O'Brien" not in text
    assert "Marques" not in text and "with mirroring test-time augmentation" in text
    assert "thresholded at 0.55" in text and "a GPU" in text and "fold disagreement" not in text
    from cl_bidsapp.config import Settings

    assert "thresholded at 0.3" in citation_markdown(
        [{"status": "failed"}], settings=Settings(threshold=0.3))
    failed_only = citation_markdown([{"status": "failed"}], settings={
        "segmentation": {"threshold": 0.4, "skull_strip_tool": "deepbet", "tta": False}})
    assert "thresholded at 0.4" in failed_only and "Fisch et al" in failed_only


def _as_sessions(phantom: Path, root: Path) -> Path:
    """A copy of sub-01 of the phantom as two sessions (files renamed with ``ses-``)."""
    bids = root / "bids"
    for session in ("1", "2"):
        for src_dir, dst_dir in ((phantom / "sub-01" / "anat",
                                  bids / "sub-01" / f"ses-{session}" / "anat"),
                                 (phantom / "derivatives/reference/sub-01/anat",
                                  bids / f"derivatives/reference/sub-01/ses-{session}/anat")):
            dst_dir.mkdir(parents=True)
            for path in src_dir.iterdir():
                new = path.name.replace("sub-01_", f"sub-01_ses-{session}_")
                shutil.copy(path, dst_dir / new)
    shutil.copy(phantom / "dataset_description.json", bids / "dataset_description.json")
    return bids


def test_sessions_get_one_section_each_on_one_page(phantom_2mm, tmp_path):
    bids = _as_sessions(phantom_2mm, tmp_path)
    out = tmp_path / "out"
    fake_participant_outputs(out, bids, "01", session="1", folds=(0,))
    fake_failed_image(out, bids, "01", session="2", message="INV2 is missing", exit_code=66)
    html = build_subject_report(out, "01").read_text()
    assert "1 of 2 image(s) failed" in html
    assert html.count('<section class="image"') == 2
    assert 'id="sub-01_ses-1_UNIT1"' in html and 'id="sub-01_ses-2_UNIT1"' in html
    assert "INV2 is missing" in html and "exit code 66" in html
    figures = {p.name for p in (out / "sub-01" / "figures").iterdir()}
    assert "sub-01_ses-1_desc-lesions_mosaic.png" in figures
    assert not any("ses-2" in name for name in figures)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_page_renders_in_headless_chromium(outputs, tmp_path):
    out, _ = outputs
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", "--window-size=1280,2400",
         f"--screenshot={shot}", (out / "sub-01.html").as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    # the dark page header and the (dark) brain mosaic were drawn, not a blank page
    grey = pixels[..., :3].mean(-1)
    assert grey[:40].mean() < 0.3 and grey.std() > 0.1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_clicking_a_column_heading_sorts_the_lesion_table(outputs, tmp_path):
    out, _ = outputs
    html = _page(out, "01").replace(
        "</body>", "<script>document.querySelector('th[data-key=\"uncertainty_ddu\"]').click();"
                   "</script></body>")
    page = out / "sorted-test.html"  # beside the real page, so relative links still resolve
    page.write_text(html)
    try:
        proc = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        page.unlink()
    body = proc.stdout.split('class="data sortable"')[1].split("</table>")[0]
    shown = re.findall(r"<tr><td[^>]*>(?:<a [^>]*>)?(CL-\d+)", body)
    table = pd.read_csv(out / subject_records(out, "01")[0]["outputs"]["lesion_table"], sep="\t")
    assert sorted(shown) == sorted(table["name"])
    ddu = table.set_index("name")["uncertainty_ddu"]
    assert [ddu[name] for name in shown] == sorted(ddu), "ascending fold disagreement"

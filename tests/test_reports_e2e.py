"""Reports from a real participant run through the command line (2 mm phantom, random-weight
model, one fold, brain masks taken from the phantom's derivatives; sub-02 fails).

Guards the contract between the participant level's outputs (records, derivatives, crash
files, settings) and the report reader, which the fast tests fake; and ``--reports-only``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow


def _cli(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run(["cl-bidsapp", *map(str, args)], capture_output=True, text=True,
                          check=False)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def real_run(phantom_2mm, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reports-e2e")
    bids = root / "bids"
    shutil.copytree(phantom_2mm, bids)
    bad = bids / "sub-02/anat/sub-02_UNIT1.nii.gz"
    data = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(data[: len(data) // 3]))  # truncated volume: exit 65
    out = root / "out"
    common = (bids, out, "participant", "-w", root / "work", "--skip-bids-validation")
    # one fold, no overlap between windows and the phantom's own brain masks keep this short
    proc = _cli(*common, "--model", tiny_model, "--no-tta", "--folds", "0",
                "--tile-step-size", "1", "--nprocs", "2",
                "-d", f"masks={bids / 'derivatives' / 'reference'}")
    assert proc.returncode == 65, proc.stderr[-3000:]
    return out, common


def _record(out, subject):
    return json.loads((out / f"sub-{subject}/log/sub-{subject}_UNIT1_record.json").read_text())


def test_participant_run_writes_pages_that_state_what_it_recorded(real_run):
    import html5lib

    out, _ = real_run
    html = (out / "sub-01.html").read_text()
    html5lib.HTMLParser(strict=True).parse(html)
    record = _record(out, "01")
    count = record["lesions"]["count"]
    assert re.search(rf'<div class="value">{count:,}</div><div class="label">lesions</div>', html)
    for text in (record["model"]["SHA256"], record["run_id"], "nnunetv2", "input checks",
                 "trained on simulated phantoms"):
        assert text in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 3 + min(count, 12)
    assert not re.search(r"https?:", html)


def test_pages_of_finished_subjects_are_written_inside_the_workflow(real_run):
    out, common = real_run
    work = common[4]
    made = {p.parent.parent.name for p in work.rglob("subject_report/result_subject_report.pklz")}
    # sub-01's page was written as soon as its image was saved; sub-02 failed, so its page
    # (with the failure, recorded after the run) was built by the main process at the end
    assert made == {"sub_01_wf"}
    assert (out / "sub-01.html").stat().st_mtime < (out / "sub-02.html").stat().st_mtime


def test_failed_subject_page_names_the_reason_and_crash_file(real_run):
    out, _ = real_run
    html = (out / "sub-02.html").read_text()
    record = _record(out, "02")
    assert record["status"] == "failed"
    assert "This image failed (exit code 65)" in html
    assert f'href="{record["crash_file"]}"' in html and (out / record["crash_file"]).is_file()
    assert "sub-02_UNIT1.nii.gz" in html


def test_citation_names_the_model_and_settings_of_the_run(real_run):
    out, _ = real_run
    text = (out / "logs" / "CITATION.md").read_text()
    record = _record(out, "01")
    assert record["model"]["SHA256"] in text
    assert "without test-time augmentation" in text and "fold 0" in text
    assert f"thresholded at {record['settings']['threshold']:g}" in text
    assert "masks supplied with --derivatives" in text


def test_reports_only_rebuilds_pages_without_touching_derivatives(real_run):
    out, common = real_run

    def digests():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*")
                if p.is_file() and "figures" not in p.parts and p.suffix != ".html"
                and p.parent.name != "logs"}

    before = digests()
    first = (out / "sub-01.html").read_text()
    for page in out.glob("*.html"):
        page.unlink()
    proc = _cli(*common, "--reports-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "sub-01.html").read_text() == first
    assert (out / "sub-02.html").is_file()
    assert digests() == before


def test_a_crashing_report_node_neither_fails_the_run_nor_loses_the_page(
        phantom_2mm, tiny_model, tmp_path, monkeypatch, capfd):
    # a failure Nipype sees in the subject-level report node (not one the node catches itself,
    # e.g. a worker killed or a broken import) must not turn a run whose every image succeeded
    # into an error: the main process writes the page instead
    from cl_bidsapp.cli.run import main
    from cl_bidsapp.interfaces.reports import SubjectReport

    def broken(self, runtime):
        raise RuntimeError("report node broke")

    monkeypatch.setattr(SubjectReport, "_run_interface", broken)
    plugin = tmp_path / "linear.yml"
    plugin.write_text("plugin: Linear\n")
    out = tmp_path / "out"
    code = main([str(phantom_2mm), str(out), "participant", "--participant-label", "01",
                 "-w", str(tmp_path / "work"), "--skip-bids-validation",
                 "--model", str(tiny_model), "--no-tta", "--folds", "0",
                 "--tile-step-size", "1", "--use-plugin", str(plugin),
                 "-d", f"masks={phantom_2mm / 'derivatives' / 'reference'}"])
    assert code == 0
    assert json.loads((out / "sub-01/log/sub-01_UNIT1_record.json").read_text())["status"] != \
        "failed"
    assert (out / "sub-01.html").is_file() and (out / "logs" / "CITATION.md").is_file()
    assert "sub_01_wf.subject_report failed" in capfd.readouterr().err

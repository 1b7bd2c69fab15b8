"""The command line: pre-flight checks, exit codes and messages (no traceback, ever)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cl_bidsapp import __version__
from cl_bidsapp.cli.parser import build_parser, parse_args
from cl_bidsapp.cli.run import main
from cl_bidsapp.config import Settings
from cl_bidsapp.errors import UsageError
from tests.bids_builders import make_dataset


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "bids", [
        "sub-01/anat/sub-01_UNIT1.nii.gz", "sub-01/anat/sub-01_inv-1_MP2RAGE.nii.gz",
        "sub-01/anat/sub-01_inv-2_MP2RAGE.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz",
    ])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_has_argument_groups():
    text = build_parser().format_help()
    for group in ("Selecting inputs", "Segmentation", "Performance", "Workflow"):
        assert group in text


def test_dry_run_prints_plan_and_writes_nothing(capsys, dataset, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, dataset, out_dir, "participant", "--dry-run",
                           "--skip-bids-validation")
    assert code == 0
    assert "sub-01/anat/sub-01_UNIT1.nii.gz" in out and "INV1+INV2" in out
    assert "sub-02/anat/sub-02_T1w.nii.gz" in out and "MPRAGE" in out
    assert not out_dir.exists()


def test_dry_run_names_the_images_that_will_fail_and_exits_65(capsys, dataset, tmp_path):
    sidecar = dataset / "sub-01" / "anat" / "sub-01_UNIT1.json"
    sidecar.write_text('{"MagneticFieldStrength": 3,')
    code, out, err = run_cli(capsys, dataset, tmp_path / "out", "participant", "--dry-run",
                             "--skip-bids-validation")
    assert code == 65
    row = next(line for line in out.splitlines() if "sub-01_UNIT1.nii.gz" in line)
    assert row.endswith("unusable (below)")
    assert next(ln for ln in out.splitlines() if "sub-02_T1w" in ln).endswith("ok")
    assert "1 of 2 image(s) cannot be processed" in err
    assert f"sub-01 sub-01_UNIT1: {sidecar}: sidecar is not valid JSON" in err
    assert not (tmp_path / "out").exists()
    # the group level would flag that image and go on: its dry run does not fail
    code, _, _ = run_cli(capsys, dataset, tmp_path / "out", "group", "--dry-run",
                         "--skip-bids-validation")
    assert code == 0


def test_both_levels_accepted(dataset, tmp_path):
    s = parse_args([str(dataset), str(tmp_path / "o"), "participant", "group"])
    assert s.analysis_levels == ["participant", "group"]


def test_unknown_level_exits_17(capsys, dataset, tmp_path):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "subject")
    assert code == 17 and "unknown analysis level 'subject'" in err


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_bids_dir_refused(capsys, dataset, where):
    out = dataset if where == "same" else dataset / "results"
    code, _, err = run_cli(capsys, dataset, out, "participant", "--dry-run")
    assert code == 64
    assert "output_dir" in err and str(dataset / "derivatives" / "cl-bidsapp") in err


def test_output_under_derivatives_allowed(capsys, dataset):
    code, out, _ = run_cli(capsys, dataset, dataset / "derivatives" / "cl-bidsapp",
                           "participant", "--dry-run", "--skip-bids-validation")
    assert code == 0 and "sub-01_UNIT1" in out


def test_work_dir_in_bids_dir_refused(capsys, dataset, tmp_path):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "-w",
                           dataset / "work")
    assert code == 64 and "work folder is inside the BIDS dataset" in err


def test_unknown_participant_lists_existing(capsys, dataset, tmp_path):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                           "--skip-bids-validation", "--participant-label", "sub-01", "07")
    assert code == 18
    assert "not found in the dataset: 07" in err and "existing labels: 01, 02" in err


def test_unknown_session_lists_existing(capsys, tmp_path):
    root = make_dataset(tmp_path / "bids", ["sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"])
    code, _, err = run_cli(capsys, root, tmp_path / "o", "participant", "--dry-run",
                           "--skip-bids-validation", "--session-label", "b")
    assert code == 18 and "session label(s) not found: b" in err and "a" in err


@pytest.mark.parametrize("label", ["../x", "sub-0/1", "01_a", ""])
def test_label_with_path_characters_refused(capsys, dataset, tmp_path, label):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                           "--participant-label", label)
    assert code == 64 and "invalid sub label" in err


def test_labels_from_file(dataset, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("sub-02\n\n01\n")
    s = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--participant-label",
                    str(labels)])
    assert s.participant_label == ["02", "01"]


def test_filter_file_not_json(capsys, dataset, tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text("{'t1w': ")
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                           "--bids-filter-file", bad)
    assert code == 64 and "f.json" in err and "not valid JSON" in err


def test_filter_file_unknown_entity(capsys, dataset, tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text(json.dumps({"t1w": {"flavour": "x"}}))
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                           "--skip-bids-validation", "--bids-filter-file", bad)
    assert code == 64 and "unknown BIDS entity 'flavour'" in err and "f.json" in err


def test_filter_file_missing(capsys, dataset, tmp_path):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant",
                           "--bids-filter-file", tmp_path / "nope.json")
    assert code == 66 and "nope.json" in err


def test_filters_select_nothing(capsys, dataset, tmp_path):
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"uni": {"acquisition": "none"}, "t1w": {"acquisition": "none"}}))
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                           "--skip-bids-validation", "--bids-filter-file", f)
    assert code == 18 and "selected no" in err


def test_empty_dataset_exits_18(capsys, tmp_path):
    root = make_dataset(tmp_path / "bids", [])
    code, _, err = run_cli(capsys, root, tmp_path / "o", "participant", "--dry-run",
                           "--skip-bids-validation")
    assert code == 18 and "selected no" in err


def test_missing_bids_dir_exits_66(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path / "absent", tmp_path / "o", "participant")
    assert code == 66 and "does not exist" in err


def test_validation_failure_exits_16_and_can_be_skipped(capsys, dataset, tmp_path):
    # the NIfTI files are empty: the validator reports them
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run")
    assert code == 16
    assert "BIDS validation found" in err and "sub-01_UNIT1.nii.gz" in err
    code, _, _ = run_cli(capsys, dataset, tmp_path / "o", "participant", "--dry-run",
                         "--skip-bids-validation")
    assert code == 0


def test_unwritable_output_exits_73(capsys, dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, dataset, blocker / "out", "participant",
                           "--skip-bids-validation", "-w", tmp_path / "w")
    assert code == 73 and "cannot write to the output folder" in err and "a-file" in err


@pytest.mark.parametrize("args, message", [
    (["--nprocs", "0"], "positive integer"),
    (["--mem", "lots"], "cannot read memory"),
    (["--threshold", "1.5"], "(0, 1)"),
    (["--min-lesion-size", "3.5"], "whole number"),
    (["--device", "tpu"], "invalid choice"),
    (["--folds", "x"], "integers or 'all'"),
])
def test_bad_flag_values_exit_64(capsys, dataset, tmp_path, args, message):
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", *args)
    assert code == 64 and message in err


def test_settings_roundtrip_through_config_file(dataset, tmp_path):
    s = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--threshold", "0.4",
                    "--mem", "8GB", "--folds", "0", "2", "--no-tta", "--participant-label",
                    "01", "-d", f"masks={tmp_path}", "--min-lesion-size", "10mm3", "-v"])
    assert (s.threshold, s.mem_gb, s.folds, s.tta) == (0.4, 8.0, [0, 2], False)
    cfg = tmp_path / "run.toml"
    cfg.write_text(s.to_toml())
    again = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--config-file",
                        str(cfg), "--threshold", "0.6"])
    assert again.threshold == 0.6  # the command line wins
    assert (again.mem_gb, again.folds, again.tta) == (8.0, [0, 2], False)
    assert Settings.from_toml(s.to_toml()).run_id == s.run_id


@pytest.mark.parametrize("toml, message", [
    ("[segmentation]\nthreshhold = 0.5\n", "[segmentation] threshhold: unknown setting\n"
                                          "  hint: did you mean 'threshold'?"),
    ('[segmentation]\nthreshold = "high"\n', "threshold = 'high': expected a number in (0, 1)"),
    ("[segmentation]\nthreshold = 7\n", "threshold = 7: expected a number in (0, 1)"),
    ('[segmentation]\nmin_lesion_size = "big"\n', "cannot read minimum lesion size 'big'"),
    ('[segmentation]\ndevice = "gpu"\n', "expected one of auto, cpu, cuda"),
    ("[execution]\nnprocs = 0\n", "nprocs = 0: expected a positive integer"),
    ("[execution]\nnprocs = true\n", "nprocs = True: expected a number"),
    ("[segmentation]\ntta = 1\n", "tta = 1: expected true or false"),
    ('[inputs]\nparticipant_label = "01"\n', "expected a list"),
    ("[execution]\nmem_gb = -4\n", "memory must be positive"),
    ("threshold = 0.5\n", "'threshold' is not in a [section]"),
])
def test_a_bad_config_file_is_refused_before_any_work(capsys, dataset, tmp_path, toml,
                                                      message):
    cfg = tmp_path / "settings.toml"
    cfg.write_text(toml)
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant", "--config-file", cfg,
                           "-w", tmp_path / "w")
    assert code == 64, err
    assert f"{cfg}: " in err and message in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()


def test_a_filter_that_drops_an_entity_survives_the_saved_settings(dataset, tmp_path):
    # README: {"inv1": {"acquisition": null}} selects INV1 images without an acq- entity
    filters = tmp_path / "filters.json"
    filters.write_text('{"inv1": {"acquisition": null}, "t1w": {"acquisition": "mprage"}}')
    s = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--bids-filter-file",
                    str(filters)])
    cfg = tmp_path / "saved.toml"
    cfg.write_text(s.to_toml())            # what each run saves under sub-XX/log/<run-id>/
    again = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--config-file",
                        str(cfg)])
    assert again.bids_filters == {"inv1": {"acquisition": None},
                                  "t1w": {"acquisition": "mprage"}}


def test_config_file_values_are_stored_as_the_flags_store_them(dataset, tmp_path):
    cfg = tmp_path / "settings.toml"
    cfg.write_text('[execution]\nnprocs = "4"\n[segmentation]\nthreshold = "0.5"\n'
                   'folds = ["all"]\nmin_lesion_size = 3\n'
                   '[inputs]\nparticipant_label = ["sub-01"]\n')
    s = parse_args([str(dataset), str(tmp_path / "o"), "participant", "--config-file", str(cfg)])
    assert (s.nprocs, s.threshold, s.folds, s.min_lesion_size) == (4, 0.5, None, "3")
    assert s.participant_label == ["01"]
    cfg.write_text('[segmentation]\nfolds = [0, "2"]\n[inputs]\nderivatives = {m = 3}\n')
    with pytest.raises(UsageError, match=r"\[inputs\] derivatives = \{'m': 3\}: expected"):
        parse_args([str(dataset), str(tmp_path / "o"), "participant", "--config-file", str(cfg)])


def test_the_default_work_folder_inside_the_dataset_is_refused(capsys, dataset, tmp_path,
                                                               monkeypatch):
    monkeypatch.chdir(dataset)        # ./work would be inside the dataset
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant",
                           "--skip-bids-validation")
    assert code == 64 and "default work folder (./work in the current folder)" in err
    assert "-w /tmp/work" in err and not (dataset / "work").exists()
    # a dry run writes nothing, so it may run from inside the dataset
    code, out, _ = run_cli(capsys, dataset, dataset / "derivatives" / "cl-bidsapp",
                           "participant", "--dry-run", "--skip-bids-validation")
    assert code == 0 and "sub-01_UNIT1" in out and not (dataset / "work").exists()


def test_the_derivatives_folder_itself_is_refused_as_output(capsys, dataset, tmp_path):
    code, _, err = run_cli(capsys, dataset, dataset / "derivatives", "participant",
                           "-w", tmp_path / "w", "--skip-bids-validation")
    assert code == 64 and "derivatives/ folder itself" in err
    assert str(dataset / "derivatives" / "cl-bidsapp") in err


@pytest.mark.parametrize("description, owner", [
    ({"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
      "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}, "made by fMRIPrep"),
    ({"Name": "raw", "BIDSVersion": "1.9.0"}, "not made by cl-bidsapp"),
    (None, "with an unreadable dataset_description.json"),
])
def test_another_pipelines_folder_is_refused_as_output(capsys, dataset, tmp_path, description,
                                                       owner):
    other = dataset / "derivatives" / "other"
    other.mkdir(parents=True)
    text = json.dumps(description) if description else "{not json"
    (other / "dataset_description.json").write_text(text)
    code, _, err = run_cli(capsys, dataset, other, "participant", "-w", tmp_path / "w",
                           "--skip-bids-validation")
    assert code == 64 and f"output_dir already holds a dataset {owner}" in err
    assert (other / "dataset_description.json").read_text() == text   # untouched
    assert sorted(p.name for p in other.iterdir()) == ["dataset_description.json"]


def test_help_shows_defaults_only_where_they_say_something():
    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "(default: False)" not in text and "(default: 0)" not in text
    assert "fraction of the patch (default: 0.5)" in text


def test_an_unexpected_error_before_settings_exist_never_writes_the_current_folder(
        capsys, dataset, tmp_path, monkeypatch):
    import cl_bidsapp.cli.parser as parser_module

    def broken(argv):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(parser_module, "parse_args", broken)
    monkeypatch.chdir(dataset)
    code, _, err = run_cli(capsys, dataset, tmp_path / "o", "participant")
    assert code == 1 and "unexpected RuntimeError: simulated bug" in err
    assert not list(dataset.glob("crash-*"))
    crash = Path(err.split("details in ")[1].split(";")[0].split("\n")[0])
    assert crash.is_file() and "simulated bug" in crash.read_text()
    crash.unlink()


def test_console_scripts_installed(dataset, tmp_path):
    for cmd in (["cl-bidsapp", "--version"], [sys.executable, "-m", "cl_bidsapp", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and __version__ in proc.stdout
    proc = subprocess.run(["cl-bidsapp", str(dataset), str(tmp_path / "o"), "group2"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 17 and "Traceback" not in proc.stderr


def test_the_validator_installed_with_the_app_is_found_without_an_activated_venv(tmp_path):
    """README's demo runs .venv/bin/cl-bidsapp without activating the venv: the validator pip
    installed beside it is not on PATH, and the run must not stop with 'not installed'."""
    from cl_bidsapp.bids.validation import VALIDATOR
    from cl_bidsapp.simulate import simulate_dataset

    if not (Path(sys.executable).parent / VALIDATOR).is_file():
        pytest.skip(f"{VALIDATOR} is not installed in this environment")
    bids = simulate_dataset(tmp_path / "bids", n_subjects=1, voxel_size=2.0, lesion_mean=1)
    proc = subprocess.run([sys.executable, "-m", "cl_bidsapp", str(bids), str(tmp_path / "out"),
                           "participant", "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "PATH": "/usr/bin:/bin"}, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not installed" not in proc.stderr and "sub-01_UNIT1" in proc.stdout

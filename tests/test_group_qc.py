"""QC flags and the training-domain rule, on summaries read back from written records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cl_bidsapp.group.domain import domain_rule, find_model_card
from cl_bidsapp.group.qc import (MIN_IMAGES, ROBUST_Z_LIMIT, flag_outliers,
                                 flag_run_conditions, robust_z)
from cl_bidsapp.group.records import record_path, summarise_image
from cl_bidsapp.group.testing import FAKE_MODEL, record, work_item, write_table_outputs
from cl_bidsapp.io import write_json
from cl_bidsapp.models.card import sha256_bytes


def _summaries(out, specs):
    """specs: (bids_name, n_lesions, record fields to override)."""
    summaries = []
    for seed, (name, n_lesions, changes) in enumerate(specs):
        item = work_item(name)
        path = write_table_outputs(out, item, n_lesions=n_lesions, seed=seed,
                                   **changes.pop("options", {}))
        if changes:
            data = json.loads(path.read_text())
            for key, value in changes.items():
                data[key] = data[key] | value if isinstance(value, dict) else value
            write_json(path, data)
        summaries.append(summarise_image(item, out, {}))
    return summaries


def _normal_brains(rng, n):
    return [{"brain": {"brain_volume_ml": float(v)}} for v in rng.normal(1200, 60, n)]


def test_robust_z_is_not_fooled_by_the_outliers_it_looks_for():
    values = [1190, 1210, 1200, 1180, 1220, 1205, 1195, 400, 3000]
    z = robust_z(values)
    assert abs(z[-1]) > ROBUST_Z_LIMIT and abs(z[-2]) > ROBUST_Z_LIMIT
    assert (np.abs(z[:-2]) < 2).all()
    # a plain z-score would let the two outliers hide each other
    plain = (np.array(values) - np.mean(values)) / np.std(values)
    assert abs(plain[-2]) < ROBUST_Z_LIMIT


def test_a_brain_mask_far_from_the_rest_is_flagged_in_either_direction(tmp_path):
    rng = np.random.default_rng(0)
    specs = [(f"sub-{i:02d}_T1w", 2, changes) for i, changes in
             enumerate(_normal_brains(rng, 12), start=1)]
    specs += [("sub-90_T1w", 2, {"brain": {"brain_volume_ml": 2400.0}}),   # skull kept
              ("sub-91_T1w", 2, {"brain": {"brain_volume_ml": 500.0}})]    # brain cut
    summaries = _summaries(tmp_path, specs)
    flag_outliers(summaries)
    flagged = {s.bids_name for s in summaries if s.has_flag("brain_volume_outlier")}
    assert flagged == {"sub-90_T1w", "sub-91_T1w"}
    reason = dict(summaries[-2].flags)["brain_volume_outlier"]
    assert "2,400 mL" in reason


def test_lesion_load_outliers_are_flagged_on_the_high_side_only(tmp_path):
    counts = [1, 2, 1, 3, 2, 1, 2, 0, 1, 2]
    specs = [(f"sub-{i:02d}_UNIT1", n, {}) for i, n in enumerate(counts, start=1)]
    specs.append(("sub-99_UNIT1", 60, {}))
    summaries = _summaries(tmp_path, specs)
    flag_outliers(summaries)
    by_count = {s.bids_name: s for s in summaries}
    assert by_count["sub-99_UNIT1"].has_flag("lesion_count_outlier")
    assert by_count["sub-99_UNIT1"].has_flag("lesion_volume_outlier")
    others = [s for s in summaries if s.bids_name != "sub-99_UNIT1"]
    assert not any(s.has_flag("lesion_count_outlier") for s in others)   # 0 and 3 are normal


def test_two_lesions_among_images_with_one_is_not_an_outlier(tmp_path):
    specs = [(f"sub-{i:02d}_UNIT1", 1, {}) for i in range(1, 9)] + [("sub-09_UNIT1", 2, {})]
    summaries = _summaries(tmp_path, specs)
    flag_outliers(summaries)
    assert not any(s.has_flag("lesion_count_outlier") for s in summaries)


def test_intensity_is_compared_within_each_contrast(tmp_path):
    uni = {"brain": {"intensity_p01": 300.0, "intensity_p25": 1600.0, "intensity_p50": 2000.0,
                     "intensity_p75": 2400.0, "intensity_p99": 3000.0}}
    rng = np.random.default_rng(1)
    specs = []
    for i in range(1, 7):   # MP2RAGE UNI on the usual 0..4095 scale, a little variation
        jitter = {k: v * rng.uniform(0.97, 1.03) for k, v in uni["brain"].items()}
        specs.append((f"sub-{i:02d}_UNIT1", 1, {"brain": jitter}))
    for i in range(7, 13):  # MPRAGE on its own scale: not compared with UNI
        specs.append((f"sub-{i:02d}_T1w", 1, {"brain": {k: v * rng.uniform(0.97, 1.03) / 5
                                                          for k, v in uni["brain"].items()}}))
    # a UNI stored as -0.5..0.5 instead of 0..4095
    specs.append(("sub-20_UNIT1", 1, {"brain": {k: v / 4095 - 0.5
                                                for k, v in uni["brain"].items()}}))
    summaries = _summaries(tmp_path, specs)
    flag_outliers(summaries)
    flagged = {s.bids_name for s in summaries if s.has_flag("intensity_outlier")}
    assert flagged == {"sub-20_UNIT1"}
    assert "MP2RAGE" in dict(summaries[-1].flags)["intensity_outlier"]


def test_small_datasets_are_not_searched_for_outliers(tmp_path):
    specs = [(f"sub-{i:02d}_UNIT1", n, {}) for i, n in
             enumerate([1] * (MIN_IMAGES - 2) + [80], start=1)]
    summaries = _summaries(tmp_path, specs)
    flag_outliers(summaries)
    assert not any(s.flags for s in summaries)


def test_demo_model_is_flagged_on_real_data_but_not_on_phantoms(tmp_path):
    demo = {"model": FAKE_MODEL | {"IsDemo": True, "Name": "cl-demo-phantom"}}
    summaries = _summaries(tmp_path, [("sub-01_UNIT1", 1, dict(demo)),
                                      ("sub-02_UNIT1", 1, {})])
    flag_run_conditions(summaries, phantom_dataset=True)
    assert not any(s.has_flag("demo_model") for s in summaries)
    flag_run_conditions(summaries, phantom_dataset=False)
    assert [s.has_flag("demo_model") for s in summaries] == [True, False]
    assert "cl-demo-phantom" in dict(summaries[0].flags)["demo_model"]


def test_the_noisy_background_fallback_is_flagged(tmp_path):
    summaries = _summaries(tmp_path, [("sub-01_UNIT1", 1, {"masking_method": "uni"}),
                                      ("sub-02_UNIT1", 1, {})])
    flag_run_conditions(summaries, phantom_dataset=True)
    assert [s.has_flag("noisy_background_fallback") for s in summaries] == [True, False]


def test_images_run_with_another_model_or_threshold_are_flagged(tmp_path):
    other = {"model": FAKE_MODEL | {"SHA256": "cd" * 32, "Name": "older-model"}}
    specs = [(f"sub-{i:02d}_UNIT1", 1, {}) for i in range(1, 5)]
    specs += [("sub-05_UNIT1", 1, other),
              ("sub-06_UNIT1", 1, {"options": {"threshold": 0.3}})]
    summaries = _summaries(tmp_path, specs)
    flag_run_conditions(summaries, phantom_dataset=True)
    flagged = {s.bids_name: dict(s.flags).get("different_settings") for s in summaries}
    assert "older-model" in flagged["sub-05_UNIT1"]
    assert "threshold 0.3" in flagged["sub-06_UNIT1"]
    assert all(flagged[f"sub-{i:02d}_UNIT1"] is None for i in range(1, 5))


def test_images_processed_by_another_app_version_or_minimum_size_are_flagged(tmp_path):
    specs = [(f"sub-{i:02d}_UNIT1", 1, {}) for i in range(1, 5)]
    specs += [("sub-05_UNIT1", 1, {"software": {"cl-bidsapp": "0.0.9"}}),
              ("sub-06_UNIT1", 1, {"software": None}),        # written before records had it
              ("sub-07_UNIT1", 1, {"settings": {"min_lesion_size": "1"}}),
              # 10 mm3 gives other voxel counts at other voxel sizes: not a different setting
              ("sub-08_UNIT1", 1, {"lesions": {"min_size_voxels": 2}})]
    summaries = _summaries(tmp_path, specs)
    flag_run_conditions(summaries, phantom_dataset=True)
    flagged = {s.bids_name: dict(s.flags).get("different_settings") for s in summaries}
    assert "cl-bidsapp 0.0.9 while most images used cl-bidsapp " in flagged["sub-05_UNIT1"]
    assert "did not record its version" in flagged["sub-06_UNIT1"]
    assert "minimum lesion size: 1 voxels while most images used 3 voxels" in \
        flagged["sub-07_UNIT1"]
    assert all(flagged[f"sub-{i:02d}_UNIT1"] is None for i in (1, 2, 3, 4, 8))
    assert summaries[0].values["app_version"] == summaries[6].values["app_version"]


def test_records_that_all_lack_the_app_version_are_not_flagged(tmp_path):
    summaries = _summaries(tmp_path, [(f"sub-{i:02d}_UNIT1", 1, {"software": None})
                                      for i in range(1, 4)])
    flag_run_conditions(summaries, phantom_dataset=True)
    assert not any(s.has_flag("different_settings") for s in summaries)
    assert summaries[0].values["app_version"] is None


def test_a_failed_record_is_flagged_with_its_error_and_exit_code(tmp_path):
    item = work_item("sub-01_T1w")
    write_json(record_path(tmp_path, "01", item.bids_name),
               record(item, {}, lesion_count=0, total_volume_mm3=0, status="failed"))
    summary = summarise_image(item, tmp_path, {})
    assert summary.status == "failed"
    assert dict(summary.flags)["failed"].endswith("something went wrong (exit 65)")


def test_an_unreadable_record_counts_as_missing_outputs(tmp_path):
    item = work_item("sub-01_T1w")
    path = record_path(tmp_path, "01", item.bids_name)
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    summary = summarise_image(item, tmp_path, {})
    assert summary.status == "missing" and summary.has_flag("missing_outputs")


@pytest.mark.parametrize("card, participant, expected", [
    ({"training": {"sites": ["Basel", "NIH"]}}, {"site": "Basel"}, "in-domain"),
    ({"training": {"sites": ["Basel", "NIH"]}}, {"site": "UCLouvain"}, "out-of-domain"),
    ({"training": {"simulator": {"protocols": ["3T-MP2RAGE"]}}},
     {"protocol": "3T-MPRAGE"}, "out-of-domain"),
    ({"training": {"protocols": ["3T-MP2RAGE"]}, "input": {"contrasts": ["UNIT1"]}},
     {"site": "x"}, "in-domain"),        # no protocol column: falls back to the contrast
    ({"input": {"contrasts": ["UNIT1"]}}, {"contrast": "MPRAGE"}, "out-of-domain"),
    (None, {"site": "Basel"}, "unknown"),
])
def test_domain_rule(card, participant, expected):
    rule = domain_rule(card, has_site="site" in participant,
                       has_protocol="protocol" in participant)
    got = rule.classify(participant.get("site"), participant.get("protocol"),
                        participant.get("contrast", "MP2RAGE"))
    assert got == expected
    assert rule.describe()


def test_the_model_card_is_found_by_its_sha256_in_the_models_cache(tmp_path):
    folder = tmp_path / "models" / "cl-2025"
    folder.mkdir(parents=True)
    raw = json.dumps({"name": "cl-2025", "training": {"sites": ["Basel"]}}).encode()
    (folder / "cl_model.json").write_bytes(raw)
    card = find_model_card(sha256_bytes(raw), None, tmp_path / "models")
    assert card["training"]["sites"] == ["Basel"]
    assert find_model_card("00" * 32, None, tmp_path / "models") is None
    assert find_model_card(sha256_bytes(raw), folder, tmp_path / "elsewhere") is not None

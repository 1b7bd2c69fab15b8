"""Reference lesions lie where cortical lesions lie and look as the physics says."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cl_bidsapp.core.mp2rage import uni_from_scanner
from cl_bidsapp.simulate.anatomy import tissue_labels
from cl_bidsapp.simulate.lesions import draw_count, draw_volume
from cl_bidsapp.simulate.phantom import simulate_session

CUBE = np.ones((3, 3, 3), bool)


@pytest.fixture(scope="module")
def sessions():
    return [simulate_session(["3T-MP2RAGE"], subject=s, voxel_size=2.0, seed=5,
                             lesion_mean=10.0) for s in (1, 2, 3)]


def test_every_lesion_is_cortical(sessions):
    kinds = set()
    n_lesions = 0
    for phantom in sessions:
        a = phantom.anatomy
        labels = tissue_labels(a.gm, a.wm, a.csf)
        components, n = ndi.label(phantom.lesion_labels > 0, CUBE)
        assert n == len(phantom.lesions)  # lesions never touch each other
        for lesion in phantom.lesions:
            n_lesions += 1
            kinds.add(lesion.kind)
            mask = phantom.lesion_labels == lesion.lesion_id
            tissue = labels[mask]
            assert mask.sum() >= 3
            assert set(tissue) <= {1, 2}, "lesion voxels must be grey or white matter"
            if lesion.kind == "intracortical":
                assert np.all(tissue == 1)
                neighbours = labels[ndi.binary_dilation(mask, CUBE)]
                assert not np.any(neighbours == 2), "intracortical lesion touches white matter"
            else:
                assert np.any(tissue == 1) and np.any(tissue == 2), \
                    "leukocortical lesion must cross the grey/white boundary"
    assert n_lesions >= 10 and kinds == {"intracortical", "leukocortical"}


def _lesion_minus_grey_matter(phantom):
    """Mean UNI in each lesion minus mean UNI of the grey matter around it (0..4095 scale)."""
    a = phantom.anatomy
    uni = phantom.images["3T-MP2RAGE"]["uni"].astype(np.float64)
    grey = tissue_labels(a.gm, a.wm, a.csf) == 1
    any_lesion = ndi.binary_dilation(phantom.lesion_labels > 0, CUBE)
    out = []
    for lesion in phantom.lesions:
        mask = phantom.lesion_labels == lesion.lesion_id
        ring = ndi.binary_dilation(mask, CUBE, iterations=3) & ~any_lesion & grey
        out.append(uni[mask & grey].mean() - uni[ring].mean())
    return np.array(out)


def test_lesions_are_darker_than_cortex_on_uni(sessions):
    diffs = np.concatenate([_lesion_minus_grey_matter(p) for p in sessions])
    assert np.mean(diffs < 0) >= 0.9
    assert np.median(diffs) < -150  # physics: ~ -600 for pure tissue, less with partial volume


def test_lesion_t1_sets_the_direction_and_size_of_the_contrast():
    def lesion_uni(contrast):
        phantom = simulate_session(["3T-MP2RAGE"], subject=1, voxel_size=2.0, seed=5,
                                   lesion_mean=10.0, lesion_contrast=contrast)
        uni = phantom.images["3T-MP2RAGE"]["uni"].astype(np.float64)
        return phantom.lesion_labels, np.array(
            [uni[phantom.lesion_labels == lesion.lesion_id].mean() for lesion in phantom.lesions])

    labels, neutral = lesion_uni(1.0)
    labels_dark, dark = lesion_uni(1.3)
    labels_bright, bright = lesion_uni(0.75)
    # the contrast changes the lesions' T1 only, not where they are
    assert np.array_equal(labels, labels_dark) and np.array_equal(labels, labels_bright)
    assert np.all(dark < neutral) and np.all(bright > neutral)
    # 3T physics for pure tissue: T1 x 1.3 lowers UNI by ~0.15 (~600); partial volume and the
    # lesion edge make it somewhat less
    assert -700 < np.median(dark - neutral) < -300
    assert np.median(bright - neutral) > 300


def test_volume_scale_gives_larger_lesions_at_2_mm():
    plain, scaled = (simulate_session(["3T-MP2RAGE"], subject=2, voxel_size=2.0, seed=5,
                                      lesion_mean=10.0, lesion_volume_scale=scale)
                     for scale in (1.0, 8.0))
    sizes = [np.array([len(les.voxels) for les in p.lesions]) for p in (plain, scaled)]
    assert len(sizes[1]) >= len(sizes[0]) - 1
    assert np.median(sizes[0]) == 3
    assert np.median(sizes[1]) >= 2 * np.median(sizes[0]) and sizes[1].max() > 30


def test_lesion_volumes_are_heavy_tailed_within_bounds():
    volumes = draw_volume(np.random.default_rng(0), 20000)
    assert volumes.min() >= 3.0 and volumes.max() <= 300.0
    assert np.median(volumes) < 15.0
    assert np.mean(volumes > 100.0) > 0.03  # a tail of large lesions


def test_lesion_counts_scatter_around_the_mean_with_some_zeros():
    rng = np.random.default_rng(0)
    counts = np.array([draw_count(rng, 8.0) for _ in range(4000)])
    assert counts.mean() == pytest.approx(8.0, rel=0.06)
    assert 0.03 < np.mean(counts == 0) < 0.2
    assert draw_count(rng, 0.0) == 0


def test_uni_values_of_pure_tissue_match_the_worked_example(sessions):
    a = sessions[0].anatomy
    uni = uni_from_scanner(sessions[0].images["3T-MP2RAGE"]["uni"])
    no_lesion = ~ndi.binary_dilation(sessions[0].lesion_labels > 0, CUBE, iterations=2)
    # subject T1s vary by a few percent and B1+ by ~5 %: allow a few hundredths
    assert np.median(uni[(a.wm > 0.95) & no_lesion]) == pytest.approx(0.20, abs=0.04)
    assert np.median(uni[(a.gm > 0.8) & no_lesion]) == pytest.approx(-0.07, abs=0.05)
    assert np.median(uni[a.csf > 0.95]) == pytest.approx(-0.49, abs=0.04)

"""Phantom heads: individual anatomy, a head around the brain, scanner-like background."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from cl_bidsapp.simulate.phantom import simulate_session


@pytest.fixture(scope="module")
def pair():
    return [simulate_session(["3T-MP2RAGE", "3T-MPRAGE", "7T-MP2RAGE"], subject=s,
                             voxel_size=2.0, seed=8, lesion_mean=0) for s in (1, 2)]


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_no_two_subjects_share_voxel_positions(pair):
    first, second = (p.anatomy for p in pair)
    assert first.shape == second.shape
    assert _dice(first.brain_mask, second.brain_mask) < 0.9
    assert _dice(first.gm > 0.5, second.gm > 0.5) < 0.7
    volumes = [a.brain_mask.sum() * a.voxel_size ** 3 / 1000 for a in (first, second)]
    for litres in volumes:
        assert 1000 < litres < 2000  # cm^3: adult brain sizes
    assert volumes[0] != volumes[1]


def test_head_around_the_brain_gives_brain_extraction_work(pair):
    a = pair[0].anatomy
    inv2 = pair[0].images["3T-MP2RAGE"]["inv2"].astype(np.float64)
    brain = a.brain_mask
    voxel = a.voxel_size
    dist = ndi.distance_transform_edt(~brain, sampling=voxel)
    scalp_zone = (dist > 3) & (dist < 25)
    # skull, diploe, fat and soft tissue all present around the brain
    for tissue in ("bone", "marrow", "fat", "soft"):
        assert getattr(a, tissue)[scalp_zone].sum() * voxel ** 3 > 20_000, tissue
    # the scalp is bright (fat) and the skull dark, as on real images
    brain_level = np.median(inv2[brain])
    assert np.median(inv2[scalp_zone & (a.fat > 0.5)]) > brain_level
    assert np.median(inv2[scalp_zone & (a.bone > 0.5)]) < 0.5 * brain_level
    # non-brain tissue covers more voxels than the brain itself
    head = (a.gm + a.wm + a.csf + a.bone + a.marrow + a.fat + a.soft) > 0.5
    assert (head & ~brain).sum() > brain.sum()


def test_uni_background_is_salt_and_pepper_and_inversions_are_dark(pair):
    a = pair[0].anatomy
    images = pair[0].images["3T-MP2RAGE"]
    head = a.gm + a.wm + a.csf + a.bone + a.marrow + a.fat + a.soft
    air = ndi.distance_transform_edt(head == 0) > 3
    uni = images["uni"][air].astype(np.float64)
    assert uni.std() > 800
    assert np.percentile(uni, 5) < 800 and np.percentile(uni, 95) > 3300
    wm = images["uni"][a.wm > 0.95].astype(np.float64)
    assert wm.std() < 0.25 * uni.std()
    # magnitude images: only the Rayleigh noise floor in the air
    assert np.median(images["inv2"][air]) < 0.1 * np.median(images["inv2"][a.brain_mask])
    t1w = pair[0].images["3T-MPRAGE"]["t1w"]
    assert np.median(t1w[air]) < 0.1 * np.median(t1w[a.brain_mask])


def test_mprage_contrast_and_receive_bias(pair):
    a = pair[0].anatomy
    t1w = pair[0].images["3T-MPRAGE"]["t1w"].astype(np.float64)
    wm, gm, csf = (np.median(t1w[m]) for m in (a.wm > 0.95, a.gm > 0.8, a.csf > 0.95))
    assert wm > 1.2 * gm > 1.2 * csf
    # the receive bias shows on magnitude images but cancels in UNI
    uni = pair[0].images["3T-MP2RAGE"]["uni"].astype(np.float64)
    inv2 = pair[0].images["3T-MP2RAGE"]["inv2"].astype(np.float64)
    white = np.argwhere(a.wm > 0.95)
    octant = ((white > white.mean(0)) * [4, 2, 1]).sum(1)

    def spread_of_regional_means(img):
        means = np.array([img[tuple(white[octant == k].T)].mean() for k in range(8)])
        return means.std() / means.mean()

    assert spread_of_regional_means(inv2) > 2 * spread_of_regional_means(uni)


def test_7t_b1_inhomogeneity_spreads_uni(pair):
    a = pair[0].anatomy
    grey = a.gm > 0.8
    spread = {name: np.percentile(pair[0].images[name]["uni"][grey], 90)
              - np.percentile(pair[0].images[name]["uni"][grey], 10)
              for name in ("3T-MP2RAGE", "7T-MP2RAGE")}
    assert spread["7T-MP2RAGE"] > 1.3 * spread["3T-MP2RAGE"]

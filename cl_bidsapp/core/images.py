"""Loading and checking input images, before any work starts.

:func:`load_image` turns every way a NIfTI file can be unusable into an
:class:`~cl_bidsapp.errors.InputDataError` (exit 65) or, when the content is simply not there
(a DataLad/git-annex file not fetched, a missing file), a
:class:`~cl_bidsapp.errors.MissingInputError` (exit 66), with a message that names the file.
:func:`check_image` then refuses images that cannot be a structural head scan and warns about
ones that can be used with care; :func:`detect_skull_stripped` (from
:mod:`cl_bidsapp.core.brain`) tells whether an image is already brain-extracted and
:func:`compare_grids` whether two images share a voxel grid. Nothing here reorients or
resamples: the image returned is on the source grid, voxel for voxel, so outputs line up
with the user's image.

Limits (module constants, in millimetres):

* each axis needs at least :data:`MIN_VOXELS_PER_AXIS` voxels (a slice or a thin slab is
  not a head);
* voxel edges between :data:`MIN_VOXEL_MM` and :data:`MAX_VOXEL_MM` (outside that, the header
  is almost surely in metres or microns, or the image is not a structural MRI);
* voxel anisotropy (longest / shortest edge) above :data:`WARN_ANISOTROPY` warns (thick slices
  hide small cortical lesions), above :data:`MAX_ANISOTROPY` refuses;
* NaN or infinite voxels are set to 0 with a warning, and refused above
  :data:`MAX_NONFINITE_FRACTION` of the image;
* axes tilted by more than :data:`OBLIQUE_WARN_DEGREES` from the scanner axes warn.

>>> import numpy as np, nibabel as nib
>>> img = nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20, 1)), np.eye(4))
>>> clean, warnings = check_image(img, "sub-01_T1w.nii.gz")
>>> clean.shape, warnings
((20, 20, 20), ['sub-01_T1w.nii.gz is stored as 4-D with a single volume; it is used as a 3-D image.'])
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity, voxel_sizes

from cl_bidsapp.core.brain import detect_skull_stripped  # noqa: F401  (re-exported)
from cl_bidsapp.errors import InputDataError, IOFailure, MissingInputError

logger = logging.getLogger(__name__)

MIN_VOXELS_PER_AXIS = 16
MIN_VOXEL_MM = 0.1
MAX_VOXEL_MM = 10.0
WARN_ANISOTROPY = 3.0
MAX_ANISOTROPY = 10.0
MAX_NONFINITE_FRACTION = 0.25
OBLIQUE_WARN_DEGREES = 1.0

_GZIP_MAGIC = b"\x1f\x8b"
_ANNEX_MARKER = "annex/objects"


def load_image(path: str | Path) -> nib.Nifti1Image:
    """Read a NIfTI image fully, or explain in plain words why it cannot be read.

    The data are read at once (a truncated file fails here, not hours later) and returned in
    memory; scaling (``scl_slope``) is applied.

    Parameters
    ----------
    path : str or Path
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nibabel.Nifti1Image (or Nifti2Image)

    Raises
    ------
    MissingInputError
        The file does not exist, cannot be opened, or is a DataLad/git-annex file whose content
        has not been fetched (the message says to run ``datalad get``).
    InputDataError
        Empty file, truncated or corrupt compression, content that is not NIfTI, a header that
        cannot be read.
    """
    path = Path(path)
    _check_file_is_there(path)
    head = _read_head(path)
    if not head:
        raise InputDataError("the file is empty (0 bytes)", path=path,
                             hint="the download or copy did not finish; fetch the file again")
    if head.lstrip().startswith(b"/annex/objects/") or (
            len(head) < 1024 and _ANNEX_MARKER.encode() in head):
        raise MissingInputError("the image content is not present (this is a git-annex pointer "
                                "file, not the image)", path=path, hint=f"run `datalad get {path}`")
    _check_format(path, head)
    try:
        # nibabel prints its own header complaints; ours below say it in plain words.
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.load(str(path), mmap=False)
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError,
            ValueError, struct.error) as exc:
        raise InputDataError(f"the NIfTI header cannot be read ({_one_line(exc)})",
                             path=path) from None
    except (EOFError, zlib.error, OSError) as exc:
        raise InputDataError(f"the file is truncated or corrupt ({_one_line(exc)})",
                             path=path) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputDataError(f"not a NIfTI image (read as {type(img).__name__})", path=path)
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise InputDataError(
            f"the image data are incomplete: the file is truncated or corrupt "
            f"({_one_line(exc)})",
            path=path, hint="the download or copy did not finish; fetch the file again") from None
    header = img.header.copy()
    if data.dtype != header.get_data_dtype() and data.dtype.kind == "f":
        header.set_data_dtype(np.float32)   # scaled integers: keep values, not the int type
    with np.errstate(invalid="ignore"):
        finite = bool(np.isfinite(img.affine).all())
    # A NaN in the orientation cannot be re-encoded into a header; keep the header's own, so
    # that check_image refuses it in plain words.
    return img.__class__(data, img.affine if finite else None, header)


def check_image(img: nib.spatialimages.SpatialImage, name: str
                ) -> tuple[nib.Nifti1Image, list[str]]:
    """Check that an image can be a structural head scan; return it cleaned, with warnings.

    Parameters
    ----------
    img : nibabel image
        As returned by :func:`load_image`.
    name : str
        The file name, used in messages.

    Returns
    -------
    image : nibabel image
        The same image, or a copy with singleton 4th+ axes removed and NaN/Inf voxels set to
        0; always on the source grid (same shape and affine).
    warnings : list of str
        Plain sentences about things the user should know (empty when all is well).

    Raises
    ------
    InputDataError
        For a 4-D series, too few voxels, a broken orientation matrix, absurd voxel sizes or
        anisotropy, an all-zero or constant image, mostly NaN/Inf voxels, complex values.

    Examples
    --------
    >>> flat = nib.Nifti1Image(np.zeros((20, 20, 20)), np.eye(4))
    >>> check_image(flat, "sub-01_T1w.nii.gz")
    Traceback (most recent call last):
    ...
    cl_bidsapp.errors.InputDataError: sub-01_T1w.nii.gz: every voxel is 0: the image is empty
    """
    def refuse(problem: str, hint: str | None = None) -> None:
        raise InputDataError(problem, path=name, hint=hint)

    warnings: list[str] = []
    data = np.asanyarray(img.dataobj)
    changed = False
    if data.ndim > 3:
        extra = data.shape[3:]
        if any(n != 1 for n in extra):
            refuse(f"is a {data.ndim}-D series of {int(np.prod(extra))} volumes; "
                   "a single 3-D image is needed", hint="select one volume")
        data = data.reshape(data.shape[:3])
        changed = True
        warnings.append(f"{name} is stored as {img.ndim}-D with a single volume; "
                        "it is used as a 3-D image.")
    if data.ndim < 3 or min(data.shape) < MIN_VOXELS_PER_AXIS:
        refuse(f"has {_shape_text(data.shape)} voxels, too few for a head: each of the 3 axes "
               f"needs at least {MIN_VOXELS_PER_AXIS} voxels")
    if data.dtype.kind == "c" or data.dtype.fields is not None:
        refuse(f"has {data.dtype} voxel values (complex or RGB); a magnitude image is needed")

    _check_geometry(img, name, warnings, refuse)

    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        n_bad = int(finite.size - np.count_nonzero(finite))
        if n_bad:
            fraction = n_bad / data.size
            if fraction > MAX_NONFINITE_FRACTION:
                refuse(f"{fraction:.0%} of the voxels are NaN or infinite",
                       hint="if the image was masked with NaN, set the background to 0")
            data = np.where(finite, data, 0).astype(data.dtype, copy=False)
            changed = True
            warnings.append(f"{name} has {n_bad} NaN or infinite voxels "
                            f"({fraction:.2%}); they were set to 0.")
    low, high = data.min(), data.max()
    if low == high:
        if low == 0:
            refuse("every voxel is 0: the image is empty")
        refuse(f"every voxel has the same value ({low:g}): the image holds no anatomy")

    for text in warnings:
        logger.debug(text)
    if not changed:
        return img, warnings
    header = img.header.copy()
    return img.__class__(data, img.affine, header), warnings


def _check_geometry(img, name: str, warnings: list[str], refuse) -> None:
    """Affine, orientation codes, voxel sizes and units, anisotropy, obliquity."""
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all():
        refuse("the orientation matrix (affine) in the header has NaN or infinite values")
    linear = affine[:3, :3]
    zooms = voxel_sizes(affine)
    if zooms.min() == 0 or abs(np.linalg.det(linear)) < 1e-6 * np.prod(zooms):
        refuse("the orientation matrix (affine) in the header is not invertible "
               "(a voxel axis has zero length or two axes coincide)")
    header = img.header
    if isinstance(header, nib.Nifti1Header):
        if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
            warnings.append(f"{name} has no orientation in its header (qform and sform codes "
                            "are 0); voxel axes are assumed to be RAS: check left and right.")
        unit = header.get_xyzt_units()[0]
    else:
        unit = "unknown"
    size_text = "x".join(f"{z:.3g}" for z in zooms)
    if unit in ("meter", "micron"):
        refuse(f"voxel sizes are given in {unit}s ({size_text} {unit}); this app needs "
               "millimetres", hint="convert the header to millimetres (xyzt_units)")
    if zooms.min() < MIN_VOXEL_MM:
        refuse(f"voxel size {size_text} mm is implausibly small (under {MIN_VOXEL_MM} mm); "
               "is the header in metres?")
    if zooms.max() > MAX_VOXEL_MM:
        refuse(f"voxel size {size_text} mm is larger than {MAX_VOXEL_MM:g} mm: "
               "not a structural MRI, or the header is not in millimetres")
    ratio = zooms.max() / zooms.min()
    if ratio > MAX_ANISOTROPY:
        refuse(f"voxels of {size_text} mm are {ratio:.1f} times longer than wide "
               f"(at most {MAX_ANISOTROPY:g}:1 is usable)")
    if ratio > WARN_ANISOTROPY:
        warnings.append(f"{name} has strongly anisotropic voxels ({size_text} mm, "
                        f"{ratio:.1f}:1); thick slices hide small cortical lesions.")
    tilt = float(np.degrees(obliquity(affine)).max())
    if tilt > OBLIQUE_WARN_DEGREES:
        warnings.append(f"{name} is oblique (axes tilted up to {tilt:.1f} degrees from the "
                        "scanner axes); it is kept on its own grid, not resampled.")


def compare_grids(img_a, img_b, tol: float = 0.01,
                  names: tuple[str, str] = ("first image", "second image")) -> tuple[bool, str]:
    """Tell whether two images share a voxel grid (shape and affine), and what differs.

    Parameters
    ----------
    img_a, img_b : nibabel images
        E.g. INV2 and UNI, or a reference mask and a prediction. Singleton 4th+ axes ignored.
    tol : float
        Largest distance in mm between the positions the two affines give to the same voxel
        (checked at the corners of the grid, where it is largest).
    names : (str, str)
        Used in the message.

    Returns
    -------
    same : bool
    message : str
        What differs, in plain words (or a confirmation).

    Examples
    --------
    >>> a = nib.Nifti1Image(np.zeros((4, 4, 4)), np.eye(4))
    >>> b = nib.Nifti1Image(np.zeros((4, 4, 4)), np.diag([1, 1, 1.2, 1]))
    >>> compare_grids(a, a)[0]
    True
    >>> compare_grids(a, b, names=("INV2", "UNI"))
    (False, 'INV2 and UNI are on different grids: the same voxel lies up to 0.6 mm apart (voxel sizes 1x1x1 mm vs 1x1x1.2 mm)')
    """
    shape_a, shape_b = _spatial_shape(img_a.shape), _spatial_shape(img_b.shape)
    label = f"{names[0]} and {names[1]}"
    if shape_a != shape_b:
        return False, (f"{label} have different shapes: {_shape_text(shape_a)} vs "
                       f"{_shape_text(shape_b)} voxels")
    affine_a = np.asarray(img_a.affine, float)
    affine_b = np.asarray(img_b.affine, float)
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape_a],
                                   indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    distance = float(np.linalg.norm((affine_a @ corners - affine_b @ corners)[:3], axis=0).max())
    if not np.isfinite(distance):
        return False, f"{label} cannot be compared: an affine has NaN or infinite values"
    if distance > tol:
        sizes = [ "x".join(f"{z:.3g}" for z in voxel_sizes(a)) for a in (affine_a, affine_b)]
        detail = (f"voxel sizes {sizes[0]} mm vs {sizes[1]} mm" if sizes[0] != sizes[1]
                  else "same voxel sizes: the images are shifted or rotated")
        return False, (f"{label} are on different grids: the same voxel lies up to "
                       f"{distance:.3g} mm apart ({detail})")
    return True, (f"{label} share a grid ({_shape_text(shape_a)} voxels, positions agree "
                  f"within {tol:g} mm)")


def _spatial_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)


def _check_file_is_there(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        if _ANNEX_MARKER in target.replace(os.sep, "/"):
            raise MissingInputError(
                "the image content is not present: it is a DataLad/git-annex file that has "
                "not been downloaded", path=path, hint=f"run `datalad get {path}`")
        raise MissingInputError(f"broken symbolic link (it points to {target}, which does "
                                "not exist)", path=path)
    if not path.exists():
        raise MissingInputError("file not found", path=path)
    if path.is_dir():
        raise InputDataError("is a folder, not an image file", path=path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputDataError("is not a NIfTI file name (expected .nii or .nii.gz)", path=path)


def _one_line(exc: BaseException) -> str:
    """A library's error message on one line, without its own advice ("- could ...?")."""
    text = " ".join(str(exc).split()).split(" - could")[0].strip()
    if text.endswith(" from"):  # nibabel names an anonymous file object as ""
        text = text[: -len(" from")]
    return text or type(exc).__name__


def _read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(1024)
    except PermissionError:
        raise MissingInputError("cannot be opened (permission denied)", path=path) from None
    except OSError as exc:
        raise IOFailure(f"cannot be read ({exc.strerror or exc})", path=path) from None


def _check_format(path: Path, head: bytes) -> None:
    """Compare the file's first bytes with what its name promises."""
    compressed = head[:2] == _GZIP_MAGIC
    if path.name.endswith(".nii.gz"):
        if not compressed:
            if _is_nifti_header(head):
                raise InputDataError("is named .nii.gz but is not compressed (it is a plain "
                                     ".nii file)", path=path, hint="rename it to .nii")
            raise InputDataError(f"is not a NIfTI image: the file is not gzip-compressed and "
                                 f"has no NIfTI header ({_describe(head)})", path=path)
        try:
            with gzip.open(path, "rb") as handle:
                inner = handle.read(540)
        except (EOFError, zlib.error, OSError) as exc:
            raise InputDataError(f"the compressed file is truncated or corrupt ({exc})",
                                 path=path) from None
        if not _is_nifti_header(inner):
            raise InputDataError(f"is not a NIfTI image: the compressed content has no NIfTI "
                                 f"header ({_describe(inner)})", path=path)
    elif compressed:
        raise InputDataError("is named .nii but is gzip-compressed", path=path,
                             hint="rename it to .nii.gz")
    elif not _is_nifti_header(head):
        raise InputDataError(f"is not a NIfTI image: no NIfTI header ({_describe(head)})",
                             path=path)


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        for order in "<>":
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348 and head[344:347] in (b"n+1", b"ni1"):
                return True
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return True
    return False


def _describe(head: bytes) -> str:
    """A few words on what the content looks like, to help the user find the mix-up."""
    text = head[:200].lower()
    if b"<html" in text or b"<!doctype" in text:
        return "it looks like an HTML page, e.g. a download error page"
    if head[:4] == b"PK\x03\x04":
        return "it looks like a zip archive"
    if b"dicm" in head[128:132].lower():
        return "it looks like a DICOM file; convert it with dcm2niix"
    try:
        head[:200].decode("utf-8")
        return "it looks like a text file"
    except UnicodeDecodeError:
        return "unknown binary content"

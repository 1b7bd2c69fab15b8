"""Write simulated subjects as a BIDS dataset with a ground-truth derivatives dataset.

Layout (``[ses-YY]`` only when there are several sessions)::

    dataset_description.json  README  participants.tsv/.json
    sub-01/[ses-01/]anat/sub-01[_ses-01]_inv-1_MP2RAGE.nii.gz (+ .json)
                                         _inv-2_MP2RAGE.nii.gz (+ .json)
                                         _UNIT1.nii.gz         (+ .json)
    sub-02/anat/sub-02_T1w.nii.gz (+ .json)                    (MPRAGE protocols)
    derivatives/reference/dataset_description.json  simulation.json
        sub-01/[ses-01/]anat/sub-01[_ses-01]_label-CL_mask.nii.gz (+ .json)
                                          _seg-CL_dseg.nii.gz      (lesion ids of the table)
                                          _label-CL_lesions.tsv (+ .json)
                                          _label-GM|WM|CSF_probseg.nii.gz
                                          _desc-brain_mask.nii.gz

All files go through the atomic writers of :mod:`cl_bidsapp.io`; gzip headers carry no time
stamp, so the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from cl_bidsapp import __version__
from cl_bidsapp.errors import OutputError, TemporaryFailure, UsageError
from cl_bidsapp.io import save_nifti, write_error, write_json, write_text
from cl_bidsapp.simulate.phantom import lesion_rows, simulate_session
from cl_bidsapp.simulate.protocols import PROTOCOLS, get_protocol

log = logging.getLogger(__name__)

GENERATOR = "cl-bidsapp-simulate"
BIDS_VERSION = "1.10.0"
DEFAULT_NOISE = 0.03
REFERENCE = Path("derivatives") / "reference"

LESION_COLUMNS = {
    "lesion_id": {"Description": "Lesion number; the value of the lesion's voxels in the "
                                 "seg-CL_dseg image"},
    "type": {"Description": "Cortical lesion type",
             "Levels": {"intracortical": "within cortical grey matter, not touching white "
                                         "matter (no white-matter voxel among its 26 neighbours)",
                        "leukocortical": "spans the grey/white matter boundary (has grey- and "
                                         "white-matter voxels)"}},
    "n_voxels": {"Description": "Number of voxels in the reference mask"},
    "volume_mm3": {"Description": "Lesion volume", "Units": "mm^3"},
    "centroid_i": {"Description": "Centroid, first voxel index (0-based)"},
    "centroid_j": {"Description": "Centroid, second voxel index (0-based)"},
    "centroid_k": {"Description": "Centroid, third voxel index (0-based)"},
    "centroid_x": {"Description": "Centroid in scanner (image affine) coordinates, x",
                   "Units": "mm"},
    "centroid_y": {"Description": "Centroid in scanner coordinates, y", "Units": "mm"},
    "centroid_z": {"Description": "Centroid in scanner coordinates, z", "Units": "mm"},
    "n_voxels_gm": {"Description": "Lesion voxels whose most likely tissue is grey matter"},
    "n_voxels_wm": {"Description": "Lesion voxels whose most likely tissue is white matter"},
    "t1_ratio": {"Description": "Lesion T1 divided by the subject's grey-matter T1"},
    "t1_ms": {"Description": "Lesion T1 used in the simulation", "Units": "ms"},
}


def simulate_dataset(out_dir, n_subjects: int = 3, n_sessions: int = 1,
                     protocols=("3T-MP2RAGE",), voxel_size: float = 1.0,
                     lesion_mean: float = 8.0, lesion_contrast: float = 1.3,
                     noise: float = DEFAULT_NOISE, seed: int = 0,
                     leukocortical_fraction: float = 0.5,
                     lesion_volume_scale: float = 1.0, nprocs: int = 1) -> Path:
    """Simulate MP2RAGE/MPRAGE phantoms with cortical lesions as a BIDS dataset.

    Parameters
    ----------
    out_dir : str or Path
        Dataset root. Created if needed; a folder written before by this generator is
        replaced (its ``sub-*`` folders and ``derivatives/reference``), any other non-empty
        folder is refused.
    n_subjects, n_sessions : int
        Subjects ``sub-01``... and, when ``n_sessions`` > 1, sessions ``ses-01``... A subject's
        sessions share anatomy and lesions; head pose, fields and noise differ.
    protocols : sequence of str
        Presets (``3T-MP2RAGE``, ``7T-MP2RAGE``, ``3T-MPRAGE``); subjects are assigned to them
        in turn, one protocol per site.
    voxel_size : float
        Isotropic voxel size, mm (1 by default; 2 gives small, fast test data).
    lesion_mean : float
        Mean number of cortical lesions per subject.
    lesion_contrast : float
        Lesion T1 / grey-matter T1 (1.3: lesions darker than cortex on UNI and T1w).
    noise : float
        Complex noise SD relative to the white-matter signal of INV2 (or of the T1w image).
    seed : int
        Same seed and arguments, same bytes.
    leukocortical_fraction : float
        Share of lesions that cross the grey/white boundary.
    lesion_volume_scale : float
        Multiplies the lesion volumes (drawn between 3 and 300 mm^3); lesions never have fewer
        than 3 voxels, so at 2 mm most are 3 voxels unless this is raised.
    nprocs : int
        Sessions simulated at once, each in its own process (about 1.3 GB of memory each at
        1 mm). Every session has its own random stream, so the bytes do not depend on it.

    Returns
    -------
    pathlib.Path
        The dataset root.

    Raises
    ------
    UsageError
        Invalid arguments (exit code 64).
    OutputError
        ``out_dir`` holds something else or cannot be written (exit code 73).
    """
    protocols = _check_arguments(n_subjects, n_sessions, protocols, voxel_size, lesion_mean,
                                 lesion_contrast, noise, leukocortical_fraction,
                                 lesion_volume_scale)
    if int(nprocs) != nprocs or not 1 <= nprocs <= 256:
        raise UsageError(f"--nprocs must be 1..256, not {nprocs}")
    root = Path(out_dir)
    staging = _prepare(root)
    try:
        _simulate_into(staging, n_subjects, n_sessions, protocols, voxel_size, lesion_mean,
                       lesion_contrast, noise, seed, leukocortical_fraction,
                       lesion_volume_scale, int(nprocs))
        _replace_dataset(root, staging)
    except OSError as exc:
        raise write_error(exc, Path(exc.filename or root), "cannot write") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _simulate_into(root: Path, n_subjects, n_sessions, protocols, voxel_size, lesion_mean,
                   lesion_contrast, noise, seed, leukocortical_fraction,
                   lesion_volume_scale, nprocs: int = 1) -> None:
    settings = {"n_subjects": n_subjects, "n_sessions": n_sessions,
                "protocols": [p.name for p in protocols], "voxel_size": voxel_size,
                "lesion_mean": lesion_mean, "lesion_contrast": lesion_contrast, "noise": noise,
                "seed": seed, "leukocortical_fraction": leukocortical_fraction,
                "lesion_volume_scale": lesion_volume_scale}
    participants, jobs = [], []
    for subject in range(1, n_subjects + 1):
        protocol = protocols[(subject - 1) % len(protocols)]
        site = f"site{(subject - 1) % len(protocols) + 1:02d}"
        participants.append((f"sub-{subject:02d}", site, protocol.name))
        for session in range(1, n_sessions + 1):
            jobs.append((str(root), subject, session, n_sessions > 1, protocol,
                         (voxel_size, lesion_mean, lesion_contrast, noise, seed,
                          leukocortical_fraction, lesion_volume_scale)))
    done = 0
    for subject, ses, protocol_name, n_lesions in _run_jobs(jobs, nprocs):
        done += 1
        log.info("wrote sub-%02d%s (%s, %d lesions) [%d/%d]", subject,
                 f" {ses}" if ses else "", protocol_name, n_lesions, done, len(jobs))
    _write_top_level(root, participants, settings)


def _simulate_job(job) -> tuple:
    """Simulate and write one session (a process-pool job); return what the log says."""
    root, subject, session, several, protocol, options = job
    phantom = simulate_session([protocol], subject, session, *options)
    ses = f"ses-{session:02d}" if several else None
    _write_session(Path(root), subject, ses, protocol, phantom)
    return subject, ses, protocol.name, len(phantom.lesions)


def _run_jobs(jobs: list, nprocs: int, work=_simulate_job):
    """Yield ``work(job)`` for each job as it finishes: in this process, or in ``nprocs``."""
    if nprocs <= 1 or len(jobs) <= 1:
        yield from map(work, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # spawn: workers start clean, whatever threads (torch, BLAS) the caller has running
    pool = ProcessPoolExecutor(min(nprocs, len(jobs)),
                               mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(work, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    except BrokenProcessPool:
        raise TemporaryFailure(
            "a simulation process died (most likely out of memory)",
            hint=f"lower --nprocs (now {nprocs}; each process needs about 1.3 GB at 1 mm)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_arguments(n_subjects, n_sessions, protocols, voxel_size, lesion_mean,
                     lesion_contrast, noise, leukocortical_fraction, lesion_volume_scale):
    if isinstance(protocols, str):
        protocols = [protocols]
    try:
        resolved = [get_protocol(p) for p in protocols]
    except KeyError as exc:
        raise UsageError(exc.args[0]) from None
    checks = [
        (int(n_subjects) == n_subjects and 1 <= n_subjects <= 999,
         f"--n-subjects must be 1..999, not {n_subjects}"),
        (int(n_sessions) == n_sessions and 1 <= n_sessions <= 99,
         f"--n-sessions must be 1..99, not {n_sessions}"),
        (bool(resolved), "give at least one protocol"),
        (0.5 <= voxel_size <= 3.0, f"--voxel-size must be 0.5..3 mm, not {voxel_size}"),
        (0 <= lesion_mean <= 50, f"--lesion-mean must be 0..50, not {lesion_mean}"),
        (0.2 <= lesion_contrast <= 5.0,
         f"--lesion-contrast (lesion T1 / grey-matter T1) must be 0.2..5, not {lesion_contrast}"),
        (0 <= noise <= 1.0, f"--noise must be 0..1, not {noise}"),
        (0 <= leukocortical_fraction <= 1, "leukocortical_fraction must be 0..1"),
        (0.1 <= lesion_volume_scale <= 20,
         f"--lesion-volume-scale must be 0.1..20, not {lesion_volume_scale}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    return resolved


#: The dataset is written into this hidden folder inside the target and moved into place at
#: the end, so an interrupted or failed run leaves an earlier dataset as it was.
_STAGING_PREFIX = ".simulating-"


def _prepare(root: Path) -> Path:
    """Check that ``root`` is new, empty or an earlier simulation; return a staging folder."""
    if root.exists() and not root.is_dir():
        raise OutputError("exists and is not a folder", path=root)
    leftovers = sorted(root.glob(_STAGING_PREFIX + "*")) if root.is_dir() else []
    if root.is_dir() and any(p not in leftovers for p in root.iterdir()):
        description = root / "dataset_description.json"
        try:
            generated = json.loads(description.read_text())["GeneratedBy"][0]["Name"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            generated = None
        if generated != GENERATOR:
            raise OutputError("folder is not empty and was not written by " + GENERATOR,
                              path=root, hint="choose a new or empty folder")
    for old in leftovers:          # from a run that was killed
        shutil.rmtree(old, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    except OSError as exc:
        raise write_error(exc, root, "cannot create files in this folder") from None


def _replace_dataset(root: Path, staging: Path) -> None:
    """Move the finished dataset from ``staging`` into ``root``, replacing an earlier one."""
    for old in [*sorted(root.glob("sub-*")), root / REFERENCE]:
        if old.is_dir():
            shutil.rmtree(old)
    for new in sorted(staging.iterdir()):
        if new.name == REFERENCE.parts[0]:
            (root / REFERENCE).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / REFERENCE, root / REFERENCE)
        else:
            os.replace(new, root / new.name)


def _stem(subject: int, ses: str | None) -> tuple[Path, str]:
    sub = f"sub-{subject:02d}"
    folder = Path(sub) / ses / "anat" if ses else Path(sub) / "anat"
    return folder, f"{sub}_{ses}" if ses else sub


def _nifti(data, affine, dtype=None):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _write_session(root: Path, subject: int, ses: str | None, protocol, phantom) -> None:
    folder, stem = _stem(subject, ses)
    anat = root / folder
    affine = phantom.anatomy.affine
    images = phantom.images[protocol.name]
    if protocol.is_mp2rage:
        names = [("inv1", "_inv-1_MP2RAGE", 0), ("inv2", "_inv-2_MP2RAGE", 1),
                 ("uni", "_UNIT1", None)]
        source = f"{stem}_UNIT1.nii.gz"
    else:
        names = [("t1w", "_T1w", None)]
        source = f"{stem}_T1w.nii.gz"
    for key, suffix, block in names:
        save_nifti(_nifti(images[key], affine), anat / f"{stem}{suffix}.nii.gz")
        sidecar = protocol.sidecar(block)
        if key == "uni":
            sidecar["BasedOn"] = [f"bids::{(folder / stem).as_posix()}_inv-{k}_MP2RAGE.nii.gz"
                                  for k in (1, 2)]
        write_json(anat / f"{stem}{suffix}.json", _sidecar_header(protocol) | sidecar)
    ref = root / REFERENCE / folder
    anatomy = phantom.anatomy
    sources = {"Sources": [f"bids:raw:{(folder / source).as_posix()}"]}
    mask = (phantom.lesion_labels > 0).astype(np.uint8)
    save_nifti(_nifti(mask, affine), ref / f"{stem}_label-CL_mask.nii.gz")
    write_json(ref / f"{stem}_label-CL_mask.json", sources | {
        "Description": "Ground-truth cortical lesion mask of a simulated phantom (1 = lesion)",
        "Type": "Lesion"})
    ids = phantom.lesion_labels
    save_nifti(_nifti(ids, affine, np.uint8 if ids.max() < 256 else np.uint16),
               ref / f"{stem}_seg-CL_dseg.nii.gz")
    write_json(ref / f"{stem}_seg-CL_dseg.json", sources | {
        "Description": "Cortical lesion instances: voxel value = lesion_id of the "
                       "label-CL_lesions.tsv table, 0 = background"})
    rows = lesion_rows(phantom, phantom.tissues[protocol.name])
    write_text(ref / f"{stem}_label-CL_lesions.tsv", _tsv(rows, list(LESION_COLUMNS)))
    write_json(ref / f"{stem}_label-CL_lesions.json", LESION_COLUMNS)
    for label in ("GM", "WM", "CSF"):
        frac = getattr(anatomy, label.lower())
        img = _nifti(np.rint(frac * 255.0).astype(np.uint8), affine)
        img.header.set_slope_inter(1.0 / 255.0, 0.0)
        save_nifti(img, ref / f"{stem}_label-{label}_probseg.nii.gz")
        write_json(ref / f"{stem}_label-{label}_probseg.json", sources | {
            "Description": f"{label} fraction of each voxel used to simulate the images"})
    save_nifti(_nifti(anatomy.brain_mask.astype(np.uint8), affine),
               ref / f"{stem}_desc-brain_mask.nii.gz")
    write_json(ref / f"{stem}_desc-brain_mask.json", sources | {
        "Description": "True brain mask (MNI152 brain mask deformed into this image; brain "
                       "tissue and the CSF inside it)", "Type": "Brain"})


def _sidecar_header(protocol) -> dict:
    return {"Manufacturer": "cl-bidsapp simulation", "ManufacturersModelName": GENERATOR,
            "SoftwareVersions": __version__, "ProtocolName": protocol.name}


def _tsv(rows, columns) -> str:
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join("n/a" if row.get(c) is None else str(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def _write_top_level(root: Path, participants, settings) -> None:
    generated = [{"Name": GENERATOR, "Version": __version__,
                  "Description": "Simulated MP2RAGE/MPRAGE phantoms with cortical-lesion "
                                 "ground truth; settings: " + json.dumps(settings),
                  "CodeURL": "https://github.com/cl-bidsapp/cl-bidsapp"}]
    write_json(root / "dataset_description.json", {
        "Name": "cl-bidsapp simulated phantoms (SIMULATED DATA, not real MRI)",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "License": "CC0",
        "Authors": [GENERATOR], "GeneratedBy": generated})
    write_text(root / "README", _readme(settings))
    write_text(root / "participants.tsv", _tsv(
        [{"participant_id": p, "site": s, "protocol": pr} for p, s, pr in participants],
        ["participant_id", "site", "protocol"]))
    write_json(root / "participants.json", {
        "site": {"Description": "Simulated acquisition site (one protocol per site)"},
        "protocol": {"Description": "Simulated acquisition protocol",
                     "Levels": {name: f"{p.field_strength:g} T {p.sequence}"
                                for name, p in PROTOCOLS.items()}}})
    ref = root / REFERENCE
    write_json(ref / "dataset_description.json", {
        "Name": "Ground truth of the simulated phantoms: cortical lesion masks, lesion tables, "
                "tissue maps and brain masks",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": generated, "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": "../../"}})
    write_json(ref / "simulation.json", {"Generator": GENERATOR, "Version": __version__,
                                         **settings})


def _readme(settings) -> str:
    return (
        "# Simulated MP2RAGE / MPRAGE phantoms (not real data)\n\n"
        f"Generated by {GENERATOR} {__version__} (cl-bidsapp). Every image is simulated: the "
        "anatomy is the MNI152 2009a template deformed per subject, with a synthetic head; the "
        "images follow the MP2RAGE / MPRAGE signal equations with B1+, receive bias and Rician "
        "noise; cortical lesions are drawn with a known answer.\n\n"
        "Ground truth (lesion masks, per-lesion tables, tissue maps, brain masks) is in "
        "derivatives/reference/.\n\n"
        "Settings:\n\n" + "".join(f"- {k}: {v}\n" for k, v in settings.items())
    )

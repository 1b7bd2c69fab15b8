"""Lesion frequency map in MNI152NLin2009cAsym: where lesions are, over the dataset.

Each processed image's lesion mask is warped to the template (see
:mod:`cl_bidsapp.group.register`); the warped masks are summed and divided by N, the number of
images that went in, so a voxel's value is the fraction of images with a lesion there. Images
whose registration failed or overlaps the template brain poorly (Dice below
:data:`~cl_bidsapp.group.qc.MIN_TEMPLATE_DICE`) are flagged and left out.

Output: ``group/group_space-MNI152NLin2009cAsym_res-01_label-CL_desc-frequency_probseg.nii.gz``
(float32, 0..1) with a JSON sidecar, on the template's 1 mm grid.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cl_bidsapp.group.parallel import run_jobs, worker_count
from cl_bidsapp.group.qc import MIN_TEMPLATE_DICE, flag_registration
from cl_bidsapp.group.records import ImageSummary
from cl_bidsapp.group.template import TemplateFiles
from cl_bidsapp.io import save_nifti, write_json

logger = logging.getLogger(__name__)

MAP_NAME = ("group_space-MNI152NLin2009cAsym_res-01_label-CL_desc-frequency_probseg.nii.gz")


@dataclass
class FrequencyMap:
    """What was made: the file, how many images went in, timings."""

    path: Path | None = None
    n_images: int = 0
    n_left_out: int = 0
    seconds: float = 0.0
    n_registered: int = 0
    n_cached: int = 0
    registration_seconds: list[float] = field(default_factory=list)


def _worker_setup(threads: int) -> None:
    from cl_bidsapp.group.register import set_threads

    set_threads(threads)


def make_frequency_map(summaries: Sequence[ImageSummary], template: TemplateFiles,
                       group_dir: Path, cache_dir: Path, output_dir: Path,
                       nprocs: int | None = None) -> FrequencyMap:
    """Register, warp, sum and write the map; fill ``template_brain_dice`` of each image.

    Parameters
    ----------
    summaries : sequence of ImageSummary
        Images whose ``preproc``, ``lesion_mask`` and ``brain_mask`` exist are used.
    template : TemplateFiles
        From :func:`~cl_bidsapp.group.template.find_template`.
    group_dir, cache_dir, output_dir : Path
        Where the map goes, where transforms are cached, the output folder (for ``Sources``).
    nprocs : int, optional
        Processes for registration (default: all CPUs).
    """
    import nibabel as nib

    start = time.monotonic()
    by_name = {s.bids_name: s for s in summaries}
    result = FrequencyMap()
    jobs = []
    for s in summaries:
        files = [s.output(k) for k in ("preproc", "lesion_mask", "brain_mask")]
        if s.status != "ok":                  # never processed: not one of the map's images
            continue
        if not s.ok or any(f is None for f in files):   # flagged missing_outputs already
            result.n_left_out += 1
            continue
        jobs.append({"bids_name": s.bids_name, "preproc": str(files[0]),
                     "lesion_mask": str(files[1]), "brain_mask": str(files[2]),
                     "template_t1w": str(template.t1w), "template_mask": str(template.brain_mask),
                     "template_key": template.cache_key(), "cache_dir": str(cache_dir)})
    from cl_bidsapp.group.register import is_cached

    # cached transforms only need warping (a fraction of a second): not worth a worker
    cached = [job for job in jobs if is_cached(job)]
    cached_names = {job["bids_name"] for job in cached}
    to_register = [job for job in jobs if job["bids_name"] not in cached_names]
    workers = worker_count(nprocs, len(to_register))
    threads = max(1, (nprocs or os.cpu_count() or 1) // workers)
    logger.info("Lesion frequency map: %d image(s) to register to %s with %d process(es), %d "
                "transform(s) in the cache", len(to_register), template.name, workers,
                len(cached))
    template_img = nib.load(str(template.t1w))
    total = None
    sources = []
    outputs = itertools.chain(run_jobs(_register_job, cached, 1, _worker_setup, (threads,)),
                              run_jobs(_register_job, to_register, nprocs, _worker_setup,
                                       (threads,)))
    for out in outputs:
        summary = by_name[out["bids_name"]]
        if out.get("damaged"):
            summary.flag("missing_outputs", f"{out['damaged']}; left out of the lesion "
                                            "frequency map")
            result.n_left_out += 1
            continue
        dice = out.get("brain_dice")
        summary.values["template_brain_dice"] = None if dice is None else round(dice, 4)
        flag_registration(summary, dice, out.get("error"))
        if out.get("error") or dice is None or dice < MIN_TEMPLATE_DICE:
            result.n_left_out += 1
            continue
        mask = np.unpackbits(out["lesions"], count=int(np.prod(out["shape"])))
        mask = mask.reshape(out["shape"]).astype(bool)
        if total is None:
            total = np.zeros(out["shape"], dtype=np.uint32)
        total += mask
        result.n_images += 1
        result.n_cached += bool(out.get("cached"))
        result.registration_seconds.append(out.get("seconds", 0.0))
        sources.append("bids::" + summary.output("lesion_mask").relative_to(output_dir)
                       .as_posix())
        logger.info("  %s: brain overlap with the template %.3f (%s, %.1f s)",
                    summary.bids_name, dice, "cached" if out.get("cached") else "registered",
                    out.get("seconds", 0.0))
    result.n_registered = len(jobs)
    if not result.n_images:
        logger.warning("no image could be placed in template space: no frequency map")
        result.seconds = time.monotonic() - start
        return result
    frequency = (total / float(result.n_images)).astype(np.float32)
    image = nib.Nifti1Image(frequency, template_img.affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = b"CL lesion frequency (fraction of images)"
    result.path = save_nifti(image, Path(group_dir) / MAP_NAME)
    write_json(Path(group_dir) / MAP_NAME.replace(".nii.gz", ".json"), {
        "Description": "Fraction of images with a cortical lesion at each voxel, after affine "
                       "registration of each model input to the template brain and "
                       "nearest-neighbour warping of its lesion mask.",
        "Template": template.name, "Resolution": "1 mm (TemplateFlow res-01)",
        "NumberOfImages": result.n_images, "ImagesLeftOut": result.n_left_out,
        "Registration": {"Software": "SimpleITK", "Stages": ["rigid", "affine"],
                         "Metric": "Mattes mutual information (32 bins)",
                         "Moving": "desc-preproc model input (brain-extracted)",
                         "Fixed": "template T1w masked by its desc-brain mask",
                         "MinimumBrainDice": MIN_TEMPLATE_DICE},
        "Sources": sorted(sources),
    })
    result.seconds = time.monotonic() - start
    logger.info("Lesion frequency map of %d image(s) written in %.1f s (%d transform(s) from "
                "the cache)", result.n_images, result.seconds, result.n_cached)
    return result


def _register_job(job):
    from cl_bidsapp.group.register import register_and_warp

    return register_and_warp(job)

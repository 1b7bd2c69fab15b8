"""Cortical-lesion segmentation: nnU-Net probability map -> lesions."""
from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cl_bidsapp.interfaces.segmentation import FindLesions, Segment


def init_cl_segmentation_wf(*, model_path: str, threshold: float, min_size: str,
                            device: str = "auto", folds: list[int] | None = None,
                            tta: bool = True, tile_step_size: float = 0.5,
                            omp_nthreads: int = 1, mem_gb: float = 3.0,
                            model_sha256: str | None = None,
                            name: str = "cl_segmentation_wf"):
    """Predict the CL probability map and turn it into lesions.

    Parameters
    ----------
    model_path : str
        Folder of a verified model (see :func:`cl_bidsapp.models.registry.resolve_model`).
    threshold : float
        Probability threshold.
    min_size : str
        Smallest lesion kept: voxels (``"3"``) or cubic millimetres (``"10mm3"``).
    device, folds, tta, tile_step_size
        nnU-Net prediction settings.
    omp_nthreads : int
        PyTorch CPU threads (the node reserves as many Nipype processor slots).
    mem_gb : float
        Memory Nipype reserves for the prediction node.
    model_sha256 : str, optional
        The model card's sha256 (:attr:`InstalledModel.sha256`; default: read from the folder's
        card). It identifies the model in the node's hash instead of the folder's path, so a
        model replaced at the same path is run again and a zip model unpacked to another
        temporary folder is still read from the cache.

    Inputs
    ------
    model_input
        The masked UNI/T1w.

    Outputs
    -------
    probability, fold_probabilities, folds, device_used, lesion_mask, lesion_dseg,
    lesion_table, n_lesions, total_volume_mm3, min_size_voxels, segment_seconds,
    lesions_seconds, embedding, embedding_info, ood

    Examples
    --------
    >>> wf = init_cl_segmentation_wf(model_path="/models/x", threshold=0.5, min_size="3")
    >>> sorted(wf.list_node_names())
    ['find_lesions', 'inputnode', 'outputnode', 'segment']
    >>> wf.get_node("segment").inputs.use_gpu
    False
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["model_input"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "probability", "fold_probabilities", "folds", "device_used", "lesion_mask",
        "lesion_dseg", "lesion_table", "n_lesions", "total_volume_mm3", "min_size_voxels",
        "segment_seconds", "lesions_seconds", "embedding", "embedding_info", "ood"]),
        name="outputnode")
    segment = pe.Node(Segment(model=str(model_path), device=device, tta=tta,
                              tile_step_size=tile_step_size, threads=omp_nthreads,
                              use_gpu=(device == "cuda")),
                      name="segment", n_procs=omp_nthreads, mem_gb=mem_gb)
    if folds:
        segment.inputs.folds = list(folds)
    if model_sha256 is None:
        from cl_bidsapp.models import card as cards

        card = Path(model_path) / cards.CARD_FILENAME
        model_sha256 = cards.sha256_file(card) if card.is_file() else None
    if model_sha256:
        segment.inputs.model_sha256 = model_sha256
    find_lesions = pe.Node(FindLesions(threshold=threshold, min_size=str(min_size)),
                           name="find_lesions", mem_gb=1.0)
    wf.connect([
        (inputnode, segment, [("model_input", "in_file")]),
        (segment, find_lesions, [("probability", "probability"),
                                 ("fold_probabilities", "fold_probabilities")]),
        (segment, outputnode, [("probability", "probability"),
                               ("fold_probabilities", "fold_probabilities"),
                               ("folds", "folds"), ("device_used", "device_used"),
                               ("seconds", "segment_seconds"), ("embedding", "embedding"),
                               ("embedding_info", "embedding_info"), ("ood", "ood")]),
        (find_lesions, outputnode, [("lesion_mask", "lesion_mask"),
                                    ("lesion_dseg", "lesion_dseg"),
                                    ("lesion_table", "lesion_table"),
                                    ("n_lesions", "n_lesions"),
                                    ("total_volume_mm3", "total_volume_mm3"),
                                    ("min_size_voxels", "min_size_voxels"),
                                    ("seconds", "lesions_seconds")]),
    ])
    return wf

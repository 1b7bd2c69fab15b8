"""The participant-level workflow: one sub-workflow per subject, one branch per image."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nipype.pipeline import engine as pe

from cl_bidsapp.bids.derivatives import source_entities
from cl_bidsapp.bids.discovery import WorkItem
from cl_bidsapp.interfaces.derivatives import SaveDerivatives
from cl_bidsapp.interfaces.reports import SubjectReport
from cl_bidsapp.workflows.anat import init_anat_preproc_wf
from cl_bidsapp.workflows.segmentation import init_cl_segmentation_wf


@dataclass
class ParticipantOptions:
    """What the participant workflow needs, resolved from the settings and the model card."""

    output_dir: Path
    bids_dir: Path
    run_id: str
    model_path: str
    model_provenance: dict
    threshold: float
    min_size: str
    background: float = 0.0
    device: str = "cpu"
    folds: list[int] | None = None
    tta: bool = True
    tile_step_size: float = 0.5
    skull_strip: str = "auto"
    skull_strip_tool: str = "deepbet"
    omp_nthreads: int = 1
    segment_mem_gb: float = 3.0
    precomputed_masks: dict[str, Path] = field(default_factory=dict)  # bids_name -> mask
    extra_warnings: dict[str, list[str]] = field(default_factory=dict)  # bids_name -> texts

    def settings_record(self) -> dict:
        return {"threshold": self.threshold, "min_lesion_size": self.min_size,
                "tta": self.tta, "tile_step_size": self.tile_step_size,
                "device": self.device, "skull_strip": self.skull_strip,
                "skull_strip_tool": self.skull_strip_tool,
                "folds": self.folds}


def node_name(text: str) -> str:
    """A Nipype-safe name from a BIDS name.

    >>> node_name("sub-01_ses-1_acq-mp2rage_UNIT1")
    'sub_01_ses_1_acq_mp2rage_UNIT1'
    """
    return re.sub(r"\W", "_", text)


def init_cl_wf(items: list[WorkItem], opts: ParticipantOptions, name: str = "cl_bidsapp_wf"):
    """The whole participant level: one :func:`init_single_subject_wf` per subject.

    Examples
    --------
    >>> from cl_bidsapp.bids.discovery import WorkItem
    >>> items = [WorkItem("01", None, "MPRAGE", Path("/b/sub-01/anat/sub-01_T1w.nii.gz"),
    ...                   "default", "", entities={"sub": "01"}),
    ...          WorkItem("02", None, "MP2RAGE", Path("/b/sub-02/anat/sub-02_UNIT1.nii.gz"),
    ...                   "UNIT1", "", inv2=Path("/b/sub-02/anat/sub-02_inv-2_MP2RAGE.nii.gz"),
    ...                   entities={"sub": "02"}, source_suffix="UNIT1")]
    >>> opts = ParticipantOptions(Path("/o"), Path("/b"), "run1", "/m", {}, 0.5, "3")
    >>> wf = init_cl_wf(items, opts)
    >>> [n for n in wf.list_node_names() if n.endswith(("save_derivatives", "report"))]
    ['sub_01_wf.sub_01_T1w_wf.save_derivatives', 'sub_01_wf.subject_report', \
'sub_02_wf.sub_02_UNIT1_wf.save_derivatives', 'sub_02_wf.subject_report']
    """
    wf = pe.Workflow(name=name)
    by_subject: dict[str, list[WorkItem]] = {}
    for item in items:
        by_subject.setdefault(item.subject, []).append(item)
    for subject, subject_items in sorted(by_subject.items()):
        wf.add_nodes([init_single_subject_wf(subject, subject_items, opts)])
    return wf


def init_single_subject_wf(subject: str, items: list[WorkItem], opts: ParticipantOptions):
    """One subject: a branch per planned image (preprocess, segment, save), then its report.

    The report node waits for every image record of the subject, so a subject's page is
    written while the next subjects are still being processed (not all at the end).
    """
    from nipype.interfaces.utility import Merge

    wf = pe.Workflow(name=f"sub_{node_name(subject)}_wf")
    records = pe.Node(Merge(len(items)), name="records", run_without_submitting=True)
    report = pe.Node(SubjectReport(output_dir=str(opts.output_dir), subject=subject,
                                   run_id=opts.run_id),
                     name="subject_report", mem_gb=0.5)
    for index, item in enumerate(items, start=1):
        image_wf = init_image_wf(item, opts)
        wf.connect(image_wf, "save_derivatives.record", records, f"in{index}")
    wf.connect(records, "out", report, "records")
    return wf


def init_image_wf(item: WorkItem, opts: ParticipantOptions):
    """Preprocessing, segmentation and derivatives of one image."""
    wf = pe.Workflow(name=f"{node_name(item.bids_name)}_wf")
    mask = opts.precomputed_masks.get(item.bids_name)
    anat_wf = init_anat_preproc_wf(
        contrast=item.contrast, skull_strip=opts.skull_strip,
        skull_strip_tool=opts.skull_strip_tool, precomputed_mask=mask is not None,
        device=opts.device, omp_nthreads=opts.omp_nthreads, background=opts.background)
    for key in ("image", "inv1", "inv2"):
        value = getattr(item, key)
        if value is not None:
            setattr(anat_wf.inputs.inputnode, key, str(value))
    if item.image is None:  # UNI computed from the complex inversions
        anat_wf.inputs.inputnode.inv1_phase = str(item.inv1_phase)
        anat_wf.inputs.inputnode.inv2_phase = str(item.inv2_phase)
    if mask is not None:
        anat_wf.inputs.inputnode.precomputed_mask = str(mask)

    seg_wf = init_cl_segmentation_wf(
        model_path=opts.model_path, threshold=opts.threshold, min_size=opts.min_size,
        device=opts.device, folds=opts.folds, tta=opts.tta,
        tile_step_size=opts.tile_step_size, omp_nthreads=opts.omp_nthreads,
        mem_gb=opts.segment_mem_gb, model_sha256=opts.model_provenance.get("SHA256"))

    source_name = item.image.name if item.image is not None else f"{item.bids_name}.nii.gz"
    save = pe.Node(SaveDerivatives(
        output_dir=str(opts.output_dir), bids_dir=str(opts.bids_dir), item=item.to_dict(),
        source_entities=source_entities(source_name, item.source_suffix),
        settings=opts.settings_record(), model=opts.model_provenance, run_id=opts.run_id,
        extra_warnings=opts.extra_warnings.get(item.bids_name, [])),
        name="save_derivatives", mem_gb=0.5, run_without_submitting=False)

    wf.connect([
        (anat_wf, seg_wf, [("outputnode.model_input", "inputnode.model_input")]),
        (anat_wf, save, [("outputnode.model_input", "preproc"),
                         ("outputnode.brain_mask", "brain_mask"),
                         ("outputnode.masking_method", "masking_method"),
                         ("outputnode.skullstrip_method", "skullstrip_method"),
                         ("outputnode.prestripped", "prestripped"),
                         ("outputnode.stats", "stats"),
                         ("outputnode.prepare_warnings", "prepare_warnings"),
                         ("outputnode.skullstrip_warnings", "skullstrip_warnings"),
                         ("outputnode.prepare_seconds", "prepare_seconds"),
                         ("outputnode.skullstrip_seconds", "skullstrip_seconds"),
                         ("outputnode.model_input_seconds", "model_input_seconds")]),
        (seg_wf, save, [("outputnode.probability", "probability"),
                        ("outputnode.lesion_mask", "lesion_mask"),
                        ("outputnode.lesion_dseg", "lesion_dseg"),
                        ("outputnode.lesion_table", "lesion_table"),
                        ("outputnode.n_lesions", "n_lesions"),
                        ("outputnode.total_volume_mm3", "total_volume_mm3"),
                        ("outputnode.min_size_voxels", "min_size_voxels"),
                        ("outputnode.folds", "folds"),
                        ("outputnode.device_used", "device_used"),
                        ("outputnode.segment_seconds", "segment_seconds"),
                        ("outputnode.embedding", "embedding"),
                        ("outputnode.embedding_info", "embedding_info"),
                        ("outputnode.ood", "ood"),
                        ("outputnode.lesions_seconds", "lesions_seconds")]),
    ])
    return wf

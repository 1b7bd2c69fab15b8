"""Anatomical preprocessing: checked input -> brain mask -> model input."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cl_bidsapp.interfaces.preproc import ModelInput, PrepareInputs, SkullStrip

#: Memory (GB) Nipype reserves for each node, measured at 1 mm (see benchmarks/README.md)
MEM_GB = {"prepare": 0.8, "skullstrip": 1.5, "model_input": 0.5}


def init_anat_preproc_wf(*, contrast: str, skull_strip: str = "auto",
                         skull_strip_tool: str = "deepbet", precomputed_mask: bool = False,
                         device: str = "cpu", omp_nthreads: int = 1, background: float = 0.0,
                         name: str = "anat_preproc_wf"):
    """Check the image and its companions, extract the brain, build the model input.

    Parameters
    ----------
    contrast : {"MP2RAGE", "MPRAGE"}
        MP2RAGE images use their inversions (when given) for brain extraction.
    skull_strip : {"auto", "skip", "force"}
        ``auto`` keeps an already brain-extracted input as it is.
    skull_strip_tool : {"deepbet", "synthstrip"}
    precomputed_mask : bool
        A brain mask from ``--derivatives`` arrives on ``inputnode.precomputed_mask``.
    device : str
        Device for the brain-extraction network.
    omp_nthreads : int
        Threads for brain extraction.
    background : float
        Value outside the brain in the model input (the model card's).

    Inputs
    ------
    image, inv1, inv2, inv1_phase, inv2_phase, precomputed_mask

    Outputs
    -------
    image
        The checked UNI/T1w (the source file when nothing needed fixing).
    brain_mask, model_input
    masking_method, skullstrip_method, prestripped, stats
    prepare_warnings, skullstrip_warnings, prepare_seconds, skullstrip_seconds,
    model_input_seconds

    Examples
    --------
    >>> wf = init_anat_preproc_wf(contrast="MP2RAGE")
    >>> sorted(wf.list_node_names())
    ['inputnode', 'model_input', 'outputnode', 'prepare', 'skullstrip']
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[
        "image", "inv1", "inv2", "inv1_phase", "inv2_phase", "precomputed_mask"]),
        name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=[
        "image", "brain_mask", "model_input", "masking_method", "skullstrip_method",
        "prestripped", "stats", "prepare_warnings", "skullstrip_warnings", "prepare_seconds",
        "skullstrip_seconds", "model_input_seconds"]), name="outputnode")

    prepare = pe.Node(PrepareInputs(contrast=contrast), name="prepare",
                      mem_gb=MEM_GB["prepare"])
    skullstrip = pe.Node(SkullStrip(mode=skull_strip, tool=skull_strip_tool,
                                    device="cuda" if device == "cuda" else "cpu",
                                    threads=omp_nthreads),
                         name="skullstrip", mem_gb=MEM_GB["skullstrip"], n_procs=omp_nthreads)
    model_input = pe.Node(ModelInput(background=background), name="model_input",
                          mem_gb=MEM_GB["model_input"])

    wf.connect([
        (inputnode, prepare, [("image", "image"), ("inv1", "inv1"), ("inv2", "inv2"),
                              ("inv1_phase", "inv1_phase"), ("inv2_phase", "inv2_phase")]),
        (prepare, skullstrip, [("out_image", "in_image"), ("masking_image", "masking_image")]),
        (prepare, model_input, [("out_image", "in_image")]),
        (skullstrip, model_input, [("brain_mask", "brain_mask")]),
        (prepare, outputnode, [("out_image", "image"), ("masking_method", "masking_method"),
                               ("warnings", "prepare_warnings"),
                               ("seconds", "prepare_seconds")]),
        (skullstrip, outputnode, [("brain_mask", "brain_mask"), ("method", "skullstrip_method"),
                                  ("prestripped", "prestripped"),
                                  ("warnings", "skullstrip_warnings"),
                                  ("seconds", "skullstrip_seconds")]),
        (model_input, outputnode, [("out_file", "model_input"), ("stats", "stats"),
                                   ("seconds", "model_input_seconds")]),
    ])
    if precomputed_mask:
        wf.connect(inputnode, "precomputed_mask", skullstrip, "precomputed_mask")
    return wf

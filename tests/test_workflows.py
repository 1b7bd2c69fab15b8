"""Workflows are built (not run) for many option combinations: nodes, wiring, resources."""
from __future__ import annotations

from pathlib import Path

import pytest

from cl_bidsapp.bids.discovery import WorkItem
from cl_bidsapp.workflows.anat import init_anat_preproc_wf
from cl_bidsapp.workflows.base import ParticipantOptions, init_cl_wf
from cl_bidsapp.workflows.segmentation import init_cl_segmentation_wf

B = Path("/bids")


def _item(subject="01", contrast="MP2RAGE", image="UNIT1", inv1=True, inv2=True,
          session=None, computed=False):
    stem = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    anat = B / f"sub-{subject}" / "anat"
    ents = {"sub": subject, **({"ses": session} if session else {})}
    return WorkItem(
        subject=subject, session=session, contrast=contrast,
        image=None if computed else anat / f"{stem}_{image}.nii.gz", rule="test", explain="",
        inv1=anat / f"{stem}_inv-1_MP2RAGE.nii.gz" if inv1 else None,
        inv2=anat / f"{stem}_inv-2_MP2RAGE.nii.gz" if inv2 else None,
        inv1_phase=anat / "p1.nii.gz" if computed else None,
        inv2_phase=anat / "p2.nii.gz" if computed else None,
        entities=ents, source_suffix="UNIT1" if computed else image)


def _opts(**kw):
    base = dict(output_dir=Path("/out"), bids_dir=B, run_id="r1", model_path="/m",
                model_provenance={"Name": "m"}, threshold=0.5, min_size="3")
    base.update(kw)
    return ParticipantOptions(**base)


def _edges(wf):
    graph = wf._create_flat_graph()
    return {(u.fullname, v.fullname): d["connect"] for u, v, d in graph.edges(data=True)}


def test_one_subject_workflow_per_participant_and_one_branch_per_image():
    items = [_item("01"), _item("01", session="2"), _item("02", contrast="MPRAGE",
                                                          image="T1w", inv1=False, inv2=False)]
    wf = init_cl_wf(items, _opts())
    names = wf.list_node_names()
    saves = sorted(n for n in names if n.endswith("save_derivatives"))
    assert saves == ["sub_01_wf.sub_01_UNIT1_wf.save_derivatives",
                     "sub_01_wf.sub_01_ses_2_UNIT1_wf.save_derivatives",
                     "sub_02_wf.sub_02_T1w_wf.save_derivatives"]
    assert {n.split(".")[0] for n in names} == {"sub_01_wf", "sub_02_wf"}


@pytest.mark.parametrize("inv1, inv2", [(True, True), (False, True), (True, False),
                                        (False, False)])
def test_mp2rage_companions_reach_prepare(inv1, inv2):
    wf = init_cl_wf([_item(inv1=inv1, inv2=inv2)], _opts())
    prepare = wf.get_node("sub_01_wf.sub_01_UNIT1_wf.anat_preproc_wf.inputnode")
    assert bool(prepare.inputs.inv1 and isinstance(prepare.inputs.inv1, str)) == inv1
    assert bool(prepare.inputs.inv2 and isinstance(prepare.inputs.inv2, str)) == inv2
    node = wf.get_node("sub_01_wf.sub_01_UNIT1_wf.anat_preproc_wf.prepare")
    assert node.inputs.contrast == "MP2RAGE"


def test_computed_uni_passes_phases():
    wf = init_cl_wf([_item(computed=True)], _opts())
    inputnode = wf.get_node("sub_01_wf.sub_01_UNIT1_wf.anat_preproc_wf.inputnode")
    assert inputnode.inputs.inv1_phase.endswith("p1.nii.gz")
    assert not isinstance(inputnode.inputs.image, str)


def test_precomputed_mask_is_wired_only_when_given():
    plain = init_anat_preproc_wf(contrast="MPRAGE")
    with_mask = init_anat_preproc_wf(contrast="MPRAGE", precomputed_mask=True)
    key = ("anat_preproc_wf.inputnode", "anat_preproc_wf.skullstrip")
    assert not any(e[1].endswith("skullstrip") and "precomputed_mask" in str(c)
                   for e, c in _edges(plain).items())
    assert any("precomputed_mask" in str(c) for e, c in _edges(with_mask).items()
               if e[1].endswith("skullstrip")), key
    item = _item()
    wf = init_cl_wf([item], _opts(precomputed_masks={item.bids_name: Path("/d/mask.nii.gz")}))
    node = wf.get_node("sub_01_wf.sub_01_UNIT1_wf.anat_preproc_wf.inputnode")
    assert node.inputs.precomputed_mask == "/d/mask.nii.gz"


@pytest.mark.parametrize("mode, tool", [("auto", "deepbet"), ("skip", "deepbet"),
                                        ("force", "synthstrip")])
def test_skull_strip_options(mode, tool):
    wf = init_anat_preproc_wf(contrast="MP2RAGE", skull_strip=mode, skull_strip_tool=tool,
                              omp_nthreads=2)
    node = wf.get_node("skullstrip")
    assert (node.inputs.mode, node.inputs.tool, node.inputs.threads) == (mode, tool, 2)
    assert node.n_procs == 2


@pytest.mark.parametrize("device, gpu", [("cpu", False), ("cuda", True)])
def test_segmentation_node_declares_gpu_and_threads(device, gpu):
    wf = init_cl_segmentation_wf(model_path="/m", threshold=0.4, min_size="10mm3",
                                 device=device, folds=[0, 2], tta=False, omp_nthreads=2,
                                 mem_gb=4.0)
    seg = wf.get_node("segment")
    assert seg.inputs.use_gpu is gpu and seg.is_gpu_node() is gpu
    assert (seg.n_procs, seg.mem_gb) == (2, 4.0)
    assert (seg.inputs.folds, seg.inputs.tta) == ([0, 2], False)
    lesions = wf.get_node("find_lesions")
    assert (lesions.inputs.threshold, lesions.inputs.min_size) == (0.4, "10mm3")


def test_save_node_receives_every_derivative():
    wf = init_cl_wf([_item()], _opts(extra_warnings={"sub-01_UNIT1": ["demo model"]}))
    flat = wf._create_flat_graph()
    save = next(n for n in flat.nodes if n.name == "save_derivatives")
    connected = {dst for _, v, d in flat.in_edges(save, data=True) for _, dst in d["connect"]}
    assert {"preproc", "brain_mask", "probability", "lesion_mask", "lesion_dseg",
            "lesion_table", "stats", "segment_seconds", "skullstrip_warnings"} <= connected
    assert save.inputs.extra_warnings == ["demo model"]
    assert save.inputs.settings["threshold"] == 0.5


def test_the_segment_cache_is_keyed_by_the_models_content_not_its_folder(tmp_path):
    """A rerun must predict again when a model is replaced at the same path, and must not
    when the same model is found in another folder (a zip unpacked to a new temporary
    folder in each run)."""
    image = tmp_path / "model_input.nii.gz"
    image.write_bytes(b"x")

    def segment_hash(folder, sha, threads=1):
        wf = init_cl_segmentation_wf(model_path=folder, threshold=0.5, min_size="3",
                                     model_sha256=sha, omp_nthreads=threads)
        node = wf.get_node("segment")
        node.inputs.in_file = str(image)
        return node.inputs.get_hashval(hash_method="timestamp")[1]

    same = segment_hash("/models/a", "1" * 64)
    assert segment_hash("/tmp/unpacked-xyz/a", "1" * 64) == same
    assert segment_hash("/models/a", "2" * 64) != same
    assert segment_hash("/models/a", "1" * 64, threads=4) == same   # threads change nothing

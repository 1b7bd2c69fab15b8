"""Write one image's derivatives into the output dataset: names, sidecars, the image record.

Every file appears atomically (temporary name, then rename), each NIfTI with a JSON sidecar
(``Sources`` as BIDS URIs, model identity, settings). The per-image record
(``sub-XX/log/<bids_name>_record.json``) gathers what the report and the group level need:
status, warnings, timings per stage, brain statistics, lesion count and volume.
"""
from __future__ import annotations

import functools
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject,
                                    SimpleInterface, TraitedSpec, traits)

from cl_bidsapp import __version__
from cl_bidsapp.bids.derivatives import output_path, sidecar_path
from cl_bidsapp.core.lesions import lesion_table_sidecar
from cl_bidsapp.interfaces.base import defined
from cl_bidsapp.io import atomic_path, write_json

STAGES = ("prepare", "skullstrip", "model_input", "segment", "lesions")


def record_path(output_dir: Path, subject: str, bids_name: str) -> Path:
    """Where the per-image record lives."""
    return Path(output_dir) / f"sub-{subject}" / "log" / f"{bids_name}_record.json"


def bids_uri(path: str | Path | None, bids_dir: Path) -> str | None:
    """``bids:raw:<relative path>`` for a raw file (DatasetLinks maps ``raw``)."""
    if path is None:
        return None
    try:
        return f"bids:raw:{Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()}"
    except ValueError:
        return Path(path).as_uri()


def software_versions() -> dict[str, str]:
    """Versions of cl-bidsapp, Python and the libraries that shape the results (a copy)."""
    return dict(_software_versions())


@functools.cache
def _software_versions() -> dict[str, str]:
    # read once per process: every image's sidecars and record carry it
    from importlib.metadata import PackageNotFoundError, version

    out = {"cl-bidsapp": __version__, "python": platform.python_version()}
    for package in ("nnunetv2", "torch", "nipype", "nibabel", "deepbet", "pybids"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


class _SaveInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True)
    bids_dir = traits.Str(mandatory=True)
    item = traits.Dict(mandatory=True, desc="WorkItem.to_dict() of the image")
    source_entities = traits.Dict(mandatory=True, desc="entities outputs inherit")
    preproc = File(exists=True, mandatory=True)
    brain_mask = File(exists=True, mandatory=True)
    probability = File(exists=True, mandatory=True)
    lesion_mask = File(exists=True, mandatory=True)
    lesion_dseg = File(exists=True, mandatory=True)
    lesion_table = File(exists=True, mandatory=True)
    n_lesions = traits.Int(mandatory=True)
    total_volume_mm3 = traits.Float(mandatory=True)
    min_size_voxels = traits.Int(mandatory=True)
    folds = traits.List(traits.Str)
    device_used = traits.Str()
    masking_method = traits.Str()
    skullstrip_method = traits.Str()
    prestripped = traits.Bool(False, usedefault=True)
    stats = traits.Dict()
    settings = traits.Dict(desc="threshold, min_size, tta, tile_step_size, device asked")
    model = traits.Dict(desc="InstalledModel.provenance()")
    extra_warnings = InputMultiObject(traits.Str)
    run_id = traits.Str()
    # per-stage warnings and timings
    prepare_warnings = InputMultiObject(traits.Str)
    skullstrip_warnings = InputMultiObject(traits.Str)
    prepare_seconds = traits.Float()
    skullstrip_seconds = traits.Float()
    model_input_seconds = traits.Float()
    segment_seconds = traits.Float()
    lesions_seconds = traits.Float()
    # out-of-distribution score (models/embedding.py, models/calibration.py)
    embedding = File(exists=True, desc="encoder-feature embedding TSV")
    embedding_info = traits.Dict()
    ood = traits.Dict()


class _SaveOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))
    record = File(exists=True)


class SaveDerivatives(SimpleInterface):
    """Copy one image's results into the output dataset, with sidecars and the record."""

    input_spec = _SaveInputSpec
    output_spec = _SaveOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        out_dir = Path(inputs.output_dir)
        bids_dir = Path(inputs.bids_dir)
        item = dict(inputs.item)
        ents = dict(inputs.source_entities)
        settings = dict(defined(inputs.settings) or {})
        model = dict(defined(inputs.model) or {})
        source_uri = bids_uri(item.get("image"), bids_dir)
        raw_sources = [u for u in (bids_uri(item.get(k), bids_dir)
                                   for k in ("image", "inv1", "inv2", "inv1_phase",
                                             "inv2_phase")) if u]
        segmentation = {
            "Model": model,
            "Folds": list(defined(inputs.folds) or []),
            "TestTimeAugmentation": bool(settings.get("tta", True)),
            "TileStepSize": settings.get("tile_step_size"),
            "Device": defined(inputs.device_used),
            "SoftwareVersions": software_versions(),
        }
        lesion_rules = {
            "Threshold": settings.get("threshold"),
            "MinimumLesionSize": {"voxels": inputs.min_size_voxels,
                                  "requested": settings.get("min_lesion_size")},
            "Connectivity": 26,
        }

        def rel(path: Path) -> str:
            return path.relative_to(out_dir).as_posix()

        plan = [
            ("preproc", inputs.preproc, {
                "Description": "Model input: the source image masked with the brain mask.",
                "Sources": [source_uri] if source_uri else raw_sources,
                "SkullStripped": True, "BrainExtraction": defined(inputs.skullstrip_method)}),
            ("brain_mask", inputs.brain_mask, {
                "Type": "Brain", "Sources": raw_sources,
                "BrainExtraction": defined(inputs.skullstrip_method),
                "MaskingImage": defined(inputs.masking_method)}),
            ("probseg", inputs.probability, {
                "Description": "Cortical-lesion probability from the nnU-Net model.",
                "Sources": [], **segmentation}),
            ("lesion_mask", inputs.lesion_mask, {
                "Description": "Binary cortical-lesion mask.", "Sources": [],
                **lesion_rules, **segmentation}),
            ("lesion_dseg", inputs.lesion_dseg, {
                "Description": "Cortical-lesion instances: 0 background, 1..N one label per "
                               "lesion, largest first (see the .tsv table).",
                "Sources": [], **lesion_rules, **segmentation}),
        ]
        targets: dict[str, Path] = {}
        for kind, _, _ in plan:
            targets[kind] = output_path(out_dir, ents, kind)
        targets["lesion_table"] = output_path(out_dir, ents, "lesion_table")
        # outputs derived from the model input / probability name their parents
        plan[2][2]["Sources"] = [f"bids::{rel(targets['preproc'])}"]
        for index in (3, 4):
            plan[index][2]["Sources"] = [f"bids::{rel(targets['probseg'])}"]

        # The instance map and its table share a stem (BIDS: a dseg image and its look-up
        # table), hence one sidecar: the image's fields plus the table's column descriptions.
        assert sidecar_path(targets["lesion_table"]) == sidecar_path(targets["lesion_dseg"])
        plan[4][2].update(lesion_table_sidecar())
        written = []
        for kind, src, sidecar in plan:
            dest = targets[kind]
            _copy(src, dest)
            write_json(sidecar_path(dest), sidecar)
            written += [dest, sidecar_path(dest)]
        _copy(inputs.lesion_table, targets["lesion_table"])
        written.append(targets["lesion_table"])
        ood = dict(defined(inputs.ood) or {})
        if defined(inputs.embedding):
            from cl_bidsapp.models.embedding import embedding_sidecar

            targets["embedding"] = output_path(out_dir, ents, "embedding")
            _copy(inputs.embedding, targets["embedding"])
            write_json(sidecar_path(targets["embedding"]), embedding_sidecar({
                **dict(defined(inputs.embedding_info) or {}),
                "Sources": [f"bids::{rel(targets['preproc'])}"], "OODScore": ood}))
            written += [targets["embedding"], sidecar_path(targets["embedding"])]

        seconds = {stage: round(float(getattr(inputs, f"{stage}_seconds")), 3)
                   for stage in STAGES if defined(getattr(inputs, f"{stage}_seconds"))
                   is not None}
        warnings = [w for key in ("prepare_warnings", "skullstrip_warnings", "extra_warnings")
                    for w in (defined(getattr(inputs, key)) or [])]
        record = {
            "bids_name": item.get("bids_name"), "subject": item.get("subject"),
            "session": item.get("session"), "contrast": item.get("contrast"),
            "rule": item.get("rule"), "status": "ok", "run_id": defined(inputs.run_id),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inputs": {k: item.get(k) for k in ("image", "inv1", "inv2", "t1map")},
            "outputs": {k: rel(v) for k, v in targets.items()},
            "model": model, "settings": settings,
            "device": defined(inputs.device_used), "folds": list(defined(inputs.folds) or []),
            "masking_method": defined(inputs.masking_method),
            "skullstrip_method": defined(inputs.skullstrip_method),
            "prestripped": bool(inputs.prestripped),
            "brain": dict(defined(inputs.stats) or {}),
            "lesions": {"count": int(inputs.n_lesions),
                        "total_volume_mm3": round(float(inputs.total_volume_mm3), 3),
                        "min_size_voxels": int(inputs.min_size_voxels)},
            "warnings": list(dict.fromkeys(warnings)),
            "seconds": seconds,
            "software": software_versions(),
        }
        if ood:
            record["ood"] = ood
        rec = record_path(out_dir, item["subject"], item["bids_name"])
        write_json(rec, record)
        self._results["out_files"] = [str(p) for p in written]
        self._results["record"] = str(rec)
        return runtime


def _copy(src: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)

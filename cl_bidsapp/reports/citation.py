"""The methods paragraph users paste into a paper, with its references (``logs/CITATION.md``).

The text is built only from what the run recorded (per-image records, the derivative sidecars
and the saved settings), with no dates, in a fixed order: the same outputs give the same bytes.

>>> text = methods_paragraphs([{"status": "ok", "contrast": "MP2RAGE",
...     "skullstrip_method": "deepbet", "masking_method": "robust-combination",
...     "model": {"Name": "cl-demo", "Version": "1.0", "SHA256": "ab" * 32, "IsDemo": False},
...     "settings": {"threshold": 0.5, "tta": True}, "folds": ["0", "1"], "device": "cpu",
...     "lesions": {"min_size_voxels": 3}}], versions={"cl-bidsapp": "0.1.0"})
>>> "deepbet" in text[0] and "(Fisch et al. 2024)" in text[0]
True
>>> sorted(cited_keys(text))
['fisch2024', 'gorgolewski2011', 'isensee2021', 'marques2010', 'molchanova2025', 'obrien2014']
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger(__name__)

#: key -> (in-text citation, full reference). Identifiers only (DOI / arXiv), no web links.
REFERENCES: dict[str, tuple[str, str]] = {
    "molchanova2025": (
        "Molchanova et al. 2025",
        "Molchanova N, et al. (2025). Preprint, arXiv:2507.12092."),
    "isensee2021": (
        "Isensee et al. 2021",
        "Isensee F, Jaeger PF, Kohl SAA, Petersen J, Maier-Hein KH (2021). nnU-Net: a "
        "self-configuring method for deep learning-based biomedical image segmentation. "
        "Nature Methods 18(2):203-211. doi:10.1038/s41592-020-01008-z."),
    "fisch2024": (
        "Fisch et al. 2024",
        "Fisch L, Zumdick S, Barkhau C, et al. (2024). deepbet: fast brain extraction of "
        "T1-weighted MRI using convolutional neural networks. Computers in Biology and "
        "Medicine 179:108845. doi:10.1016/j.compbiomed.2024.108845."),
    "hoopes2022": (
        "Hoopes et al. 2022",
        "Hoopes A, Mora JS, Dalca AV, Fischl B, Hoffmann M (2022). SynthStrip: skull-stripping "
        "for any brain image. NeuroImage 260:119474. doi:10.1016/j.neuroimage.2022.119474."),
    "gorgolewski2011": (
        "Gorgolewski et al. 2011",
        "Gorgolewski K, Burns CD, Madison C, Clark D, Halchenko YO, Waskom ML, Ghosh SS (2011). "
        "Nipype: a flexible, lightweight and extensible neuroimaging data processing framework "
        "in Python. Frontiers in Neuroinformatics 5:13. doi:10.3389/fninf.2011.00013."),
    "marques2010": (
        "Marques et al. 2010",
        "Marques JP, Kober T, Krueger G, van der Zwaag W, Van de Moortele PF, Gruetter R "
        "(2010). MP2RAGE, a self bias-field corrected sequence for improved segmentation and "
        "T1-mapping at high field. NeuroImage 49(2):1271-1281. "
        "doi:10.1016/j.neuroimage.2009.10.002."),
    "obrien2014": (
        "O'Brien et al. 2014",
        "O'Brien KR, Kober T, Hagmann P, Maeder P, Marques J, Lazeyras F, Krueger G, Roche A "
        "(2014). Robust T1-weighted structural brain imaging and morphometry at 7T using "
        "MP2RAGE. PLoS ONE 9(6):e99676. doi:10.1371/journal.pone.0099676."),
}


def _cite(key: str, extra: str = "") -> str:
    return f"({REFERENCES[key][0]}{'; ' + extra if extra else ''})"


def cited_keys(paragraphs: Iterable[str]) -> list[str]:
    """Reference keys cited in the text, in the order of :data:`REFERENCES`."""
    text = "\n".join(paragraphs)
    return [key for key, (short, _) in REFERENCES.items() if f"({short}" in text]


def _settings_sections(settings) -> dict[str, Any]:
    """Flatten a Settings object, its TOML sections, or a flat mapping into one dict."""
    if settings is None:
        return {}
    if hasattr(settings, "to_dict"):
        settings = settings.to_dict()
    flat: dict[str, Any] = {}
    for key, value in dict(settings).items():
        if isinstance(value, Mapping) and key in ("inputs", "execution", "segmentation"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _join(words: list[str]) -> str:
    """>>> _join(["a"]), _join(["a", "b"]), _join(["a", "b", "c"])
    ('a', 'a and b', 'a, b and c')
    """
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _distinct(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if value not in (None, "", []) and value not in out:
            out.append(value)
    return out


def _number(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def methods_paragraphs(records: list[dict[str, Any]], settings=None,
                       versions: Mapping[str, str] | None = None) -> list[str]:
    """The methods text (paragraphs) describing how these records were produced.

    Parameters
    ----------
    records : list of dict
        Per-image records (``sub-XX/log/*_record.json``); failed ones are ignored except when
        none succeeded.
    settings : Settings or mapping, optional
        The run's settings, used where the records say nothing (e.g. every image failed).
    versions : mapping, optional
        Software versions (``cl-bidsapp``, ``nnunetv2``, ``torch``, ``nipype``, ``deepbet``).
    """
    ok = [r for r in records if r.get("status") == "ok"] or list(records)
    flat = _settings_sections(settings)
    versions = dict(versions or {})

    def version_of(name: str) -> str:
        return f" {versions[name]}" if versions.get(name) else ""

    contrasts = _distinct(r.get("contrast") for r in ok)
    intro = (f"Cortical lesions were segmented with cl-bidsapp{version_of('cl-bidsapp')}, a "
             f"BIDS App built on Nipype{version_of('nipype')} {_cite('gorgolewski2011')} that "
             f"implements a published nnU-Net method {_cite('molchanova2025')}.")
    inputs = []
    if "MP2RAGE" in contrasts:
        inputs.append(f"the MP2RAGE uniform (UNI) image {_cite('marques2010')}")
    if "MPRAGE" in contrasts:
        inputs.append("the MPRAGE T1-weighted image")
    if inputs:
        intro += f" The model input was {_join(inputs)}, with no bias correction, registration " \
                 "or denoising."
    first = [intro]

    strip_text = _brain_extraction_text(ok, flat, versions)
    if strip_text:
        first.append(strip_text)

    models = _distinct(_model_words(r.get("model") or {}) for r in ok)
    if not models and flat.get("model"):
        models = [f"\"{flat['model']}\""]
    folds = _distinct(_folds_words([str(f) for f in r.get("folds") or []]) for r in ok)
    if not folds and flat.get("folds"):
        folds = [_folds_words([str(f) for f in flat["folds"]])]
    tta = _distinct(bool((r.get("settings") or {}).get("tta", flat.get("tta", True)))
                    for r in ok) or [bool(flat.get("tta", True))]
    devices = _distinct(r.get("device") for r in ok) or _distinct([flat.get("device")])
    software = ", ".join(f"{name} {versions[name]}" for name in ("nnunetv2", "torch")
                         if versions.get(name))
    seg = (f"The masked image was segmented with nnU-Net v2 {_cite('isensee2021', software)}, "
           "3d_fullres configuration" + (f", model {_join(models)}" if models else ""))
    if len(folds) == 1:
        seg += f", {folds[0]}"
    elif folds:
        seg += f", {' or '.join(folds)} (the folds differed between images)"
    seg += (", with mirroring test-time augmentation" if tta == [True] else
            ", without test-time augmentation" if tta == [False] else
            ", with test-time augmentation for some images only")
    if devices:
        seg += f", on {_join([_device_words(d) for d in devices])}"
    first.append(seg + ".")

    thresholds = _distinct(_number((r.get("settings") or {}).get("threshold"))
                           for r in ok if (r.get("settings") or {}).get("threshold") is not None)
    if not thresholds and flat.get("threshold") is not None:
        thresholds = [_number(flat["threshold"])]
    sizes = _distinct((r.get("lesions") or {}).get("min_size_voxels") for r in ok
                      if isinstance((r.get("lesions") or {}).get("min_size_voxels"), int))
    asked = _distinct(str((r.get("settings") or {}).get("min_lesion_size")) for r in ok
                      if "mm" in str((r.get("settings") or {}).get("min_lesion_size") or ""))
    lesions = ("Lesions were the 26-connected components of the probability map thresholded at "
               f"{' / '.join(thresholds) or 'the model card threshold'}")
    if sizes and max(sizes) <= 1:
        lesions += ", keeping every component (no minimum lesion size)."
    elif sizes:
        lesions += (f", keeping components of at least {' / '.join(str(n) for n in sizes)} "
                    "voxels" + (f" (from a requested minimum of {' / '.join(asked)})"
                                if asked else "") + ".")
    else:
        lesions += "."
    if any(len(r.get("folds") or []) >= 2 for r in ok):
        lesions += (" Each lesion's fold disagreement (DDU) is one minus the mean, over folds, "
                    "of the best overlap (IoU) between the lesion and that fold's own lesions.")
    paragraphs = [" ".join(first), lesions]
    if any((r.get("model") or {}).get("IsDemo") for r in ok):
        paragraphs.append("Note: the model is the cl-bidsapp demo model, trained on simulated "
                          "phantoms for testing; its lesions on real scans are not meaningful.")
    return paragraphs


def _brain_extraction_text(ok, flat, versions) -> str:
    methods = _distinct(r.get("skullstrip_method") for r in ok)
    if not methods and flat.get("skull_strip_tool"):
        methods = [flat["skull_strip_tool"]]
    words = []
    for method in methods:
        if method == "deepbet":
            version = f" {versions['deepbet']}" if versions.get("deepbet") else ""
            words.append(f"deepbet{version} {_cite('fisch2024')}")
        elif method == "synthstrip":
            words.append(f"SynthStrip {_cite('hoopes2022')}")
        elif str(method).startswith("precomputed"):
            words.append("masks supplied with --derivatives")
        elif method == "already brain-extracted":
            words.append("none (the input was already brain-extracted)")
        else:
            words.append(str(method))
    if not words:
        return ""
    text = f"Brain masks were computed with {_join(words)}"
    masking = _distinct(r.get("masking_method") for r in ok)
    if "robust-combination" in masking:
        text += (" from the robust-combination MP2RAGE image, which suppresses the UNI "
                 f"image's background noise {_cite('obrien2014')}")
    elif "inv2" in masking:
        text += " from the second-inversion (INV2) image"
    return text + "."


def _model_words(model: Mapping[str, Any]) -> str | None:
    if not model.get("Name"):
        return None
    return (f"\"{model['Name']}\" version {model.get('Version', '?')} "
            f"(sha256 {model.get('SHA256', 'unknown')})")


def _folds_words(folds: list[str]) -> str:
    """The ensemble of one image in words.

    >>> _folds_words(["all"])
    'using the single model trained on all training cases (nnU-Net fold "all")'
    >>> _folds_words(["2"]), _folds_words(["0", "1"])
    ('using the fold 2 model alone', 'averaging the probability maps of folds 0, 1')
    """
    if not folds:
        return ""
    if folds == ["all"]:
        return 'using the single model trained on all training cases (nnU-Net fold "all")'
    if len(folds) == 1:
        return f"using the fold {folds[0]} model alone"
    return f"averaging the probability maps of folds {', '.join(folds)}"


def _device_words(device: str) -> str:
    device = str(device)
    if device.startswith("cuda"):
        return "a GPU (CUDA)"
    if device == "cpu":
        return "the CPU"
    return device


def citation_markdown(records: list[dict[str, Any]], settings=None,
                      versions: Mapping[str, str] | None = None) -> str:
    """``CITATION.md`` text: the methods paragraphs, then the references they cite."""
    paragraphs = methods_paragraphs(records, settings, versions)
    lines = ["# Methods (cl-bidsapp)", "",
             "Paste and adapt the text below; every reference it cites is listed after it.", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    lines += ["## References", ""]
    lines += [f"- {REFERENCES[key][1]}" for key in cited_keys(paragraphs)]
    return "\n".join(lines) + "\n"


def write_citation(output_dir: str | Path, settings=None,
                   records: list[dict[str, Any]] | None = None) -> Path:
    """Write ``<output_dir>/logs/CITATION.md`` (atomically) and return its path.

    Parameters
    ----------
    output_dir : path
        The output dataset.
    settings : Settings or mapping, optional
        The run's settings (default: the newest settings saved in the output folder).
    records : list of dict, optional
        Per-image records (default: every record in the output folder).
    """
    from cl_bidsapp.io import write_text
    from cl_bidsapp.reports.records import (all_subjects, read_settings, software_versions,
                                            subject_records)

    output_dir = Path(output_dir)
    subjects = all_subjects(output_dir)
    if records is None:
        records = [r for s in subjects for r in subject_records(output_dir, s)]
    if settings is None:
        newest: tuple[str, dict] = ("", {})
        for subject in subjects:
            run_id, sections = read_settings(output_dir, subject)
            if run_id and run_id > newest[0]:
                newest = (run_id, sections)
        settings = newest[1] or None
    versions = software_versions(output_dir, records)
    return write_text(output_dir / "logs" / "CITATION.md",
                      citation_markdown(records, settings, versions))

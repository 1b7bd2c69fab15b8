"""Evaluate a model on simulated phantoms, in and out of its training domain.

Simulates held-out phantoms (a seed the training never saw) for each protocol, predicts with
the model through the app's predictor, applies the card's threshold and minimum lesion size
(26-connected components), and scores each scan with the seed's lesion-wise metrics
(``cl_bidsapp.core.metrics``). Prints one row per protocol in the shape of the seed's result
table: per-scan mean and bootstrap standard error of F1, recall, precision and DSC. The second
and third table give the detection rate (share of reference lesions found) and pooled F1 by
cortical involvement (intracortical, leukocortical, from the simulator's tissue maps) and by
depth below the brain-mask surface: the group level's error analysis
(``cl_bidsapp.group.error_analysis``) applied to the same predictions.

The model input is the UNI (MP2RAGE) or T1w (MPRAGE) image times the true brain mask, as in
training; brain extraction errors are therefore not part of these figures.

Examples::

    python benchmarks/bench_models.py                       # demo model, 8 scans/protocol
    python benchmarks/bench_models.py --n 20 --markdown --csv scans.csv
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

log = logging.getLogger("bench_models")

IN_DOMAIN = "3T-MP2RAGE"
OUT_OF_DOMAIN = ("7T-MP2RAGE", "3T-MPRAGE")
TABLE_METRICS = ("f1", "recall", "precision", "dsc")


def phantom_scans(protocol: str, n: int, voxel_size: float, seed: int, work: Path,
                  lesions: dict):
    """Simulate ``n`` phantoms; yield (stem, masked input image, reference CL mask, brain mask,
    tissue probability maps by tissue)."""
    from cl_bidsapp.simulate import simulate_dataset

    bids = work / protocol
    simulate_dataset(bids, n, protocols=(protocol,), voxel_size=voxel_size, seed=seed,
                     **lesions)
    reference = bids / "derivatives" / "reference"
    images = sorted(p for p in bids.glob("sub-*/**/anat/*.nii.gz")
                    if p.name.endswith(("_UNIT1.nii.gz", "_T1w.nii.gz")))
    for path in images:
        suffix = "_UNIT1.nii.gz" if path.name.endswith("_UNIT1.nii.gz") else "_T1w.nii.gz"
        stem = path.name[: -len(suffix)]
        rel = path.relative_to(bids).parent
        brain = np.asarray(nib.load(reference / rel / f"{stem}_desc-brain_mask.nii.gz")
                           .dataobj) > 0
        truth = np.asarray(nib.load(reference / rel / f"{stem}_label-CL_mask.nii.gz")
                           .dataobj) > 0
        img = nib.load(path)
        masked = nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * brain, img.affine)
        tissue = {t: str(reference / rel / f"{stem}_label-{t}_probseg.nii.gz")
                  for t in ("GM", "WM", "CSF")}
        yield stem, masked, truth, brain, tissue


def evaluate(predictor, protocol: str, n: int, voxel_size: float, seed: int,
             work: Path, lesions: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-scan scores, and per-lesion rows of the error analysis, of one protocol."""
    from cl_bidsapp.core.components import lesion_instances
    from cl_bidsapp.core.metrics import lesion_detection, scan_scores
    from cl_bidsapp.group.error_analysis import image_lesion_rows

    model = predictor.model
    rows, lesion_rows = [], []
    for stem, image, truth, brain, tissue in phantom_scans(protocol, n, voxel_size, seed, work,
                                                           lesions):
        result = predictor.predict(image)
        probability = result.probability.get_fdata(dtype=np.float32)
        instances = lesion_instances(probability, model.recommended_threshold,
                                     model.recommended_min_size_voxels)
        scores = scan_scores(instances > 0, truth, probability=probability, brain_mask=brain)
        rows.append({"protocol": protocol, "scan": stem, "seconds": result.seconds, **scores})
        name = f"{protocol}/{stem}"
        found, _ = image_lesion_rows({"bids_name": name, "tissue": tissue}, instances > 0, truth,
                                     lesion_detection(instances > 0, truth).records, image,
                                     probability=probability, brain=brain)
        lesion_rows += [dict(r, protocol=protocol) for r in found]
        log.info("%s %s: F1 %.2f (TP %d FP %d US %d FN %d)", protocol, stem, scores["f1"],
                 scores["tp"], scores["fp"], scores["us"], scores["fn"])
    return pd.DataFrame(rows), pd.DataFrame(lesion_rows)


def strata_tables(scans: pd.DataFrame, lesions: pd.DataFrame) -> pd.DataFrame:
    """Detection rate and pooled F1 by cortical involvement and by depth below the brain
    surface, per protocol (column ``grouping``: involvement / depth)."""
    from cl_bidsapp.core.lesion_properties import INVOLVEMENTS
    from cl_bidsapp.core.lesion_strata import DEPTH_BIN_LABELS, stratified_detection

    if lesions.empty:
        return pd.DataFrame()
    images = scans.assign(bids_name=scans.protocol + "/" + scans.scan)
    parts = []
    for column, grouping, order in (("stratum_involvement", "involvement", INVOLVEMENTS),
                                    ("depth_bin", "depth", DEPTH_BIN_LABELS)):
        for protocol in [IN_DOMAIN, *OUT_OF_DOMAIN]:
            mine = images[images.protocol == protocol]
            if mine.empty:
                continue
            table = stratified_detection(lesions[lesions.protocol == protocol], mine, column,
                                         grouping, order=order)
            parts.append(table.assign(data=protocol))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def format_strata(table: pd.DataFrame, markdown: bool = False) -> str:
    head = ["data", table.grouping.iloc[0], "reference lesions", "detected", "detection rate",
            "FP", "F1"]
    def score(value, se):
        return "n/a" if pd.isna(value) else f"{value:.2f} ± {se:.2f}"

    lines = [[r.data, r.group, str(r.n_reference), str(r.detected),
              score(r.detection_rate, r.detection_rate_se), str(r.fp), score(r.f1, r.f1_se)]
             for r in table.itertuples()]
    return _format(head, lines, markdown)


def summary_table(scans: pd.DataFrame) -> pd.DataFrame:
    """One row per protocol (and pooled out-of-domain): mean and bootstrap SE per metric."""
    from cl_bidsapp.core.metrics import summarise_scans

    groups = [(IN_DOMAIN, "in-domain", scans[scans.protocol == IN_DOMAIN])]
    for protocol in OUT_OF_DOMAIN:
        groups.append((protocol, "out-of-domain", scans[scans.protocol == protocol]))
    ood = scans[scans.protocol.isin(OUT_OF_DOMAIN)]
    if ood.protocol.nunique() > 1:
        groups.append(("all out-of-domain", "out-of-domain", ood))
    rows = []
    for name, domain, part in groups:
        if part.empty:
            continue
        summary = summarise_scans(part).set_index("metric")
        row = {"domain": domain, "data": name, "scans": len(part),
               "lesions": int(part.n_reference.sum())}
        for metric in TABLE_METRICS:
            row[metric] = float(summary.loc[metric, "mean"])
            row[f"{metric}_se"] = float(summary.loc[metric, "se"])
        row["pooled_f1"] = float(summary.loc["f1", "pooled"])
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    head = ["domain", "data", "scans", "lesions", "F1", "recall", "precision", "DSC"]
    lines = []
    for _, r in table.iterrows():
        cells = [r.domain, r.data, str(r.scans), str(r.lesions)]
        cells += [f"{r[m]:.2f} ± {r[m + '_se']:.2f}" for m in TABLE_METRICS]
        lines.append(cells)
    return _format(head, lines, markdown)


def _format(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{w}s}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*c) for c in lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name or path (default: demo)")
    parser.add_argument("--n", type=int, default=8, help="phantoms per protocol")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="phantom voxel size, mm")
    parser.add_argument("--seed", type=int, default=90210,
                        help="simulation seed (must differ from the training seed)")
    parser.add_argument("--protocols", nargs="*", default=[IN_DOMAIN, *OUT_OF_DOMAIN])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-tta", action="store_true", help="disable mirroring TTA")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    parser.add_argument("--csv", type=Path, default=None, help="write per-scan scores here")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    from cl_bidsapp.models.predictor import CLPredictor
    from cl_bidsapp.models.registry import resolve_model

    model = resolve_model(args.model)
    simulator = model.card.get("training", {}).get("simulator", {})
    training_seed = simulator.get("seed")
    # in-domain means the training distribution: same lesion count and contrast
    lesions = {k: simulator[k] for k in ("lesion_mean", "lesion_contrast") if k in simulator}
    if training_seed is not None and int(training_seed) == args.seed:
        parser.error(f"--seed {args.seed} is the training seed: choose held-out phantoms")
    predictor = CLPredictor(model, device=args.device, tta=not args.no_tta,
                            threads=args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-models-"))
    start = time.time()
    results = [evaluate(predictor, p, args.n, args.voxel_size, args.seed + i, work, lesions)
               for i, p in enumerate(args.protocols)]
    scans = pd.concat([r[0] for r in results], ignore_index=True)
    lesion_rows = pd.concat([r[1] for r in results], ignore_index=True)
    if args.csv:
        scans.to_csv(args.csv, index=False)
    print(f"model {model.name} {model.version} (sha256 {model.sha256[:12]}), "
          f"{args.voxel_size:g} mm phantoms, seed {args.seed}, TTA "
          f"{'off' if args.no_tta else 'on'}, threshold {model.recommended_threshold}, "
          f"min size {model.recommended_min_size_voxels} voxels, lesions {lesions or 'default'}; "
          f"mean ± bootstrap SE over scans; {time.time() - start:.0f} s")
    print(format_table(summary_table(scans), markdown=args.markdown))
    strata = strata_tables(scans, lesion_rows)
    titles = {"involvement": "by cortical involvement",
              "depth": "by depth below the brain surface (mm, the lesion's closest voxel)"}
    for grouping, table in (strata.groupby("grouping", sort=False) if not strata.empty else ()):
        print(f"\n{titles[grouping]} (pooled over scans; bootstrap SE):")
        print(format_strata(table, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())

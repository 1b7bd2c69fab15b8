"""Cost of the encoder embedding (OOD score) during prediction, in one process.

Runs ``CLPredictor.predict`` on the same image with the embedding hooks on and off, alternating
(so load on a shared machine hits both alike), and prints the median wall times and their
ratio (target: under 1.05); then times the hook bodies and the final pooling inside the same
predictions and prints their share of the prediction time, which load from other jobs cannot
skew the way it skews two separate timings.

Examples::

    python benchmarks/bench_ood.py                       # demo-sized random network, 2 mm
    python benchmarks/bench_ood.py --model cl-demo-phantom --tta
    python benchmarks/bench_ood.py --device cuda --repeats 5

``--auc N`` instead checks the score on phantoms: a reference from ``--n-train`` 3T MP2RAGE
phantoms (or the BIDS phantoms of ``--train-bids``), a threshold from ``--n-held-out`` more
(another seed), then N phantoms of each protocol (3T MP2RAGE in-domain; 7T MP2RAGE and 3T
MPRAGE out-of-domain) are scored; prints the ROC AUC (overall, and of each encoder stage's
distance alone) and writes ``--figure``. ``--use-card`` scores them against the reference and
threshold the model card ships with instead, and runs the phantoms through the app's
participant level (its brain extraction), as the card's reference was made: what users get::

    python benchmarks/bench_ood.py --model cl-demo-phantom --auc 12 --use-card \\
        --figure docs/figures/ood_phantoms.png
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def phantom_input(folder: Path, voxel_size: float) -> nib.Nifti1Image:
    """A skull-stripped UNI (UNI x true brain mask) of one 3T MP2RAGE phantom."""
    from cl_bidsapp.simulate import simulate_dataset

    bids = simulate_dataset(folder / "bids", 1, voxel_size=voxel_size, seed=11)
    uni = next(bids.glob("sub-01/**/anat/*_UNIT1.nii.gz"))
    mask = next((bids / "derivatives" / "reference").rglob("*_desc-brain_mask.nii.gz"))
    data = np.asarray(nib.load(uni).dataobj, np.float32) * (np.asarray(
        nib.load(mask).dataobj) > 0)
    return nib.Nifti1Image(data, nib.load(uni).affine)


def subject_protocols(bids: Path) -> dict[str, str]:
    """participant_id -> protocol, from a phantom dataset's participants.tsv."""
    import csv

    with open(bids / "participants.tsv", newline="") as fh:
        return {row["participant_id"]: row.get("protocol", "?")
                for row in csv.DictReader(fh, delimiter="\t")}


def masked_inputs(bids: Path, out: Path) -> list[tuple[Path, str]]:
    """(image x true brain mask, protocol) for every phantom scan: the model input."""
    protocols = subject_protocols(bids)
    out.mkdir(parents=True, exist_ok=True)
    found = []
    for image in sorted(bids.glob("sub-*/**/anat/*.nii.gz")):
        if not image.name.endswith(("_UNIT1.nii.gz", "_T1w.nii.gz")):
            continue
        stem = image.name.rsplit("_", 1)[0]
        mask = next((bids / "derivatives" / "reference").rglob(f"{stem}_desc-brain_mask.nii.gz"))
        dest = out / image.name
        if not dest.exists():
            img = nib.load(image)
            data = np.asarray(img.dataobj, np.float32) * (np.asarray(nib.load(mask).dataobj) > 0)
            nib.save(nib.Nifti1Image(data, img.affine), dest)
        found.append((dest, protocols.get(image.name.split("_")[0], "?")))
    return found


def auc_check(args, model, tmp: Path) -> int:
    from cl_bidsapp.core.ood import block_distances, ood_score, roc_auc
    from cl_bidsapp.models.calibration import build_reference, embed_images
    from cl_bidsapp.simulate import simulate_dataset

    t0 = time.perf_counter()
    test_bids = simulate_dataset(tmp / "test", 3 * args.auc, voxel_size=args.voxel_size,
                                 protocols=("3T-MP2RAGE", "7T-MP2RAGE", "3T-MPRAGE"),
                                 seed=args.seed)
    if args.use_card:
        # the card's reference comes from the app's own preprocessing (calibrate), so the
        # scored phantoms go through the app's participant level too
        from cl_bidsapp.models.calibration import collect_embeddings

        x_test, names, info = collect_embeddings(
            model, Path(test_bids), work_dir=tmp / "app",
            app_args=["--nprocs", str(args.threads), "--skip-bids-validation"])
        protocol_of = subject_protocols(Path(test_bids))
        test = [(name, protocol_of.get(name.split("_")[0], "?")) for name in names]
    else:
        test = masked_inputs(test_bids, tmp / "m-test")
        x_test, info = embed_images(model, [p for p, _ in test], threads=args.threads)
    if args.use_card:
        ref = model.card.get("ood")
        if not ref:
            raise SystemExit(f"model {model.name} has no ood reference in its card")
        if ref.get("checkpoint_sha256") != info.get("CheckpointSHA256") or "blocks" not in ref:
            raise SystemExit(f"model {model.name}: the card's reference was made from other "
                             "features (another fold, network or cl-bidsapp version); "
                             "calibrate it again")
        x_held = None
        source = (f"the card's reference ({ref['n_scans']} scans, threshold "
                  f"{ref['threshold']:.2f} from {ref.get('n_held_out', 0)} held-out scans)")
    else:
        train_bids = args.train_bids or simulate_dataset(
            tmp / "train", args.n_train, voxel_size=args.voxel_size, seed=501)
        held_bids = simulate_dataset(tmp / "held", args.n_held_out,
                                     voxel_size=args.voxel_size, seed=9001)
        train = masked_inputs(Path(train_bids), tmp / "m-train")
        held = masked_inputs(held_bids, tmp / "m-held")
        x_train, _ = embed_images(model, [p for p, _ in train], threads=args.threads)
        x_held, _ = embed_images(model, [p for p, _ in held], threads=args.threads)
        ref = build_reference(x_train, x_held, blocks=info.get("Blocks"))
        source = (f"a reference of {len(train)} 3T-MP2RAGE scans, threshold "
                  f"{ref['threshold']:.2f} from {len(held)} held-out scans")
    scores = ood_score(ref, x_test)
    protocols = [p for _, p in test]
    out_domain = [p != "3T-MP2RAGE" for p in protocols]
    auc = roc_auc(scores, out_domain)
    print(f"model {model.name}: {source} ({time.perf_counter() - t0:.0f} s)")
    for name in sorted(set(protocols)):
        x = scores[[p == name for p in protocols]]
        print(f"  {name:11s} n={len(x)} scores {', '.join(f'{v:.2f}' for v in sorted(x))}; "
              f"{int((x > ref['threshold']).sum())} above the threshold")
    for name in ("7T-MP2RAGE", "3T-MPRAGE"):
        keep = [p in ("3T-MP2RAGE", name) for p in protocols]
        print(f"  ROC AUC 3T-MP2RAGE vs {name}: "
              f"{roc_auc(scores[keep], [p == name for p, k in zip(protocols, keep) if k]):.3f}")
    per_block = block_distances(ref, x_test)
    for i, block in enumerate(ref.get("blocks", [{"name": "all"}])):
        print(f"  stage {block['name']:8s} alone: ROC AUC {roc_auc(per_block[:, i], out_domain):.3f}")
    print(f"ROC AUC in-domain vs out-of-domain: {auc:.3f}")
    if args.figure:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.2, 3.4), dpi=100, layout="constrained")
        ax = fig.subplots()
        names = ["3T-MP2RAGE", "7T-MP2RAGE", "3T-MPRAGE"]
        rng = np.random.default_rng(0)
        calibration = (ood_score(ref, x_held) if x_held is not None
                       else np.asarray(ref.get("calibration_scores", []), float))
        ax.scatter(np.zeros(len(calibration)) - 0.35 + rng.uniform(-.05, .05, len(calibration)),
                   calibration, s=16, c="#9ecae1", label="held-out (threshold)")
        for i, name in enumerate(names):
            y = scores[[p == name for p in protocols]]
            ax.scatter(i + rng.uniform(-.12, .12, len(y)), y, s=16,
                       c="#1f77b4" if i == 0 else "#d62728")
        ax.axhline(ref["threshold"], color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(3), [f"{n}\n({'in' if i == 0 else 'out of'} domain)"
                                 for i, n in enumerate(names)], fontsize=8)
        ax.set_ylabel("OOD score (1 = typical in-domain scan)")
        ax.set_title(f"{model.name}: ROC AUC {auc:.2f}; dashed: threshold", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        fig.savefig(args.figure, format="png", dpi=100)
        print(f"wrote {args.figure}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="model name or folder (default: a random network of the demo model's "
                        "size: features 12-24-48-96, patch 32, 2 mm)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true", help="mirroring TTA on")
    p.add_argument("--voxel-size", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--auc", type=int, default=0, metavar="N",
                   help="phantom check of the score with N phantoms per protocol")
    p.add_argument("--n-train", type=int, default=12)
    p.add_argument("--n-held-out", type=int, default=6)
    p.add_argument("--train-bids", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--seed", type=int, default=9101,
                   help="simulation seed of the scored phantoms")
    p.add_argument("--use-card", action="store_true",
                   help="score against the reference and threshold in the model's card "
                        "instead of building one from --n-train/--n-held-out phantoms; the "
                        "phantoms go through the app's participant level")
    args = p.parse_args(argv)

    from cl_bidsapp.models.predictor import CLPredictor
    from cl_bidsapp.models.registry import resolve_model
    from cl_bidsapp.models.testing import make_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-ood-"))
    model = args.model or str(make_tiny_model(tmp / "model", patch=(32, 32, 32),
                                              features=(12, 24, 48, 96)))
    model = resolve_model(model)
    if args.auc:
        return auc_check(args, model, tmp)
    image = phantom_input(tmp, args.voxel_size)
    on = CLPredictor(model, device=args.device, tta=args.tta, threads=args.threads,
                     embed=True)
    off = CLPredictor(model, device=args.device, tta=args.tta, threads=args.threads,
                      embed=False)
    on.predict(image)  # warm-up (allocations, lazy imports)
    off.predict(image)
    times = {"with hook": [], "without": []}
    for _ in range(args.repeats):
        for name, predictor in (("without", off), ("with hook", on)):
            t = time.perf_counter()
            result = predictor.predict(image)
            times[name].append(time.perf_counter() - t)
            print(f"  {name}: {times[name][-1]:.3f} s", flush=True)
    hook_s, pooling_s, total_s = hook_share(on, image, args.repeats)
    info = on.predict(image).embedding_info
    print(f"model {model.name}, image {'x'.join(map(str, image.shape))} at "
          f"{args.voxel_size} mm, device {args.device}, TTA {'on' if args.tta else 'off'}, "
          f"{info['TilesTotal']} tiles ({info['TilesUsed']} in the brain), "
          f"{len(result.folds)} fold(s), {args.repeats} repeats")
    for name, values in times.items():
        print(f"  {name:10s} median {statistics.median(values):.3f} s  "
              f"({', '.join(f'{v:.3f}' for v in values)})")
    ratio = statistics.median(times["with hook"]) / statistics.median(times["without"])
    print(f"ratio with/without hook: {ratio:.3f} (target < 1.05)")
    print(f"time inside the hooks: {hook_s:.3f} s + final pooling {pooling_s:.3f} s of "
          f"{total_s:.3f} s per prediction = {100 * (hook_s + pooling_s) / total_s:.2f} % "
          "(measured inside the same runs, so load from other jobs does not skew it)")
    return 0


def hook_share(predictor, image, repeats: int) -> tuple[float, float, float]:
    """Median seconds spent inside the embedding hooks and in the final pooling, and the
    median prediction time, from the same runs (timers around the hook bodies)."""
    from cl_bidsapp.models import embedding

    original_hook, original_embedding = embedding.FeatureCapture._hook, \
        embedding.FeatureCapture.embedding
    spent = {"hook": 0.0, "pool": 0.0}

    def timed_hook(self, stage):
        body = original_hook(self, stage)

        def hook(*a):
            t = time.perf_counter()
            body(*a)
            spent["hook"] += time.perf_counter() - t
        return hook

    def timed_embedding(self):
        t = time.perf_counter()
        out = original_embedding(self)
        spent["pool"] += time.perf_counter() - t
        return out

    rows = []
    embedding.FeatureCapture._hook = timed_hook
    embedding.FeatureCapture.embedding = timed_embedding
    try:
        for _ in range(repeats):
            spent.update(hook=0.0, pool=0.0)
            t = time.perf_counter()
            predictor.predict(image)
            rows.append((spent["hook"], spent["pool"], time.perf_counter() - t))
    finally:
        embedding.FeatureCapture._hook = original_hook
        embedding.FeatureCapture.embedding = original_embedding
    return tuple(statistics.median(r[i] for r in rows) for i in range(3))


if __name__ == "__main__":
    raise SystemExit(main())

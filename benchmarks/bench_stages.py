"""Wall time and peak memory of each stage of the participant level, for one phantom.

Part 1 runs ``cl-bidsapp ... participant`` in this process (Nipype's Linear plugin, so every
stage runs here one after the other, as MultiProc runs a single image) on one simulated 3T
MP2RAGE phantom (1 mm by default) and prints, per stage: seconds, the peak resident memory of
the process during the stage and how much it grew over the stage's start. Stages: startup
(arguments, BIDS index, model verification), input checks (+ masking image), brain
extraction (deepbet), masking (model input), nnU-Net (model load shown apart), post-processing
(lesions), derivatives, report.

Part 2 times the full-size network of the seed method (``../shared/notes/method.md``: 6-stage
PlainConvUNet 32..320, patch 112x128x160 at 1 mm; random weights) on the phantom's model
input, with and without mirroring TTA. By default it times ``--tiles`` sliding-window tiles
and extrapolates to the number of tiles nnU-Net uses on that image (step 0.5), and says so;
``--full`` runs whole predictions instead (the GPU script does).

Examples::

    python benchmarks/bench_stages.py                       # CPU, demo model, 1 mm
    python benchmarks/bench_stages.py --voxel-size 2 --tiles 1
    python benchmarks/bench_stages.py --device cuda --stage-model full-size --full \\
        --folds-list 1 5 --tta-list on off                  # benchmarks/gpu_profile.sh
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_predictor import realistic_model
from bench_vs_nnunet import pick_model

STAGES = [("startup", "startup: arguments, BIDS index, model check"),
          ("prepare", "input checks + masking image"),
          ("skullstrip", "brain extraction (deepbet)"),
          ("model_input", "masking (model input)"),
          ("model_load", "nnU-Net: model load"),
          ("segment", "nnU-Net: prediction"),
          ("find_lesions", "post-processing (lesions)"),
          ("save_derivatives", "derivatives"),
          ("subject_report", "report (HTML)")]


def rss_mb() -> float:
    """Resident memory of this process (MB), from /proc."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Sampler(threading.Thread):
    """Samples this process's resident memory every ``interval`` seconds."""

    def __init__(self, interval: float = 0.01):
        super().__init__(daemon=True)
        self.interval, self.samples, self.running = interval, [], True

    def run(self):
        while self.running:
            self.samples.append((time.monotonic(), rss_mb()))
            time.sleep(self.interval)

    def peak(self, start: float, end: float) -> float:
        values = [mb for t, mb in self.samples if start <= t <= end]
        return max(values) if values else rss_mb()

    def at(self, when: float) -> float:
        before = [mb for t, mb in self.samples if t <= when]
        return before[-1] if before else rss_mb()


def profile_app(bids: Path, work: Path, model: str, device: str, folds, tta: bool) -> dict:
    """Run the participant level here; return {stage: (start, end)} and the sampler."""
    import cl_bidsapp.cli.participant as participant
    import cl_bidsapp.models.predictor as predictor
    import cl_bidsapp.reports as reports
    from cl_bidsapp.cli.run import main

    spans: dict[str, list] = {}

    class Recorder(participant._Progress):
        def __call__(self, node, status):
            now = time.monotonic()
            if status == "start":
                spans[node.name] = [now, None]
            elif node.name in spans:
                spans[node.name][1] = now
            super().__call__(node, status)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                spans[name] = [start, time.monotonic()]
        return wrapper

    originals = (participant._Progress, predictor.CLPredictor, reports.build_subject_reports)
    participant._Progress = Recorder
    predictor.CLPredictor = type("CLPredictor", (predictor.CLPredictor,), {
        "__init__": timed("model_load", predictor.CLPredictor.__init__)})
    # the workflow writes the page (node subject_report); the main process only for failures
    reports.build_subject_reports = timed("subject_report", reports.build_subject_reports)
    work.mkdir(parents=True, exist_ok=True)
    plugin = work / "linear.yml"
    plugin.write_text("plugin: Linear\n")
    args = [str(bids), str(work / "out"), "participant", "-w", str(work / "work"),
            "--model", model, "--skip-bids-validation", "--device", device,
            "--use-plugin", str(plugin), "--folds", *map(str, folds)]
    args += [] if tta else ["--no-tta"]
    sampler = Sampler()
    sampler.start()
    start = time.monotonic()
    try:
        code = main(args)
    finally:
        end = time.monotonic()
        sampler.running = False
        participant._Progress, predictor.CLPredictor, reports.build_subject_reports = originals
    if code != 0:
        sys.exit(f"cl-bidsapp exited with {code}")
    first = min(s for s, _ in spans.values())
    spans["startup"] = [start, first]
    if "model_load" in spans:  # the load happens inside the segment node
        spans["segment"][0] = spans["model_load"][1]
    return {"spans": spans, "sampler": sampler, "total": end - start, "start": start}


def print_profile(result: dict, title: str) -> None:
    spans, sampler = result["spans"], result["sampler"]
    print(f"\n{title}")
    predict = spans.get("segment", [0, 0])
    predict_s = (predict[1] or 0) - predict[0]
    print(f"{'stage':<46s} {'seconds':>8s} {'share':>6s} {'/ nnU-Net':>9s} "
          f"{'peak RSS MB':>12s} {'growth MB':>10s}")
    for key, label in STAGES:
        if key not in spans or spans[key][1] is None:
            continue
        start, end = spans[key]
        peak = sampler.peak(start, end)
        ratio = (end - start) / predict_s if predict_s > 0 else float("nan")
        print(f"{label:<46s} {end - start:8.2f} {(end - start) / result['total']:6.1%} "
              f"{ratio:9.2f} {peak:12.0f} {peak - sampler.at(start):10.0f}")
    print(f"{'total (main() of cl-bidsapp, imports excluded)':<46s} {result['total']:8.2f}")


def window_count(shape, patch, step: float = 0.5) -> int:
    """Sliding-window tiles nnU-Net predicts for a preprocessed image of ``shape``.

    >>> window_count((140, 170, 140), (112, 128, 160))
    4
    """
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    padded = [max(s, p) for s, p in zip(shape, patch)]
    steps = compute_steps_for_sliding_window(padded, list(patch), step)
    count = 1
    for axis in steps:
        count *= len(axis)
    return count


def full_size(image_path: Path, work: Path, device: str, folds_list, tta_list, tiles: int,
              full: bool, threads: int | None, network: str = "full-size") -> list[dict]:
    """Time the full-size random network on ``image_path``; one row per (folds, TTA).

    ``network="tiny"`` swaps in a small network (to check this code quickly on a CPU).
    """
    import nibabel as nib
    import torch

    from cl_bidsapp.models.predictor import CLPredictor
    from cl_bidsapp.models.registry import resolve_model

    folds = range(max(folds_list))
    image = nib.load(image_path)
    if network == "tiny":  # at the image's own spacing: few tiles
        from cl_bidsapp.models.testing import make_tiny_model

        spacing = [float(z) for z in image.header.get_zooms()[:3]][::-1]
        folder = make_tiny_model(work / "part2-tiny", folds=folds, spacing=spacing,
                                 patch=(32, 32, 32), features=(4, 8, 16))
    else:
        folder = realistic_model(work / "full-size", folds=folds)
    model = resolve_model(str(folder))
    rows = []
    for tta in tta_list:
        for n_folds in folds_list:
            pred = CLPredictor(model, device=device, folds=list(range(n_folds)), tta=tta,
                               threads=threads)
            row = {"folds": n_folds, "tta": tta, "device": str(pred.device)}
            if full:
                pred.predict(image)  # warm-up: lazy imports, cuDNN autotuning
                start = time.perf_counter()
                result = pred.predict(image)
                row.update(seconds=time.perf_counter() - start, how="measured")
                del result
            else:
                with pred._torch_threads():
                    data, props = pred._read_like_nnunet(image)
                    prep = pred._configuration.preprocessor_class(verbose=False)
                    data, _, _ = prep.run_case_npy(data, None, props, pred._plans_manager,
                                                   pred._configuration, pred._dataset_json)
                    patch = pred._configuration.patch_size
                    n_tiles = window_count(data.shape[1:], patch)
                    x = torch.randn(1, 1, *patch, device=pred.device)
                    net = pred._nnunet
                    net.network = net.network.to(pred.device).eval()
                    times = []
                    with torch.inference_mode():
                        for _ in range(tiles):
                            start = time.perf_counter()
                            net._internal_maybe_mirror_and_predict(x)
                            times.append(time.perf_counter() - start)
                per_tile = min(times)  # the first tile also pays one-off set-up
                row.update(seconds=per_tile * n_tiles * n_folds, per_tile=per_tile,
                           tiles=n_tiles, how=f"extrapolated: fastest of {tiles} tile(s)")
            rows.append(row)
            del pred
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voxel-size", type=float, default=1.0, help="phantom voxel size, mm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="model of part 1 (default: demo)")
    parser.add_argument("--tiny", action="store_true",
                        help="part 1 with a random stand-in of the demo model's architecture")
    parser.add_argument("--stage-model", choices=("demo", "full-size"), default="demo",
                        help="part 1 with the demo model or the full-size random network")
    parser.add_argument("--stage-tta", choices=("on", "off"), default="off")
    parser.add_argument("--folds-list", type=int, nargs="+", default=[1],
                        help="part 2: numbers of folds to time")
    parser.add_argument("--tta-list", choices=("on", "off"), nargs="+", default=["off", "on"])
    parser.add_argument("--tiles", type=int, default=2, help="part 2: tiles timed per setting")
    parser.add_argument("--full", action="store_true", help="part 2: whole predictions")
    parser.add_argument("--skip-full-size", action="store_true", help="part 1 only")
    parser.add_argument("--threads", type=int, default=None, help="part 2: torch threads")
    parser.add_argument("--network", choices=("full-size", "tiny"), default="full-size",
                        help="part 2: tiny only checks this script quickly (gpu_profile --smoke)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept)")
    parser.add_argument("--folds", type=int, nargs="+", default=None,
                        help=argparse.SUPPRESS)  # pick_model() reads it
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from cl_bidsapp.simulate import simulate_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bids = simulate_dataset(work / "bids", 1, voxel_size=args.voxel_size, seed=21)
    print(f"one 3T MP2RAGE phantom at {args.voxel_size:g} mm simulated in "
          f"{time.perf_counter() - start:.0f} s")
    if args.stage_model == "full-size":
        model, what = str(realistic_model(work / "stage-model")), "full-size random network"
    else:
        model, what = pick_model(args, work)
    from cl_bidsapp.models.registry import resolve_model

    folds = resolve_model(model).folds
    result = profile_app(bids, work / "app", model, args.device, folds, args.stage_tta == "on")
    print_profile(result, f"Part 1: participant level, one image; model {what}, folds "
                          f"{folds}, TTA {args.stage_tta}, device {args.device}")
    if args.skip_full_size:
        return 0
    model_input = next((work / "app" / "out").rglob("*_desc-preproc_UNIT1.nii.gz"))
    rows = full_size(model_input, work, args.device, args.folds_list,
                     [t == "on" for t in args.tta_list], args.tiles, args.full, args.threads,
                     args.network)
    what = ("full-size network (PlainConvUNet 32..320, patch 112x128x160, 1 mm, random weights)"
            if args.network == "full-size" else "TINY stand-in network (script check only)")
    print(f"\nPart 2: {what} on the phantom's model input")
    print(f"{'device':<12s} {'folds':>5s} {'TTA':>4s} {'tiles/fold':>10s} {'s per tile':>10s} "
          f"{'network s':>10s}  how")
    for r in rows:
        print(f"{r['device']:<12s} {r['folds']:5d} {'on' if r['tta'] else 'off':>4s} "
              f"{r.get('tiles', float('nan')):10} {r.get('per_tile', float('nan')):10.2f} "
              f"{r['seconds']:10.1f}  {r['how']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The app's participant level against the peer baseline: deepbet, then nnU-Net's own CLI.

The baseline is what users of the seed method do today, scripted once per scan::

    deepbet-cli -i <UNI> -o <in>/<sub>_0000.nii.gz --no_gpu          # brain extraction
    nnUNetv2_predict_from_modelfolder -i <in> -o <pred> -m <model> -f <folds> -device cpu

(each scan in its own input folder, one call per scan, nnU-Net's default worker settings),
against ``cl-bidsapp <bids> <out> participant --participant-label ...`` on the same phantom
images, with the same model, folds and TTA setting (BIDS validation skipped; the app also
writes derivatives, lesion tables and the HTML reports). Each repeat runs baseline and app
alternately from clean folders, for one subject and for a batch; the table shows medians and
app / baseline. The app's log is read to count how many times it loaded the nnU-Net model and
deepbet (at most once per worker process).

Examples::

    python benchmarks/bench_vs_nnunet.py                      # demo model, 2 mm, 1 and 10
    python benchmarks/bench_vs_nnunet.py --repeats 1 --batch 4 --tiny
    python benchmarks/bench_vs_nnunet.py --voxel-size 1 --batch 3 --tta on

Without the bundled demo model (``--tiny``, or when it is not installed) a random-weight
network with the demo model's architecture stands in: the timings are the same, the lesions
are noise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
#: The app logs one of these lines each time a process loads a network
MODEL_LOAD = re.compile(r"\| model .+ \(sha256 \w+\), folds ")
DEEPBET_LOAD = re.compile(r"Loading the deepbet brain-extraction network")
#: The demo model's network (scripts/train_demo_model.py defaults)
DEMO_FEATURES, DEMO_PATCH = (12, 24, 48, 96), 32


def pick_model(args, work: Path) -> tuple[str, str]:
    """(model folder, description): the demo model, a path, or a random stand-in."""
    from cl_bidsapp.errors import CLBidsAppError
    from cl_bidsapp.models.registry import resolve_model

    if getattr(args, "full_size", False):
        from bench_predictor import realistic_model

        return str(realistic_model(work / "full-size")), "full-size random network (method.md)"
    if not args.tiny:
        try:
            model = resolve_model(args.model)
            return str(model.path), f"{model.name} {model.version}"
        except CLBidsAppError as err:
            if args.model:
                raise
            print(f"(demo model unavailable: {err}; using a random stand-in)")
    from cl_bidsapp.models.testing import make_tiny_model

    size = args.voxel_size
    folder = make_tiny_model(work / "model", name="demo-architecture-random", spacing=[size] * 3,
                             patch=[DEMO_PATCH] * 3, features=DEMO_FEATURES,
                             folds=tuple(args.folds or (0,)))
    return str(folder), f"random weights, demo architecture {DEMO_FEATURES}"


def run(cmd: list[str], env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
                 f"{proc.stderr[-3000:]}")
    return proc


def baseline(images: dict[str, Path], model: str, folds: list[str], tta: bool,
             work: Path, save_probabilities: bool, device: str = "cpu") -> float:
    """deepbet-cli then nnUNetv2_predict_from_modelfolder, once per scan; wall seconds."""
    start = time.perf_counter()
    for subject, image in images.items():
        inp = work / f"in-{subject}"
        inp.mkdir(parents=True)
        run([BIN / "deepbet-cli", "-i", image, "-o", inp / f"{subject}_0000.nii.gz",
             "--no_gpu" if device == "cpu" else "--no-no_gpu", "--no-skip_broken"])
        cmd = [BIN / "nnUNetv2_predict_from_modelfolder", "-i", inp, "-o", work / "pred",
               "-m", model, "-f", *folds, "-device", device, "--disable_progress_bar"]
        cmd += [] if tta else ["--disable_tta"]
        cmd += ["--save_probabilities"] if save_probabilities else []
        run(cmd)
    seconds = time.perf_counter() - start
    missing = [s for s in images if not (work / "pred" / f"{s}.nii.gz").is_file()]
    if missing:
        sys.exit(f"baseline wrote no segmentation for {missing}")
    return seconds


def app(bids: Path, subjects: list[str], model: str, folds: list[str], tta: bool,
        work: Path, nprocs: int, extra: list[str], device: str = "cpu") -> tuple[float, dict]:
    """``cl-bidsapp ... participant`` on the subjects; wall seconds and what its log says."""
    cmd = [BIN / "cl-bidsapp", bids, work / "out", "participant", "-w", work / "work",
           "--participant-label", *subjects, "--model", model, "--folds", *folds,
           "--skip-bids-validation", "--device", device, "--nprocs", str(nprocs), *extra]
    cmd += [] if tta else ["--no-tta"]
    start = time.perf_counter()
    proc = run(cmd)
    seconds = time.perf_counter() - start
    log = proc.stderr
    finished = re.search(r"Participant level finished in (\d+) s", log)
    info = {"model_loads": len(MODEL_LOAD.findall(log)), "busy": segment_busy(log),
            "deepbet_loads": len(DEEPBET_LOAD.findall(log)),
            "workflow_s": float(finished.group(1)) if finished else float("nan")}
    missing = [s for s in subjects
               if not list((work / "out" / f"sub-{s}").rglob("*_label-CL_probseg.nii.gz"))]
    if missing:
        sys.exit(f"the app wrote no probability map for {missing}:\n{log[-3000:]}")
    return seconds, info


def segment_busy(log: str) -> float:
    r"""Share of the time from the first nnU-Net start to the last end with a prediction running.

    From the app's progress lines (1 s clock), so only a rough figure; 1.0 means the network
    (the GPU) never waited for the next image's preprocessing.

    >>> segment_busy("10:00:00 | a: nnU-Net segmentation ...\n"
    ...              "10:00:04 | a: nnU-Net segmentation done (4.0 s) [1/2 stages]\n"
    ...              "10:00:04 | b: nnU-Net segmentation ...\n"
    ...              "10:00:08 | b: nnU-Net segmentation done (4.0 s) [2/2 stages]\n")
    1.0
    """
    def clock(text):
        h, m, sec = (int(v) for v in text.split(":"))
        return 3600 * h + 60 * m + sec

    starts = [clock(t) for t in re.findall(r"^(\S+) \| .*nnU-Net segmentation \.\.\.$", log,
                                           re.M)]
    ends = re.findall(r"^(\S+) \| .*nnU-Net segmentation done \(([\d.]+) s\)", log, re.M)
    if not starts or not ends:
        return float("nan")
    span = max(clock(t) for t, _ in ends) - min(starts)
    busy = sum(float(d) for _, d in ends)
    return min(1.0, busy / span) if span > 0 else 1.0


def agreement(app_out: Path, base_pred: Path, subject: str) -> float:
    """Dice of the app's probability > 0.5 and the baseline's argmax (same model: near 1)."""
    import nibabel as nib
    import numpy as np

    prob = next((app_out / f"sub-{subject}").rglob("*_label-CL_probseg.nii.gz"))
    a = np.asarray(nib.load(prob).dataobj) > 0.5
    b = np.asarray(nib.load(base_pred / f"{subject}.nii.gz").dataobj) > 0
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name or folder (default: demo)")
    parser.add_argument("--tiny", action="store_true",
                        help="random-weight stand-in with the demo model's architecture")
    parser.add_argument("--full-size", action="store_true",
                        help="the full-size random network of method.md (1 mm plans)")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="phantom voxel size, mm")
    parser.add_argument("--batch", type=int, default=10, help="subjects in the batch run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (median)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="numbers of subjects to time (default: 1 and --batch)")
    parser.add_argument("--folds", nargs="+", default=None, help="default: the model's")
    parser.add_argument("--tta", choices=("on", "off"), default="off")
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="for both (deepbet and nnU-Net)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="let the baseline also write probabilities (as the app does)")
    parser.add_argument("--app-args", default="", help="extra cl-bidsapp arguments (quoted)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept)")
    args = parser.parse_args(argv)

    from cl_bidsapp.models.registry import resolve_model
    from cl_bidsapp.simulate import simulate_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-nnunet-"))
    work.mkdir(parents=True, exist_ok=True)
    model, what = pick_model(args, work)
    folds = [str(f) for f in (args.folds or resolve_model(model).folds)]
    bids = work / "bids"
    start = time.perf_counter()
    simulate_dataset(bids, args.batch, voxel_size=args.voxel_size, seed=11)
    subjects = sorted(p.name[4:] for p in bids.glob("sub-*"))
    images = {s: next((bids / f"sub-{s}").rglob("*_UNIT1.nii.gz")) for s in subjects}
    tta = args.tta == "on"
    print(f"model {what}, folds {' '.join(folds)}, TTA {args.tta}; {args.batch} phantoms at "
          f"{args.voxel_size:g} mm simulated in {time.perf_counter() - start:.0f} s; "
          f"device {args.device}, app --nprocs {args.nprocs}; {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")
    sizes = args.sizes or ([1, args.batch] if args.batch > 1 else [1])
    if max(sizes) > args.batch:
        parser.error("--sizes cannot exceed --batch")
    times: dict[tuple, list] = {}
    infos: dict[int, list] = {}
    dice = []
    for repeat in range(args.repeats):
        for n in sizes:
            chosen = subjects[:n]
            folder = work / f"run-{repeat}-{n}"
            t_base = baseline({s: images[s] for s in chosen}, model, folds, tta,
                              folder / "baseline", args.save_probabilities, args.device)
            t_app, info = app(bids, chosen, model, folds, tta, folder / "app", args.nprocs,
                              args.app_args.split(), args.device)
            times.setdefault(("baseline", n), []).append(t_base)
            times.setdefault(("app", n), []).append(t_app)
            infos.setdefault(n, []).append(info)
            dice += [agreement(folder / "app" / "out", folder / "baseline" / "pred", s)
                     for s in chosen]
            print(f"  repeat {repeat + 1}, {n:2d} subject(s): baseline {t_base:7.1f} s, "
                  f"app {t_app:7.1f} s (workflow {info['workflow_s']:.0f} s; loads: nnU-Net "
                  f"{info['model_loads']}, deepbet {info['deepbet_loads']}; nnU-Net busy "
                  f"{info['busy']:.0%}), load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{'subjects':>8s} {'baseline s':>11s} {'app s':>8s} {'app/baseline':>13s} "
          f"{'per subject: base':>18s} {'app':>6s}")
    for n in sizes:
        base = statistics.median(times[("baseline", n)])
        ours = statistics.median(times[("app", n)])
        print(f"{n:8d} {base:11.1f} {ours:8.1f} {ours / base:13.2f} {base / n:18.1f} "
              f"{ours / n:6.1f}")
    loads = max(i["model_loads"] for v in infos.values() for i in v)
    print(f"most nnU-Net model loads in one app run: {loads} (processes: {args.nprocs}); "
          f"Dice app (p > 0.5) vs baseline argmax: min {min(dice):.3f}, "
          f"median {statistics.median(dice):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Group level at scale: time and peak memory for 1,000 and 10,000 images (target: < 30 s).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_group.py [--sizes 1000 10000]``.

For each size, participant outputs are written first (records, per-lesion tables and their
sidecars only, no images; about 3 lesions per image, a few failed or missing images, four sites
and two sessions), then the group level runs in a fresh process (tables, QC flags, figures and
report; no template-space map, which needs images), which reports its wall time and peak
resident memory. Memory is "flat" when the 10,000-image peak is close to the 1,000-image one:
per-lesion rows are streamed; only one small summary per image stays in memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_S = 30.0
SITES = ("Basel", "Lausanne", "NIH", "UCLouvain")


def names(n_images: int) -> list[str]:
    """BIDS names of ``n_images`` images: two sessions per subject, UNIT1 or T1w by site."""
    out = []
    for i in range(n_images):
        subject, session = i // 2 + 1, i % 2 + 1
        suffix = "UNIT1" if (subject % len(SITES)) < 2 else "T1w"
        out.append(f"sub-{subject:05d}_ses-{session}_{suffix}")
    return out


def build(out: Path, bids: Path, n_images: int, seed: int = 0) -> float:
    """Write the fake participant outputs; return seconds taken."""
    from cl_bidsapp.group.records import record_path
    from cl_bidsapp.group.testing import record, work_item, write_table_outputs
    from cl_bidsapp.io import write_json

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    bids.mkdir(parents=True, exist_ok=True)
    subjects = sorted({name.split("_")[0] for name in names(n_images)})
    rows = [f"{s}\t{SITES[int(s[4:]) % len(SITES)]}" for s in subjects]
    (bids / "participants.tsv").write_text("participant_id\tsite\n" + "\n".join(rows) + "\n")
    for i, name in enumerate(names(n_images)):
        item = work_item(name)
        if i % 500 == 7:        # never run
            continue
        if i % 500 == 11:       # failed
            write_json(record_path(out, item.subject, name), record(
                item, {}, lesion_count=0, total_volume_mm3=0, status="failed"))
            continue
        write_table_outputs(out, item, n_lesions=int(rng.poisson(3)), seed=i,
                            brain_volume_ml=float(rng.normal(1200, 80)))
    return time.perf_counter() - start


def run_one(out: Path, bids: Path, n_images: int) -> None:
    """In a fresh process: run the group level, print seconds and peak memory as JSON."""
    from cl_bidsapp.config import Settings
    from cl_bidsapp.group import run_group_level
    from cl_bidsapp.group.testing import work_item

    items = [work_item(name) for name in names(n_images)]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    settings = Settings(bids_dir=bids, output_dir=out, nprocs=1)
    start = time.perf_counter()
    run_group_level(settings, items, {"Name": "benchmark"}, frequency_map=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "before_mb": baseline}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--run-one", nargs=3, metavar=("OUT", "BIDS", "N"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(Path(args.run_one[0]), Path(args.run_one[1]), int(args.run_one[2]))
        return
    print(f"{'images':>8s} {'build s':>8s} {'group s':>8s} {'x target':>9s} {'peak MB':>8s} "
          f"{'(after imports)':>16s} {'lesion rows':>12s}")
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"bench-group-{n}-"))
        try:
            built = build(root / "out", root / "bids", n)
            child = subprocess.run(
                [sys.executable, __file__, "--run-one", str(root / "out"), str(root / "bids"),
                 str(n)], capture_output=True, text=True, check=True)
            result = json.loads(child.stdout.strip().splitlines()[-1])
            with open(root / "out" / "group" / "group_lesions.tsv") as fh:
                lesion_rows = sum(1 for _ in fh) - 1
            print(f"{n:8d} {built:8.1f} {result['seconds']:8.1f} "
                  f"{result['seconds'] / TARGET_S:9.2f} {result['peak_mb']:8.0f} "
                  f"{result['before_mb']:16.0f} {lesion_rows:12d}", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

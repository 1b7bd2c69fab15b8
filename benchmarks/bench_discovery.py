#!/usr/bin/env python
"""Discovery speed on a large generated dataset: cold index vs reused --bids-database-dir.

Builds N subjects x S sessions, each session with an MP2RAGE (UNIT1 + inv-1 + inv-2 with JSON
sidecars) and a T1w, files empty (discovery never reads voxels), then times the app's planning
step (pybids index + classification + companions + sidecar inheritance) twice:
cold, and with the pybids database reused.

    python benchmarks/bench_discovery.py --subjects 1000 --sessions 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl_bidsapp.cli.parser import parse_args  # noqa: E402
from cl_bidsapp.cli.run import plan  # noqa: E402


def build(root: Path, n_sub: int, n_ses: int) -> int:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "bench", "BIDSVersion": "1.10.0"}))
    (root / "MP2RAGE.json").write_text(json.dumps({"RepetitionTimePreparation": 5.0,
                                                   "MagneticFieldStrength": 3}))
    n = 0
    for s in range(1, n_sub + 1):
        for e in range(1, n_ses + 1):
            anat = root / f"sub-{s:04d}" / f"ses-{e}" / "anat"
            anat.mkdir(parents=True)
            stem = f"sub-{s:04d}_ses-{e}"
            for name, meta in ((f"{stem}_UNIT1", {}),
                               (f"{stem}_inv-1_MP2RAGE", {"InversionTime": 0.7}),
                               (f"{stem}_inv-2_MP2RAGE", {"InversionTime": 2.5}),
                               (f"{stem}_acq-mprage_T1w", {"InversionTime": 0.9})):
                (anat / f"{name}.nii.gz").write_bytes(b"")
                (anat / f"{name}.json").write_text(json.dumps(meta))
                n += 2
    return n


def timed_plan(bids: Path, db: Path | None) -> tuple[float, int]:
    args = [str(bids), str(bids.parent / "out"), "participant", "--skip-bids-validation"]
    if db is not None:
        args += ["--bids-database-dir", str(db)]
    settings = parse_args(args)
    t0 = time.perf_counter()
    _, items = plan(settings)
    return time.perf_counter() - t0, len(items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=2)
    opts = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cl-bench-discovery-"))
    try:
        bids = tmp / "bids"
        t0 = time.perf_counter()
        n_files = build(bids, opts.subjects, opts.sessions)
        print(f"dataset: {opts.subjects} subjects x {opts.sessions} sessions, {n_files} files "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        cold, n_items = timed_plan(bids, None)
        first_db, _ = timed_plan(bids, tmp / "db")
        reused, n_reused = timed_plan(bids, tmp / "db")
        assert n_items == n_reused == 2 * opts.subjects * opts.sessions
        print(f"planned work items : {n_items}")
        print(f"cold (no database) : {cold:6.1f} s")
        print(f"creating database  : {first_db:6.1f} s")
        print(f"reused database    : {reused:6.1f} s   (ratio reused/cold = {reused / cold:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

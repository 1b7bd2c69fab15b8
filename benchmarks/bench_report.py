"""Time of one subject's HTML report at 1 mm, against a 15 s budget.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_report.py`` (simulates a 1 mm phantom and
fakes its participant outputs, ~1 min, then times the report), or point it at a finished run:
``python benchmarks/bench_report.py --output-dir OUT --subject 01``. Prints the seconds of each
repeat and the best one's ratio to the budget (below 1 is within budget), and the page size.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

BUDGET_S = 15.0


def prepare(folder: Path, lesions: int) -> tuple[Path, str]:
    from cl_bidsapp.reports.testing import fake_participant_outputs
    from cl_bidsapp.simulate import simulate_dataset

    start = time.perf_counter()
    bids = simulate_dataset(folder / "bids", n_subjects=1, voxel_size=1.0, seed=3)
    out = folder / "out"
    fake_participant_outputs(out, bids, "01", extra_lesions=lesions)
    print(f"prepared a 1 mm phantom and its outputs in {time.perf_counter() - start:.1f} s")
    return out, "01"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, help="a finished run's output folder")
    parser.add_argument("--subject", default="01")
    parser.add_argument("--extra-lesions", type=int, default=20,
                        help="false-positive lesions added to the fake outputs (close-ups)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from cl_bidsapp.reports import build_subject_report

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        out, subject = ((args.output_dir, args.subject) if args.output_dir
                        else prepare(Path(tmp), args.extra_lesions))
        times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            page = build_subject_report(out, subject)
            times.append(time.perf_counter() - start)
            print(f"report of sub-{subject}, repeat {repeat + 1}: {times[-1]:6.2f} s")
        best = min(times)
        print(f"{'subject report (best)':<44s} {best:7.2f} s   {best / BUDGET_S:5.2f} x budget")
        print(f"page {page.stat().st_size / 1e6:.1f} MB, figures in {out / f'sub-{subject}'}")


if __name__ == "__main__":
    main()

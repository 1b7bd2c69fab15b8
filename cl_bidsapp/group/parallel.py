"""Run per-image jobs in a few processes (registration, evaluation), or in this one.

``spawn`` workers start clean (no copy of a parent that may hold threads of SimpleITK or
torch); each job is a picklable tuple handled by a module-level function. A pool whose worker
died (almost always out of memory) becomes a :class:`~cl_bidsapp.errors.TemporaryFailure`
(exit 75) with a hint.

>>> list(run_jobs(abs, [-1, 2, -3], nprocs=1))
[1, 2, 3]
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Sequence

from cl_bidsapp.errors import TemporaryFailure

logger = logging.getLogger(__name__)


def worker_count(nprocs: int | None, n_jobs: int, jobs_per_worker: int = 1) -> int:
    """Processes to use: ``nprocs`` (default: all CPUs), at most one per ``jobs_per_worker``.

    Starting a worker costs a few seconds (imports), so quick jobs need several per worker
    to be worth it.

    >>> worker_count(8, 3), worker_count(None, 0), worker_count(4, 10, jobs_per_worker=4)
    (3, 1, 2)
    """
    wanted = nprocs or os.cpu_count() or 1
    return max(1, min(int(wanted), n_jobs // max(1, jobs_per_worker)))


def run_jobs(function: Callable[[Any], Any], jobs: Sequence[Any], nprocs: int | None,
             initializer: Callable[..., None] | None = None,
             initargs: tuple = (), jobs_per_worker: int = 1) -> Iterator[Any]:
    """Yield ``function(job)`` for each job, in the order of ``jobs``.

    With one worker everything runs here (no process start-up cost, easier debugging).
    """
    workers = worker_count(nprocs, len(jobs), jobs_per_worker)
    if workers == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from (function(job) for job in jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                 initializer=initializer, initargs=initargs) as pool:
            yield from pool.map(function, jobs)
    except BrokenProcessPool:
        raise TemporaryFailure(
            "a group-level worker process died, almost always because the machine ran out of "
            "memory", hint="lower --nprocs (e.g. --nprocs 1)") from None

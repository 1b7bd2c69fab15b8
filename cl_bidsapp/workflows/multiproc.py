"""Nipype's MultiProc, made to survive a worker that dies (out-of-memory kill, segfault).

When the kernel kills one worker process, Python marks the whole process pool broken and every
task running in it fails with ``BrokenProcessPool``; Nipype 1.11 then waits forever for
results that never come. Here, a task lost that way is retried once, alone in a one-worker
pool of its own: tasks that merely shared the pool with the culprit finish normally (a second
death can only be the culprit's), and a task that dies twice is reported as failed (with a
message saying a worker was killed), so the other subjects' work is kept.

Ready jobs are started deepest first (furthest from the graph's inputs; ties in graph order),
so each image runs through to its segmentation and derivatives while the next image is being
prepared: preprocessing overlaps inference (a GPU is fed as soon as an input is ready) and
finished subjects appear early, instead of every image's preprocessing running before any
image is segmented.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from nipype.pipeline.plugins.multiproc import MultiProcPlugin, process_initializer

LOGGER = logging.getLogger("cl_bidsapp.multiproc")

KILLED_MESSAGE = ("MemoryError: a worker process was killed while running this step, "
                  "almost always because the machine ran out of memory")


def batch_threads(nprocs: int, n_images: int) -> int:
    """Threads per node when the user gave no ``--omp-nthreads``.

    One image: every node may use all processors (its stages run one after the other). A
    batch: one thread per node, so that ``nprocs`` nodes run side by side; two single-thread
    processes get more done than one process with two threads (PyTorch and deepbet scale
    less than linearly, and the NumPy stages use one core), and the CPU-only stages of one
    image overlap the network of another.

    >>> batch_threads(2, 1), batch_threads(2, 10), batch_threads(16, 4), batch_threads(16, 40)
    (2, 1, 4, 1)
    """
    return max(1, int(nprocs) // max(1, min(int(n_images), int(nprocs))))


def job_depths(graph, nodes) -> list[int]:
    """Longest path (in nodes) from any input of ``graph`` to each of ``nodes``.

    >>> import networkx as nx
    >>> g = nx.DiGraph([("prepare", "strip"), ("strip", "segment"), ("prepare", "segment")])
    >>> job_depths(g, ["prepare", "strip", "segment"])
    [1, 2, 3]
    """
    import networkx as nx

    depth: dict = {}
    for node in nx.topological_sort(graph):
        depth[node] = 1 + max((depth[p] for p in graph.predecessors(node)), default=0)
    return [depth[node] for node in nodes]


class ResilientMultiProcPlugin(MultiProcPlugin):
    """MultiProc that retries, once, tasks lost to a broken process pool."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._task_node: dict[int, tuple] = {}
        self._lost: set[int] = set()
        self._retried: set[int] = set()
        self._future_task: dict[int, int] = {}
        self._depth: list[int] = []

    def _generate_dependency_list(self, graph):
        super()._generate_dependency_list(graph)
        self._depth = job_depths(graph, self.procs)

    def _sort_jobs(self, jobids, scheduler="tsort"):
        if scheduler == "mem_thread" or len(self._depth) != len(self.procs):
            return super()._sort_jobs(jobids, scheduler=scheduler)
        return sorted(jobids, key=lambda job: (-self._depth[job], job))

    def _new_pool(self) -> None:
        context = mp.get_context(self.plugin_args.get("mp_context"))
        self.pool = ProcessPoolExecutor(max_workers=self.processors,
                                        initializer=process_initializer,
                                        initargs=(self._cwd,), mp_context=context)

    def _submit(self, node, updatehash, taskid, isolated: bool = False) -> None:
        from nipype.pipeline.plugins.multiproc import run_node

        if isolated:  # a retry runs alone: if it dies again, it takes no other task with it
            context = mp.get_context(self.plugin_args.get("mp_context"))
            pool = ProcessPoolExecutor(max_workers=1, initializer=process_initializer,
                                       initargs=(self._cwd,), mp_context=context)
            future = pool.submit(run_node, node, updatehash, taskid)
            future.add_done_callback(lambda _: pool.shutdown(wait=False))
        else:
            if getattr(self.pool, "_broken", False):
                LOGGER.warning("a worker process died; starting a fresh process pool")
                self._new_pool()
            future = self.pool.submit(run_node, node, updatehash, taskid)
        self._future_task[id(future)] = taskid
        future.add_done_callback(self._async_callback)
        self._task_obj[taskid] = future

    def _submit_job(self, node, updatehash=False):
        self._taskid += 1
        if getattr(node.interface, "terminal_output", "") == "stream":
            node.interface.terminal_output = "allatonce"
        self._task_node[self._taskid] = (node, updatehash)
        self._submit(node, updatehash, self._taskid)
        return self._taskid

    def _async_callback(self, args):
        try:
            result = args.result()
        except BrokenProcessPool:
            self._lost.add(self._future_task.get(id(args), -1))
            return
        self._taskresult[result["taskid"]] = result

    def _get_result(self, taskid):
        if taskid in self._lost:
            self._lost.discard(taskid)
            node, updatehash = self._task_node[taskid]
            if taskid not in self._retried:
                self._retried.add(taskid)
                LOGGER.warning("%s was lost with a dead worker process; retrying it once, "
                               "alone in a fresh process", node.fullname)
                self._submit(node, updatehash, taskid, isolated=True)
                return None
            return {"taskid": taskid, "result": None, "traceback": [KILLED_MESSAGE]}
        return self._taskresult.get(taskid)

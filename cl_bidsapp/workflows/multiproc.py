"""Nipype's MultiProc, made to survive a worker that dies (out-of-memory kill, segfault).

When the kernel kills one worker process, Python marks the whole process pool broken and every
task running in it fails with ``BrokenProcessPool``; Nipype 1.11 then waits forever for
results that never come. Here, a task lost that way is retried once in a fresh pool: tasks that
merely shared the pool with the culprit finish normally, and a task that dies twice is reported
as failed (with a message saying a worker was killed), so the other subjects' work is kept.
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


class ResilientMultiProcPlugin(MultiProcPlugin):
    """MultiProc that retries, once, tasks lost to a broken process pool."""

    def __init__(self, plugin_args=None):
        super().__init__(plugin_args=plugin_args)
        self._task_node: dict[int, tuple] = {}
        self._lost: set[int] = set()
        self._retried: set[int] = set()
        self._future_task: dict[int, int] = {}

    def _new_pool(self) -> None:
        context = mp.get_context(self.plugin_args.get("mp_context"))
        self.pool = ProcessPoolExecutor(max_workers=self.processors,
                                        initializer=process_initializer,
                                        initargs=(self._cwd,), mp_context=context)

    def _submit(self, node, updatehash, taskid) -> None:
        from nipype.pipeline.plugins.multiproc import run_node

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
                LOGGER.warning("%s was lost with a dead worker process; retrying it once",
                               node.fullname)
                self._submit(node, updatehash, taskid)
                return None
            return {"taskid": taskid, "result": None, "traceback": [KILLED_MESSAGE]}
        return self._taskresult.get(taskid)

"""Scheduling of the participant level: thread counts and which ready job starts first."""
from __future__ import annotations

import os

import pytest
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from cl_bidsapp.workflows.multiproc import ResilientMultiProcPlugin, batch_threads


def _step(x):
    return x + 1


def _chain_wf(name: str):
    wf = pe.Workflow(name=name)
    nodes = [pe.Node(niu.Function(input_names=["x"], output_names=["out"], function=_step),
                     name=stage) for stage in ("prepare", "skullstrip", "segment")]
    nodes[0].inputs.x = 0
    wf.connect([(nodes[0], nodes[1], [("out", "x")]), (nodes[1], nodes[2], [("out", "x")])])
    return wf


def test_each_image_is_finished_before_the_next_one_starts_on_one_processor(tmp_path):
    wf = pe.Workflow(name="batch", base_dir=str(tmp_path))
    wf.add_nodes([_chain_wf(f"image{i}_wf") for i in range(3)])
    wf.config["execution"]["poll_sleep_duration"] = 0.01
    order = []

    def callback(node, status):
        if status == "start":
            order.append(f"{node.fullname.split('.')[1]}.{node.name}")

    args = {"n_procs": 1, "status_callback": callback}
    wf.run(plugin=ResilientMultiProcPlugin(plugin_args=args), plugin_args=args)
    images = [name.split(".")[0] for name in order]
    # depth first: all stages of one image, then the next image (not all preparations first)
    assert images == sorted(images)
    assert [name.split(".")[1] for name in order[:3]] == ["prepare", "skullstrip", "segment"]


@pytest.mark.parametrize("nprocs, images, expected", [(2, 1, 2), (2, 2, 1), (2, 10, 1),
                                                      (16, 1, 16), (16, 4, 4), (8, 3, 2)])
def test_threads_per_node_use_every_processor_without_oversubscribing(nprocs, images,
                                                                       expected):
    threads = batch_threads(nprocs, images)
    assert threads == expected
    assert threads * min(images, nprocs) <= nprocs


def test_a_batch_runs_one_thread_per_node_and_one_image_all_threads(tmp_path):
    from types import SimpleNamespace

    from cl_bidsapp.cli.participant import _default_threads

    settings = SimpleNamespace(nprocs=2, omp_nthreads=None)
    assert _default_threads(settings, 1) == (2, 2)
    assert _default_threads(settings, 10) == (2, 1)
    settings.omp_nthreads = 2  # the user's --omp-nthreads always wins
    assert _default_threads(settings, 10) == (2, 2)
    assert os.cpu_count()  # the default nprocs comes from here

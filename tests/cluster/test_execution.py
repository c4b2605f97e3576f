"""Threads and resources: --omp-nthreads reaches every pool, MultiProc honours the
per-node declarations, batch plugins get what they need from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from nipype.interfaces import utility as niu
from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec, traits
from nipype.pipeline import engine as pe

from mriflow.execution import (
    THREAD_ENV_VARS,
    declare_resources,
    limit_threads,
    poll_interval,
    prepare_batch_environment,
    set_thread_environment,
    thread_environment,
)
from tests.conftest import REPO_ROOT


def test_thread_environment_covers_every_pool():
    env = thread_environment(3)
    assert set(env) == set(THREAD_ENV_VARS)
    assert set(env.values()) == {"3"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        assert var in env


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_thread_counts_are_validated(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        thread_environment(bad)
    with pytest.raises(ValueError, match="integer >= 1"):
        with limit_threads(bad):
            pass


def test_limit_threads_caps_blas_itk_and_env_then_restores(monkeypatch):
    import numpy as np  # noqa: F401  (loads the BLAS that threadpoolctl must see)
    import SimpleITK as sitk
    from threadpoolctl import threadpool_info

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    blas_before = [p["num_threads"] for p in threadpool_info()]
    with limit_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info())
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        assert sitk.SmoothingRecursiveGaussianImageFilter().GetNumberOfThreads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    assert [p["num_threads"] for p in threadpool_info()] == blas_before
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "7"


def test_limit_threads_restores_after_an_error():
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    with pytest.raises(RuntimeError, match="boom"):
        with limit_threads(1):
            raise RuntimeError("boom")
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2


def test_limit_threads_caps_torch():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_omp_nthreads_reaches_a_fresh_worker_process():
    """What a MultiProc worker or a cluster job sees after the CLI set the environment:
    BLAS and ITK start with the requested count, not one thread per core."""
    code = (
        "import json, numpy, SimpleITK as sitk\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({'blas': [p['num_threads'] for p in threadpool_info()],\n"
        "                  'itk': sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}))\n"
    )
    env = {**os.environ, **thread_environment(1)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["blas"] and set(seen["blas"]) == {1}
    assert seen["itk"] == 1


def test_cli_sets_thread_environment_before_the_run(tmp_path):
    """--omp-nthreads goes through mriflow.execution in the real command."""
    code = (
        "import os, sys\n"
        "import mriflow.cli.run as run\n"
        "run._set_thread_env(int(sys.argv[1]))\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], os.environ['ITK_NUMBER_OF_THREADS'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "3"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["3", "3"]


def test_set_thread_environment_sets_os_environ(monkeypatch):
    for var in THREAD_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    set_thread_environment(2)
    assert all(os.environ[var] == "2" for var in THREAD_ENV_VARS)


class _ThreadedInputSpec(BaseInterfaceInputSpec):
    num_threads = traits.Int(1, usedefault=True)


class _Threaded(SimpleInterface):
    input_spec = _ThreadedInputSpec
    output_spec = TraitedSpec

    def _run_interface(self, runtime):
        return runtime


def test_declare_resources_sets_node_and_job_requests():
    node = pe.Node(_Threaded(), name="heavy")
    declare_resources(node, n_procs=4, mem_gb=2.5, plugin="SLURM")
    assert node.n_procs == 4
    assert node.mem_gb == 2.5
    assert node.inputs.num_threads == 4  # Nipype forwards n_procs to num_threads
    assert node.plugin_args["sbatch_args"] == "--cpus-per-task=4 --mem=2560M"
    assert node.plugin_args["overwrite"] is False  # added to the run-wide sbatch args

    pbs = declare_resources(pe.Node(_Threaded(), name="pbs"), n_procs=2, mem_gb=1, plugin="PBS")
    assert pbs.plugin_args["qsub_args"] == "-l nodes=1:ppn=2,mem=1024mb"
    local = declare_resources(pe.Node(_Threaded(), name="mp"), n_procs=2, mem_gb=1)
    assert not local.plugin_args


@pytest.mark.parametrize("mem_gb", [0, -1, float("nan"), "2"])
def test_declare_resources_validates_memory(mem_gb):
    with pytest.raises(ValueError, match="mem_gb"):
        declare_resources(pe.Node(_Threaded(), name="x"), n_procs=1, mem_gb=mem_gb)


def _stamp(seconds):
    import time

    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def _intervals(tmp_path, *, n_procs, mem_gb, plugin_args):
    wf = pe.Workflow(name="wf", base_dir=str(tmp_path))
    nodes = []
    for index in range(2):
        node = pe.Node(
            niu.Function(input_names=["seconds"], output_names=["start", "end"], function=_stamp),
            name=f"job{index}",
        )
        node.inputs.seconds = 1.0 + index * 1e-3  # distinct hashes
        declare_resources(node, n_procs=n_procs, mem_gb=mem_gb)
        nodes.append(node)
    wf.add_nodes(nodes)
    wf.config["execution"]["poll_sleep_duration"] = 0.2
    graph = wf.run(plugin="MultiProc", plugin_args=plugin_args)
    return sorted((n.result.outputs.start, n.result.outputs.end) for n in graph.nodes())


def _overlap(intervals):
    (_, end0), (start1, _) = intervals
    return start1 < end0


@pytest.mark.slow
def test_multiproc_honours_declared_threads_and_memory(tmp_path):
    """Two 1-s nodes on 2 processes run side by side, unless each declares 2 threads
    or more than half of --mem-gb: then MultiProc runs them one after the other."""
    both = {"n_procs": 2, "memory_gb": 4, "raise_insufficient": False}
    assert _overlap(_intervals(tmp_path / "a", n_procs=1, mem_gb=1, plugin_args=both))
    assert not _overlap(_intervals(tmp_path / "b", n_procs=2, mem_gb=1, plugin_args=both))
    assert not _overlap(_intervals(tmp_path / "c", n_procs=1, mem_gb=3, plugin_args=both))


def test_prepare_batch_environment_sets_logname(monkeypatch):
    monkeypatch.delenv("LOGNAME", raising=False)
    prepare_batch_environment("MultiProc")
    assert "LOGNAME" not in os.environ
    prepare_batch_environment("SLURM")
    assert os.environ["LOGNAME"]
    monkeypatch.setenv("LOGNAME", "someone")
    prepare_batch_environment("SLURM")
    assert os.environ["LOGNAME"] == "someone"


def test_graph_plugins_resume_and_clean_the_queue_by_default():
    from mriflow.cli.participant import plugin_settings
    from mriflow.config import Config

    config = Config()
    config.set("execution.plugin", "SLURMGraph")
    config.set("execution.plugin_args", {"sbatch_args": "-p short"})
    plugin, args = plugin_settings(config)
    assert plugin == "SLURMGraph"
    assert args["dont_resubmit_completed_jobs"] is True
    assert args["sbatch_args"] == "--kill-on-invalid-dep=yes -p short"

    config.set("execution.plugin_args", {"sbatch_args": "--kill-on-invalid-dep=no"})
    assert plugin_settings(config)[1]["sbatch_args"] == "--kill-on-invalid-dep=no"

    config.set("execution.plugin", "SLURM")
    config.set("execution.plugin_args", {})
    assert plugin_settings(config)[1] == {}


def test_poll_interval_is_short_only_for_local_plugins():
    assert poll_interval("MultiProc") < 0.5
    assert poll_interval("SLURM") >= 2 and poll_interval("SGEGraph") >= 2


def test_step_threads_pins_nondeterministic_steps_to_one_thread():
    from mriflow.execution import THREAD_NONDETERMINISTIC_STEPS, step_threads

    assert {"registration", "denoise"} <= THREAD_NONDETERMINISTIC_STEPS
    assert step_threads("registration", 4) == 1
    assert step_threads("registration", 4, reproducible=False) == 4
    assert step_threads("n4", 4) == 4
    with pytest.raises(ValueError, match="omp_nthreads"):
        step_threads("n4", 0)

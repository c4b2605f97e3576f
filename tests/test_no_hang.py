"""A work disk that fills up during the run ends it with exit 1, one line and the summary,
within seconds, instead of the endless wait of Nipype's MultiProc (nipype#3404)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mriflow.execution import disk_error, run_workflow
from tests import mounts
from tests.conftest import REPO_ROOT
from tests.helpers import QUICK_CHAIN, make_bids_dataset

small_tmpfs = mounts.small_tmpfs  # the fixture, for the tests below

FAST = [
    "--voxel-size", "2", "--nprocs", "2", *QUICK_CHAIN,
    "--set", "skull_strip.method=none",
    "--set", "export.target_shape=48,56,48",
]  # fmt: skip


def _fill(folder) -> None:
    """Write zeros until the file system is full (another job filling the scratch disk)."""
    with open(folder / "filler.bin", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
        except OSError:
            pass


@pytest.mark.slow
def test_full_work_disk_ends_the_run_with_exit_1_and_the_summary(tmp_path, small_tmpfs):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    work = small_tmpfs(tmp_path / "work", "30m")
    out = tmp_path / "out"
    run = subprocess.Popen(
        [sys.executable, "-m", "mriflow.cli.run", str(root), str(out), "participant"]
        + ["-w", str(work), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    started = time.monotonic()
    while not (work / "mriflow_wf").exists() and run.poll() is None:
        assert time.monotonic() - started < 300, "the run never started"
        time.sleep(0.1)
    _fill(work)  # preflight passed: the disk fills while the graph runs
    filled = time.monotonic()
    try:
        stdout, stderr = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        pytest.fail("the run hung on a full work disk")
    ended_after = time.monotonic() - filled

    assert run.returncode == 1, stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
    fatal = [line for line in stderr.splitlines() if "the run stopped" in line]
    assert len(fatal) == 1 and "No space left on device" in fatal[0] and str(work) in fatal[0]
    assert "subject(s) succeeded" in stdout
    for label in ("01", "02"):
        assert any(line.strip().startswith(f"sub-{label} ") for line in stdout.splitlines())
    assert "FAILED" in stdout
    assert list((out / "logs").glob("run-*_summary.json"))
    # seconds under normal load; generous for a loaded 2-core CI machine
    assert ended_after < 120


def _unpicklable(x):
    import threading

    return threading.Lock()  # Nipype cannot write this node's result file


def _plus_one(x):
    return x + 1


def test_task_without_a_result_file_fails_instead_of_hanging(tmp_path):
    """nipype#3404 without a full disk: the worker cannot deliver the node's result.

    Nipype's own MultiProc waits for that task for ever (checked by hand: killed after
    45 s); mriflow's records it as failed and finishes the graph.
    """
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow("watchdog", base_dir=str(tmp_path / "work"))
    for name, function in (("bad", _unpicklable), ("good", _plus_one)):
        node = pe.Node(
            niu.Function(function=function, input_names=["x"], output_names=["y"]), name=name
        )
        node.inputs.x = 1
        workflow.add_nodes([node])
    workflow.config["execution"].update(
        {"crashdump_dir": str(tmp_path / "crash"), "poll_sleep_duration": 0.2}
    )
    started = time.monotonic()
    outcome = run_workflow(
        workflow,
        "MultiProc",
        {"n_procs": 1, "mp_context": "forkserver"},
        log_file=tmp_path / "run.log",
    )
    assert time.monotonic() - started < 120
    assert list(outcome.failures) == ["watchdog.bad"]
    assert outcome.fatal is None  # not a disk problem: the other nodes ran
    assert (tmp_path / "work" / "watchdog" / "good" / "result_good.pklz").is_file()
    assert "Traceback" in (tmp_path / "run.log").read_text()


def test_next_node_starts_when_a_task_ends_not_at_the_next_poll(tmp_path):
    """A chain of 8 quick nodes run in workers, with a 3 s poll: Nipype alone sleeps a
    whole poll after every pass (at least 8 x 3 s); mriflow's MultiProc starts the next
    pass when a task ends. The garbage collector is unfrozen afterwards."""
    import gc

    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow("handover", base_dir=str(tmp_path / "work"))
    previous = None
    for index in range(8):
        node = pe.Node(
            niu.Function(function=_plus_one, input_names=["x"], output_names=["y"]),
            name=f"step{index}",
        )
        if previous is None:
            node.inputs.x = 0
        else:
            workflow.connect(previous, "y", node, "x")
        previous = node
    workflow.config["execution"].update(
        {"crashdump_dir": str(tmp_path / "crash"), "poll_sleep_duration": 3.0}
    )
    started = time.monotonic()
    outcome = run_workflow(
        workflow, "MultiProc", {"n_procs": 2, "mp_context": "forkserver"}, log_file=None
    )
    elapsed = time.monotonic() - started
    assert not outcome.failures and outcome.fatal is None
    assert elapsed < 12, f"8 chained nodes took {elapsed:.1f} s with a 3 s poll"
    from nipype.utils.filemanip import loadpkl

    result = loadpkl(tmp_path / "work" / "handover" / "step7" / "result_step7.pklz")
    assert result.outputs.y == 8
    assert gc.get_freeze_count() == 0


def test_prestarted_workers_are_taken_by_the_run_or_stopped(tmp_path):
    """The pool booted before the graph existed runs the graph (its workers log to the
    run's log file); a pool no run took is stopped when the block ends."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from mriflow import execution

    args = {"n_procs": 2, "mp_context": "forkserver"}
    work, log = tmp_path / "work", tmp_path / "logs" / "run.log"
    with execution.prestarted_workers("MultiProc", args, cwd=work, log_file=log):
        (pool,) = execution._PRESTARTED.values()
        workflow = pe.Workflow("prestart", base_dir=str(work))
        node = pe.Node(
            niu.Function(function=_plus_one, input_names=["x"], output_names=["y"]), name="one"
        )
        node.inputs.x = 0
        workflow.add_nodes([node])
        workflow.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
        outcome = run_workflow(workflow, "MultiProc", args, log_file=log)
        assert not outcome.failures and execution._PRESTARTED == {}  # taken by the run
    with pytest.raises(RuntimeError):  # the run stopped it at its end
        pool.submit(os.getpid)
    assert 'Executing "one"' in log.read_text()  # logged by a worker
    with execution.prestarted_workers("MultiProc", args, cwd=work, log_file=log):
        (unused,) = execution._PRESTARTED.values()
    assert execution._PRESTARTED == {}
    with pytest.raises(RuntimeError):  # shut down: takes no more work
        unused.submit(os.getpid)
    # another working folder or log file: not this run's pool
    with execution.prestarted_workers("MultiProc", args, cwd=tmp_path / "w2", log_file=log):
        outcome = run_workflow(workflow, "MultiProc", args, log_file=log)
        assert len(execution._PRESTARTED) == 1


def test_disk_errors_are_recognised_in_tracebacks():
    text = "OSError: [Errno 28] No space left on device: '/w/n4/result_n4.pklz'"
    assert disk_error(text) == "No space left on device (/w/n4/result_n4.pklz)"
    assert disk_error("OSError: [Errno 30] Read-only file system") == "Read-only file system"
    eio = "OSError: [Errno 5] Input/output error: '/w/x'"
    assert disk_error(eio) == "Input/output error (/w/x)"
    # a missing input or a permission problem is one subject's failure, not the run's
    assert disk_error("FileNotFoundError: [Errno 2] No such file or directory: '/x'") is None
    assert disk_error("ValueError: image is constant") is None


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are gone already
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_sigterm_stops_the_workers_too(tmp_path):
    """A scheduler's time limit sends SIGTERM: no worker may keep running after the run."""
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    run = subprocess.Popen(
        [sys.executable, "-m", "mriflow.cli.run", str(root), str(tmp_path / "out"), "participant"]
        + ["-w", str(tmp_path / "work"), *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    started = time.monotonic()
    workers: set[int] = set()
    while len(workers) < 2 and run.poll() is None:  # the forkserver and a worker at least
        assert time.monotonic() - started < 300, "no workers started"
        time.sleep(0.2)
        workers = _descendants(run.pid)
    run.send_signal(signal.SIGTERM)
    run.communicate(timeout=120)
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {p for p in workers if Path(f"/proc/{p}").exists()}
    assert not alive, "workers outlived the run"
    assert run.returncode != 0

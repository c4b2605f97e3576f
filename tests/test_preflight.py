"""Preflight: unwritable folders, too little space and a busy OUT_DIR are refused in one
line with exit 2 before any work; a stale lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mriflow.cli.preflight import (
    LOCK_NAME,
    PreflightError,
    _process_start,
    estimate_run_bytes,
    out_dir_lock,
)
from mriflow.cli.run import main
from mriflow.config import Config
from tests import mounts
from tests.helpers import make_bids_dataset

small_tmpfs = mounts.small_tmpfs  # the fixture, for the tests below


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert not captured.out.strip()
    return lines[0]


def test_out_dir_that_cannot_be_created_is_exit_2(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "out"
    assert main([str(root), str(out), "participant", "-w", str(tmp_path / "w")]) == 2
    line = _error_line(capsys)
    assert line.startswith("mriflow: error: OUT_DIR") and str(out) in line
    assert "not writable" in line
    assert not (tmp_path / "w" / "mriflow_wf").exists()


def test_read_only_work_dir_is_exit_2(tmp_path, capsys, small_tmpfs):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    work = small_tmpfs(tmp_path / "ro", "1m", read_only=True)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "-w", str(work / "w")]) == 2
    line = _error_line(capsys)
    assert "--work-dir" in line and "Read-only file system" in line
    assert not (out / LOCK_NAME).exists()


def test_too_little_space_is_exit_2_before_any_work(tmp_path, capsys, small_tmpfs):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    work = small_tmpfs(tmp_path / "small", "2m")
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "-w", str(work)]) == 2
    line = _error_line(capsys)
    assert str(work) in line and "not enough free space" in line and "MB free" in line
    assert not any(work.iterdir())  # nothing written in the work dir
    assert not (out / LOCK_NAME).exists()  # the lock is released on the way out


def test_estimate_grows_with_the_inputs_and_the_template(tmp_path):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""], "02": [""]})
    images = [(p, "T1w") for p in sorted(root.rglob("*_T1w.nii.gz"))]
    config = Config()
    one, two = estimate_run_bytes(images[:1], config), estimate_run_bytes(images, config)
    assert two[0] == 2 * one[0] and two[1] == 2 * one[1]
    config.set("registration.enabled", False)
    assert estimate_run_bytes(images, config)[0] < two[0]


def _write_lock(out, pid, host=None, process_start=None):
    out.mkdir(parents=True, exist_ok=True)
    holder = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2026-01-01T00:00:00+0000",
        "process_start": process_start if process_start is not None else _process_start(pid),
    }
    (out / LOCK_NAME).write_text(json.dumps(holder))


def test_second_run_into_a_busy_out_dir_is_refused_naming_the_holder(tmp_path, capsys):
    root = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, holder.pid)
        assert main([str(root), str(out), "participant", "-w", str(tmp_path / "w")]) == 2
        line = _error_line(capsys)
        assert f"pid {holder.pid} on {socket.gethostname()}" in line
        assert "started 2026-01-01T00:00:00+0000" in line
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid  # kept
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, dead.pid)
    with out_dir_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_killed_run_leaves_no_lock_file_behind_the_next_run(tmp_path):
    """kill -9 leaves the lock and its draft; the next run removes both, and keeps the
    drafts of runs still alive."""
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(out, dead.pid)
    stale = out / f"{LOCK_NAME}.{socket.gethostname()}.{dead.pid}"
    stale.write_text((out / LOCK_NAME).read_text())
    live = out / f"{LOCK_NAME}.some-other-node.1"
    live.write_text(json.dumps({"pid": 1, "host": "some-other-node", "process_start": 1}))
    with out_dir_lock(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == [live.name]


def test_lock_of_a_recycled_pid_is_taken_over(tmp_path):
    out = tmp_path / "out"
    # a live pid (ours) but another start time: the recorded process is gone
    _write_lock(out, os.getpid(), process_start=(_process_start(os.getpid()) or 0) + 1)
    with out_dir_lock(out):
        pass


def test_lock_held_by_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    _write_lock(out, 1, host="some-other-node", process_start=1)
    with pytest.raises(PreflightError, match="pid 1 on some-other-node"):
        with out_dir_lock(out):
            pass


def test_runs_with_the_same_config_share_the_out_dir_others_are_refused(tmp_path):
    """Slurm array tasks (one config, different subjects) run side by side; a run with
    another config is refused while they hold OUT_DIR."""
    out = tmp_path / "out"
    with out_dir_lock(out, share_key="config-a") as lock:
        assert lock is not None
        with out_dir_lock(out, share_key="config-a") as shared:
            assert shared is None  # goes ahead without owning the lock
        assert lock.exists()  # the sharer leaves the holder's lock alone
        with pytest.raises(PreflightError, match=f"pid {os.getpid()}"):
            with out_dir_lock(out, share_key="config-b"):
                pass
    assert not lock.exists()

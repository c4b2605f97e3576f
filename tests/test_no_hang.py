"""A work disk that fills up during the run ends it with exit 1, one line and the summary,
within seconds, instead of the endless wait of Nipype's MultiProc (nipype#3404)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

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

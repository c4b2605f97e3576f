"""Resumability: a run killed with SIGKILL finishes when the same command is rerun,
with outputs bit-identical to an uninterrupted run; a rerun with nothing changed
rewrites nothing, and a rerun with a changed config rewrites what depends on it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.cluster.compare import assert_same_outputs, output_files
from tests.cluster.conftest import mriflow_command, mriflow_env, run_mriflow

pytestmark = pytest.mark.slow

SUBJECT_WORKFLOWS = ("sub_01_wf", "sub_02_wf")


def _results(work: Path) -> list[Path]:
    return sorted((work / "mriflow_wf").rglob("result_*.pklz"))


def _published(work: Path) -> list[str]:
    return [s for s in SUBJECT_WORKFLOWS if (work / "mriflow_wf" / s / "publish").is_dir()]


def _kill_after_first_node(cmd: list[str], cwd: Path, work: Path) -> Path:
    """Start ``cmd``; SIGKILL its whole process group as soon as one node has finished.

    Returns the result file of that first node.
    """
    log = cwd / "killed_run.log"
    with open(log, "w") as handle:
        # own session: the kill reaches the MultiProc workers too, like a killed batch job
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=mriflow_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    try:
        while not _results(work):
            if proc.poll() is not None:
                pytest.fail(
                    f"run ended (exit {proc.returncode}) before any node finished:\n"
                    + log.read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                pytest.fail("no node finished within 600 s")
            time.sleep(0.05)
        first = _results(work)[0]
        published_at_kill = _published(work)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-run:\n{log.read_text()}"
    assert len(published_at_kill) < len(SUBJECT_WORKFLOWS), "killed after everything was published"
    return first


def _mtimes(out: Path) -> dict[str, int]:
    return {rel: path.stat().st_mtime_ns for rel, path in output_files(out).items()}


def test_kill9_then_rerun(tmp_path, multiproc_reference):
    out, work = tmp_path / "out", tmp_path / "work"
    # one process: the slowest schedule, so the kill lands well before the end
    cmd = mriflow_command(out, work, "--nprocs", "1")

    first = _kill_after_first_node(cmd, tmp_path, work)
    first_mtime = first.stat().st_mtime_ns
    incomplete = set(output_files(multiproc_reference)) - set(output_files(out))
    assert incomplete, "the killed run had already written every output"

    # the same command again finishes the job
    run_mriflow(cmd, cwd=tmp_path)
    assert_same_outputs(multiproc_reference, out)
    # ... reusing the work dir cache: the node finished before the kill did not run again
    assert first.stat().st_mtime_ns == first_mtime, f"{first} was recomputed"

    # nothing changed: nothing is rewritten
    before = _mtimes(out)
    time.sleep(1.1)  # coarse file-system clocks
    run_mriflow(cmd, cwd=tmp_path)
    after = _mtimes(out)
    rewritten = sorted(rel for rel in before if after.get(rel) != before[rel])
    assert after.keys() == before.keys()
    assert not rewritten, f"a rerun with nothing changed rewrote {rewritten}"

    # a changed parameter: the images in T1w space (on the configured grid) are rewritten
    native = [
        p
        for rel, p in output_files(out).items()
        if rel.endswith("_desc-preproc_T1w.nii.gz") and "space-" not in rel
    ]
    assert len(native) == 3
    assert all(np.allclose(nib.load(p).header.get_zooms()[:3], 2.0) for p in native)
    native = [p for p in native if p.name.startswith("sub-01_")]  # one subject is enough
    run_mriflow(cmd + ["--voxel-size", "3", "--participant-label", "01"], cwd=tmp_path)
    for path in native:
        zooms = nib.load(path).header.get_zooms()[:3]
        assert np.allclose(zooms, 3.0), f"{path} was not updated for the new voxel size"

"""Fixtures for the scale-out tests: the mriflow CLI as a subprocess, and one
uninterrupted MultiProc run of the bundled example that other runs must equal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import QUICK_CHAIN

EXAMPLE = REPO_ROOT / "bids_examples"
# 2 mm voxels and the quick chain (real brain extraction, N4, tissues, reports; no
# registration) keep the many runs of the two example subjects short
RUN_OPTIONS = ["--voxel-size", "2", *QUICK_CHAIN]
RUN_TIMEOUT = 900


def mriflow_command(out_dir: Path, work_dir: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mriflow.cli.run",
        str(EXAMPLE),
        str(out_dir),
        "participant",
        "-w",
        str(work_dir),
        *RUN_OPTIONS,
        *options,
    ]


def mriflow_env(**extra: str) -> dict[str, str]:
    """The environment of a run: this checkout importable (also by Slurm jobs, which
    inherit it through sbatch's default --export=ALL), no network version check."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["NIPYPE_NO_ET"] = "1"
    env.update(extra)
    return env


def run_mriflow(cmd: list[str], cwd: Path, env: dict[str, str] | None = None):
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=env or mriflow_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="session")
def multiproc_reference(tmp_path_factory) -> Path:
    """Outputs of one uninterrupted MultiProc run (2 processes) of the bundled example."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    run_mriflow(mriflow_command(out, tmp / "work", "--nprocs", "2"), cwd=tmp)
    return out

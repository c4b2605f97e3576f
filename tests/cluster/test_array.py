"""``--submit slurm``: one job array of three subjects, one of them broken, end to end.

Needs a running Slurm (CI starts a one-node cluster with
``bash tests/cluster/setup_slurm.sh``); skipped outside CI without one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster.conftest import mriflow_env
from tests.cluster.test_slurm import SETUP_HINT, _our_jobs, slurm_config, slurm_problem
from tests.helpers import QUICK_CHAIN, make_bids_dataset, write_phantom_t1w

pytestmark = pytest.mark.slow

# small phantoms (40x48x40 at 2 mm), the quick chain and a model-ready box that fits
# them keep each subject to about a minute on a loaded 2-core machine
OPTIONS = [
    "--voxel-size", "2", *QUICK_CHAIN,
    "--set", "export.target_shape=48,56,48",
    "--nprocs", "1",
]  # fmt: skip
WAIT_SECONDS = 900


def mriflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mriflow.cli.run", *args],
        cwd=cwd,
        env=mriflow_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for_jobs(job_ids: list[str]) -> None:
    """Until Slurm no longer lists the jobs (the test waits; mriflow itself never does)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        listed = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # squeue errors out for ids it already forgot: those jobs are done too
        if listed.returncode != 0 or not listed.stdout.strip():
            return
        time.sleep(3)
    pytest.fail(f"jobs {job_ids} still queued after {WAIT_SECONDS} s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    problem = slurm_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Slurm cannot run jobs: {problem}; {SETUP_HINT}")
        pytest.skip(f"Slurm not available: {problem}; {SETUP_HINT}")
    return slurm_config()


def test_array_of_three_with_a_broken_subject(slurm, tmp_path):
    cwd = tmp_path / uuid.uuid4().hex  # unique: the job completion log is matched by folder
    cwd.mkdir()
    raw = make_bids_dataset(cwd / "raw", {"01": [""], "02": [""], "03": [""]})
    broken = raw / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:600])  # a truncated gzip: fails at its first step
    common = ["-w", "work", *OPTIONS]

    submitted = mriflow(
        "raw", "out", "participant", *common,
        "--submit", "slurm", "--max-parallel", "2", "--group-after", "--submit-args=--time=30",
        cwd=cwd,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    array_id = re.search(r"submitted array job (\d+): 3 subject", submitted.stdout).group(1)
    group_id = re.search(r"submitted group job (\d+)", submitted.stdout).group(1)
    (submit_dir,) = (cwd / "work" / "submit").iterdir()
    assert (submit_dir / "subjects.txt").read_text().split() == ["01", "02", "03"]
    script = (submit_dir / "participant.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "--bids-database-dir" in script
    wait_for_jobs([array_id, group_id])

    # the two good subjects are published, the broken one is not
    for subject in ("01", "02"):
        anat = cwd / "out" / f"sub-{subject}" / "anat"
        assert (anat / f"sub-{subject}_desc-preproc_T1w.nii.gz").is_file()
    assert not (cwd / "out" / "sub-03" / "anat").exists()
    status = mriflow("status", "out", cwd=cwd)
    assert status.returncode == 1, status.stdout + status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert lines["sub-01"].split()[1] == lines["sub-02"].split()[1] == "ok"
    assert lines["sub-03"].split()[1] == "failed" and str(broken) in lines["sub-03"]
    assert "2 ok, 1 failed, 0 pending, 0 missing" in status.stdout

    # Slurm ran one task per subject, then the group job, after the whole array
    jobs = _our_jobs(Path(slurm["JobCompLoc"]), cwd, expected=4)
    tasks = [j for j in jobs if j.get("ArrayJobId") == array_id]
    assert sorted(j["ArrayTaskId"] for j in tasks) == ["1", "2", "3"]
    (group,) = [j for j in jobs if j["JobId"] == group_id]
    # it ran on the two good subjects and, since a selected subject failed, says so
    # with exit 1 (the group level's contract), which Slurm records as FAILED
    assert group["JobState"] == "FAILED" and group["ExitCode"].startswith("1"), group
    assert "sub-03  SKIPPED" in next((cwd / "work" / "submit").rglob("*_group.out")).read_text()
    last_task_end = max(datetime.fromisoformat(j["EndTime"]) for j in tasks)
    assert datetime.fromisoformat(group["StartTime"]) >= last_task_end
    assert (cwd / "out" / "splits.tsv").is_file()

    # fix the image; resubmitting only what failed is one command
    write_phantom_t1w(broken, seed=7)
    again = mriflow("raw", "out", "participant", *common, "--submit", "slurm", "--only-failed",
                    cwd=cwd)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "1 subject(s)" in again.stdout
    resubmit_id = re.search(r"submitted array job (\d+)", again.stdout).group(1)
    newest = max((cwd / "work" / "submit").iterdir())
    assert (newest / "subjects.txt").read_text().split() == ["03"]
    pending = mriflow("status", "out", cwd=cwd)
    assert re.search(r"sub-03\s+pending", pending.stdout) or "3 ok" in pending.stdout
    wait_for_jobs([resubmit_id])
    final = mriflow("out", "status", cwd=cwd)  # both spellings of the command
    assert final.returncode == 0, final.stdout + final.stderr
    assert "3 ok, 0 failed, 0 pending, 0 missing" in final.stdout
    assert (cwd / "out" / "sub-03" / "anat" / "sub-03_desc-preproc_T1w.nii.gz").is_file()
    shutil.rmtree(cwd / "work")  # tmp_path keeps only the outputs

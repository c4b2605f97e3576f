"""End to end through a real Slurm: two subjects via Nipype's SLURM plugin.

Needs a running Slurm (CI starts a one-node cluster with
``bash tests/cluster/setup_slurm.sh``). Skipped outside CI when Slurm is not
available; under CI (env var ``CI`` set) a missing Slurm is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from nipype.utils.filemanip import loadpkl

from tests.cluster.compare import assert_same_outputs
from tests.cluster.conftest import mriflow_command, mriflow_env, run_mriflow

pytestmark = pytest.mark.slow

SETUP_HINT = "start a one-node cluster with: sudo bash tests/cluster/setup_slurm.sh"
USABLE_STATES = {"idle", "mixed", "allocated", "completing"}
# passed through --plugin-args; it must show up on every job (TimeLimit in the log)
SBATCH_ARGS = "--time=30"
TIME_LIMIT = "30"  # jobcomp/filetxt writes minutes


def slurm_problem() -> str | None:
    """Why Slurm cannot run jobs here, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (Slurm is not installed)"
    try:
        result = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if result.returncode != 0:
        return f"sinfo failed (is slurmctld running?): {result.stderr.strip()}"
    states = {state.rstrip("*~#!%$@^-") for state in result.stdout.split()}
    if not states & USABLE_STATES:
        return f"no Slurm node accepts jobs (node states: {sorted(states) or 'none'})"
    return None


def slurm_config() -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    config = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    return config


def parse_jobcomp(path: Path) -> list[dict[str, str]]:
    """Lines of a ``jobcomp/filetxt`` log as dicts (``JobId=3 Name=x JobState=...``)."""
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def slurm_cluster() -> dict[str, str]:
    problem = slurm_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but Slurm cannot run jobs: {problem}; {SETUP_HINT}")
        pytest.skip(f"Slurm not available: {problem}; {SETUP_HINT}")
    return slurm_config()


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The two example subjects through ``--plugin SLURM``, with a unique job-name tag.

    Nipype's SLURM plugin names each job ``<node>.<workflows...>.$LOGNAME``; a fresh
    LOGNAME makes this run's jobs findable in the cluster's job completion log.
    """
    tmp = tmp_path_factory.mktemp("slurm")
    tag = f"mriflowtest{uuid.uuid4().hex[:10]}"
    out, work = tmp / "out", tmp / "work"
    cmd = mriflow_command(
        out,
        work,
        "--plugin",
        "SLURM",
        "--plugin-args",
        json.dumps({"sbatch_args": SBATCH_ARGS}),
    )
    run_mriflow(cmd, cwd=tmp, env=mriflow_env(LOGNAME=tag))
    return {"out": out, "work": work, "tag": tag}


def test_jobs_ran_in_slurm(slurm_cluster, slurm_run):
    work, tag = slurm_run["work"], slurm_run["tag"]
    batch = work / "mriflow_wf" / "batch"
    # Slurm itself expands %j in the plugin's "-o slurm-%j.out": one file per job
    job_ids = {
        int(m.group(1))
        for p in batch.glob("slurm-*.out")
        if (m := re.fullmatch(r"slurm-(\d+)\.out", p.name))
    }
    assert job_ids, f"no Slurm job output files in {batch}"

    # every node that Nipype may submit (not run_without_submitting) ran as a job
    submittable = set()
    for node_pkl in (work / "mriflow_wf").rglob("_node.pklz"):
        if "mapflow" in node_pkl.parts:
            continue
        if not loadpkl(node_pkl).run_without_submitting:
            submittable.add(node_pkl.parent.relative_to(work).as_posix())
    subjects = {part for n in submittable for part in n.split("/") if part.startswith("sub_")}
    assert subjects == {"sub_01_wf", "sub_02_wf"}, submittable

    if slurm_cluster.get("JobCompType") != "jobcomp/filetxt":
        pytest.skip(
            f"job ids checked; the cluster logs completions with "
            f"{slurm_cluster.get('JobCompType')}, not jobcomp/filetxt"
        )
    log = Path(slurm_cluster["JobCompLoc"])
    ours = [job for job in parse_jobcomp(log) if job.get("Name", "").endswith("." + tag)]
    assert {int(job["JobId"]) for job in ours} == job_ids
    for job in ours:
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["TimeLimit"] == TIME_LIMIT, f"--plugin-args did not reach sbatch: {job}"
    # job name = node.workflow...mriflow_wf.TAG: reversed, the node's folder in the work dir
    ran = {"/".join(job["Name"].split(".")[:-1][::-1]) for job in ours}
    assert ran == submittable
    for node_dir in ran:
        assert list((work / node_dir).glob("result_*.pklz")), node_dir


def test_slurm_outputs_equal_multiproc(slurm_run, request):
    # requested here, not as an argument: pytest would set the session-scoped
    # reference up before the module-scoped Slurm check could skip
    reference = request.getfixturevalue("multiproc_reference")
    assert_same_outputs(reference, slurm_run["out"])

"""End to end through a real Slurm: two subjects via Nipype's SLURM plugin, and a
failing subject via SLURMGraph.

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
import time
import uuid
from pathlib import Path

import pytest
from nipype.utils.filemanip import loadpkl

from tests.cluster.compare import assert_same_outputs, differences
from tests.cluster.conftest import EXAMPLE, mriflow_command, mriflow_env, run_mriflow
from tests.helpers import copy_layout

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
    """The two example subjects through ``--plugin SLURM``.

    SLURM submits one job per node as it becomes ready and polls squeue. Every
    job of this run is found in the job completion log by its working directory
    (the run's own temporary folder) and by a unique tag, the plugin's
    ``$LOGNAME`` suffix of the job name. (SLURMGraph, which submits the whole
    graph at once with job dependencies, runs in the failing-subject test.)
    """
    plugin = "SLURM"
    tag = f"mriflowtest{uuid.uuid4().hex[:10]}"
    # a unique folder: it identifies this run's jobs in a log that outlives /tmp
    tmp = tmp_path_factory.mktemp(plugin.lower()) / tag
    tmp.mkdir()
    out, work = tmp / "out", tmp / "work"
    cmd = mriflow_command(
        out,
        work,
        "--plugin",
        plugin,
        "--plugin-args",
        json.dumps({"sbatch_args": SBATCH_ARGS}),
    )
    run_mriflow(cmd, cwd=tmp, env=mriflow_env(LOGNAME=tag))
    return {"plugin": plugin, "out": out, "work": work, "tag": tag, "cwd": tmp}


def _node_dirs(work: Path) -> dict[str, bool]:
    """Each node's folder in the work dir -> whether Nipype runs it without submitting."""
    nodes = {}
    for node_pkl in (work / "mriflow_wf").rglob("_node.pklz"):
        if "mapflow" not in node_pkl.parts:
            rel = node_pkl.parent.relative_to(work).as_posix()
            nodes[rel] = bool(loadpkl(node_pkl).run_without_submitting)
    return nodes


def _our_jobs(log: Path, cwd: Path, expected: int) -> list[dict[str, str]]:
    # a job's line is written when Slurm retires it, which may be just after the
    # run saw its last output appear
    deadline = time.monotonic() + 60
    while True:
        # graph jobs are submitted from the run's work dir (inside ``cwd``)
        jobs = [
            job
            for job in parse_jobcomp(log)
            if job.get("WorkDir") and Path(job["WorkDir"]).is_relative_to(cwd)
        ]
        if len(jobs) >= expected or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def test_jobs_ran_in_slurm(slurm_cluster, slurm_run):
    work, tag = slurm_run["work"], slurm_run["tag"]
    nodes = _node_dirs(work)
    subjects = {part for rel in nodes for part in rel.split("/") if part.startswith("sub_")}
    assert subjects == {"sub_01_wf", "sub_02_wf"}, sorted(nodes)
    # SLURM submits the nodes not marked run_without_submitting
    expected = sorted(rel for rel, local in nodes.items() if not local)
    assert expected
    for rel in expected:
        assert list((work / rel).glob("result_*.pklz")), f"{rel} has no result"

    batch = work / "mriflow_wf" / "batch"
    # Slurm itself expands %j in the SLURM plugin's "-o slurm-%j.out": one file per job
    job_ids = {
        int(m.group(1))
        for p in batch.glob("slurm-*.out")
        if (m := re.fullmatch(r"slurm-(\d+)\.out", p.name))
    }
    assert len(job_ids) == len(expected), f"{len(job_ids)} job files in {batch}"

    if slurm_cluster.get("JobCompType") != "jobcomp/filetxt":
        pytest.skip(
            f"the cluster logs completed jobs with {slurm_cluster.get('JobCompType')}, "
            "not jobcomp/filetxt: the job completion log cannot be checked"
        )
    ours = _our_jobs(Path(slurm_cluster["JobCompLoc"]), slurm_run["cwd"], len(expected))
    for job in ours:
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["TimeLimit"] == TIME_LIMIT, f"--plugin-args did not reach sbatch: {job}"
    assert {int(job["JobId"]) for job in ours} == job_ids
    # job name = node.workflows...mriflow_wf.$LOGNAME: reversed, the node's folder
    assert all(job["Name"].endswith("." + tag) for job in ours)
    ran = sorted("/".join(job["Name"].split(".")[:-1][::-1]) for job in ours)
    assert ran == expected


def test_slurm_outputs_equal_multiproc(slurm_run, request):
    # requested here, not as an argument: pytest would set the session-scoped
    # reference up before the module-scoped Slurm check could skip
    reference = request.getfixturevalue("multiproc_reference")
    assert_same_outputs(reference, slurm_run["out"])


def test_failed_subject_in_slurmgraph_ends_the_wait(slurm_cluster, tmp_path, request):
    """One subject's job fails: mriflow stops waiting for it, reports it, publishes the
    other subject, and leaves none of the failed subject's jobs waiting in the queue."""
    tmp_path = tmp_path / uuid.uuid4().hex  # unique, as the queue is matched by folder
    tmp_path.mkdir()
    # sub-01 and a broken copy of it, sub-03 (sub-02's two sessions would only add time)
    bids = copy_layout(EXAMPLE, tmp_path / "bids")
    shutil.rmtree(bids / "sub-02")
    shutil.copytree(bids / "sub-01", bids / "sub-03")
    for path in list((bids / "sub-03").rglob("sub-01_*")):
        path.rename(path.with_name(path.name.replace("sub-01_", "sub-03_")))
    broken = bids / "sub-03" / "anat" / "sub-03_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:5000])  # truncated gzip
    # participants.tsv lists the subjects present (the input validation checks it)
    rows = (bids / "participants.tsv").read_text().splitlines()
    kept = [r for r in rows[1:] if r.startswith("sub-01\t")]
    sub03 = [r.replace("sub-01", "sub-03", 1) for r in kept]
    (bids / "participants.tsv").write_text("\n".join([rows[0], *kept, *sub03]) + "\n")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = mriflow_command(out, work, "--plugin", "SLURMGraph")
    cmd[3] = str(bids)
    result = subprocess.run(
        cmd, cwd=tmp_path, env=mriflow_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "sub-03  FAILED" in result.stdout and "not a readable image" in result.stdout
    assert "sub-01  ok" in result.stdout
    assert not (out / "sub-03").exists()

    reference = request.getfixturevalue("multiproc_reference")
    # sub-01 as in the full run; its provenance record names another raw folder here
    problems = [p for p in differences(reference, out) if "sub-01" in p and "_prov.jsonld" not in p]
    assert (out / "sub-01").is_dir()
    assert not problems, problems

    # SLURMGraph submitted every node of both subjects; sub-01's all completed
    nodes = _node_dirs(work)
    good = sorted(rel.rsplit("/", 1)[-1] for rel in nodes if "/sub_01_wf/" in f"/{rel}/")
    assert good and any("/sub_03_wf/" in f"/{rel}/" for rel in nodes), sorted(nodes)
    if slurm_cluster.get("JobCompType") == "jobcomp/filetxt":
        log = Path(slurm_cluster["JobCompLoc"])
        jobs = _our_jobs(log, tmp_path, len(good) + 1)
        completed = [job["Name"].split("_", 1)[1] for job in jobs if job["JobState"] == "COMPLETED"]
        # SLURMGraph names jobs j<index>_<node name>; sub-03 fails at its first node
        assert sorted(completed) == good
        assert any(job["JobState"] == "FAILED" for job in jobs), jobs

    deadline = time.monotonic() + 30
    while True:
        queued = subprocess.run(
            ["squeue", "-h", "-o", "%i %Z"], capture_output=True, text=True, check=True
        ).stdout.split("\n")
        left = [
            line
            for line in queued
            if " " in line and Path(line.split(" ", 1)[1]).is_relative_to(tmp_path)
        ]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"jobs left in the queue after the run: {left}"

"""One job per subject (``--submit slurm``) against MultiProc and Nipype's SLURMGraph.

Runs the bundled example's two subjects (three T1w images, ``--voxel-size 2`` and the
quick chain of tests/cluster) from a cold work dir in three ways on the Slurm this
machine runs (``tests/cluster/setup_slurm.sh``):

- ``MultiProc --nprocs 2`` on the machine, no scheduler (the anchor);
- ``--submit slurm --max-parallel 2 --nprocs 1``: one array task per subject;
  wall time from the submit command until Slurm lists none of its jobs;
- ``--plugin SLURMGraph``: one Slurm job per Nipype node, the CLI waits itself.

Prints wall time, its ratio to MultiProc, and the number of Slurm jobs each made
(from the job completion log, matched by the run's folder).

Usage::

    python benchmarks/bench_array.py [--modes multiproc,array,slurmgraph]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "bids_examples"
OPTIONS = [
    "--voxel-size", "2",
    "--set", "registration.enabled=false",
    "--set", "denoise.method=none",
    "--set", "segmentation.method=gmm",
]  # fmt: skip
JOBCOMP = Path("/var/lib/mriflow-slurm/jobcomp.log")


def run(mode: str, tmp: Path) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO), NIPYPE_NO_ET="1")
    base = [sys.executable, "-m", "mriflow.cli.run", str(EXAMPLE), "out", "participant"]
    base += ["-w", "work", *OPTIONS]
    extra = {
        "multiproc": ["--nprocs", "2"],
        "array": ["--submit", "slurm", "--max-parallel", "2", "--nprocs", "1"],
        "slurmgraph": ["--plugin", "SLURMGraph"],
    }[mode]
    start = time.perf_counter()
    result = subprocess.run(
        [*base, *extra], cwd=tmp, env=env, capture_output=True, text=True, timeout=3600
    )
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    if mode == "array":
        job = re.search(r"submitted array job (\d+)", result.stdout).group(1)
        while subprocess.run(
            ["squeue", "-h", "-j", job], capture_output=True, text=True
        ).stdout.strip():
            time.sleep(0.5)
    wall = time.perf_counter() - start
    time.sleep(3)  # Slurm writes the completion log as it retires a job
    jobs = 0
    if JOBCOMP.is_file():
        jobs = sum(f"WorkDir={tmp} " in line for line in JOBCOMP.read_text().splitlines())
    return wall, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="multiproc,array,slurmgraph")
    args = parser.parse_args()
    rows = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"mriflow-array-{mode}-") as tmp:
            wall, jobs = run(mode, Path(tmp))
        rows.append((mode, wall, jobs))
        print(f"  {mode}: {wall:.1f} s", file=sys.stderr, flush=True)
    anchor = rows[0][1]
    print(f"2 subjects / 3 T1w of bids_examples, cold work dir; ratio = wall / {rows[0][0]} wall")
    print("| mode | wall s | ratio | Slurm jobs |")
    print("|---|---|---|---|")
    for mode, wall, jobs in rows:
        print(f"| {mode} | {wall:.1f} | {wall / anchor:.2f}x | {jobs} |")


if __name__ == "__main__":
    main()

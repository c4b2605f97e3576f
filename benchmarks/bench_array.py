"""One job per subject (``--submit slurm``) against MultiProc and Nipype's SLURMGraph.

Runs the bundled example's two subjects (three T1w images, ``--voxel-size 2`` and the
quick chain of tests/cluster) from a cold work dir in three ways on the Slurm this
machine runs (``tests/cluster/setup_slurm.sh``):

- ``MultiProc --nprocs 2`` on the machine, no scheduler (the anchor);
- ``--submit slurm --max-parallel 2 --nprocs 1``: one array task per subject;
  wall time from the submit command until Slurm lists none of its jobs;
- ``--plugin SLURMGraph``: one Slurm job per Nipype node, the CLI waits itself.

Prints wall time, its ratio to MultiProc, and the number of Slurm jobs each made
(from the job completion log, matched by the run's folder). With ``--repeat R`` the
modes run round-robin R times (so a change of machine load hits every mode alike)
and the table shows each mode's median.

Usage::

    python benchmarks/bench_array.py [--modes multiproc,array,slurmgraph] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
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
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    modes = args.modes.split(",")
    walls: dict[str, list[float]] = {mode: [] for mode in modes}
    jobs: dict[str, int] = {}
    for _ in range(args.repeat):
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix=f"mriflow-array-{mode}-") as tmp:
                wall, jobs[mode] = run(mode, Path(tmp))
            walls[mode].append(wall)
            print(f"  {mode}: {wall:.1f} s", file=sys.stderr, flush=True)
    anchor = statistics.median(walls[modes[0]])
    print(
        f"2 subjects / 3 T1w of bids_examples, cold work dir, median of {args.repeat}; "
        f"ratio = wall / {modes[0]} wall"
    )
    print("| mode | wall s (runs) | ratio | Slurm jobs |")
    print("|---|---|---|---|")
    for mode in modes:
        wall = statistics.median(walls[mode])
        runs = ", ".join(f"{w:.0f}" for w in walls[mode])
        print(f"| {mode} | {wall:.1f} ({runs}) | {wall / anchor:.2f}x | {jobs[mode]} |")


if __name__ == "__main__":
    main()

"""Subjects in parallel on one machine: wall time with --nprocs 1 vs 2, and memory.

For 1, 2 and 4 subjects (copies of the bundled example's sub-01, so every
subject is the same work), run ``mriflow BIDS OUT participant`` from a cold work
dir with ``--nprocs 1`` and ``--nprocs 2`` (``--omp-nthreads 1``), then rerun the
same command with nothing changed (the Nipype cache answers). Prints wall
times, the speed-up of 2 processes over 1 (the serial run is the reference:
ratio = serial / parallel), the peak memory of the whole process tree (sum of
RSS over the CLI and its workers, sampled every 0.1 s) and of its largest process.

Usage::

    python benchmarks/bench_parallel.py [--subjects 1,2,4] [--nprocs 1,2] [-- extra CLI flags]

The machine is shared while this runs, so wall times are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "bids_examples"
PAGE = os.sysconf("SC_PAGE_SIZE")


def make_dataset(root: Path, n_subjects: int) -> Path:
    """A raw BIDS dataset of ``n_subjects`` copies of the example's sub-01."""
    root.mkdir(parents=True)
    for name in ("dataset_description.json", "README", "LICENSE"):
        shutil.copy(EXAMPLE / name, root / name)
    source = EXAMPLE / "sub-01" / "anat"
    for index in range(1, n_subjects + 1):
        label = f"{index:02d}"
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        for path in source.iterdir():
            shutil.copy(path, anat / path.name.replace("sub-01", f"sub-{label}"))
    return root


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_bytes(pid: int) -> tuple[int, int]:
    """Resident memory of ``pid`` and all its descendants, and of the largest one (/proc)."""
    tree = _children()
    total, largest, stack = 0, 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/statm") as handle:
                rss = int(handle.read().split()[1]) * PAGE
        except OSError:
            rss = 0
        total += rss
        largest = max(largest, rss)
        stack.extend(tree.get(current, []))
    return total, largest


def run(cmd: list[str], cwd: Path) -> dict[str, float]:
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = largest = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, largest
        while not done.is_set():
            total, one = tree_rss_bytes(proc.pid)
            peak, largest = max(peak, total), max(largest, one)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return {"wall": wall, "tree_gb": peak / 1024**3, "largest_gb": largest / 1024**3}


def measure(n_subjects: int, nprocs: int, extra: list[str], tmp: Path) -> dict[str, float]:
    case = tmp / f"s{n_subjects}_p{nprocs}"
    bids = make_dataset(case / "bids", n_subjects)
    cmd = [
        sys.executable, "-m", "mriflow.cli.run", str(bids), str(case / "out"), "participant",
        "-w", str(case / "work"), "--nprocs", str(nprocs), "--omp-nthreads", "1", "-q", *extra,
    ]  # fmt: skip
    cold = run(cmd, case)
    rerun = run(cmd, case)
    shutil.rmtree(case)
    return {**cold, "rerun": rerun["wall"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", default="1,2,4")
    parser.add_argument("--nprocs", default="1,2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("extra", nargs="*", help="extra mriflow flags (after --)")
    args = parser.parse_args()
    subjects = [int(s) for s in args.subjects.split(",")]
    procs = [int(p) for p in args.nprocs.split(",")]
    base = procs[0]

    print(f"mriflow participant, copies of bids_examples/sub-01, {os.cpu_count()} CPUs")
    header = (
        f"{'subjects':>8} {'nprocs':>6} {'wall s':>7} {'s/subject':>9} "
        f"{'speed-up':>8} {'rerun s':>7} {'peak tree GB':>12} {'largest proc GB':>15}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory(prefix="mriflow-bench-") as tmp:
        for n in subjects:
            reference = None
            for p in procs:
                row = {"subjects": n, "nprocs": p, **measure(n, p, args.extra, Path(tmp))}
                if p == base:
                    reference = row["wall"]
                row["speedup"] = reference / row["wall"] if reference else float("nan")
                rows.append(row)
                print(
                    f"{n:>8} {p:>6} {row['wall']:>7.1f} {row['wall'] / n:>9.1f} "
                    f"{row['speedup']:>7.2f}x {row['rerun']:>7.1f} {row['tree_gb']:>12.2f} "
                    f"{row['largest_gb']:>15.2f}",
                    flush=True,
                )
    print(f"speed-up = wall(--nprocs {base}) / wall; rerun = same command, nothing changed")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

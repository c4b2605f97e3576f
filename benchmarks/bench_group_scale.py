"""The group level against the number of subjects: wall time and peak memory.

One small phantom subject (40x48x40 at 2 mm, the quick chain of tests/cluster, a
48x56x48 model-ready box) is run once through the participant level; its outputs
are then cloned into 200 and 2,000 synthetic subjects (images hard-linked, text
files rewritten with the new label) and ``mriflow RAW OUT group`` runs on each.
Peak RSS is the group process's own (``getrusage(RUSAGE_CHILDREN)`` of a fresh
helper that runs only it). The ratio is the figure over the smallest size's.

Target (issue 15): under 2 GB at 2,000 subjects, memory not growing with the
subject count beyond the tables.

Usage::

    python benchmarks/bench_group_scale.py [--sizes 200,2000] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import QUICK_CHAIN, make_bids_dataset  # noqa: E402

OPTIONS = ["--voxel-size", "2", *QUICK_CHAIN, "--set", "export.target_shape=48,56,48"]
TEXT = {".json", ".tsv", ".csv", ".html", ".toml", ".txt", ".jsonld"}
# runs the group level in a child and reports the child's peak RSS (kB on Linux)
MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - start
sys.stderr.write(done.stderr[-1500:])
print(done.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), NIPYPE_NO_ET="1")


def mriflow(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mriflow.cli.run", *map(str, args)],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
    )


def clone_outputs(template: Path, out: Path, n_subjects: int) -> None:
    """``n_subjects`` copies of ``template``'s sub-01 (and its report) under new labels."""
    shutil.copytree(template, out, ignore=shutil.ignore_patterns("sub-01*", "logs", "dataset*"))
    for name in ("dataset_description.json",):
        shutil.copy(template / name, out / name)
    sources = [p for p in (template / "sub-01").rglob("*") if p.is_file()]
    # the completion record, without which the group level skips a subject
    sources += sorted((template / "logs").glob("sub-01_*"))
    report = template / "sub-01.html"
    for index in range(1, n_subjects + 1):
        label = f"sub-{index:05d}"
        for src in [*sources, report]:
            rel = src.relative_to(template).as_posix().replace("sub-01", label)
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in TEXT:
                dest.write_text(src.read_text().replace("sub-01", label))
            else:
                os.link(src, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200,2000")
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="mriflow-group-", dir=args.root))
    rows = []
    try:
        raw = make_bids_dataset(root / "raw", {"01": [""]})
        done = mriflow(raw, root / "template", "participant", "-w", root / "work", *OPTIONS,
                       cwd=root)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"participant run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        for size in sizes:
            out = root / f"out{size}"
            t0 = time.perf_counter()
            clone_outputs(root / "template", out, size)
            cloned = time.perf_counter() - t0
            n_files = sum(1 for p in out.rglob("*") if p.is_file())
            command = [sys.executable, "-m", "mriflow.cli.run", str(raw), str(out), "group"]
            command += ["-w", str(root / f"gwork{size}"), *OPTIONS]
            result = subprocess.run(
                [sys.executable, "-c", MEASURE, *command],
                env=env(),
                capture_output=True,
                text=True,
                check=True,
            )
            code, wall, peak_kb = result.stdout.split()[-3:]
            if int(code) != 0:
                print(result.stderr[-1500:], file=sys.stderr)
            rows.append((size, int(code), float(wall), int(peak_kb) / 1024**2, n_files, cloned))
            print(f"  {size}: exit {code}, {float(wall):.1f} s", file=sys.stderr, flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = rows[0]
    print(f"group level on cloned phantom derivatives; ratio = figure / the {first[0]}-subject one")
    print("| subjects | exit | wall s (ratio) | peak RSS GB (ratio) | files in OUT |")
    print("|---|---|---|---|---|")
    for size, code, wall, peak, n_files, _ in rows:
        print(
            f"| {size} | {code} | {wall:.1f} ({wall / first[2]:.2f}x) "
            f"| {peak:.2f} ({peak / first[3]:.2f}x) | {n_files} |"
        )


if __name__ == "__main__":
    main()

"""Whole participant runs on 1 mm heads, against ANTs N4 + one ANTs SyN, per step.

Usage::

    PYTHONPATH=. python benchmarks/bench_run.py [--data ../shared/data] [--omp 1]
        [--configs default,chain] [--heads T1_head,avg152] [--example]

Inputs, each the only T1w of a one-subject BIDS dataset: ``anat/T1_head`` (1.6 mm)
and the SPM ``avg152T1`` head (2 mm), both reoriented and resampled to 1 mm.
``mriflow BIDS OUT participant --nprocs 2 --omp-nthreads 1`` runs from a cold work
dir for each head and config: ``default`` (the whole default run), ``chain``
(the steps issue #4 times: the default without segmentation, intensity
normalization and slices) and ``gmm`` (the default with sklearn's GMM for the
tissue classes, standing in for the fast classifier of issue #14). ``--example``
also runs the README's example (``bids_examples``, 3 T1w) with the first config.

Printed per run: wall time and peak memory of the whole process tree (CLI and
workers, sampled every 0.1 s from /proc), then per step (Nipype node) its wall
time (Nipype's start and end), its CPU time and the resident memory of the
process that ran it (/proc samples of every process whose working directory is
the node's folder), and the critical path: from the last node to finish, back
through the node that finished last before each one started.

The anchor, in a fresh process with 2 ITK threads on the same 1 mm image: ANTs N4
(antspyx defaults) plus one default ``ants.registration(type_of_transform="SyN")``
of mriflow's extracted brain to the 1 mm template. That is the least sMRIPrep
spends; it also runs a brain-extraction SyN, Atropos and a "precise" SyN.
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
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parallel import PAGE, _children  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def head_image(data: Path, head: str) -> nib.Nifti1Image:
    """The benchmark's 1 mm head: ``T1_head`` or the SPM avg152 T1, resampled to 1 mm."""
    from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size

    source = {
        "T1_head": data / "anat" / "T1_head.nii.gz",
        "avg152": data / "ground_truth" / "spm_avg152" / "avg152T1.nii",
    }[head]
    return resample_to_voxel_size(reorient_to_ras(nib.load(source)), 1.0)


def make_dataset(img: nib.Nifti1Image, root: Path) -> Path:
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(img, anat / "sub-01_T1w.nii.gz")
    description = {"Name": "bench", "BIDSVersion": "1.10.0"}
    (root / "dataset_description.json").write_text(json.dumps(description))
    return root


def run_sampled(cmd: list[str], cwd: Path, work: Path) -> dict:
    """Run ``cmd``; wall time, peak tree RSS, and CPU / RSS per node working directory."""
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_seen: dict[int, float] = {}
    node_cpu: dict[str, float] = defaultdict(float)
    node_rss: dict[str, int] = defaultdict(int)
    peak = largest = 0
    done = threading.Event()
    work_prefix = str(work.resolve()) + os.sep

    def sample() -> None:
        nonlocal peak, largest
        while not done.is_set():
            tree, stack, total = _children(), [proc.pid], 0
            while stack:
                pid = stack.pop()
                stack.extend(tree.get(pid, []))
                try:
                    with open(f"/proc/{pid}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{pid}/statm") as handle:
                        rss = int(handle.read().split()[1]) * PAGE
                    cwd_now = os.readlink(f"/proc/{pid}/cwd")
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / ticks
                delta, cpu_seen[pid] = cpu - cpu_seen.get(pid, cpu), cpu
                total += rss
                largest = max(largest, rss)
                if cwd_now.startswith(work_prefix):
                    node = os.path.relpath(cwd_now, work)
                    node_cpu[node] += delta
                    node_rss[node] = max(node_rss[node], rss)
            peak = max(peak, total)
            done.wait(0.1)

    start, launched = time.perf_counter(), time.time()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    steps, first_start = node_steps(work, with_origin=True)
    for node, step in steps.items():
        step["cpu"] = node_cpu.get(node, 0.0)
        step["rss_gb"] = node_rss.get(node, 0) / 1024**3
    critical = critical_path(steps)
    last_end = max((s["end"] for s in steps.values()), default=0.0)
    return {
        "wall": wall,
        "tree_gb": peak / 1024**3,
        "largest_gb": largest / 1024**3,
        "steps": steps,
        "critical": critical,
        # launch -> first node's start; last node's end -> exit; waits between the
        # critical path's nodes (what Nipype does between one's end and the next's start)
        "startup": first_start - launched,
        "ending": wall - (first_start - launched) - last_end,
        "handovers": sum(
            max(0.0, steps[b]["start"] - steps[a]["end"]) for a, b in zip(critical, critical[1:])
        ),
    }


def node_steps(work: Path, with_origin: bool = False):
    """Start, end and duration of every node run, from the result files Nipype keeps
    (in s from the first node's start; ``with_origin``: also that start, epoch s)."""
    from nipype.utils.filemanip import loadpkl

    steps = {}
    for result in work.rglob("result_*.pklz"):
        runtime = getattr(loadpkl(result), "runtime", None)
        if runtime is None or not getattr(runtime, "endTime", None):
            continue
        start = datetime.fromisoformat(runtime.startTime).timestamp()
        end = datetime.fromisoformat(runtime.endTime).timestamp()
        node = os.path.relpath(result.parent, work)
        steps[node] = {"name": result.parent.name, "start": start, "end": end}
    t0 = min((s["start"] for s in steps.values()), default=0.0)
    for step in steps.values():
        step["start"] -= t0
        step["end"] -= t0
        step["wall"] = step["end"] - step["start"]
    return (steps, t0) if with_origin else steps


def critical_path(steps: dict[str, dict], slack: float = 1.0) -> list[str]:
    """Nodes from the first to the last one to finish, each the last to end before the next began.

    A node starts as soon as its last input is ready and a worker is free, so the
    node that finished last before it started (within ``slack`` s: Nipype polls) is
    what it waited for.
    """
    if not steps:
        return []
    current = max(steps, key=lambda n: steps[n]["end"])
    path = [current]
    while True:
        start = steps[current]["start"]
        before = [n for n in steps if n not in path and steps[n]["end"] <= start + slack]
        if not before:
            break
        current = max(before, key=lambda n: steps[n]["end"])
        path.append(current)
    return path[::-1]


ANCHOR = """
import sys, time, json, ants
from mriflow.image.template import load_template
from mriflow.image._itk import to_ants
t1, brain = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
t0, c0 = time.perf_counter(), time.process_time()
ants.n4_bias_field_correction(t1)
n4, n4_cpu = time.perf_counter() - t0, time.process_time() - c0
fixed = to_ants(load_template(1).t1w)
t0, c0 = time.perf_counter(), time.process_time()
ants.registration(fixed, brain, type_of_transform="SyN", random_seed=42)
syn, syn_cpu = time.perf_counter() - t0, time.process_time() - c0
print("RESULT " + json.dumps({"n4": n4, "syn": syn, "cpu": n4_cpu + syn_cpu}))
"""


def anchor(t1: Path, brain: Path, threads: int) -> dict[str, float]:
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", ANCHOR, str(t1), str(brain)],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return json.loads(out.split("RESULT ", 1)[1])


def extracted_brain(out: Path, tmp: Path) -> Path:
    """The run's published brain (preproc times mask): the anchor registers the same image."""
    import numpy as np

    anat = out / "sub-01" / "anat"
    preproc = nib.load(anat / "sub-01_desc-preproc_T1w.nii.gz")
    mask = np.asanyarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    brain = preproc.get_fdata(dtype=np.float32) * mask
    path = tmp / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain, preproc.affine), path)
    return path


# The chain issue #4 times: the default config without the later issues' steps
# (tissue segmentation, intensity normalization, 2D slices); the model-ready volume
# and the QC report still run.
CHAIN_ONLY = ("segmentation.method=none", "intensity.method=none", "export.slices=false")
# Stand-in for the fast tissue classifier being written for issue #14 (<= 8 s): the
# default run with sklearn's GMM (about 4 s) instead of Atropos (about 48 s).
CONFIGS = {
    "default": (),
    "chain": CHAIN_ONLY,
    "gmm": ("segmentation.method=gmm",),
}


def participant(bids: Path, case: Path, omp: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable, "-m", "mriflow.cli.run", str(bids), str(case / "out"),
        "participant", "-w", str(case / "work"), "--nprocs", "2",
        "--omp-nthreads", str(omp), "-q", *extra,
    ]  # fmt: skip
    case.mkdir(parents=True, exist_ok=True)
    return {**run_sampled(cmd, case, case / "work"), "out": case / "out"}


def print_run(label: str, run: dict, anchor_s: float) -> None:
    steps = run["steps"]
    critical = set(run["critical"])
    print(f"\n{label}: wall {run['wall']:.1f} s, peak RSS of the process tree "
          f"{run['tree_gb']:.2f} GB (largest process {run['largest_gb']:.2f} GB), "
          f"run / anchor {run['wall'] / anchor_s:.2f}")  # fmt: skip
    header = f"{'step':<28}{'wall s':>8}{'CPU s':>8}{'RSS GB':>8}  critical path"
    print(header)
    print("-" * len(header))
    merged: dict[str, dict] = {}
    for node, step in steps.items():
        row = merged.setdefault(step["name"], {"wall": 0.0, "cpu": 0.0, "rss_gb": 0.0, "n": 0})
        row["wall"] += step["wall"]
        row["cpu"] += step["cpu"]
        row["rss_gb"] = max(row["rss_gb"], step["rss_gb"])
        row["n"] += 1
        row["critical"] = row.get("critical", False) or node in critical
    for name, row in sorted(merged.items(), key=lambda kv: -kv[1]["wall"]):
        if row["wall"] < 0.5 and row["cpu"] < 0.5:
            continue
        title = name + (f" (x{row['n']})" if row["n"] > 1 else "")
        mark = "*" if row["critical"] else ""
        print(f"{title:<28}{row['wall']:>8.1f}{row['cpu']:>8.1f}{row['rss_gb']:>8.2f}  {mark}")
    total_cpu = sum(step["cpu"] for step in steps.values())
    print(f"{'all steps (sum)':<28}{'':>8}{total_cpu:>8.1f}")
    path = " -> ".join(f"{steps[n]['name']} {steps[n]['wall']:.1f}" for n in run["critical"])
    print(f"critical path (s): {path}")
    if "startup" in run:
        print(
            f"overhead (s): start-up {run['startup']:.2f} (launch -> first node), hand-overs "
            f"{run['handovers']:.2f} (between the critical path's nodes), end "
            f"{run['ending']:.2f} (last node -> exit)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--omp", default="1", help="--omp-nthreads values to run, e.g. 1,2")
    parser.add_argument(
        "--configs", default="default", help="default, chain (issue #4), gmm (fast segmentation)"
    )
    parser.add_argument("--heads", default="T1_head,avg152", help="T1_head and/or avg152")
    parser.add_argument("--example", action="store_true", help="also run bids_examples")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders here")
    args = parser.parse_args()
    if not (args.data / "anat" / "T1_head.nii.gz").is_file():
        print(f"test data not found under {args.data}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="mriflow-bench-run-")) if not args.keep else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} at the start")
    print("mriflow BIDS OUT participant --nprocs 2 --omp-nthreads N, cold work dir")
    for name, settings in CONFIGS.items():
        if name != "default":
            print(f"{name} = default config with --set {' --set '.join(settings)}")
    anchors = []
    try:
        # each head's table is printed as soon as its anchor is measured
        for head in [h for h in args.heads.split(",") if h]:
            bids = make_dataset(head_image(args.data, head), tmp / head / "bids")
            t1 = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
            shape = "x".join(str(n) for n in nib.load(t1).shape)
            runs = {}
            for config in args.configs.split(","):
                for omp in (int(v) for v in args.omp.split(",")):
                    label = f"{head} {config} omp{omp}"
                    extra = [a for s in CONFIGS[config] for a in ("--set", s)]
                    case = tmp / head / label.replace(" ", "_")
                    runs[label] = participant(bids, case, omp, extra)
                    print(f"  {label}: {runs[label]['wall']:.1f} s", file=sys.stderr)
            brain = extracted_brain(next(iter(runs.values()))["out"], tmp / head)
            ref = anchor(t1, brain, threads=2)
            total = ref["n4"] + ref["syn"]
            anchors.append((head, total))
            print(f"\n=== {head} resampled to 1 mm ({shape}) ===")
            print(
                f"anchor (2 ITK threads, same run): ANTs N4 {ref['n4']:.1f} s"
                f" + ANTs SyN to 1 mm {ref['syn']:.1f} s = {total:.1f} s"
                f" ({ref['cpu']:.1f} CPU s)"
            )
            for label, run in runs.items():
                print_run(label, run, total)
            sys.stdout.flush()
        if args.example:
            config = args.configs.split(",")[0]
            extra = [a for s in CONFIGS[config] for a in ("--set", s)]
            example = participant(REPO / "bids_examples", tmp / "example", 1, extra)
            head, total = anchors[0] if anchors else ("none", float("nan"))
            print(f"\n=== README example (bids_examples, 3 T1w), anchor of {head} ===")
            print_run(f"bids_examples {config} omp1", example, total)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average {load} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

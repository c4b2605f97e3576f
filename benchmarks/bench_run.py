"""One whole participant run on a 1 mm whole-head T1, against ANTs N4 + one ANTs SyN.

Usage::

    PYTHONPATH=. python benchmarks/bench_run.py [--data ../shared/data] [--omp 1,2]
        [--configs default,chain]

Input: ``anat/T1_head`` (1.6 mm) resampled to 1 mm (167x240x213), as the only T1w of
a one-subject BIDS dataset. ``mriflow BIDS OUT participant --nprocs 2`` runs from a
cold work dir for each ``--omp-nthreads`` value and each config: ``default`` (denoise,
conform, N4, deepbet, fast SyN to MNI, Atropos with priors, z-score, model-ready
volume, slices, report) and ``chain``, the steps issue #4 times (the default without
segmentation, intensity normalization and slices; the model-ready volume and the
report still run). Printed: wall time and peak memory of the whole process tree
(CLI and workers, sampled every 0.1 s), then each step's own run time from Nipype's
node reports (steps overlap: N4, skull stripping and registration run while the
image is denoised).

The anchor, in a fresh process with 2 ITK threads on the same image: ANTs N4
(antspyx defaults) plus one default ``ants.registration(type_of_transform="SyN")``
of mriflow's extracted brain to the 1 mm template. That is the least sMRIPrep
spends; it also runs a brain-extraction SyN, Atropos and a "precise" SyN.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_parallel import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# the steps issue #4 times (reorient/resample are the "conform" step)
CORE_STEPS = (
    "denoise", "conform", "conform_denoised", "n4", "remove_bias_field", "skull_strip",
    "register", "std_preproc", "std_mask",
)  # fmt: skip


def make_dataset(data: Path, root: Path) -> Path:

    from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size

    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    img = resample_to_voxel_size(reorient_to_ras(nib.load(data / "anat" / "T1_head.nii.gz")), 1.0)
    nib.save(img, anat / "sub-01_T1w.nii.gz")
    description = {"Name": "bench", "BIDSVersion": "1.10.0"}
    (root / "dataset_description.json").write_text(json.dumps(description))
    return root


def node_times(work: Path) -> dict[str, float]:
    """Run time of each step, from the ``_report/report.rst`` Nipype writes per node."""
    times: dict[str, float] = defaultdict(float)
    for report in work.rglob("_report/report.rst"):
        for line in report.read_text().splitlines():
            if line.startswith("* duration :"):
                times[report.parent.parent.name] += float(line.split(":", 1)[1])
                break
    return dict(times)


ANCHOR = """
import sys, time, json, ants
from mriflow.image.template import load_template
from mriflow.image._itk import to_ants
t1, brain = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
t0 = time.perf_counter(); ants.n4_bias_field_correction(t1); n4 = time.perf_counter() - t0
fixed = to_ants(load_template(1).t1w)
t0 = time.perf_counter()
ants.registration(fixed, brain, type_of_transform="SyN", random_seed=42)
syn = time.perf_counter() - t0
print("RESULT " + json.dumps({"n4": n4, "syn": syn}))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--omp", default="1", help="--omp-nthreads values to run, e.g. 1,2")
    parser.add_argument(
        "--configs", default="default,chain", help="default (whole run) and/or chain (issue #4)"
    )
    args = parser.parse_args()
    if not (args.data / "anat" / "T1_head.nii.gz").is_file():
        print(f"test data not found under {args.data}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mriflow-bench-run-") as tmp_name:
        tmp = Path(tmp_name)
        bids = make_dataset(args.data, tmp / "bids")
        t1 = bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
        shape = "x".join(str(n) for n in nib.load(t1).shape)
        runs = {}
        for config in args.configs.split(","):
            for omp in (int(v) for v in args.omp.split(",")):
                label = f"{config} omp{omp}"
                case = tmp / label.replace(" ", "_")
                cmd = [
                    sys.executable, "-m", "mriflow.cli.run", str(bids), str(case / "out"),
                    "participant", "-w", str(case / "work"), "--nprocs", "2",
                    "--omp-nthreads", str(omp), "-q",
                ]  # fmt: skip
                if config == "chain":
                    for setting in CHAIN_ONLY:
                        cmd += ["--set", setting]
                measured = run(cmd, tmp)
                runs[label] = {**measured, "steps": node_times(case / "work"), "out": case / "out"}
                print(f"  {label}: {measured['wall']:.1f} s", file=sys.stderr)
        first = next(iter(runs))
        brain = extracted_brain(runs[first]["out"], tmp)
        ref = anchor(t1, brain, threads=2)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} at the end")
    print(f"input: T1_head resampled to 1 mm ({shape}); --nprocs 2")
    print(f"chain = default config with --set {' --set '.join(CHAIN_ONLY)}\n")
    labels = list(runs)
    header = f"{'step (node run time, s)':<36}" + "".join(f"{label:>16}" for label in labels)
    print(header)
    print("-" * len(header))
    steps = sorted(
        {s for r in runs.values() for s in r["steps"]},
        key=lambda s: -runs[first]["steps"].get(s, 0),
    )
    for step in steps:
        if runs[first]["steps"].get(step, 0) < 1.0:
            continue
        name = f"  {step}" + (" *" if step in CORE_STEPS else "")
        print(f"{name:<36}" + "".join(f"{r['steps'].get(step, 0):>16.1f}" for r in runs.values()))
    rows = (
        ("wall time of the run, s", "wall", ".1f"),
        ("peak RSS of the process tree, GB", "tree_gb", ".2f"),
        ("largest process, GB", "largest_gb", ".2f"),
    )
    for title, key, fmt in rows:
        print(f"{title:<36}" + "".join(f"{format(r[key], fmt):>16}" for r in runs.values()))
    total = ref["n4"] + ref["syn"]
    print(
        f"\nanchor (2 ITK threads): ANTs N4 {ref['n4']:.1f} s"
        f" + ANTs SyN to 1 mm {ref['syn']:.1f} s = {total:.1f} s"
    )
    for label, r in runs.items():
        print(f"{label}: wall / anchor {r['wall'] / total:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

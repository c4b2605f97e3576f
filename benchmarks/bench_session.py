"""What one more contrast costs: a 1 mm T1w session alone, and with the shared T2w.

Usage::

    PYTHONPATH=. python benchmarks/bench_session.py [--data ../shared/data] [--omp 1]

Two one-subject BIDS datasets: the benchmark's 1 mm ``anat/T1_head`` (as in
``bench_run.py``) alone, and the same T1w with ``anat/T2w`` (1x1x2 mm LAS slab, 27 mm
off by its header) in its session. Each runs ``mriflow BIDS OUT participant --nprocs 2``
with the default config from a cold work dir. Printed: wall time and peak memory of
each run, the difference (the extra contrast's cost on the wall clock), and the CPU
time of the T2w's own steps (denoise, N4 twice, co-registration, the two resamplings,
normalization, model-ready), which is what a busy cluster node pays for it.
Target (issue 13): at most 20 s per extra contrast on this 2-core machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import head_image, make_dataset, participant  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--omp", type=int, default=1)
    args = parser.parse_args()
    t1w = head_image(args.data, "T1_head")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label in ("T1w", "T1w+T2w"):
            bids = make_dataset(t1w, tmp / label / "bids")
            if label == "T1w+T2w":
                t2w = bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz"
                shutil.copy(args.data / "anat" / "T2w.nii.gz", t2w)
            runs[label] = participant(bids, tmp / label / "case", args.omp, [])
            assert nib.load(runs[label]["out"] / "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz")
    alone, both = runs["T1w"], runs["T1w+T2w"]
    contrast_steps = {
        node: step for node, step in both["steps"].items() if "anat_T2w_wf" in node.split("/")
    }
    print(f"{'run':<12}{'wall s':>8}{'tree GB':>9}")
    for label, run in runs.items():
        print(f"{label:<12}{run['wall']:>8.1f}{run['tree_gb']:>9.2f}")
    extra = both["wall"] - alone["wall"]
    cpu = sum(step["cpu"] for step in contrast_steps.values())
    share = extra / alone["wall"]
    print(
        f"\none extra contrast: +{extra:.1f} s wall ({share:.2f} of the T1w run), "
        f"{cpu:.1f} CPU-s in its own steps (target: <= 20 s)"
    )
    print(f"\n{'T2w step':<24}{'wall s':>8}{'CPU s':>8}")
    for step in sorted(contrast_steps.values(), key=lambda step: -step["wall"]):
        print(f"{step['name']:<24}{step['wall']:>8.1f}{step['cpu']:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cost of the raw-input checks against plain loading (the anchor), on the shared heads.

Usage::

    PYTHONPATH=. python benchmarks/bench_input_checks.py [--data ../shared/data] [--repeat 5]

Two rows per image:

* planning (every input, before any work): ``check_readable`` (header checks, including a
  second read of the raw header for zero voxel sizes) against ``nibabel.load`` of the header;
* first step: ``load_input_image`` (voxels read, NaN count, constant check) against
  ``load_image`` (voxels read), what Conform and Denoise called before.

Median of ``--repeat`` runs, in ms, with the ratio to the anchor. The anchor runs in the
same loop, interleaved, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mriflow.image.io import check_readable, load_image, load_input_image  # noqa: E402

IMAGES = ("anat/T1_head.nii.gz", "anat/T2w.nii.gz", "anat/T1_gadolinium.nii.gz")


def _ms(func, path) -> float:
    start = time.perf_counter()
    func(path)
    return (time.perf_counter() - start) * 1000


def _header(path):
    return nib.load(str(path)).header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pairs = (
        ("planning", _header, check_readable),
        ("first step", load_image, load_input_image),
    )
    print(f"{'image':28} {'stage':11} {'anchor ms':>10} {'checked ms':>11} {'ratio':>6}")
    for name in IMAGES:
        path = args.data / name
        if not path.is_file():
            print(f"{name:28} missing")
            continue
        for stage, anchor, checked in pairs:
            times = {"anchor": [], "checked": []}
            for _ in range(args.repeat):
                times["anchor"].append(_ms(anchor, path))
                times["checked"].append(_ms(checked, path))
            a, c = (statistics.median(times[k]) for k in ("anchor", "checked"))
            print(f"{Path(name).name:28} {stage:11} {a:10.1f} {c:11.1f} {c / a:6.2f}")


if __name__ == "__main__":
    main()

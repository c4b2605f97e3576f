"""Denoising error and time: mriflow's numpy NLM against ANTs' adaptive NLM.

Usage::

    PYTHONPATH=. python benchmarks/bench_denoise.py [--data ../shared/data] [--ants-r2]

Phantoms with a known clean image: nilearn's 1 mm MNI152 template (brain only) and
the SPM avg152 T1 (2 mm, with skull) from ``ground_truth/spm_avg152``, each with
Rician noise of 3, 5 and 8 % of the 90th intensity percentile inside the object
(seeded). Printed: error after denoising (RMSE inside the object over the noise sd;
1.0 is what the noise leaves) for ``mriflow.image.denoise.denoise`` inside the object
dilated by 2 voxels, and the CPU time: ``nlm`` (the default) with ``h_factor`` 1,
1.5 and 2, and ``ants`` with search radius 1 (and 2 with ``--ants-r2``); patch
radius 1 throughout. Then the time of each on ``anat/T1_head`` resampled to 1 mm,
the whole-run benchmark's input, with the default head mask.

ITK runs one thread (mriflow's default ``--omp-nthreads 1``): ANTs NLM is not
reproducible with more (benchmarks/bench_threads.py).
"""

from __future__ import annotations

import os

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mriflow.image.denoise import denoise  # noqa: E402

VARIANTS = {
    "nlm h1": {"method": "nlm", "h_factor": 1.0},
    "nlm h1.5": {"method": "nlm", "h_factor": 1.5},
    "nlm h2": {"method": "nlm", "h_factor": 2.0},
    "ants r1": {"method": "ants", "search_radius": 1},
}
NOISE = (0.03, 0.05, 0.08)


def rician(clean: np.ndarray, sd: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    real = clean + rng.normal(0.0, sd, clean.shape)
    imaginary = rng.normal(0.0, sd, clean.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def timed_denoise(
    img: nib.Nifti1Image, settings: dict, mask: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    # CPU time: everything runs on one thread, and the machine is shared
    start = time.process_time()
    out = denoise(img, mask=mask, num_threads=1, **settings)
    return out.get_fdata(dtype=np.float32), time.process_time() - start


def phantoms(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from nilearn.datasets import load_mni152_template

    mni = load_mni152_template(resolution=1)
    avg152 = nib.load(data / "ground_truth" / "spm_avg152" / "avg152T1.nii")
    found = {}
    for name, img in (("MNI152 1 mm (brain)", mni), ("avg152 2 mm (head)", avg152)):
        clean = img.get_fdata(dtype=np.float32)
        found[name] = (clean, img.affine)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--ants-r2", action="store_true", help="also DenoiseImage's -r 2")
    args = parser.parse_args()
    if args.ants_r2:
        VARIANTS["ants r2"] = {"method": "ants", "search_radius": 2}
    if not (args.data / "anat" / "T1_head.nii.gz").is_file():
        print(f"test data not found under {args.data}", file=sys.stderr)
        return 2

    header = f"{'phantom':<22}{'noise':>6}{'noisy':>8}" + "".join(
        f"{name + ' err':>14}{'CPU s':>7}" for name in VARIANTS
    )
    print("error = RMSE in the object / noise sd; one thread; CPU seconds\n")
    print(header)
    print("-" * len(header))
    for name, (clean, affine) in phantoms(args.data).items():
        inside = clean > 0.05 * clean.max()
        # the object, not the noise around it (the default head mask on a brain-only
        # phantom takes in most of the noisy background)
        region = ndi.binary_dilation(inside, iterations=2)
        for level, fraction in enumerate(NOISE):
            sd = fraction * float(np.percentile(clean[inside], 90))
            noisy = rician(clean, sd, seed=level)

            def error(x: np.ndarray) -> float:
                return float(np.sqrt(np.mean((x[inside] - clean[inside]) ** 2)) / sd)  # noqa: B023

            row = f"{name:<22}{fraction:>6.0%}{error(noisy):>8.3f}"
            for settings in VARIANTS.values():
                out, seconds = timed_denoise(nib.Nifti1Image(noisy, affine), settings, region)
                row += f"{error(out):>14.3f}{seconds:>7.1f}"
            print(row, flush=True)

    from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size

    head = nib.load(args.data / "anat" / "T1_head.nii.gz")
    head = resample_to_voxel_size(reorient_to_ras(head), 1.0)
    row = f"\nT1_head at 1 mm {'x'.join(map(str, head.shape))}, inside the head, CPU s:"
    for name, settings in VARIANTS.items():
        row += f"  {name} {timed_denoise(head, settings)[1]:.1f}"
    print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

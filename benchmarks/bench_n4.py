"""N4 settings: time, white-matter CV on real heads, and what skull stripping and registration see.

Usage::

    PYTHONPATH=. python benchmarks/bench_n4.py [--data ../shared/data] [--downstream]

Heads: ``anat/T1_head`` reoriented and resampled to 1 mm; the AOMIC-PIOP2 real head
(``ground_truth/aomic_piop2``, 1 mm); the SPM avg152 T1 resampled to 1 mm (with
``--downstream`` only). For each N4 setting (shrink factor, iterations per level) on
one ITK thread: CPU seconds of ``n4_bias_correct`` and the coefficient of variation
of white matter after correction. White matter is fixed per head, the same voxels
for every setting: AOMIC's FreeSurfer aseg (labels 2/41) eroded by one voxel;
for ``T1_head`` (no labels) the brightest of three k-means classes inside the head
after the first setting's correction, eroded by one voxel.

``--downstream``: on the old (shrink 4) and new (shrink 6) defaults, deepbet's mask
of the corrected avg152 against SPM's brain mask (Dice), and the fast registration
of the extracted brain: warped brain mask against the template mask (Dice).
"""

from __future__ import annotations

import os

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mriflow.image.bias import head_mask, n4_bias_correct  # noqa: E402
from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size  # noqa: E402

SETTINGS = {
    "shrink 4, 50x4 (old default)": {"shrink_factor": 4, "iterations": [50] * 4},
    "shrink 6, 50x4 (new default)": {"shrink_factor": 6, "iterations": [50] * 4},
    "shrink 6, 25x4": {"shrink_factor": 6, "iterations": [25] * 4},
    "shrink 4, 20x4": {"shrink_factor": 4, "iterations": [20] * 4},
    "shrink 8, 50x4": {"shrink_factor": 8, "iterations": [50] * 4},
    "shrink 6, 50x3": {"shrink_factor": 6, "iterations": [50] * 3},
}


def cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def kmeans_wm(data: np.ndarray) -> np.ndarray:
    from sklearn.cluster import KMeans

    inside = head_mask(data)
    values = data[inside].reshape(-1, 1)
    km = KMeans(3, n_init=3, random_state=0).fit(values[::50])
    labels = np.zeros(data.shape, int)
    labels[inside] = km.predict(values)
    return ndi.binary_erosion(labels == int(np.argmax(km.cluster_centers_.ravel())))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def downstream(data: Path) -> None:
    from mriflow.image.registration import apply_transforms, register_to_template
    from mriflow.image.skullstrip import skull_strip
    from mriflow.image.template import load_template

    spm = data / "ground_truth" / "spm_avg152"
    head = resample_to_voxel_size(reorient_to_ras(nib.load(spm / "avg152T1.nii")), 1.0)
    truth = resample_to_voxel_size(reorient_to_ras(nib.load(spm / "brainmask.nii")), 1.0)
    truth_mask = truth.get_fdata() >= 0.5
    tpl_mask = np.asarray(load_template(1).mask.dataobj) > 0
    print(f"\n{'avg152 at 1 mm':<32}{'skull strip Dice':>18}{'registration Dice':>19}")
    for name in list(SETTINGS)[:2]:
        corrected, _ = n4_bias_correct(head, **SETTINGS[name])
        result = skull_strip(corrected, method="deepbet")
        mask = np.asarray(result.mask.dataobj) > 0
        with tempfile.TemporaryDirectory() as tmp:
            reg = register_to_template(result.brain, Path(tmp) / "r_", compute_warped=False)
            warped = apply_transforms(
                result.mask, reg.forward_transforms, load_template(1).t1w, interpolation="nearest"
            )
        reg_dice = dice(np.asarray(warped.dataobj) > 0, tpl_mask)
        print(f"{name:<32}{dice(mask, truth_mask):>18.3f}{reg_dice:>19.3f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--downstream", action="store_true")
    args = parser.parse_args()
    aomic = args.data / "ground_truth" / "aomic_piop2"
    if not (aomic / "sub-0001_T1w.nii.gz").is_file():
        print(f"test data not found under {args.data}", file=sys.stderr)
        return 2

    t1 = resample_to_voxel_size(
        reorient_to_ras(nib.load(args.data / "anat" / "T1_head.nii.gz")), 1.0
    )
    real = nib.load(aomic / "sub-0001_T1w.nii.gz")
    real = nib.Nifti1Image(real.get_fdata(dtype=np.float32), real.affine)
    aseg = np.asarray(nib.load(aomic / "sub-0001_aseg_dseg.nii.gz").dataobj)
    heads = {
        "T1_head 1 mm": (t1, None),
        "AOMIC": (real, ndi.binary_erosion(np.isin(aseg, [2, 41]))),
    }
    print("one ITK thread; CPU seconds; WM CV = sd / mean in fixed white-matter voxels\n")
    header = f"{'setting':<32}" + "".join(f"{h + ' CPU s':>18}{'WM CV':>8}" for h in heads)
    print(header)
    print("-" * len(header))
    raw = {}
    for name, settings in SETTINGS.items():
        row = f"{name:<32}"
        for head, (img, wm) in heads.items():
            start = time.process_time()
            corrected, _ = n4_bias_correct(img, **settings)
            seconds = time.process_time() - start
            data = corrected.get_fdata(dtype=np.float32)
            if wm is None:
                wm = kmeans_wm(data)
                heads[head] = (img, wm)
            raw.setdefault(head, cv(img.get_fdata(dtype=np.float32)[wm]))
            row += f"{seconds:>18.1f}{cv(data[wm]):>8.4f}"
        print(row, flush=True)
    print(f"{'uncorrected':<32}" + "".join(f"{'':>18}{raw[h]:>8.4f}" for h in heads))
    if args.downstream:
        downstream(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

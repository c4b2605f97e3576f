"""Benchmark: mriflow intensity normalization and tissue segmentation.

Prints markdown tables:

1. each normalization method's time in mriflow beside intensity-normalization's
   (the anchor tool) as a ratio, with the in-mask correlation of the outputs;
2. segmentation time and Dice against the SPM avg152 tissue maps (thresholded
   at 0.5), noise-free and with Rician noise added, for GMM and Atropos with and
   without template priors;
3. tissue fractions on the real T1 volumes.

Usage::

    PYTHONPATH=. python benchmarks/bench_intensity.py [--data ../shared/data] [--repeat 3]

Timings are wall-clock of the operation only (no loading), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tissue_data import load_t1  # noqa: E402

from mriflow.image import intensity as I  # noqa: E402, E741
from mriflow.image import segmentation as S  # noqa: E402


def best_time(function, repeat: int):
    best, result = np.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def corr(a, b, mask) -> float:
    return float(np.corrcoef(np.asarray(a)[mask], np.asarray(b)[mask])[0, 1])


def bench_intensity(data_dir: Path, repeat: int) -> None:
    from intensity_normalization.adapters.images import create_image
    from intensity_normalization.normalizers.individual.fcm import FCMNormalizer
    from intensity_normalization.normalizers.individual.whitestripe import WhiteStripeNormalizer
    from intensity_normalization.normalizers.individual.zscore import ZScoreNormalizer
    from intensity_normalization.normalizers.population.nyul import NyulNormalizer

    gad, gad_mask, _ = load_t1(data_dir, "T1_gadolinium")
    head, head_mask, _ = load_t1(data_dir, "T1_head")
    image, mask_image = create_image(gad), create_image(gad_mask.astype(np.float32))
    head_image = create_image(head)
    head_mask_image = create_image(head_mask.astype(np.float32))

    def theirs_nyul():
        nyul = NyulNormalizer()
        nyul.fit_population([image, head_image], [mask_image, head_mask_image])
        return nyul.transform(image, mask_image).get_data()

    def ours_nyul():
        standard = I.fit_nyul([gad, head], [gad_mask, head_mask])
        return I.apply_nyul(gad, gad_mask, standard)

    anchored = {
        "zscore": (
            lambda: I.zscore(gad, gad_mask),
            lambda: ZScoreNormalizer().fit_transform(image, mask_image).get_data(),
        ),
        "whitestripe": (
            lambda: I.whitestripe(gad, gad_mask),
            lambda: WhiteStripeNormalizer().fit_transform(image, mask_image).get_data(),
        ),
        "fcm": (
            lambda: I.fcm_normalize(gad, gad_mask),
            lambda: FCMNormalizer().fit_transform(image, mask_image).get_data(),
        ),
        "nyul (fit 2 + apply 1)": (ours_nyul, theirs_nyul),
    }
    print(f"\n## Intensity normalization on T1_gadolinium ({int(gad_mask.sum())} in-mask voxels)\n")
    print("| method | mriflow s | intensity-normalization s | ratio (theirs/ours) | corr |")
    print("|---|---|---|---|---|")
    for name, (ours, theirs) in anchored.items():
        t_ours, out_ours = best_time(ours, repeat)
        # the package's FCM takes tens of seconds: once is enough
        t_theirs, out_theirs = best_time(theirs, 1 if name == "fcm" else repeat)
        print(
            f"| {name} | {t_ours:.2f} | {t_theirs:.2f} | {t_theirs / t_ours:.1f} | "
            f"{corr(out_ours, out_theirs, gad_mask):.5f} |"
        )
    print("\n| mriflow-only method | s |")
    print("|---|---|")
    for name, params in [
        ("minmax", {}),
        ("percentile", {}),
        ("binning (64 uniform)", {"n_bins": 64}),
        ("binning (64 quantile)", {"n_bins": 64, "edges": "quantile"}),
        ("histeq", {}),
        ("rmshe (r=2)", {"level": 2}),
        ("clahe (kernel 32)", {"kernel_size": 32}),
    ]:
        method = name.split()[0]
        t, _ = best_time(lambda m=method, p=params: I.normalize(gad, gad_mask, m, **p), repeat)
        print(f"| {name} | {t:.2f} |")


def _nilearn_priors(reference: nib.Nifti1Image) -> dict[str, np.ndarray]:
    from importlib.resources import files

    from nilearn.image import resample_to_img

    folder = files("nilearn.datasets") / "data"
    priors = {}
    for name in ("GM", "WM"):
        img = nib.load(
            str(folder / f"mni_icbm152_{name.lower()}_tal_nlin_sym_09a_converted.nii.gz")
        )
        resampled = resample_to_img(
            img, reference, interpolation="continuous", force_resample=True, copy_header=True
        )
        priors[name] = np.clip(resampled.get_fdata() / 255.0, 0, 1)
    return priors


def dice(a, b) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def bench_segmentation(data_dir: Path) -> None:
    folder = data_dir / "ground_truth" / "spm_avg152"
    ref = nib.load(str(folder / "avg152T1.nii"))
    t1 = ref.get_fdata()
    mask = nib.load(str(folder / "brainmask.nii")).get_fdata() > 0.5
    truth = {
        name: nib.load(str(folder / f"{file}.nii")).get_fdata() > 0.5
        for name, file in (("GM", "grey"), ("WM", "white"), ("CSF", "csf"))
    }
    priors = _nilearn_priors(ref)
    spacing = ref.header.get_zooms()[:3]
    variants = [
        ("gmm", "gmm", {}),
        ("gmm + priors", "gmm", {"priors": priors}),
        ("atropos k-means, MRF 0.3", "atropos", {"spacing": spacing}),
        ("atropos + priors, MRF 0.2", "atropos", {"priors": priors, "spacing": spacing,
                                                  "mrf_weight": 0.2}),
        ("atropos + priors, MRF 0.3 (default)", "atropos", {"priors": priors, "spacing": spacing}),
    ]  # fmt: skip
    wm_level = float(np.median(t1[truth["WM"]]))
    print("\n## Segmentation vs SPM avg152 tissue maps (> 0.5), brain mask > 0.5, 2 mm\n")
    print("| noise | method | s | Dice GM | Dice WM | Dice CSF |")
    print("|---|---|---|---|---|---|")
    for noise in (0.0, 0.05, 0.10):
        rng = np.random.default_rng(1)
        if noise:
            sd = noise * wm_level
            data = np.abs(t1 + rng.normal(0, sd, t1.shape) + 1j * rng.normal(0, sd, t1.shape))
        else:
            data = t1
        for label, method, params in variants:
            params = {"mrf_weight": 0.3, **params} if method == "atropos" else params
            start = time.perf_counter()
            seg = S.segment(data, mask, method, **params)
            elapsed = time.perf_counter() - start
            d = {n: dice(seg.dseg == S.DSEG_LABELS[n], truth[n]) for n in ("GM", "WM", "CSF")}
            print(
                f"| {int(100 * noise)} % | {label} | {elapsed:.1f} | {d['GM']:.3f} | "
                f"{d['WM']:.3f} | {d['CSF']:.3f} |"
            )

    print("\n## Tissue fractions on real T1 volumes (no priors: no registration here)\n")
    print("| image | method | s | GM | WM | CSF | warnings |")
    print("|---|---|---|---|---|---|---|")
    for name in ("T1_head", "T1_gadolinium"):
        data, brain, img = load_t1(data_dir, name)
        zooms = img.header.get_zooms()[:3]
        for label, method, params in [
            ("gmm", "gmm", {}),
            ("atropos k-means", "atropos", {"spacing": zooms, "mrf_weight": 0.3}),
            (
                "plain gmm (full cov., no window)",
                "gmm",
                {"clip_percentiles": (0, 100), "outlier_fence": None, "covariance": "full"},
            ),
        ]:
            start = time.perf_counter()
            seg = S.segment(data, brain, method, **params)
            elapsed = time.perf_counter() - start
            f = S.tissue_fractions(seg.dseg)
            warnings = len(S.check_plausibility(seg, data))
            print(
                f"| {name} | {label} | {elapsed:.1f} | {f['GM']:.3f} | {f['WM']:.3f} | "
                f"{f['CSF']:.3f} | {warnings} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["intensity", "segmentation"], default=None)
    args = parser.parse_args()
    if args.only in (None, "intensity"):
        bench_intensity(args.data, args.repeat)
    if args.only in (None, "segmentation"):
        bench_segmentation(args.data)


if __name__ == "__main__":
    main()

"""Which steps give different results with a different thread count?

For each library call that mriflow's heavy steps are built on, run it in fresh
processes twice with 1 thread and twice with 2 threads (threads capped by
``mriflow.execution.set_thread_environment`` before import and ``limit_threads``
around the call), and compare the outputs bit for bit. Prints a table: run-to-run
identical at 1 thread and at 2 threads, identical across 1 vs 2 threads, max |difference|, wall and
CPU seconds per thread count, peak RSS.

Usage::

    python benchmarks/bench_threads.py [--data ../shared/data] [--cases n4_sitk,gmm,...]

Timings are noisy on a shared machine; the identity columns are not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "conform_scipy": "nibabel/scipy resampling to 1 mm (Conform)",
    "n4_sitk": "SimpleITK N4, Otsu mask, shrink 4",
    "n4_ants": "antspyx n4_bias_field_correction",
    "denoise_ants": "antspyx denoise_image (Rician)",
    "affine_ants": "antspyx registration Affine, seed 42, 2 mm",
    "syn_ants": "antspyx registration SyN, seed 42, 2 mm",
    "deepbet_torch": "deepbet brain mask (torch CPU)",
    "gmm_sklearn": "scikit-learn GaussianMixture(3), seed 0",
}


def _head(data: Path):
    import nibabel as nib

    return nib.load(data / "anat" / "T1_head.nii.gz")


def _ants_pair(data: Path):
    """Skull-stripped T1 and the embedded MNI brain, both at 2 mm (seconds, not minutes)."""
    import ants
    import nibabel as nib
    from nilearn.datasets import load_mni152_template

    moving = ants.image_read(str(data / "anat" / "T1_gadolinium.nii.gz"))
    moving = ants.resample_image(moving, (2, 2, 2), use_voxels=False, interp_type=0)
    with tempfile.TemporaryDirectory() as tmp:
        nib.save(load_mni152_template(resolution=2), f"{tmp}/mni.nii.gz")
        fixed = ants.image_read(f"{tmp}/mni.nii.gz")
    return fixed, moving


def run_case(case: str, data: Path) -> np.ndarray:
    if case == "conform_scipy":
        from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size

        img = resample_to_voxel_size(reorient_to_ras(_head(data)), 1.0, "linear")
        return np.asanyarray(img.dataobj)
    if case == "n4_sitk":
        import SimpleITK as sitk

        img = sitk.ReadImage(str(data / "anat" / "T1_head.nii.gz"), sitk.sitkFloat32)
        mask = sitk.OtsuThreshold(img, 0, 1, 200)
        small = sitk.Shrink(img, [4] * 3)
        small_mask = sitk.Shrink(mask, [4] * 3)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.Execute(small, small_mask)
        log_bias = n4.GetLogBiasFieldAsImage(img)
        return sitk.GetArrayFromImage(img / sitk.Exp(log_bias))
    if case in ("n4_ants", "denoise_ants"):
        import ants

        img = ants.image_read(str(data / "anat" / "T1_head.nii.gz"))
        out = ants.n4_bias_field_correction(img) if case == "n4_ants" else ants.denoise_image(img)
        return out.numpy()
    if case in ("affine_ants", "syn_ants"):
        import ants

        ants.config._random_seed = 42  # what set_ants_deterministic sets, minus its 1-thread pin
        fixed, moving = _ants_pair(data)
        kind = "Affine" if case == "affine_ants" else "SyN"
        reg = ants.registration(fixed, moving, type_of_transform=kind)
        return reg["warpedmovout"].numpy()
    if case == "deepbet_torch":
        from deepbet.bet import BrainExtraction

        _, mask, _ = BrainExtraction(no_gpu=True).run(str(data / "anat" / "T1_head.nii.gz"))
        return np.asanyarray(mask.dataobj)
    if case == "gmm_sklearn":
        from sklearn.mixture import GaussianMixture

        values = _head(data).get_fdata()
        values = values[values > np.percentile(values, 60)].reshape(-1, 1)
        gmm = GaussianMixture(3, random_state=0).fit(values)
        return np.sort(np.concatenate([gmm.means_.ravel(), gmm.covariances_.ravel()]))
    raise ValueError(f"unknown case {case!r}; expected one of {sorted(CASES)}")


def child(case: str, threads: int, data: Path, out: Path) -> None:
    from mriflow.execution import limit_threads, set_thread_environment

    set_thread_environment(threads)  # before any library starts its pool
    start, cpu = time.perf_counter(), time.process_time()
    with limit_threads(threads):
        result = run_case(case, data)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.save(out, np.ascontiguousarray(result))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_gb": rss}))


def measure(case: str, threads: int, data: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", case, "--threads", str(threads),
         "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "NIPYPE_NO_ET": "1"},
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{case} with {threads} thread(s) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.data, args.out)
        return

    header = (
        f"{'case':15} {'1t rerun':>8} {'2t rerun':>8} {'1t vs 2t':>8} {'max|diff|':>10} "
        f"{'wall 1t':>7} {'wall 2t':>7} {'cpu 2t':>6} {'RSS GB':>6}  what"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            runs = {}
            for label, threads in (("a", 1), ("b", 1), ("c", 2), ("d", 2)):
                out = Path(tmp) / f"{case}_{label}.npy"
                runs[label] = (measure(case, threads, args.data, out), np.load(out))
            (m1, a), (_, b), (m2, c), (_, d) = (runs[k] for k in "abcd")
            rerun = a.tobytes() == b.tobytes()
            rerun2 = c.tobytes() == d.tobytes()
            same = a.tobytes() == c.tobytes()
            diff = 0.0 if same else float(np.nanmax(np.abs(a.astype(float) - c.astype(float))))
            rss = max(m1["rss_gb"], m2["rss_gb"])
            print(
                f"{case:15} {str(rerun):>8} {str(rerun2):>8} {str(same):>8} {diff:>10.3g} "
                f"{m1['wall']:>7.1f} {m2['wall']:>7.1f} {m2['cpu']:>6.1f} {rss:>6.2f}  "
                f"{CASES[case]}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Benchmark of the anatomical chain against ANTs N4 + one default ANTs SyN.

Usage::

    PYTHONPATH=. python benchmarks/bench_anat.py [--data ../shared/data] [--threads 2]
        [--precise] [--keep DIR]

Input: ``anat/T1_head.nii.gz`` (1.6 mm whole head) reoriented to RAS and resampled
to 1 mm, as the participant workflow's conform step does. Every step runs in its
own Python process, so its peak RSS is its own (``ru_maxrss``, which includes the
~150-400 MB of imported libraries); wall and CPU times are for the operation only
(no imports, no input loading). ITK and torch get ``--threads`` threads in every
process, mriflow and anchor alike.

The anchor is what sMRIPrep spends at the least: ANTs N4 (antspyx defaults) plus
one default ``ants.registration(type_of_transform="SyN")`` of the extracted brain
to the 1 mm template. The chain total is compared with the anchor total.

Quality, printed under the table:
- N4: coefficient of variation of white-matter intensities (brightest of three
  k-means classes inside the brain mask; lower is better) for the uncorrected,
  SimpleITK-N4 and ANTs-N4 images, and the correlation of the two log fields.
- Skull strip: Dice between the deepbet and template-backend masks.
- Registration: Dice between the warped subject brain mask and the template mask,
  and the correlation of the warped brain with the template T1w inside the mask.

The machine is shared: timings are noisy (CPU time is less so).
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

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- child steps
def _timed(func):
    def run(work: Path) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        extra = func(work) or {}
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"wall": wall, "cpu": cpu, "rss_mb": rss_mb, **extra}

    return run


def _load(path):
    import nibabel as nib

    return nib.load(str(path))


def step_reorient(work: Path, data: Path):
    import nibabel as nib

    img = nib.load(str(data / "anat" / "T1_head.nii.gz"))
    img = nib.Nifti1Image(img.get_fdata(dtype="float32"), img.affine, img.header)

    @_timed
    def op(work):
        ras = nib.as_closest_canonical(img)
        nib.save(ras, str(work / "t1w_native.nii.gz"))
        return {"shape": list(ras.shape)}

    return op(work)


def _resample(src: Path, dst: Path):
    import nibabel as nib
    from nibabel.processing import resample_to_output

    img = _load(src)
    img.get_fdata()

    @_timed
    def op(work):
        out = resample_to_output(img, voxel_sizes=1.0, order=1)
        nib.save(out, str(dst))
        return {"shape": list(out.shape)}

    return op(dst.parent)


def _denoise(src: Path, dst: Path, threads: int):
    import nibabel as nib

    from mriflow.image.denoise import denoise

    img = _load(src)
    img.get_fdata()

    @_timed
    def op(work):
        nib.save(denoise(img, method="ants", num_threads=threads), str(dst))
        return {"shape": list(img.shape)}

    return op(dst.parent)


def step_n4(work: Path, threads: int):
    import nibabel as nib

    from mriflow.image.bias import n4_bias_correct

    img = _load(work / "den.nii.gz")
    img.get_fdata()

    @_timed
    def op(work):
        corrected, field = n4_bias_correct(img, num_threads=threads)
        nib.save(corrected, str(work / "n4.nii.gz"))
        nib.save(field, str(work / "bias.nii.gz"))

    return op(work)


def _strip(work: Path, threads: int, method: str):
    import nibabel as nib

    from mriflow.image.skullstrip import skull_strip

    img = _load(work / "n4.nii.gz")
    img.get_fdata()
    if method == "deepbet":  # load the model outside the timing, as a warm worker would
        from mriflow.image.skullstrip import _deepbet_model

        _deepbet_model()

    @_timed
    def op(work):
        result = skull_strip(img, method=method, num_threads=threads)
        suffix = "" if method == "deepbet" else "_template"
        nib.save(result.brain, str(work / f"brain{suffix}.nii.gz"))
        nib.save(result.mask, str(work / f"mask{suffix}.nii.gz"))
        return {"method": result.method}

    return op(work)


def _register(work: Path, threads: int, preset: str):
    import nibabel as nib

    from mriflow.image.registration import register_to_template
    from mriflow.image.template import load_template

    img = _load(work / "brain.nii.gz")
    img.get_fdata()
    load_template(1), load_template(2)  # cached once per worker

    @_timed
    def op(work):
        result = register_to_template(
            img, work / f"{preset}_", preset=preset, output_resolution=1, num_threads=threads
        )
        nib.save(result.warped, str(work / f"mni_{preset}.nii.gz"))
        json.dump(
            [str(p) for p in result.forward_transforms], open(work / f"{preset}_fwd.json", "w")
        )

    return op(work)


def step_outputs(work: Path, threads: int):
    """Bring the mask to MNI space and write the derivatives a participant run writes."""
    import nibabel as nib

    from mriflow.image.registration import apply_transforms
    from mriflow.image.template import load_template

    tpl = load_template(1)
    mask = _load(work / "mask.nii.gz")
    n4 = _load(work / "n4.nii.gz")
    forward = json.load(open(work / "fast_fwd.json"))

    @_timed
    def op(work):
        out = work / "derivatives"
        out.mkdir(exist_ok=True)
        mni_mask = apply_transforms(
            mask, forward, tpl.t1w, interpolation="nearest", num_threads=threads
        )
        nib.save(n4, str(out / "sub-01_desc-preproc_T1w.nii.gz"))
        nib.save(mask, str(out / "sub-01_desc-brain_mask.nii.gz"))
        nib.save(mni_mask, str(out / "sub-01_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz"))
        nib.save(
            _load(work / "mni_fast.nii.gz"),
            str(out / "sub-01_space-MNI152NLin2009aSym_desc-preproc_T1w.nii.gz"),
        )

    return op(work)


def step_anchor_n4(work: Path, threads: int):
    import ants

    from mriflow.image._itk import from_ants, to_ants

    img = _load(work / "den.nii.gz")
    aimg = to_ants(img)

    @_timed
    def op(work):
        import nibabel as nib

        field = ants.n4_bias_field_correction(aimg, return_bias_field=True)
        nib.save(from_ants(field, like=img), str(work / "bias_ants.nii.gz"))

    return op(work)


def step_anchor_syn(work: Path, threads: int):
    import ants
    import nibabel as nib

    from mriflow.image._itk import from_ants, to_ants
    from mriflow.image.template import load_template

    tpl = load_template(1)
    fixed, moving = to_ants(tpl.t1w), to_ants(_load(work / "brain.nii.gz"))

    @_timed
    def op(work):
        result = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
        nib.save(from_ants(result["warpedmovout"], like=tpl.t1w), str(work / "mni_ants.nii.gz"))
        json.dump(result["fwdtransforms"], open(work / "ants_fwd.json", "w"))

    return op(work)


STEPS = {
    "reorient": lambda w, a: step_reorient(w, Path(a.data)),
    "denoise": lambda w, a: _denoise(w / "t1w_native.nii.gz", w / "den_native.nii.gz", a.threads),
    "resample": lambda w, a: _resample(w / "den_native.nii.gz", w / "den.nii.gz"),
    "resample_raw": lambda w, a: _resample(w / "t1w_native.nii.gz", w / "t1w.nii.gz"),
    "denoise_1mm": lambda w, a: _denoise(w / "t1w.nii.gz", w / "den_1mm.nii.gz", a.threads),
    "n4": lambda w, a: step_n4(w, a.threads),
    "skullstrip": lambda w, a: _strip(w, a.threads, "deepbet"),
    "register_fast": lambda w, a: _register(w, a.threads, "fast"),
    "outputs": lambda w, a: step_outputs(w, a.threads),
    "skullstrip_template": lambda w, a: _strip(w, a.threads, "template"),
    "register_precise": lambda w, a: _register(w, a.threads, "precise"),
    "anchor_n4": lambda w, a: step_anchor_n4(w, a.threads),
    "anchor_syn": lambda w, a: step_anchor_syn(w, a.threads),
}
# sMRIPrep's order: denoise on the native grid, then conform (here: resample to 1 mm)
CHAIN = ["reorient", "denoise", "resample", "n4", "skullstrip", "register_fast", "outputs"]


# ---------------------------------------------------------------- quality
def quality(work: Path, precise: bool) -> dict:
    import nibabel as nib
    import numpy as np
    from sklearn.cluster import KMeans

    from mriflow.image.registration import apply_transforms
    from mriflow.image.template import load_template

    def arr(name):
        return nib.load(str(work / name)).get_fdata(dtype=np.float32)

    mask = arr("mask.nii.gz") > 0
    den, n4 = arr("den.nii.gz"), arr("n4.nii.gz")
    bias_sitk, bias_ants = arr("bias.nii.gz"), arr("bias_ants.nii.gz")
    n4_ants = den / bias_ants
    # WM: the brightest of three k-means classes of the SimpleITK-corrected brain
    values = n4[mask].reshape(-1, 1)
    km = KMeans(3, n_init=3, random_state=0).fit(values[:: max(1, values.size // 200000)])
    labels = km.predict(values)
    wm = labels == int(np.argmax(km.cluster_centers_.ravel()))

    def cv(img):
        v = img[mask][wm]
        return float(v.std() / v.mean())

    out = {
        "wm_cv_uncorrected": cv(den),
        "wm_cv_sitk": cv(n4),
        "wm_cv_ants": cv(n4_ants),
        "log_field_corr": float(
            np.corrcoef(np.log(bias_sitk[mask]), np.log(bias_ants[mask]))[0, 1]
        ),
    }
    if (work / "mask_template.nii.gz").exists():
        other = arr("mask_template.nii.gz") > 0
        out["dice_deepbet_vs_template"] = float(
            2 * (mask & other).sum() / (mask.sum() + other.sum())
        )
        out["volume_ml_deepbet"] = float(mask.sum() / 1000)
        out["volume_ml_template"] = float(other.sum() / 1000)
    tpl = load_template(1)
    tmask = np.asarray(tpl.mask.dataobj) > 0
    tt1 = np.asarray(tpl.t1w.dataobj)
    mask_img = nib.load(str(work / "mask.nii.gz"))
    for name in ["fast", "ants"] + (["precise"] if precise else []):
        forward = json.load(open(work / f"{name}_fwd.json"))
        warped = apply_transforms(mask_img, forward, tpl.t1w, interpolation="nearest")
        w = np.asarray(warped.dataobj) > 0
        out[f"dice_{name}"] = float(2 * (w & tmask).sum() / (w.sum() + tmask.sum()))
        brain = arr(f"mni_{name}.nii.gz")
        out[f"ncc_{name}"] = float(np.corrcoef(brain[tmask], tt1[tmask])[0, 1])
    return out


# ---------------------------------------------------------------- driver
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precise", action="store_true", help="also time the precise preset")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = STEPS[args.child](Path(args.work), args)
        print("RESULT " + json.dumps(result))
        return 0

    if not (Path(args.data) / "anat" / "T1_head.nii.gz").is_file():
        print(f"test data not found under {args.data}", file=sys.stderr)
        return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_anat_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")

    extra = ["resample_raw", "denoise_1mm", "skullstrip_template"]
    extra += ["register_precise"] if args.precise else []
    order = CHAIN + extra + ["anchor_n4", "anchor_syn"]
    results: dict[str, dict] = {}
    for step in order:
        cmd = [sys.executable, __file__, "--child", step, "--work", str(work)]
        cmd += ["--data", args.data, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"step {step} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[step] = json.loads(lines[-1][len("RESULT ") :])
        r = results[step]
        print(f"  {step:<20} {r['wall']:7.1f} s", file=sys.stderr, flush=True)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {load}")
    print(f"input: T1_head {results['reorient']['shape']} at 1.6 mm, resampled to 1 mm "
          f"{results['resample']['shape']}; {args.threads} threads per step\n")  # fmt: skip
    header = f"{'step':<34}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}"
    print(header)
    print("-" * len(header))

    def row(label, r):
        print(f"{label:<34}{r['wall']:9.1f}{r['cpu']:9.1f}{r['rss_mb']:13.0f}")

    labels = {
        "reorient": "reorient to RAS",
        "denoise": "denoise, native grid (ANTs NLM)",
        "resample": "resample to 1 mm",
        "resample_raw": "  alt: resample raw to 1 mm",
        "denoise_1mm": "  alt: denoise on the 1 mm grid",
        "n4": "N4 (SimpleITK, shrink 4)",
        "skullstrip": "skull strip (deepbet)",
        "register_fast": "register, fast preset",
        "outputs": "MNI mask + write outputs",
        "skullstrip_template": "  alt: skull strip (template)",
        "register_precise": "  alt: register, precise preset",
        "anchor_n4": "ANTs N4 (antspyx defaults)",
        "anchor_syn": "ANTs SyN to 1 mm (defaults)",
    }
    for step in CHAIN:
        row(labels[step], results[step])
    chain = {
        "wall": sum(results[s]["wall"] for s in CHAIN),
        "cpu": sum(results[s]["cpu"] for s in CHAIN),
        "rss_mb": max(results[s]["rss_mb"] for s in CHAIN),
    }
    print("-" * len(header))
    row("mriflow chain (sum; max RSS)", chain)
    print()
    for step in extra:
        row(labels[step], results[step])
    print()
    anchor_steps = ["anchor_n4", "anchor_syn"]
    for step in anchor_steps:
        row(labels[step], results[step])
    anchor = {
        "wall": sum(results[s]["wall"] for s in anchor_steps),
        "cpu": sum(results[s]["cpu"] for s in anchor_steps),
        "rss_mb": max(results[s]["rss_mb"] for s in anchor_steps),
    }
    print("-" * len(header))
    row("anchor (sum; max RSS)", anchor)
    print()
    print(f"{'ratio':<34}{'wall':>9}{'cpu':>9}")

    def ratio(label, a, b):
        print(f"{label:<34}{a['wall'] / b['wall']:9.2f}{a['cpu'] / b['cpu']:9.2f}")

    ratio("mriflow chain / anchor", chain, anchor)
    ratio("N4: SimpleITK / ANTs", results["n4"], results["anchor_n4"])
    ratio("registration: fast / ANTs SyN", results["register_fast"], results["anchor_syn"])
    if args.precise:
        ratio("registration: precise / ANTs SyN", results["register_precise"],
              results["anchor_syn"])  # fmt: skip

    print("\nquality")
    for key, value in quality(work, args.precise).items():
        print(f"  {key:<28}{value:8.3f}")
    print(f"\nwork folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

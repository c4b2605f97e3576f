"""Benchmark: the tissue classifiers on a real 1 mm head, time and Dice, anchor beside them.

On the preprocessed brain of a participant run (``desc-preproc_T1w`` and
``desc-brain_mask``: the very input of the segment node) it times each method
(classifier only: arrays in memory, no file I/O) and, given the AOMIC ground
truth, prints the Dice of its dseg against FSL FAST's labels and FreeSurfer's
aseg (GM = cortex + deep GM incl. cerebellar cortex; WM = cerebral + cerebellar
WM + brainstem + ventral DC), labels resampled by nearest neighbour onto the
dseg's grid; Dice over the whole grid (= inside the union of the brain masks).

The anchor is Atropos with the template priors (main's former default) or, with
``--anchor atropos-kmeans``, without them, run in the same process: the table
shows each time as a ratio to it, since absolute times on a shared machine
move with the load.

Given the SPM avg152 truth (``--spm``, found by default), the methods without
subject priors are also run on the template as ``tests/test_segmentation.py`` does
(brain mask and tissue maps thresholded at 0.5) and its GM / WM Dice printed
beside, so a change is always judged on both images. ``--csf-shift`` adds hmrf
rows whose partial-volume step takes the pure CSF mean moved by that fraction of
the CSF-GM gap (an experiment, not an option of the method: it traces how the
CSF/GM cut trades the SPM GM Dice against the AOMIC figures, docs/anatomical.md).

Usage (after ``mriflow BIDS OUT participant`` on AOMIC sub-0001)::

    PYTHONPATH=. python benchmarks/bench_segmentation.py \\
        --preproc OUT/sub-0001/anat/sub-0001_desc-preproc_T1w.nii.gz \\
        --mask OUT/sub-0001/anat/sub-0001_desc-brain_mask.nii.gz \\
        [--priors GM.nii WM.nii CSF.nii] [--truth ../shared/data/ground_truth/aomic_piop2] \\
        [--spm ../shared/data/ground_truth/spm_avg152] [--csf-shift -0.2 -0.1 0.1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tissue_data import ASEG_GM, ASEG_WM, dice, labels_onto  # noqa: E402

from mriflow.image import segmentation as S  # noqa: E402

SPM_MAPS = (("GM", "grey"), ("WM", "white"))


def load_spm(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], dict]:
    """The SPM avg152 T1, its brain mask and GM/WM truth, as the SPM test loads them."""
    t1 = nib.load(str(folder / "avg152T1.nii"))
    mask = np.asanyarray(nib.load(str(folder / "brainmask.nii")).dataobj) > 0.5
    truth = {
        name: np.asanyarray(nib.load(str(folder / f"{file}.nii")).dataobj) > 0.5
        for name, file in SPM_MAPS
    }
    spacing = tuple(float(z) for z in t1.header.get_zooms()[:3])
    return np.asanyarray(t1.dataobj, dtype=np.float64), mask, spacing, truth


@contextmanager
def pv_csf_moved(fraction: float) -> Iterator[None]:
    """hmrf's partial-volume step with its pure CSF mean moved by ``fraction`` of the gap to GM.

    An experiment for the CSF/GM trade-off, valid for T1w without priors (where the
    means reach ``_pv_fractions`` sorted, CSF first); the module is restored on exit.
    """
    original = S._pv_fractions

    def moved(y: np.ndarray, means: np.ndarray) -> np.ndarray:
        means = means.copy()
        means[0] += np.float32(fraction) * (means[1] - means[0])
        return original(y, means)

    S._pv_fractions = moved
    try:
        yield
    finally:
        S._pv_fractions = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preproc", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--priors", type=Path, nargs=3, metavar=("GM", "WM", "CSF"))
    parser.add_argument(
        "--truth", type=Path, default=Path("../shared/data/ground_truth/aomic_piop2")
    )
    parser.add_argument("--subject", default="0001")
    parser.add_argument(
        "--anchor", choices=["atropos-priors", "atropos-kmeans"], default="atropos-priors"
    )
    parser.add_argument("--repeat", type=int, default=1, help="best of N for the fast methods")
    parser.add_argument("--spm", type=Path, default=Path("../shared/data/ground_truth/spm_avg152"))
    parser.add_argument(
        "--csf-shift",
        type=float,
        nargs="+",
        default=[],
        metavar="F",
        help="extra hmrf rows with the PV step's CSF mean moved by F x (GM - CSF)",
    )
    args = parser.parse_args()

    img = nib.load(str(args.preproc))
    data = np.asanyarray(img.dataobj, dtype=np.float64)
    mask = np.asanyarray(nib.load(str(args.mask)).dataobj) > 0
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    priors = None
    if args.priors:
        priors = {
            name: np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float64)
            for name, path in zip(("GM", "WM", "CSF"), args.priors, strict=True)
        }
    if args.anchor == "atropos-priors" and priors is None:
        parser.error("--anchor atropos-priors needs --priors (or use --anchor atropos-kmeans)")

    truth = None
    if args.truth.is_dir():
        fast = labels_onto(nib.load(str(args.truth / f"sub-{args.subject}_fast_dseg.nii.gz")), img)
        aseg = labels_onto(nib.load(str(args.truth / f"sub-{args.subject}_aseg_dseg.nii.gz")), img)
        truth = (fast, np.isin(aseg, ASEG_GM), np.isin(aseg, ASEG_WM))

    spm = load_spm(args.spm) if args.spm.is_dir() else None

    # (name, method, params, repeats, CSF shift or None, also on the SPM template)
    runs: list[tuple[str, str, dict, int, float | None, bool]] = [
        ("hmrf (default)", "hmrf", {"spacing": spacing}, args.repeat, None, True),
        ("gmm", "gmm", {}, args.repeat, None, True),
    ]
    for shift in args.csf_shift:
        name = f"hmrf, PV CSF mean {shift:+.2f} x gap"
        runs.append((name, "hmrf", {"spacing": spacing}, 1, shift, True))
    if priors is not None:
        runs.insert(
            1,
            (
                "hmrf + priors 0.25",
                "hmrf",
                {"spacing": spacing, "priors": priors, "prior_weight": 0.25},
                args.repeat,
                None,
                False,
            ),
        )
    anchor_name = "atropos + priors 0.25, MRF 0.3 (anchor)"
    anchor = ("atropos", {"spacing": spacing, "mrf_weight": 0.3, "n_iterations": 3})
    if args.anchor == "atropos-priors":
        anchor[1].update(priors=priors, prior_weight=0.25)
    else:
        anchor_name = "atropos k-means, MRF 0.3 (anchor)"
    runs.append((anchor_name, *anchor, 1, None, False))

    rows = []
    for name, method, params, repeat, shift, on_spm in runs:
        best = np.inf
        spm_dice = None
        with pv_csf_moved(shift) if shift is not None else nullcontext():
            for _ in range(repeat):
                start = time.perf_counter()
                seg = S.segment(data, mask, method, **params)
                best = min(best, time.perf_counter() - start)
            if spm is not None and on_spm:
                spm_data, spm_mask, spm_spacing, spm_truth = spm
                spm_params = {"spacing": spm_spacing} if method == "hmrf" else {}
                spm_seg = S.segment(spm_data, spm_mask, method, **spm_params)
                spm_dice = tuple(
                    dice(spm_seg.dseg == S.DSEG_LABELS[t], spm_truth[t]) for t, _ in SPM_MAPS
                )
        rows.append((name, best, seg.dseg, spm_dice))
        print(f"  ran {name}: {best:.1f} s", flush=True)

    anchor_time = rows[-1][1]
    voxel_ml = float(np.prod(spacing)) / 1000
    print(f"\nbrain: {int(mask.sum())} voxels at {spacing} mm; anchor {anchor_time:.1f} s\n")
    header = "| method | time (s) | ratio to anchor | GM ml | WM ml | CSF ml |"
    if truth is not None:
        header += " Dice FAST GM | FAST WM | aseg GM | aseg WM |"
    if spm is not None:
        header += " SPM GM | SPM WM |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    if truth is not None:
        fast = truth[0]
        print(
            "| FAST (reference) | - | - | "
            + " | ".join(f"{np.count_nonzero(fast == k) * voxel_ml:.0f}" for k in (1, 2, 3))
            + " | 1 | 1 | "
            + f"{dice(fast == 1, truth[1]):.3f} | {dice(fast == 2, truth[2]):.3f} |"
            + (" - | - |" if spm is not None else "")
        )
    for name, seconds, dseg, spm_dice in rows:
        line = f"| {name} | {seconds:.1f} | {seconds / anchor_time:.2f} | " + " | ".join(
            f"{np.count_nonzero(dseg == k) * voxel_ml:.0f}" for k in (1, 2, 3)
        )
        if truth is not None:
            fast, aseg_gm, aseg_wm = truth
            line += (
                f" | {dice(dseg == 1, fast == 1):.3f} | {dice(dseg == 2, fast == 2):.3f}"
                f" | {dice(dseg == 1, aseg_gm):.3f} | {dice(dseg == 2, aseg_wm):.3f}"
            )
        if spm is not None:
            line += " | " + (" | ".join(f"{v:.3f}" for v in spm_dice) if spm_dice else "- | -")
        print(line + " |")


if __name__ == "__main__":
    main()

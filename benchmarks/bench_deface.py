"""Benchmark and acceptance figures of defacing on real heads, in MNI space.

Usage::

    PYTHONPATH=. python benchmarks/bench_deface.py [--data ../shared/data] [--margins 2,5]

For each head (``anat/T1_head``, the AOMIC T1w, and the xa30 DICOM T1 as
``mriflow convert`` writes it) it makes the brain mask with mriflow's skull
stripper (the anchor: ``convert --deface`` runs it first), defaces with each
margin, registers the brain to the MNI template (affine, ``fast``) and prints:

* the time of defacing next to the skull stripping, as a ratio;
* ``box0``: the fraction of the face box (x -50..50, y 60..100, z -60..-10 mm
  MNI) that is zero in the defaced head resampled to MNI, and in the original;
* ``brain``: the fraction of the box covered by the subject's brain mask (in
  MNI), which defacing must keep, so ``box0 <= 1 - brain``;
* ``face0``: the fraction of the box farther than margin + 2 mm from the brain
  mask that is zero (face tissue left behind: ``1 - face0``);
* whether the brain-mask voxels are bit-identical to the original.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriflow.image.deface import deface
from mriflow.image.registration import apply_transforms, register_to_template
from mriflow.image.skullstrip import skull_strip
from mriflow.image.template import load_template

FACE_BOX = ((-50.0, 50.0), (60.0, 100.0), (-60.0, -10.0))


def box_mask(reference: nib.spatialimages.SpatialImage) -> np.ndarray:
    """The face box on a (template) grid."""
    ijk = np.indices(reference.shape[:3]).reshape(3, -1).T
    xyz = ijk @ reference.affine[:3, :3].T + reference.affine[:3, 3]
    inside = np.ones(len(xyz), dtype=bool)
    for axis, (lo, hi) in enumerate(FACE_BOX):
        inside &= (xyz[:, axis] >= lo) & (xyz[:, axis] <= hi)
    return inside.reshape(reference.shape[:3])


def _float(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def _convert_xa30(data: Path, out: Path) -> Path:
    from mriflow.dicom.convert import convert_dicom_to_bids

    convert_dicom_to_bids(data / "dicom" / "xa30_t1w_enhanced" / "In", out, subject="01")
    (path,) = out.rglob("*_T1w.nii.gz")
    return path


def measure(head_path: Path, margins: list[float], work: Path) -> list[dict]:
    img = nib.load(str(head_path))
    t0 = time.perf_counter()
    stripped = skull_strip(img, method="auto", detect_stripped=False)
    t_strip = time.perf_counter() - t0
    brain = np.asarray(stripped.mask.dataobj) > 0
    reg = register_to_template(
        stripped.brain, work / "reg_", transform="affine", preset="fast", compute_warped=False
    )
    tpl = load_template(1).t1w
    box = box_mask(tpl)
    brain_mni = (
        np.asarray(
            apply_transforms(
                stripped.mask, reg.forward_transforms, tpl, interpolation="nearest"
            ).dataobj
        )
        > 0
    )
    zooms = np.asarray(tpl.header.get_zooms()[:3], dtype=float)
    dist = ndi.distance_transform_edt(~brain_mni, sampling=zooms)

    def zero(image: nib.spatialimages.SpatialImage) -> np.ndarray:
        warped = apply_transforms(_float(image), reg.forward_transforms, tpl)
        return np.abs(np.asarray(warped.dataobj)) < 1e-6

    original_zero = zero(img)
    rows = []
    for margin in margins:
        t0 = time.perf_counter()
        result = deface(img, stripped.mask, margin_mm=margin)
        t_deface = time.perf_counter() - t0
        before = np.asarray(img.dataobj)
        after = np.asarray(result.defaced.dataobj)
        z = zero(result.defaced)
        far = box & (dist > margin + 2.0)
        rows.append(
            {
                "head": head_path.name.split(".")[0],
                "margin": margin,
                "strip_s": t_strip,
                "deface_s": t_deface,
                "box0_orig": float(original_zero[box].mean()),
                "box0": float(z[box].mean()),
                "brain": float(brain_mni[box].mean()),
                "face0": float(z[far].mean()),
                "brain_identical": bool(np.array_equal(before[brain], after[brain])),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--margins", default="2,5", help="comma-separated margins in mm")
    parser.add_argument("--heads", default="t1_head,aomic,xa30")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    margins = [float(m) for m in args.margins.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        heads = {
            "t1_head": lambda: args.data / "anat" / "T1_head.nii.gz",
            "aomic": lambda: args.data / "ground_truth" / "aomic_piop2" / "sub-0001_T1w.nii.gz",
            "xa30": lambda: _convert_xa30(args.data, Path(tmp) / "bids"),
        }
        for name in args.heads.split(","):
            work = Path(tmp) / name
            work.mkdir()
            rows += measure(heads[name](), margins, work)
    print("Machine shared with other jobs (2 cores): times are under load.")
    print(
        f"{'head':<22}{'margin':>7}{'strip s':>9}{'deface s':>10}{'ratio':>7}"
        f"{'box0 orig':>10}{'box0':>7}{'brain':>7}{'face0':>7}  brain identical"
    )
    for r in rows:
        print(
            f"{r['head']:<22}{r['margin']:>7.1f}{r['strip_s']:>9.1f}{r['deface_s']:>10.2f}"
            f"{r['deface_s'] / r['strip_s']:>7.2f}{r['box0_orig']:>10.3f}{r['box0']:>7.3f}"
            f"{r['brain']:>7.3f}{r['face0']:>7.3f}  {r['brain_identical']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

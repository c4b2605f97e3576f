"""Output spaces: what an extra space or resolution costs, and a user template on a real head.

Usage::

    PYTHONPATH=. python benchmarks/bench_spaces.py [--data DIR] [--threads 1]

``--data`` defaults to ``MRIFLOW_TEST_DATA``, else ``../shared/data``.

Input: ``anat/T1_gadolinium.nii.gz`` (a real, already skull-stripped T1w, ~1 mm).

Timings (one process, ITK threads fixed at ``--threads``):

- anchor: the registration of the brain to the embedded ``MNI152NLin2009aSym``
  (``fast`` preset, affine + SyN), which a run does once whatever the spaces;
- each further output grid is one ``apply_transforms`` of the image (res-1, res-2),
  printed as a ratio to the anchor;
- registration to a user template (the embedded 1 mm template moved by the known
  affine ``MOVE`` of ``tests/spaces_helpers.py``, given as files), as a ratio.

Accuracy on the real head (no template alone): the user-template transform must be
the embedded one composed with ``MOVE`` — for brain points ``y`` of the user template,
``T_user(y)`` and ``T_mni(MOVE @ y)`` are the same subject point; their distance (rms,
95th percentile) is printed, with the Dice of the warped subject mask and each
template's mask.

The machine is shared: wall times are noisy; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _moved_1mm(folder: Path) -> dict[str, str]:
    """The 1 mm embedded template moved by MOVE (as the tests' 2 mm one), as files."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage as ndi

    from mriflow.image.template import load_template
    from tests.spaces_helpers import MOVE

    tpl = load_template(1)
    affine = tpl.t1w.affine
    voxel_map = np.linalg.inv(affine) @ MOVE @ affine
    files = {}
    for key, order in (("t1w", 1), ("mask", 0), ("gm", 1), ("wm", 1)):
        data = np.asarray(getattr(tpl, key).dataobj, dtype=np.float32)
        moved = ndi.affine_transform(data, voxel_map[:3, :3], voxel_map[:3, 3], order=order)
        path = folder / f"moved_{key}.nii.gz"
        nib.save(nib.Nifti1Image(moved.astype(np.float32), affine), str(path))
        files[key] = str(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("MRIFLOW_TEST_DATA") or REPO.parent / "shared" / "data"
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)

    import nibabel as nib
    import numpy as np

    from mriflow.image.registration import (
        apply_transforms,
        register_to_template,
        transform_points,
    )
    from mriflow.image.template import load_template, load_user_template
    from tests.spaces_helpers import MOVE

    source = args.data / "anat" / "T1_gadolinium.nii.gz"
    if not source.is_file():
        print(f"bench_spaces: {source} not found (set --data or MRIFLOW_TEST_DATA)")
        return 2
    img = nib.load(str(source))
    data = img.get_fdata(dtype=np.float32)
    brain = nib.Nifti1Image(data, img.affine)
    mask = nib.Nifti1Image((data > 0).astype(np.uint8), img.affine)
    rows: list[tuple[str, float]] = []

    def dice(warped, tpl_mask) -> float:
        a, b = np.asarray(warped.dataobj) > 0, np.asarray(tpl_mask.dataobj) > 0
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        load_template(1), load_template(2)  # read once, outside the timings
        t0 = time.perf_counter()
        mni = register_to_template(
            brain, work / "mni_", preset="fast", random_seed=42,
            num_threads=args.threads, compute_warped=False,
        )  # fmt: skip
        rows.append(("registration to MNI152NLin2009aSym (anchor)", time.perf_counter() - t0))
        dices = {}
        for res in (1, 2):
            tpl = load_template(res)
            t0 = time.perf_counter()
            apply_transforms(brain, mni.forward_transforms, tpl.t1w, num_threads=args.threads)
            rows.append((f"+ one image on the res-{res} grid", time.perf_counter() - t0))
            warped_mask = apply_transforms(
                mask, mni.forward_transforms, tpl.mask, interpolation="nearest"
            )
            dices[f"MNI152NLin2009aSym res-{res}"] = dice(warped_mask, tpl.mask)

        user = load_user_template("Moved", _moved_1mm(work))
        t0 = time.perf_counter()
        moved = register_to_template(
            brain, work / "user_", preset="fast", random_seed=42,
            num_threads=args.threads, compute_warped=False, template=user,
        )  # fmt: skip
        rows.append(("registration to the user template (files)", time.perf_counter() - t0))
        warped_mask = apply_transforms(
            mask, moved.forward_transforms, user.mask, interpolation="nearest"
        )
        dices["user template (Moved, 1 mm)"] = dice(warped_mask, user.mask)

        ijk = np.argwhere(np.asarray(user.mask.dataobj) > 0)[::50]
        points = nib.affines.apply_affine(user.mask.affine, ijk)
        via_user = transform_points(points, moved.forward_transforms)
        via_mni = transform_points(nib.affines.apply_affine(MOVE, points), mni.forward_transforms)
        distance = np.sqrt(((via_user - via_mni) ** 2).sum(axis=1))

    anchor = rows[0][1]
    print(f"threads {args.threads}; machine shared with other work (timings noisy)\n")
    print(f"| {'step':<46} | {'wall (s)':>8} | {'x anchor':>8} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
    for name, wall in rows:
        print(f"| {name:<46} | {wall:8.2f} | {wall / anchor:8.3f} |")
    print("\nDice, warped subject brain mask vs template mask:")
    for name, value in dices.items():
        print(f"  {name:<32} {value:.4f}")
    print(
        "user-template transform vs MNI transform composed with the known affine "
        f"({len(points)} brain points): rms {np.sqrt((distance**2).mean()):.2f} mm, "
        f"95th percentile {np.percentile(distance, 95):.2f} mm, max {distance.max():.2f} mm"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

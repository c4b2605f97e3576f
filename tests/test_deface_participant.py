"""``mriflow ... participant --deface`` on a real head: face gone, brain untouched."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from mriflow.image.deface import face_mask
from tests.helpers import make_bids_dataset

FAST = ["--voxel-size", "2", "--set", "denoise.method=none", "--set", "segmentation.method=none"]
FAST += ["--set", "export.slices=false", "-q"]
#: The face box of issue 18, in MNI mm.
FACE_BOX = {"x": (-50, 50), "y": (60, 100), "z": (-60, -10)}


def _face_box_zero_fraction(img: nib.Nifti1Image) -> float:
    ijk = np.indices(img.shape[:3]).reshape(3, -1).T
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    inside = np.ones(len(xyz), bool)
    for axis, (low, high) in enumerate(FACE_BOX.values()):
        inside &= (xyz[:, axis] >= low) & (xyz[:, axis] <= high)
    values = np.asarray(img.dataobj).reshape(-1)[inside]
    return float(np.mean(values == 0))


@pytest.mark.data
@pytest.mark.slow
def test_deface_removes_the_face_and_keeps_every_brain_voxel(data_dir, tmp_path):
    raw = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    shutil.copy(data_dir / "anat" / "T1_head.nii.gz", raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    runs = {}
    for name, extra in (("plain", []), ("defaced", ["--deface"])):
        out = tmp_path / name
        assert (
            main([str(raw), str(out), "participant", "-w", str(tmp_path / "w"), *FAST, *extra]) == 0
        )
        runs[name] = out / "sub-01" / "anat"

    def image(run: str, name: str) -> nib.Nifti1Image:
        return nib.load(runs[run] / f"sub-01_{name}.nii.gz")

    mask = "desc-brain_mask"
    assert (runs["plain"] / f"sub-01_{mask}.nii.gz").read_bytes() == (
        runs["defaced"] / f"sub-01_{mask}.nii.gz"
    ).read_bytes()
    brain = np.asarray(image("plain", mask).dataobj) > 0
    plain = np.asarray(image("plain", "desc-preproc_T1w").dataobj)
    defaced = np.asarray(image("defaced", "desc-preproc_T1w").dataobj)
    assert np.array_equal(plain[brain], defaced[brain])  # not one brain voxel changed
    removed = plain != defaced
    assert not (removed & brain).any() and (defaced[removed] == 0).all()
    assert removed.sum() * 8 > 100_000  # > 100 ml of face, ears and neck at 2 mm

    space = "space-MNI152NLin2009aSym_desc-preproc_T1w"
    before = _face_box_zero_fraction(image("plain", space))
    after = _face_box_zero_fraction(image("defaced", space))
    assert after > max(0.8, before + 0.2)
    for name in ("desc-preproc_T1w", space):
        sidecar = json.loads((runs["defaced"] / f"sub-01_{name}.json").read_text())
        assert sidecar["Defaced"] is True
        assert "deface" in [step["Name"] for step in sidecar["Steps"]]
    plain_sidecar = json.loads((runs["plain"] / "sub-01_desc-preproc_T1w.json").read_text())
    assert "Defaced" not in plain_sidecar

    # the report: a defacing figure in the defaced run only
    figure = "sub-01/figures/sub-01_desc-deface_T1w.png"
    reports = {name: (tmp_path / name / "sub-01.html").read_text() for name in runs}
    assert figure in reports["defaced"] and (tmp_path / "defaced" / figure).stat().st_size > 5000
    assert "Defacing" not in reports["plain"] and not (tmp_path / "plain" / figure).exists()
    # what the figure draws is what was removed: the region recomputed from the published
    # grid and brain mask with the recorded parameters holds every changed voxel, and has
    # the recorded size
    native = json.loads((runs["defaced"] / "sub-01_desc-preproc_T1w.json").read_text())
    (step,) = [s for s in native["Steps"] if s["Name"] == "deface"]
    region, _ = face_mask(image("defaced", "desc-preproc_T1w"), image("defaced", mask))
    assert not (removed & ~region).any() and (defaced[region] == 0).all()
    assert int(region.sum()) == step["Parameters"]["removed_voxels"]

"""A catalogue of bad inputs beside a good subject, in one participant run.

Every bad input either succeeds with finite outputs (and a warning where it is doubtful)
or fails alone with one line that names its file and the problem; the good subject
completes; nothing of a failed subject is published but its report; no traceback
reaches the terminal (it goes to the run's log file). docs/usage.md lists the same
cases and what each gives.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import QUICK_CHAIN, make_bids_dataset, write_phantom_t1w

pytestmark = pytest.mark.slow

# Quick settings: what is tested here is input handling, not the algorithms.
FAST = [
    "--voxel-size", "2", "--nprocs", "2", *QUICK_CHAIN,
    "--set", "skull_strip.method=none",
    "--set", "export.target_shape=48,56,48",
    "--set", "export.slices=false",
    "--skip-bids-validation",  # some inputs are broken on purpose: each must fail alone
]  # fmt: skip


def _phantom(path: Path) -> tuple[np.ndarray, np.ndarray]:
    write_phantom_t1w(path)
    img = nib.load(path)
    return np.asanyarray(img.dataobj).astype(np.float32), img.affine


def _nan(path):
    data, affine = _phantom(path)
    data[18:22, 20:24, 18:22] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _complex(path):
    data, affine = _phantom(path)
    nib.save(nib.Nifti1Image(data.astype(np.complex64) * (1 + 0.5j), affine), str(path))


def _rgb(path):
    data, affine = _phantom(path)
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for channel in "RGB":
        rgb[channel] = np.clip(data, 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, affine), str(path))


def _one_slice(path):
    data, affine = _phantom(path)
    nib.save(nib.Nifti1Image(data[:, :, 20:21], affine), str(path))


def _tiny(path):
    nib.save(nib.Nifti1Image(np.arange(27, dtype=np.float32).reshape(3, 3, 3), np.eye(4)), path)


def _negative_slope(path):
    data, affine = _phantom(path)
    plain = path.with_name(path.name[: -len(".gz")])
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(plain))
    raw = bytearray(plain.read_bytes())
    raw[112:116] = np.float32(-1.0).tobytes()  # scl_slope; nibabel would rescale on save
    path.write_bytes(gzip.compress(bytes(raw)))
    plain.unlink()


def _all_zero(path):
    _, affine = _phantom(path)
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 40), np.int16), affine), str(path))


def _thick_slices(path):
    data, _ = _phantom(path)
    thick = np.repeat(np.repeat(data[:, :, ::5], 2, axis=0), 2, axis=1)  # 80x96x8
    nib.save(nib.Nifti1Image(thick, np.diag([-0.5, 0.5, 10.0, 1.0])), str(path))


def _qform_sform_apart(path):
    data, affine = _phantom(path)
    img = nib.Nifti1Image(data, affine)
    rotated = affine.copy()
    rotated[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ affine[:3, :3]
    img.set_qform(rotated, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))


def _truncated(path):
    write_phantom_t1w(path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])


def _four_d(path):
    data, affine = _phantom(path)
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), affine), str(path))


def _not_nifti(path):
    path.write_bytes(gzip.compress(b"this is a text file, not an image\n" * 40))


def _zero_voxel_size(path):
    data, affine = _phantom(path)
    plain = path.with_name(path.name[: -len(".gz")])
    img = nib.Nifti1Image(data, affine)
    img.set_sform(None, code=0)  # the qform (pixdim) gives the grid
    nib.save(img, str(plain))
    raw = bytearray(plain.read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1]: a voxel 0 mm wide
    path.write_bytes(gzip.compress(bytes(raw)))
    plain.unlink()


#: Inputs mriflow can use, each a session of one subject (one report, one chain start-up
#: for all of them): label -> (how its T1w is made, words of the warning it gets).
USABLE = {
    "nan": (_nan, "non-finite voxel(s)"),
    "thick": (_thick_slices, "20x anisotropic"),
    "qsform": (_qform_sform_apart, "90 degrees apart"),
    "zerovox": (_zero_voxel_size, "0 mm wide along axis 0"),
}
#: Inputs mriflow refuses, each its own subject: label -> (maker, words of its one line).
REFUSED = {
    "complex": (_complex, "complex-valued"),
    "rgb": (_rgb, "RGB colour image"),
    "oneslice": (_one_slice, "a single slice"),
    "tiny": (_tiny, "too small to process"),
    "negslope": (_negative_slope, "negative scl_slope"),
    "zero": (_all_zero, "the image is constant (every voxel is 0)"),
    "truncated": (_truncated, "not a readable image"),
    "fourd": (_four_d, "expected a 3D image"),
    "notnifti": (_not_nifti, "not a readable image"),
}


def _t1w(root: Path, label: str) -> Path:
    if label in USABLE:
        return root / "sub-usable" / f"ses-{label}" / "anat" / f"sub-usable_ses-{label}_T1w.nii.gz"
    return root / f"sub-{label}" / "anat" / f"sub-{label}_T1w.nii.gz"


@pytest.fixture(scope="module")
def catalogue_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalogue")
    root = make_bids_dataset(tmp / "raw", {"good": [""]})
    for label, (make, _) in {**USABLE, **REFUSED}.items():
        path = _t1w(root, label)
        path.parent.mkdir(parents=True)
        make(path)
    out = tmp / "out"
    # a real process: the terminal is what its workers print too
    command = [sys.executable, "-m", "mriflow.cli.run", str(root), str(out), "participant"]
    done = subprocess.run(
        [*command, "-w", str(tmp / "work"), *FAST],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    return {"root": root, "out": out, "code": done.returncode, "out_text": done.stdout,
            "err_text": done.stderr}  # fmt: skip


def _summary_line(run, label: str) -> str:
    lines = [line for line in run["out_text"].splitlines() if f"sub-{label} " in line]
    assert len(lines) == 1, run["out_text"]
    return lines[0]


def test_exit_code_and_the_good_subject(catalogue_run):
    run = catalogue_run
    assert run["code"] == 1  # some subjects failed
    assert "sub-good  ok" in run["out_text"]
    preproc = run["out"] / "sub-good" / "anat" / "sub-good_desc-preproc_T1w.nii.gz"
    assert np.isfinite(nib.load(preproc).get_fdata()).all()


def test_usable_inputs_succeed_with_finite_outputs_and_a_warning(catalogue_run):
    run = catalogue_run
    assert "sub-usable  ok" in _summary_line(run, "usable")
    for label, (_, words) in USABLE.items():
        anat = _t1w(run["out"], label).parent
        stem = f"sub-usable_ses-{label}"
        for name in (f"{stem}_desc-preproc_T1w.nii.gz", f"{stem}_desc-brain_mask.nii.gz"):
            data = nib.load(anat / name).get_fdata()
            assert np.isfinite(data).all() and data.any(), name
        warned = [line for line in run["err_text"].splitlines() if words in line]
        assert warned, f"no warning for {label}: {run['err_text']}"
        assert all(line.startswith(str(_t1w(run["root"], label))) for line in warned)


def test_nan_voxels_are_counted_in_the_sidecar(catalogue_run):
    anat = _t1w(catalogue_run["out"], "nan").parent
    sidecar = anat / "sub-usable_ses-nan_desc-preproc_T1w.json"
    steps = json.loads(sidecar.read_text())["Steps"]
    counts = [s["Input"]["NonFiniteVoxelsSetToZero"] for s in steps if "Input" in s]
    assert counts and set(counts) == {4 * 4 * 4 + 1}


@pytest.mark.parametrize("label", sorted(REFUSED))
def test_bad_inputs_fail_alone_in_one_line_naming_the_file(catalogue_run, label):
    run = catalogue_run
    words = REFUSED[label][1]
    line = _summary_line(run, label)
    assert "FAILED" in line and str(_t1w(run["root"], label)) in line and words in line
    # nothing published for it but its report (and the run's logs and provenance)
    assert not (run["out"] / f"sub-{label}" / "anat").exists()


def test_no_traceback_on_the_terminal_but_in_the_log_file(catalogue_run):
    run = catalogue_run
    for text in (run["out_text"], run["err_text"]):
        assert "Traceback" not in text and "nipype.workflow" not in text
    err_lines = [line for line in run["err_text"].splitlines() if line.strip()]
    # one line per problem: every line on stderr names one of the inputs
    inputs = [str(_t1w(run["root"], label)) for label in {**USABLE, **REFUSED}]
    stray = [
        line
        for line in err_lines
        if not any(p in line for p in inputs) and not line.startswith("mriflow:")
    ]
    assert not stray
    logs = list((run["out"] / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()

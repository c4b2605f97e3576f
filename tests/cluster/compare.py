"""Compare two mriflow output folders file by file, whatever outputs the chain makes.

Used by the cluster and resumability tests: a run through Slurm, or a run
killed and resumed, must give the same derivatives as one uninterrupted
MultiProc run. The list of outputs is not hard-coded: every file that appears
in either folder is compared, so the tests keep working as steps are added.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from mriflow.config import tomllib

# Per-run bookkeeping: run summaries are named by a run id; the execution section
# of the config records how the run was executed (plugin, processes), not what it computed.
RUN_SPECIFIC_DIRS = ("logs",)
# The HTML reports show each step's measured run time (and which plugin ran it), so
# they differ between runs by design; their content is compared, not their bytes.
RUN_SPECIFIC_SUFFIXES = (".html",)
CONFIG_NAME = "mriflow_config.toml"


def output_files(root: Path) -> dict[str, Path]:
    """Relative path -> file for every output of a run, per-run logs excluded."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in RUN_SPECIFIC_DIRS:
            if path.suffix in RUN_SPECIFIC_SUFFIXES:
                _check_report(path)
                continue
            files[rel.as_posix()] = path
    return files


def _check_report(path: Path) -> None:
    text = path.read_text()
    assert "</html>" in text.lower(), f"{path}: not a complete report"
    # a failed subject's report shows its error instead of figures
    assert "<img" in text or 'class="err">ERROR: ' in text, f"{path}: no figures, no error"


def differences(expected_root: Path, actual_root: Path) -> list[str]:
    """Human-readable differences between two output folders (empty when equal)."""
    expected = output_files(expected_root)
    actual = output_files(actual_root)
    problems = [f"missing: {rel}" for rel in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {rel}" for rel in sorted(actual.keys() - expected.keys())]
    for rel in sorted(expected.keys() & actual.keys()):
        problem = _compare_file(expected[rel], actual[rel])
        if problem:
            problems.append(f"{rel}: {problem}")
    return problems


def assert_same_outputs(expected_root: Path, actual_root: Path) -> None:
    problems = differences(expected_root, actual_root)
    assert not problems, "outputs differ:\n  " + "\n  ".join(problems)
    # a comparison of two empty folders proves nothing
    assert any(rel.endswith((".nii", ".nii.gz")) for rel in output_files(expected_root))


def _compare_file(a: Path, b: Path) -> str:
    name = a.name
    if name.endswith((".nii", ".nii.gz")):
        return _compare_nifti(a, b)
    if name.endswith(".json"):
        return "" if _load_json(a) == _load_json(b) else "JSON content differs"
    if name == CONFIG_NAME:
        ca, cb = (tomllib.loads(p.read_text()) for p in (a, b))
        ca.pop("execution", None)
        cb.pop("execution", None)
        return "" if ca == cb else "config differs outside the execution section"
    if name.endswith(".h5"):
        # HDF5 files embed their write time: compare the transforms they hold
        return "" if _h5_transform(a) == _h5_transform(b) else "transform parameters differ"
    return "" if a.read_bytes() == b.read_bytes() else "bytes differ"


def _compare_nifti(a: Path, b: Path) -> str:
    ia, ib = nib.load(a), nib.load(b)
    if ia.header.binaryblock != ib.header.binaryblock:
        return "NIfTI headers differ"
    da, db = np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj)
    if da.dtype != db.dtype or da.shape != db.shape:
        return f"data {da.dtype}{da.shape} vs {db.dtype}{db.shape}"
    # bit-identical, NaNs included
    if da.tobytes() != db.tobytes():
        diff = np.abs(da.astype(np.float64) - db.astype(np.float64))
        return f"voxel data differ ({int((diff > 0).sum())} voxels, max |diff| {diff.max():g})"
    return ""


def _load_json(path: Path):
    return json.loads(path.read_text())


def _h5_transform(path: Path) -> list[tuple]:
    """Kind, fixed parameters and parameters of each transform in an ITK HDF5 file."""
    import SimpleITK as sitk

    transform = sitk.ReadTransform(str(path))
    if transform.GetName() == "CompositeTransform":
        parts = [transform.GetNthTransform(i) for i in range(transform.GetNumberOfTransforms())]
    else:
        parts = [transform]
    return [(t.GetName(), t.GetFixedParameters(), t.GetParameters()) for t in parts]

"""The README's main job: the participant level on the bundled real-T1w example."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from mriflow.config import load_config
from tests.conftest import REPO_ROOT

EXAMPLE = REPO_ROOT / "bids_examples"
T1W = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-02/ses-hfs/anat/sub-02_ses-hfs_T1w.nii.gz",
    "sub-02/ses-hfdl/anat/sub-02_ses-hfdl_T1w.nii.gz",
]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    out = tmp / "out"
    code = main([str(EXAMPLE), str(out), "participant", "-w", str(tmp / "work"), "-q"])
    return code, out


def test_bundled_example_is_small_real_bids():
    size = sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file())
    assert size < 10 * 1024**2
    assert "BSD-2-Clause" in (EXAMPLE / "LICENSE").read_text() + (EXAMPLE / "README").read_text()
    for rel in T1W:
        img = nib.load(EXAMPLE / rel)
        assert np.asanyarray(img.dataobj).std() > 10  # real images, not empty layouts
        sidecar = json.loads((EXAMPLE / rel.replace(".nii.gz", ".json")).read_text())
        assert "InstitutionName" not in sidecar and "PatientName" not in sidecar


@pytest.mark.slow
def test_participant_level_on_bundled_example(example_run):
    code, out = example_run
    assert code == 0
    for rel in T1W:
        preproc = out / rel.replace("_T1w.nii.gz", "_desc-preproc_T1w.nii.gz")
        img = nib.load(preproc)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S"), preproc
        assert np.allclose(img.header.get_zooms()[:3], 1.0), preproc
        sidecar = json.loads(preproc.with_name(preproc.name[:-7] + ".json").read_text())
        assert sidecar["Sources"][0] == f"bids:raw:{rel}"
        assert "SkullStripped" in sidecar
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert load_config(out / "mriflow_config.toml").spatial.voxel_size == 1.0


@pytest.mark.slow
def test_two_patient_positions_give_the_same_head_in_ras(example_run):
    """HFS and HFDL are one head lying differently: after conforming, both are RAS+ and
    the head's extent along each world axis is alike (the scanner frame follows the table)."""
    _, out = example_run
    extents = []
    for session in ("hfs", "hfdl"):
        img = nib.load(
            out / f"sub-02/ses-{session}/anat/sub-02_ses-{session}_desc-preproc_T1w.nii.gz"
        )
        data = np.asanyarray(img.dataobj)
        head = np.argwhere(data > np.percentile(data, 75))
        extents.append(head.max(0) - head.min(0))
    assert np.all(np.abs(extents[0] - extents[1]) < 0.25 * np.maximum(extents[0], extents[1]))

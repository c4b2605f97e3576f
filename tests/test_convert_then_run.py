"""DICOM to BIDS to derivatives: `mriflow convert` output feeds `mriflow participant`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from tests.conftest import REPO_ROOT
from tests.helpers import QUICK_CHAIN

DICOM = REPO_ROOT / "bids_examples" / "sourcedata" / "sub-01"


@pytest.mark.slow
def test_convert_then_participant_end_to_end(tmp_path):
    bids_dir = tmp_path / "bids"
    assert main(["convert", str(DICOM), str(bids_dir), "--subject", "01"]) == 0
    t1w = bids_dir / "sub-01" / "anat" / "sub-01_acq-tfl_T1w.nii.gz"
    sidecar = json.loads(t1w.with_name("sub-01_acq-tfl_T1w.json").read_text())
    assert sidecar["ConversionCheck"]["Status"] == "agree"  # dcm2niix and dicom2nifti
    # the converted image equals the dcm2niix reference shipped as the example's sub-01
    reference = nib.load(REPO_ROOT / "bids_examples" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    converted = nib.load(t1w)
    assert np.allclose(converted.affine, reference.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(converted.dataobj), np.asanyarray(reference.dataobj))

    out = tmp_path / "out"
    args = [str(bids_dir), str(out), "participant", "-w", str(tmp_path / "work"), "-q"]
    code = main([*args, "--voxel-size", "2", *QUICK_CHAIN])  # the full chain: test_example
    assert code == 0
    preproc = out / "sub-01" / "anat" / "sub-01_acq-tfl_desc-preproc_T1w.nii.gz"
    assert nib.aff2axcodes(nib.load(preproc).affine) == ("R", "A", "S")

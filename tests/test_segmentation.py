"""CSF/GM/WM segmentation: phantoms, the SPM ground truth and real T1 volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriflow.image import segmentation as S
from tests.tissue_data import T1_INTENSITY, T2_INTENSITY, load_t1, tissue_phantom

LABEL = S.DSEG_LABELS


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


def accuracy(seg: S.Segmentation, tissues: dict[str, np.ndarray]) -> float:
    correct = sum(
        np.count_nonzero(seg.dseg[region] == LABEL[name]) for name, region in tissues.items()
    )
    return correct / sum(np.count_nonzero(r) for r in tissues.values())


def check_outputs(seg: S.Segmentation, mask: np.ndarray) -> None:
    assert seg.dseg.dtype == np.uint8
    assert set(np.unique(seg.dseg[mask])) <= {1, 2, 3} and np.all(seg.dseg[~mask] == 0)
    assert set(seg.probabilities) == {"CSF", "GM", "WM"}
    total = sum(p.astype(np.float64) for p in seg.probabilities.values())
    assert np.allclose(total[mask], 1.0, atol=1e-4) and np.all(total[~mask] == 0)
    for name, p in seg.probabilities.items():
        assert p.dtype == np.float32
        # the dseg is the most probable tissue
        assert np.all(p[seg.dseg == LABEL[name]] >= 1 / 3 - 1e-6)
    json.dumps(seg.parameters)


# --------------------------------------------------------------------------- phantoms

METHODS = ["hmrf", "gmm", "atropos"]
SMALL = {"shape": (32, 32, 32), "radii": (8.0, 12.0, 14.0), "noise": 6.0}
# The phantom's CSF is an outer shell beyond the GM: the rim that hmrf leaves
# unlabelled on a real head (see test_hmrf_keeps_sulcal_csf_drops_the_rim).
PHANTOM = {"hmrf": {"csf_hull_mm": 0.0}, "gmm": {}, "atropos": {}}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("contrast, intensities", [("T1w", T1_INTENSITY), ("T2w", T2_INTENSITY)])
def test_labels_follow_smriprep_order_for_each_contrast(method, contrast, intensities):
    data, mask, tissues = tissue_phantom(intensities, **SMALL)
    seg = S.segment(data, mask, method, contrast=contrast, **PHANTOM[method])
    check_outputs(seg, mask)
    assert accuracy(seg, tissues) > 0.95
    for name, region in tissues.items():
        assert np.mean(seg.dseg[region] == LABEL[name]) > 0.9, name
    assert S.check_plausibility(seg, data, contrast=contrast, fraction_ranges={}) == []


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    data, mask, _ = tissue_phantom(T1_INTENSITY, **SMALL)
    a = S.segment(data, mask, method)
    b = S.segment(data.copy(), mask.copy(), method)
    assert np.array_equal(a.dseg, b.dseg)
    for name in S.TISSUES:
        assert np.array_equal(a.probabilities[name], b.probabilities[name])
    assert a.parameters == b.parameters


def _with_bright_outliers(seed: int = 0):
    """The T1 phantom plus 'enhancing vessels': 3 % of the WM and GM very bright and spread."""
    data, mask, tissues = tissue_phantom(T1_INTENSITY, **SMALL)
    rng = np.random.default_rng(seed)
    brain = np.flatnonzero((tissues["WM"] | tissues["GM"]).ravel())
    vessels = rng.choice(brain, size=int(0.03 * brain.size), replace=False)
    flat = data.ravel()
    flat[vessels] = rng.uniform(150, 400, vessels.size)
    return data, mask, tissues


def test_gmm_survives_bright_outliers():
    data, mask, tissues = _with_bright_outliers()
    robust = S.segment_gmm(data, mask)
    assert accuracy(robust, tissues) > 0.93
    # a plain per-class-variance fit on every voxel gives the outliers a class of their own
    naive = S.segment_gmm(
        data, mask, clip_percentiles=(0, 100), outlier_fence=None, covariance="full"
    )
    assert accuracy(naive, tissues) < accuracy(robust, tissues) - 0.05


def test_priors_pull_ambiguous_voxels(rng):
    # GM and WM with the same intensity: only the priors can tell them apart
    data, mask, tissues = tissue_phantom({"CSF": 30.0, "GM": 90.0, "WM": 90.0}, **SMALL)
    priors = {"GM": 0.9 * tissues["GM"] + 0.05, "WM": 0.9 * tissues["WM"] + 0.05}
    for method in METHODS:
        seg = S.segment(data, mask, method, priors=priors, prior_weight=0.5, **PHANTOM[method])
        assert np.mean(seg.dseg[tissues["WM"]] == LABEL["WM"]) > 0.8, method
        assert np.mean(seg.dseg[tissues["GM"]] == LABEL["GM"]) > 0.8, method


def test_hmrf_keeps_sulcal_csf_drops_the_rim():
    # A cleft of CSF cut into the GM shell down to the WM (a sulcus) and the CSF
    # shell around the GM (the dark rim a generous brain mask takes in).
    data, mask, tissues = tissue_phantom(T1_INTENSITY, **SMALL)
    sulcus = np.zeros_like(mask)
    sulcus[14:18, 16:, 14:18] = True
    sulcus &= tissues["GM"]
    rng = np.random.default_rng(1)
    data[sulcus] = T1_INTENSITY["CSF"] + rng.normal(0, SMALL["noise"], int(sulcus.sum()))
    seg = S.segment(data, mask, "hmrf")
    assert np.mean(seg.dseg[sulcus] == LABEL["CSF"]) > 0.9
    # The rim away from the sulcus (the hull bridges the cleft's mouth, as it
    # should); the hull is drawn on a 2x coarser grid, so it may keep the first
    # voxel beyond the GM.
    far = ndi.distance_transform_edt(~sulcus) > 8
    beyond = ndi.distance_transform_edt(~(tissues["GM"] | tissues["WM"])) >= 2
    rim = tissues["CSF"] & far & beyond
    assert np.mean(seg.dseg[rim] == 0) > 0.95
    assert np.mean(seg.dseg[tissues["WM"]] == LABEL["WM"]) > 0.95
    tissue = seg.dseg > 0
    total = sum(p.astype(np.float64) for p in seg.probabilities.values())
    assert np.allclose(total[tissue], 1.0, atol=1e-4) and np.all(total[~tissue] == 0)
    assert seg.parameters["rim_voxels_unlabelled"] == int(np.count_nonzero(mask & ~tissue))
    # without the hull every voxel of the mask keeps a tissue
    kept = S.segment(data, mask, "hmrf", csf_hull_mm=0.0)
    assert np.all(kept.dseg[mask] > 0)


def test_hmrf_partial_volume_maps_follow_intensity():
    # A voxel halfway between the GM and WM means is half GM, half WM.
    data, mask, tissues = tissue_phantom(T1_INTENSITY, **{**SMALL, "noise": 1.0})
    probe = (16, 16, 16)
    assert tissues["WM"][probe]
    data[probe] = 0.5 * (T1_INTENSITY["GM"] + T1_INTENSITY["WM"])
    seg = S.segment(data, mask, "hmrf", pv_beta=0.0, csf_hull_mm=0.0)
    assert abs(seg.probabilities["GM"][probe] - 0.5) < 0.1
    assert abs(seg.probabilities["WM"][probe] - 0.5) < 0.1
    assert seg.probabilities["CSF"][probe] == 0.0
    means = seg.parameters["class_means"]
    for name, value in T1_INTENSITY.items():
        assert abs(means[name] - value) < 3.0, (name, means)


def test_validation_messages():
    data, mask, _ = tissue_phantom(T1_INTENSITY, **SMALL)
    with pytest.raises(ValueError, match="unknown segmentation method"):
        S.segment(data, mask, "fast")
    with pytest.raises(ValueError, match="contrast must be one of"):
        S.segment_gmm(data, mask, contrast="T1")
    with pytest.raises(ValueError, match="priors must map 'GM', 'WM'"):
        S.segment_gmm(data, mask, priors={"grey": data})
    with pytest.raises(ValueError, match="GM prior's shape"):
        S.segment_gmm(data, mask, priors={"GM": data[1:], "WM": data})
    with pytest.raises(ValueError, match="clip_percentiles"):
        S.segment_atropos(data, mask, clip_percentiles=(99, 1))
    with pytest.raises(ValueError, match="at least 100"):
        S.segment_gmm(data, np.zeros_like(mask))
    with pytest.raises(ValueError, match="mrf_beta and pv_beta must be >= 0"):
        S.segment(data, mask, "hmrf", mrf_beta=-1.0)
    with pytest.raises(ValueError, match="n_iterations must be an integer >= 1"):
        S.segment(data, mask, "hmrf", n_iterations=0)


def test_plausibility_flags_merged_classes():
    data, mask, tissues = tissue_phantom(T1_INTENSITY, **SMALL)
    seg = S.segment_gmm(data, mask)
    assert S.check_plausibility(seg, data, fraction_ranges={}) == []
    # GM and WM merged into one class, CSF split in two: what a failed fit looks like
    dseg = np.zeros_like(seg.dseg)
    dseg[tissues["WM"] | tissues["GM"]] = LABEL["WM"]
    csf = np.flatnonzero(tissues["CSF"].ravel())
    dseg.ravel()[csf[::2]] = LABEL["GM"]
    dseg.ravel()[csf[1::2]] = LABEL["CSF"]
    bad = S.Segmentation(dseg=dseg, probabilities=seg.probabilities)
    warnings = S.check_plausibility(bad, data)
    assert any("WM is" in w and "outside the plausible" in w for w in warnings)
    assert any("poorly separated" in w for w in warnings)
    # swapped labels against the contrast
    swapped = seg.dseg.copy()
    swapped[seg.dseg == LABEL["GM"]] = LABEL["WM"]
    swapped[seg.dseg == LABEL["WM"]] = LABEL["GM"]
    warnings = S.check_plausibility(S.Segmentation(swapped, seg.probabilities), data)
    assert any("mislabelled" in w for w in warnings)


def test_dseg_tsv_lookup_table():
    lines = S.dseg_tsv().splitlines()
    assert lines == ["index\tname", "1\tGM", "2\tWM", "3\tCSF"]


def test_interface_writes_dseg_probseg_and_table(tmp_path):
    from mriflow.interfaces.segmentation import TissueSegmentation

    data, mask, tissues = tissue_phantom(T1_INTENSITY, **SMALL)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.Nifti1Image(data.astype(np.float32), affine).to_filename(tmp_path / "t1w.nii.gz")
    nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(tmp_path / "mask.nii.gz")
    node = TissueSegmentation(
        in_file=str(tmp_path / "t1w.nii.gz"), mask_file=str(tmp_path / "mask.nii.gz"),
        method="gmm",
    )  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    out = node.run(cwd=str(work)).outputs
    dseg = nib.load(out.dseg_file)
    assert dseg.get_data_dtype() == np.uint8 and np.allclose(dseg.affine, affine)
    assert [Path(p).name for p in out.probseg_files] == [
        f"t1w_label-{t}_probseg.nii" for t in ("CSF", "GM", "WM")
    ]
    assert Path(out.dseg_tsv).read_text() == S.dseg_tsv()
    assert np.mean(np.asanyarray(dseg.dataobj)[tissues["WM"]] == LABEL["WM"]) > 0.9
    assert out.warnings == [] or all(isinstance(w, str) for w in out.warnings)
    assert out.step["Name"] == "tissue_segmentation"
    assert out.step["Parameters"]["method"] == "gmm"
    assert set(out.fractions) == {"GM", "WM", "CSF"}


def test_interface_default_is_hmrf(tmp_path):
    from mriflow.interfaces.segmentation import TissueSegmentation

    data, mask, tissues = tissue_phantom(T1_INTENSITY, **SMALL)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    nib.Nifti1Image(data.astype(np.float32), affine).to_filename(tmp_path / "t1w.nii.gz")
    nib.Nifti1Image(mask.astype(np.uint8), affine).to_filename(tmp_path / "mask.nii.gz")
    work = tmp_path / "work"
    work.mkdir()
    out = TissueSegmentation(
        in_file=str(tmp_path / "t1w.nii.gz"), mask_file=str(tmp_path / "mask.nii.gz"),
        csf_hull_mm=0.0,
    ).run(cwd=str(work)).outputs  # fmt: skip
    dseg = np.asanyarray(nib.load(out.dseg_file).dataobj)
    for name, region in tissues.items():
        assert np.mean(dseg[region] == LABEL[name]) > 0.9, name
    params = out.step["Parameters"]
    assert params["method"] == "hmrf" and params["csf_hull_mm"] == 0.0
    assert out.step["Software"].keys() >= {"mriflow", "numpy", "scipy"}


def test_interface_atropos_with_prior_files(tmp_path):
    from mriflow.interfaces.segmentation import TissueSegmentation

    data, mask, tissues = tissue_phantom({"CSF": 30.0, "GM": 90.0, "WM": 90.0}, **SMALL)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    files = {}
    for name, array in {
        "t1w": data.astype(np.float32),
        "mask": mask.astype(np.uint8),
        "gm": (0.9 * tissues["GM"] + 0.05).astype(np.float32),
        "wm": (0.9 * tissues["WM"] + 0.05).astype(np.float32),
    }.items():
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.Nifti1Image(array, affine).to_filename(files[name])
    work = tmp_path / "work"
    work.mkdir()
    out = TissueSegmentation(
        in_file=files["t1w"], mask_file=files["mask"], method="atropos",
        gm_prior=files["gm"], wm_prior=files["wm"], use_priors=True, prior_weight=0.5,
    ).run(cwd=str(work)).outputs  # fmt: skip
    dseg = np.asanyarray(nib.load(out.dseg_file).dataobj)
    # GM and WM share one intensity: only the prior files can separate them
    assert np.mean(dseg[tissues["WM"]] == LABEL["WM"]) > 0.8
    assert np.mean(dseg[tissues["GM"]] == LABEL["GM"]) > 0.8
    params = out.step["Parameters"]
    assert params["initialization"] == "priors" and params["mrf_weight"] == 0.3
    assert out.step["Software"].keys() >= {"mriflow", "antspyx"}


# --------------------------------------------------------------------------- real data


def _nilearn_priors(reference: nib.Nifti1Image) -> dict[str, np.ndarray]:
    """nilearn's MNI152 2009a GM/WM maps resampled onto a grid that is already in MNI space."""
    from importlib.resources import files

    from nilearn.image import resample_to_img

    folder = files("nilearn.datasets") / "data"
    priors = {}
    for name in ("GM", "WM"):
        img = nib.load(
            str(folder / f"mni_icbm152_{name.lower()}_tal_nlin_sym_09a_converted.nii.gz")
        )
        resampled = resample_to_img(
            img, reference, interpolation="continuous", force_resample=True, copy_header=True
        )
        priors[name] = np.clip(resampled.get_fdata() / 255.0, 0, 1)
    return priors


@pytest.fixture(scope="module")
def spm_truth(data_dir):
    folder = data_dir / "ground_truth" / "spm_avg152"
    t1 = nib.load(str(folder / "avg152T1.nii"))
    mask = nib.load(str(folder / "brainmask.nii")).get_fdata() > 0.5
    truth = {
        name: nib.load(str(folder / f"{file}.nii")).get_fdata() > 0.5
        for name, file in (("GM", "grey"), ("WM", "white"), ("CSF", "csf"))
    }
    return t1, mask, truth


# GM / WM Dice floors on the SPM average, a little under what each method gives
# (hmrf 0.840 / 0.878, gmm 0.875 / 0.878, Atropos + priors 0.868 / 0.879), so that
# none of them gets worse unnoticed.
SPM_FLOORS = {"hmrf": (0.835, 0.87), "gmm": (0.87, 0.87), "atropos": (0.86, 0.87)}


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("method", ["hmrf", "gmm", "atropos"])
def test_dice_on_spm_ground_truth(spm_truth, method):
    # hmrf (the default, no priors) stays under issue 14's GM >= 0.86 here: its CSF/GM
    # cut, the one that matches FAST and FreeSurfer on the AOMIC head, takes 15 k voxels
    # of this blurred average's GM as CSF. Moving the cut far enough for 0.86 costs the
    # AOMIC FAST GM bar (0.838 < 0.85); no setting measured passes both
    # (docs/anatomical.md, benchmarks/bench_segmentation.py --csf-shift).
    t1, mask, truth = spm_truth
    data = t1.get_fdata()
    params = {}
    if method == "hmrf":
        params = {"spacing": t1.header.get_zooms()[:3]}
    if method == "atropos":
        # the default: template priors (here the grids are both MNI, no warp needed) + MRF
        params = {"priors": _nilearn_priors(t1), "spacing": t1.header.get_zooms()[:3]}
    seg = S.segment(data, mask, method, **params)
    gm_floor, wm_floor = SPM_FLOORS[method]
    assert dice(seg.dseg == LABEL["GM"], truth["GM"]) >= gm_floor
    assert dice(seg.dseg == LABEL["WM"], truth["WM"]) >= wm_floor
    assert S.check_plausibility(seg, data) == []


@pytest.fixture(scope="module")
def real_t1s(data_dir):
    head, head_mask, head_img = load_t1(data_dir, "T1_head")
    gad, gad_mask, gad_img = load_t1(data_dir, "T1_gadolinium")
    return {
        "T1_head": (head, head_mask, head_img.header.get_zooms()[:3]),
        "T1_gadolinium": (gad, gad_mask, gad_img.header.get_zooms()[:3]),
    }


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("method", ["gmm", "atropos"])
@pytest.mark.parametrize("name", ["T1_head", "T1_gadolinium"])
def test_tissue_fractions_plausible_on_real_t1(real_t1s, name, method):
    data, mask, zooms = real_t1s[name]
    params = {}
    if method == "atropos":
        # No registration here, so no priors: k-means start on the clamped intensities.
        # The 1 mm gadolinium image is halved to 2 mm to keep the test short.
        if name == "T1_gadolinium":
            data, mask, zooms = data[::2, ::2, ::2], mask[::2, ::2, ::2], [2 * z for z in zooms]
        params["spacing"] = zooms
    seg = S.segment(data, mask, method, **params)
    fractions = S.tissue_fractions(seg.dseg)
    assert 0.35 <= fractions["GM"] <= 0.60, fractions
    assert 0.25 <= fractions["WM"] <= 0.50, fractions
    assert not [w for w in S.check_plausibility(seg, data) if "outside" in w]


@pytest.mark.data
def test_naive_fit_on_contrast_enhanced_t1_is_flagged(real_t1s):
    # The measured failure of issue 6: a plain 3-class GMM on every voxel of the
    # gadolinium T1 merges GM with WM. The plausibility check must say so.
    data, mask, _ = real_t1s["T1_gadolinium"]
    naive = S.segment_gmm(
        data, mask, clip_percentiles=(0, 100), outlier_fence=None, covariance="full"
    )
    assert S.check_plausibility(naive, data) != []

"""Nipype interface for CSF/GM/WM segmentation (thin wrapper of mriflow.image.segmentation)."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.paths import work_filename
from mriflow.image.io import load_image
from mriflow.image.segmentation import (
    INTENSITY_ORDER,
    TISSUES,
    check_plausibility,
    dseg_tsv,
    segment,
    tissue_fractions,
)
from mriflow.interfaces.base import MriflowInterface, step_record
from mriflow.interfaces.intensity import save_like

__all__ = ["TissueSegmentation"]


class _TissueSegmentationInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="bias-corrected, skull-stripped image")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (non-zero = brain)")
    method = traits.Enum("hmrf", "atropos", "gmm", usedefault=True, desc="segmentation method")
    contrast = traits.Enum(*INTENSITY_ORDER, usedefault=True, desc="image contrast (BIDS suffix)")
    gm_prior = File(exists=True, desc="GM probability map in subject space")
    wm_prior = File(exists=True, desc="WM probability map in subject space")
    csf_prior = File(exists=True, desc="CSF probability map (default 1 - GM - WM)")
    use_priors = traits.Bool(False, usedefault=True, desc="use the priors when given")
    prior_weight = traits.Float(desc="weight of the priors (method default when unset)")
    mrf_beta = traits.Float(1.0, usedefault=True, desc="hmrf: Potts MRF strength")
    hmrf_iterations = traits.Int(6, usedefault=True, desc="hmrf: EM iterations")
    pv_beta = traits.Float(0.3, usedefault=True, desc="hmrf: MRF weight on the PV fractions")
    csf_hull_mm = traits.Float(
        7.0, usedefault=True, desc="hmrf: CSF outside the GM+WM hull closed by this ball is 0"
    )
    mrf_weight = traits.Float(0.3, usedefault=True, desc="Atropos MRF smoothing factor")
    n_iterations = traits.Int(3, usedefault=True, desc="Atropos EM iterations")
    clip_percentiles = traits.Tuple(
        (1.0, 99.0), traits.Float, traits.Float, usedefault=True, desc="robust intensity window"
    )
    seed = traits.Int(42, usedefault=True, desc="seed of the GMM")


class _TissueSegmentationOutputSpec(TraitedSpec):
    dseg_file = File(exists=True, desc="labels 1=GM, 2=WM, 3=CSF, 0 elsewhere (uint8)")
    probseg_files = traits.List(File(exists=True), desc="probability maps: CSF, GM, WM")
    dseg_tsv = File(exists=True, desc="lookup table of the dseg labels")
    fractions = traits.Dict(desc="fraction of the brain in each tissue")
    warnings = traits.List(traits.Str, desc="plausibility warnings for the report")
    step = traits.Dict(desc="step record for the sidecar")


class TissueSegmentation(MriflowInterface):
    """Segment CSF, GM and WM; write dseg, probseg maps and the dseg.tsv table."""

    input_spec = _TissueSegmentationInputSpec
    output_spec = _TissueSegmentationOutputSpec

    def _run_interface(self, runtime):
        img = load_image(self.inputs.in_file)
        mask_img = load_image(self.inputs.mask_file)
        if mask_img.shape != img.shape:
            raise ValueError(
                f"{self.inputs.mask_file}: mask shape {mask_img.shape} does not match "
                f"the image's {img.shape}"
            )
        data = np.asanyarray(img.dataobj, dtype=np.float64)
        mask = np.asanyarray(mask_img.dataobj) > 0

        priors = None
        given = {
            name: getattr(self.inputs, f"{name.lower()}_prior")
            for name in ("GM", "WM", "CSF")
            if isdefined(getattr(self.inputs, f"{name.lower()}_prior"))
        }
        if self.inputs.use_priors and given:
            if not {"GM", "WM"} <= set(given):
                raise ValueError("tissue priors need at least gm_prior and wm_prior")
            priors = {}
            for name, path in given.items():
                prior_img = load_image(path)
                if prior_img.shape != img.shape:
                    raise ValueError(
                        f"{path}: prior shape {prior_img.shape} does not match the image's "
                        f"{img.shape}; warp it to the subject first"
                    )
                priors[name] = np.asanyarray(prior_img.dataobj, dtype=np.float64)

        params = {
            "contrast": self.inputs.contrast,
            "clip_percentiles": tuple(self.inputs.clip_percentiles),
            "priors": priors,
        }
        if isdefined(self.inputs.prior_weight):
            params["prior_weight"] = self.inputs.prior_weight
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        if self.inputs.method == "hmrf":
            params["mrf_beta"] = self.inputs.mrf_beta
            params["n_iterations"] = self.inputs.hmrf_iterations
            params["pv_beta"] = self.inputs.pv_beta
            params["csf_hull_mm"] = self.inputs.csf_hull_mm
            params["spacing"] = spacing
            software = ["numpy", "scipy"]
        elif self.inputs.method == "atropos":
            params["mrf_weight"] = self.inputs.mrf_weight
            params["n_iterations"] = self.inputs.n_iterations
            params["spacing"] = spacing
            software = ["antspyx"]
        else:
            params["seed"] = self.inputs.seed
            software = ["scikit-learn"]
        result = segment(data, mask, self.inputs.method, **params)

        base = os.path.basename(self.inputs.in_file).split(".nii")[0]
        dseg_file = os.path.join(runtime.cwd, work_filename(base, suffix="dseg", extension=".nii"))
        save_like(result.dseg, img, dseg_file)
        probseg_files = []
        for name in TISSUES:
            path = os.path.join(
                runtime.cwd, work_filename(base, suffix="probseg", extension=".nii", label=name)
            )
            probseg_files.append(save_like(result.probabilities[name], img, path))
        tsv = os.path.join(runtime.cwd, "dseg.tsv")
        with open(tsv, "w") as handle:
            handle.write(dseg_tsv())

        self._results["dseg_file"] = dseg_file
        self._results["probseg_files"] = probseg_files
        self._results["dseg_tsv"] = tsv
        self._results["fractions"] = tissue_fractions(result.dseg)
        self._results["warnings"] = check_plausibility(result, data, contrast=self.inputs.contrast)
        self._results["step"] = step_record("tissue_segmentation", result.parameters, software)
        return runtime

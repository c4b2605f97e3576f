"""Nipype interfaces for intensity normalization (thin wrappers of mriflow.image.intensity)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    traits,
)
from nipype.utils.filemanip import fname_presuffix

from mriflow.image.intensity import METHODS, NyulStandard, fit_nyul, normalize
from mriflow.image.io import load_image
from mriflow.interfaces.base import MriflowInterface, step_record

__all__ = ["FitNyul", "Normalize", "save_like"]


def save_like(data: np.ndarray, reference: nib.Nifti1Image, path: str) -> str:
    """Save ``data`` with the reference's affine and header, in the data's own dtype."""
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, reference.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.to_filename(path)
    return path


def _load_mask(path: str, reference: nib.Nifti1Image) -> np.ndarray:
    mask_img = load_image(path)
    if mask_img.shape != reference.shape:
        raise ValueError(
            f"{path}: mask shape {mask_img.shape} does not match the image's {reference.shape}"
        )
    return np.asanyarray(mask_img.dataobj) > 0


class _NormalizeInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to normalize")
    mask_file = File(exists=True, mandatory=True, desc="brain mask (non-zero = brain)")
    method = traits.Enum(*METHODS, usedefault=True, desc="normalization method")
    parameters = traits.Dict(
        traits.Str, traits.Any, usedefault=True, desc="keyword parameters of the method"
    )
    nyul_standard = File(exists=True, desc="saved Nyúl standard (JSON) for method 'nyul'")


class _NormalizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="normalized image, float32, background 0")
    record = traits.Dict(desc="method, parameters and fitted values")
    step = traits.Dict(desc="step record for the sidecar")


class Normalize(MriflowInterface):
    """Normalize intensities inside the brain mask with one of :data:`METHODS`."""

    input_spec = _NormalizeInputSpec
    output_spec = _NormalizeOutputSpec

    def _run_interface(self, runtime):
        img = load_image(self.inputs.in_file)
        mask = _load_mask(self.inputs.mask_file, img)
        params = dict(self.inputs.parameters)
        if self.inputs.method == "nyul":
            if self.inputs.nyul_standard:
                params["standard"] = self.inputs.nyul_standard
            if "standard" not in params:
                raise ValueError("method 'nyul' needs nyul_standard (a fitted standard JSON)")
        data = np.asanyarray(img.dataobj, dtype=np.float64)
        out, record = normalize(data, mask, self.inputs.method, **params)
        out_file = fname_presuffix(
            self.inputs.in_file, suffix=f"_{self.inputs.method}", newpath=runtime.cwd
        )
        self._results["out_file"] = save_like(out, img, out_file)
        self._results["record"] = record
        self._results["step"] = step_record(
            "intensity_normalization",
            {"method": record["Method"], **record["Parameters"], "fitted": record["Fitted"]},
            ["numpy", "scikit-image"] if self.inputs.method == "clahe" else ["numpy"],
        )
        return runtime


class _FitNyulInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="training images")
    mask_files = InputMultiObject(File(exists=True), mandatory=True, desc="their brain masks")
    subject_ids = traits.List(traits.Str, desc="subject of each image (recorded in the standard)")
    percentiles = traits.List(
        traits.Float,
        value=[1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0],
        usedefault=True,
        desc="landmark percentiles",
    )
    output_range = traits.Tuple(
        (1.0, 100.0), traits.Float, traits.Float, usedefault=True, desc="standard scale range"
    )
    out_name = traits.Str("nyul_standard.json", usedefault=True, desc="output file name")


class _FitNyulOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the Nyúl standard (JSON)")
    step = traits.Dict(desc="step record for the sidecar")


class FitNyul(MriflowInterface):
    """Fit a Nyúl & Udupa standard scale on a group of (training) images."""

    input_spec = _FitNyulInputSpec
    output_spec = _FitNyulOutputSpec

    def _run_interface(self, runtime):
        if len(self.inputs.in_files) != len(self.inputs.mask_files):
            raise ValueError(
                f"got {len(self.inputs.in_files)} images but {len(self.inputs.mask_files)} masks"
            )
        images, masks = [], []
        for image_path, mask_path in zip(self.inputs.in_files, self.inputs.mask_files, strict=True):
            img = load_image(image_path)
            masks.append(_load_mask(mask_path, img))
            images.append(np.asanyarray(img.dataobj, dtype=np.float64))
        subjects = list(self.inputs.subject_ids) or [
            os.path.basename(p).split(".nii")[0] for p in self.inputs.in_files
        ]
        standard: NyulStandard = fit_nyul(
            images,
            masks,
            percentiles=self.inputs.percentiles,
            output_range=self.inputs.output_range,
            subjects=subjects,
        )
        out_file = os.path.join(runtime.cwd, self.inputs.out_name)
        standard.save(out_file)
        self._results["out_file"] = out_file
        self._results["step"] = step_record(
            "nyul_fit", json.loads(json.dumps(standard.to_dict())), ["numpy"]
        )
        return runtime

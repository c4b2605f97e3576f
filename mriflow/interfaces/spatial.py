"""Nipype interfaces of the spatial steps (thin wrappers of :mod:`mriflow.image.spatial`)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    traits,
)

from mriflow.image.io import load_input_image
from mriflow.image.spatial import reorient_to_ras, resample_to_voxel_size
from mriflow.interfaces.base import MriflowInterface, step_record


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="anatomical image")
    voxel_size = traits.Float(1.0, usedefault=True, desc="isotropic output voxel size (mm)")
    interpolation = traits.Enum(
        "linear", "bspline", "nearest", usedefault=True, desc="nearest for label maps and masks"
    )
    reorient = traits.Bool(True, usedefault=True, desc="reorient to RAS+ first")


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="RAS, isotropic image")
    step = traits.Dict(desc="step record for the sidecar")


class Conform(MriflowInterface):
    """Reorient to RAS+ and resample to isotropic voxels."""

    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_interface(self, runtime):
        # the first step on the raw image: refuses unusable inputs, zeroes NaN voxels
        img, input_report = load_input_image(self.inputs.in_file)
        before_zooms = [round(float(z), 4) for z in img.header.get_zooms()[:3]]
        before_axcodes = "".join(nib.aff2axcodes(img.affine))
        before_shape = [int(n) for n in img.shape[:3]]
        if self.inputs.reorient:
            img = reorient_to_ras(img)
        out = resample_to_voxel_size(img, self.inputs.voxel_size, self.inputs.interpolation)
        out_file = os.path.join(runtime.cwd, "conformed.nii")
        nib.save(out, out_file)
        self._results["out_file"] = out_file
        self._results["step"] = step_record(
            "conform",
            {
                "reorient": "RAS" if self.inputs.reorient else "none",
                "voxel_size_mm": self.inputs.voxel_size,
                "interpolation": self.inputs.interpolation,
                "input_orientation": before_axcodes,
                "input_voxel_size_mm": before_zooms,
                "input_shape": before_shape,
                "output_shape": list(map(int, out.shape[:3])),
                "output_voxel_size_mm": [
                    round(float(z), 4) for z in np.sqrt((out.affine[:3, :3] ** 2).sum(0))
                ],
            },
            ["nibabel", "scipy"],
            input_report=input_report,
        )
        return runtime

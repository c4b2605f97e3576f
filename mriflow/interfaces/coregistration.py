"""Thin Nipype interfaces of :mod:`mriflow.image.coregistration` (within-session alignment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, TraitedSpec, traits

from mriflow.bids.paths import work_filename
from mriflow.image.io import load_image
from mriflow.interfaces.anatomical import _save, _stem
from mriflow.interfaces.base import MriflowInterface, step_record

__all__ = ["Coregister", "MaskOnMovingGrid"]


class _CoregisterInputSpec(BaseInterfaceInputSpec):
    moving_file = File(exists=True, mandatory=True, desc="bias-corrected contrast, own grid")
    fixed_file = File(exists=True, mandatory=True, desc="reference T1w brain (bias-corrected)")
    fixed_mask_file = File(exists=True, mandatory=True, desc="reference brain mask")
    transform = traits.Enum("rigid", "affine", usedefault=True)
    initialisation = traits.Enum("auto", "header", "moments", usedefault=True)
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")
    step_name = traits.Str("coregistration", usedefault=True, desc="name in the sidecar chain")


class _CoregisterOutputSpec(TraitedSpec):
    transform_file = File(exists=True, desc="ITK text affine (reference -> contrast points)")
    metric = traits.Float(desc="final Mattes MI of the kept start (lower is better)")
    step = traits.Dict(desc="step record for the sidecar")


class Coregister(MriflowInterface):
    """Align a contrast to its session's reference T1w.

    See :func:`mriflow.image.coregistration.coregister`.
    """

    input_spec = _CoregisterInputSpec
    output_spec = _CoregisterOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.coregistration import (
            coregister,
            method_parameters,
            write_itk_affine,
        )

        inputs = self.inputs
        stem = _stem(inputs.moving_file)
        result = coregister(
            load_image(inputs.moving_file),
            load_image(inputs.fixed_file),
            load_image(inputs.fixed_mask_file),
            transform=inputs.transform,
            initialisation=inputs.initialisation,
            num_threads=inputs.num_threads,
        )
        out = Path(runtime.cwd) / work_filename(stem, suffix="xfm", extension=".txt")
        self._results["transform_file"] = str(write_itk_affine(result.fixed_to_moving, out))
        self._results["metric"] = float(result.metric)
        parameters = {
            "transform": inputs.transform,
            **method_parameters(),
            "initialisation": inputs.initialisation,
            "kept_start": result.initialisation,
            # each start's metric after the coarsest level; the better one was refined
            "start_metrics": {k: round(float(v), 6) for k, v in result.candidates.items()},
            "final_metric": round(float(result.metric), 6),
        }
        self._results["step"] = step_record(inputs.step_name, parameters, ["SimpleITK"])
        return runtime


class _MaskOnMovingGridInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="mask on the reference grid")
    moving_file = File(exists=True, mandatory=True, desc="image whose grid the mask goes to")
    transform_file = File(exists=True, mandatory=True, desc="Coregister's transform")
    dilation_mm = traits.Float(0.0, usedefault=True)
    allow_empty = traits.Bool(False, usedefault=True, desc="an empty result is not an error")


class _MaskOnMovingGridOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="uint8 mask on the moving image's grid")


class MaskOnMovingGrid(MriflowInterface):
    """The reference's mask on a contrast's own grid (N4's fit mask there, the face to remove)."""

    input_spec = _MaskOnMovingGridInputSpec
    output_spec = _MaskOnMovingGridOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.coregistration import mask_on_moving_grid, read_itk_affine

        inputs = self.inputs
        mask = mask_on_moving_grid(
            load_image(inputs.mask_file),
            load_image(inputs.moving_file),
            read_itk_affine(inputs.transform_file),
            dilation_mm=inputs.dilation_mm,
        )
        if not inputs.allow_empty and not np.any(np.asarray(mask.dataobj)):
            raise ValueError(
                f"{inputs.moving_file}: the reference brain mask falls outside this image "
                "after co-registration (wrong image, or registration failed)"
            )
        self._results["out_file"] = _save(mask, runtime.cwd, inputs.moving_file, "refmask")
        return runtime

"""Thin Nipype interface around :func:`mriflow.image.deface.deface`."""

from __future__ import annotations

import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.image.io import load_image
from mriflow.interfaces.anatomical import _save
from mriflow.interfaces.base import MriflowInterface, step_record

__all__ = ["ApplyFaceMask", "Deface"]


class _DefaceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D head image to deface")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    margin_mm = traits.Float(5.0, usedefault=True, desc="distance kept around the brain mask")
    ear_depth_mm = traits.Float(45.0, usedefault=True, desc="shave reach behind the centroid")
    shave = traits.Bool(True, usedefault=True, desc="shave below the brain (ears, face)")
    template_to_subject = InputMultiObject(
        File(exists=True), desc="kept template -> subject transform (adds a template face mask)"
    )
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads (template face mask)")


class _DefaceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="defaced head (input's data type and scaling)")
    face_mask = File(exists=True, desc="uint8 mask of the removed voxels")
    metadata = traits.Dict(desc="sidecar fields: Defaced, DefacingMethod")
    step = traits.Dict(desc="step record for the sidecar")


class Deface(MriflowInterface):
    """Remove face and ears outside the brain mask plus a margin (never a brain voxel)."""

    input_spec = _DefaceInputSpec
    output_spec = _DefaceOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.deface import deface

        inputs = self.inputs
        head = load_image(inputs.in_file)
        mask = load_image(inputs.mask_file)
        transforms = (
            list(inputs.template_to_subject) if isdefined(inputs.template_to_subject) else None
        )
        result = deface(
            head,
            mask,
            margin_mm=inputs.margin_mm,
            ear_depth_mm=inputs.ear_depth_mm,
            shave=inputs.shave,
            template_to_subject=transforms,
            num_threads=inputs.num_threads,
        )
        self._results["out_file"] = _save(result.defaced, runtime.cwd, inputs.in_file, "defaced")
        self._results["face_mask"] = _save(
            result.face_mask, runtime.cwd, inputs.in_file, "facemask"
        )
        self._results["metadata"] = {"Defaced": True, "DefacingMethod": result.description}
        parameters = {
            "margin_mm": inputs.margin_mm,
            "ear_depth_mm": inputs.ear_depth_mm,
            "shave": inputs.shave,
            "template_face_mask": bool(transforms),
            "removed_voxels": int(np.count_nonzero(np.asarray(result.face_mask.dataobj))),
        }
        self._results["step"] = step_record("deface", parameters, ["scipy"])
        return runtime


class _ApplyFaceMaskInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="head image")
    face_mask = File(exists=True, mandatory=True, desc="voxels to remove, on the same grid")


class _ApplyFaceMaskOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the head with those voxels set to 0")
    step = traits.Dict(desc="step record for the sidecar")


class ApplyFaceMask(MriflowInterface):
    """Remove the reference T1w's face from another contrast of the session (the face
    mask brought onto that contrast's grid), before anything is resampled from it."""

    input_spec = _ApplyFaceMaskInputSpec
    output_spec = _ApplyFaceMaskOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.deface import apply_face_mask

        head = load_image(self.inputs.in_file)
        remove = np.asarray(load_image(self.inputs.face_mask).dataobj) > 0
        self._results["out_file"] = _save(
            apply_face_mask(head, remove), runtime.cwd, self.inputs.in_file, "defaced"
        )
        parameters = {
            "face_mask": "the reference T1w's, co-registered",
            "removed_voxels": int(remove.sum()),
        }
        self._results["step"] = step_record("deface", parameters, ["nibabel"])
        return runtime

"""Nipype interfaces of the ML export (thin wrappers of :mod:`mriflow.image.spatial`,
:mod:`mriflow.ml.slices` and :mod:`mriflow.ml.channel_stack`)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.outputs import slices_stem
from mriflow.bids.paths import STAGING_DIRNAME, parse_entities
from mriflow.image.io import load_image
from mriflow.image.spatial import fit_masked_to_shape
from mriflow.interfaces.base import MriflowInterface, step_record
from mriflow.ml.channel_stack import stack_channels
from mriflow.ml.slices import export_slices


class _ModelReadyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image (normally MNI space, normalized)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    dseg_file = File(exists=True, desc="tissue labels on the same grid")
    target_shape = traits.List(traits.Int, [160, 192, 160], usedefault=True, minlen=3, maxlen=3)
    margin_mm = traits.Float(10.0, usedefault=True)
    fit = traits.Enum("crop_or_pad", "resize", usedefault=True)


class _ModelReadyOutputSpec(TraitedSpec):
    out_file = File(exists=True)
    out_mask = File(exists=True)
    out_dseg = File()
    step = traits.Dict()


class ModelReady(MriflowInterface):
    """Crop to the brain box and fit a fixed shape; mask and labels on the same grid."""

    input_spec = _ModelReadyInputSpec
    output_spec = _ModelReadyOutputSpec

    def _run_interface(self, runtime):
        dseg = load_image(self.inputs.dseg_file) if isdefined(self.inputs.dseg_file) else None
        image, mask, dseg = fit_masked_to_shape(
            load_image(self.inputs.in_file),
            load_image(self.inputs.mask_file),
            self.inputs.target_shape,
            dseg=dseg,
            margin_mm=self.inputs.margin_mm,
            mode=self.inputs.fit,
        )
        fitted = {"out_file": image, "out_mask": mask}
        if dseg is not None:
            fitted["out_dseg"] = dseg
        for key, image in fitted.items():
            out_path = os.path.join(runtime.cwd, f"{key}.nii")
            nib.save(image, out_path)
            self._results[key] = out_path
        self._results["step"] = step_record(
            "model_ready",
            {
                "target_shape": list(self.inputs.target_shape),
                "crop_margin_mm": self.inputs.margin_mm,
                "fit": self.inputs.fit,
            },
            ["nibabel"],
        )
        return runtime


class _ExportSlicesInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True)
    dseg_file = File(exists=True)
    source_file = traits.Str(mandatory=True, desc="raw BIDS file (for the name entities)")
    entities = traits.Dict(traits.Str, traits.Str, desc="entities of the sliced volume")
    space = traits.Str(mandatory=True, desc="space of the volume (said in the index)")
    axes = traits.List(traits.Enum("axial", "coronal", "sagittal"), ["axial"], usedefault=True)
    min_brain_fraction = traits.Float(0.05, usedefault=True)
    fmt = traits.Enum("stack", "png", "npy", usedefault=True)
    png_bit_depth = traits.Enum(16, 8, usedefault=True)
    channel_files = traits.List(File(exists=True), desc="other contrasts on the same grid")
    channel_names = traits.List(traits.Str, desc="their channel names, in the same order")


class _ExportSlicesOutputSpec(TraitedSpec):
    index_file = File(exists=True)
    staged = traits.List(File(exists=True), desc="every staged file (slices, index, JSON)")
    step = traits.Dict()


class ExportSlices(MriflowInterface):
    """2D slices with a CSV index, staged for publishing under ``sub-XX/[ses-YY/]slices/``."""

    input_spec = _ExportSlicesInputSpec
    output_spec = _ExportSlicesOutputSpec

    def _run_interface(self, runtime):
        entities, suffix, _ = parse_entities(self.inputs.source_file)
        entities.update(self.inputs.entities or {})
        folder, stem = slices_stem(entities)
        out_dir = Path(runtime.cwd) / STAGING_DIRNAME / folder
        mask = load_image(self.inputs.mask_file) if isdefined(self.inputs.mask_file) else None
        dseg = load_image(self.inputs.dseg_file) if isdefined(self.inputs.dseg_file) else None
        files = self.inputs.channel_files if isdefined(self.inputs.channel_files) else []
        names = self.inputs.channel_names if isdefined(self.inputs.channel_names) else []
        if len(files) != len(names):
            raise ValueError(f"{len(files)} channel files for {len(names)} channel names")
        export = export_slices(
            load_image(self.inputs.in_file),
            out_dir,
            stem,
            subject=entities["subject"],
            session=entities.get("session"),
            space=self.inputs.space,
            mask=mask,
            dseg=dseg,
            axes=self.inputs.axes,
            min_brain_fraction=self.inputs.min_brain_fraction,
            fmt=self.inputs.fmt,
            png_bit_depth=self.inputs.png_bit_depth,
            suffix=suffix,
            channels={name: load_image(path) for name, path in zip(names, files, strict=True)},
        )
        self._results["index_file"] = str(export.index_file)
        self._results["staged"] = [
            str(p) for p in (export.index_file, export.json_file, *export.files)
        ]
        self._results["step"] = step_record(
            "slices",
            {
                "axes": list(self.inputs.axes),
                "min_brain_fraction": self.inputs.min_brain_fraction,
                "format": self.inputs.fmt,
                "space": self.inputs.space,
                "n_slices": len(export.rows),
                "channels": [suffix, *names],
            },
            ["Pillow"] if self.inputs.fmt == "png" else ["numpy"],
        )
        return runtime


class _StackChannelsInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(
        File(exists=True), mandatory=True, minlen=1, desc="model-ready volumes, in channel order"
    )
    channel_names = traits.List(traits.Str, mandatory=True, desc="their channel names")


class _StackChannelsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="(X, Y, Z, C) volume")
    out_metadata = traits.Dict(desc="sidecar fields: Channels")
    step = traits.Dict()


class StackChannels(MriflowInterface):
    """A session's model-ready channels as one 4D volume, channels last."""

    input_spec = _StackChannelsInputSpec
    output_spec = _StackChannelsOutputSpec

    def _run_interface(self, runtime):
        files, names = list(self.inputs.in_files), list(self.inputs.channel_names)
        if len(files) != len(names):
            raise ValueError(f"{len(files)} volumes for {len(names)} channel names")
        stacked = stack_channels([load_image(path) for path in files], names)
        out_path = os.path.join(runtime.cwd, "stack.nii")
        nib.save(stacked, out_path)
        self._results["out_file"] = out_path
        self._results["out_metadata"] = {"Channels": names}
        self._results["step"] = step_record(
            "stack_channels", {"channels": names, "channel_axis": 3}, ["nibabel"]
        )
        return runtime

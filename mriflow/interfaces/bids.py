"""Nipype interfaces that write BIDS derivatives: stage per output, publish per subject.

A subject's outputs are first staged inside the work directory by
:class:`DerivativesDataSink` nodes and copied to the output folder by one
:class:`PublishDerivatives` node that runs only after every step of the subject
succeeded, so a failed subject leaves nothing half-written in the output folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.derivatives import (
    STAGING_DIRNAME,
    atomic_copy,
    atomic_write_json,
    bids_uri,
    build_path,
    parse_entities,
    staged_relpath,
)

_NIFTI = (".nii", ".nii.gz")


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the file to write as a derivative")
    source_file = traits.Str(mandatory=True, desc="raw BIDS file the output derives from")
    raw_relpath = traits.Str(mandatory=True, desc="source_file relative to the raw dataset")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix (T1w, mask, dseg, probseg, xfm)")
    extension = traits.Str(desc="output extension; default: .nii.gz for NIfTI, else in_file's")
    datatype = traits.Str("anat", usedefault=True)
    entities = traits.Dict(
        traits.Str, traits.Str, desc="entities to set (desc, space, label, from, to, mode)"
    )
    derived_from = traits.List(
        traits.Str, desc="other derivatives (relative paths) this output derives from"
    )
    metadata = traits.Dict(desc="extra sidecar fields (SkullStripped, Type, ...)")
    extra_metadata = traits.Dict(desc="sidecar fields known only at run time (override)")
    steps = traits.List(traits.Dict, desc="step records of the chain, in order")
    step_names = traits.List(traits.Str, desc="which of ``steps`` made this output (default all)")
    data_dtype = traits.Str(desc="cast NIfTI voxels to this dtype (e.g. uint8 for masks)")


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the staged derivative")
    out_meta = File(exists=True, desc="its staged JSON sidecar")
    staged = traits.List(File(exists=True), desc="both staged files")


class DerivativesDataSink(SimpleInterface):
    """Name an output by BIDS entities and stage it, with its sidecar, for publishing."""

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        source_entities, _, _ = parse_entities(self.inputs.source_file)
        entities = {**source_entities, **(self.inputs.entities or {})}
        in_file = self.inputs.in_file
        if isdefined(self.inputs.extension):
            extension = self.inputs.extension
        else:
            # NIfTI derivatives are always published compressed (work files are not)
            extension = ".nii.gz" if in_file.endswith(_NIFTI) else Path(in_file).suffix
        relpath = build_path(
            entities,
            suffix=self.inputs.suffix,
            extension=extension,
            datatype=self.inputs.datatype or None,
        )
        staged = Path(runtime.cwd) / STAGING_DIRNAME / relpath
        if staged.parent.exists():
            shutil.rmtree(staged.parent)
        staged.parent.mkdir(parents=True)
        if extension in _NIFTI:
            self._write_nifti(in_file, staged)
        else:
            shutil.copyfile(in_file, staged)

        sources = [bids_uri(self.inputs.raw_relpath, "raw")]
        if isdefined(self.inputs.derived_from):
            sources += [bids_uri(p, "") for p in self.inputs.derived_from]
        sidecar = {"Sources": sources}
        for metadata in (self.inputs.metadata, self.inputs.extra_metadata):
            if isdefined(metadata):
                sidecar.update(metadata)
        if isdefined(self.inputs.steps):
            wanted = self.inputs.step_names if isdefined(self.inputs.step_names) else None
            sidecar["Steps"] = [
                step for step in self.inputs.steps if wanted is None or step["Name"] in wanted
            ]
        meta = staged.with_name(staged.name[: -len(extension)] + ".json")
        atomic_write_json(meta, sidecar)
        self._results["out_file"] = str(staged)
        self._results["out_meta"] = str(meta)
        self._results["staged"] = [str(staged), str(meta)]
        return runtime

    def _write_nifti(self, in_file: str, out_path: Path) -> None:
        img = nib.load(in_file)
        data = np.asanyarray(img.dataobj)
        if isdefined(self.inputs.data_dtype):
            data = data.astype(self.inputs.data_dtype)
        out = nib.Nifti1Image(data, img.affine, img.header)
        out.set_data_dtype(data.dtype)
        # sMRIPrep-style header hygiene: both forms, scanner-anatomical code
        out.set_qform(img.affine, code=1)
        out.set_sform(img.affine, code=1)
        out.header.set_xyzt_units("mm", "sec")
        nib.save(out, str(out_path))


class _PublishInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(File(exists=True), mandatory=True, desc="staged derivatives")
    out_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")


class _PublishOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="published files")


class PublishDerivatives(SimpleInterface):
    """Copy a subject's staged derivatives into the output dataset, each file atomically.

    A file already in place with identical content is left untouched, so a rerun
    does not rewrite outputs whose inputs and config did not change.
    """

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec

    def _run_interface(self, runtime):
        out_dir = Path(self.inputs.out_dir)
        published = []
        for staged in _flatten(self.inputs.in_files):
            target = out_dir / staged_relpath(staged)
            atomic_copy(staged, target)  # leaves identical files untouched
            published.append(str(target))
        self._results["out_files"] = published
        return runtime


def _flatten(items) -> list[str]:
    flat: list[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            flat.append(os.fspath(item))
    return flat

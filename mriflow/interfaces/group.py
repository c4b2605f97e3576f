"""Nipype interfaces of the group level: splits, Nyúl apply, manifest, group QC.

Each writes dataset-level files into OUT_DIR atomically (names from
:mod:`mriflow.bids.outputs`); the Nyúl fit itself is
:class:`mriflow.interfaces.intensity.FitNyul`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.outputs import GROUP_OUTPUTS, NYUL_SPEC
from mriflow.bids.paths import (
    atomic_copy,
    atomic_write,
    atomic_write_json,
    bids_uri,
    sidecar_path,
)
from mriflow.interfaces.base import MriflowInterface, step_record

__all__ = [
    "ApplyNyulStandard",
    "GroupReport",
    "MakeSplits",
    "PublishGroupFile",
    "SelectSubjects",
    "WriteManifest",
]


log = logging.getLogger("mriflow")


class _PublishGroupFileInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    output = traits.Enum(*GROUP_OUTPUTS, mandatory=True, desc="which dataset-level file it is")


class _PublishGroupFileOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class PublishGroupFile(MriflowInterface):
    """Copy a dataset-level file (e.g. the fitted Nyúl standard) to its place in OUT_DIR."""

    input_spec = _PublishGroupFileInputSpec
    output_spec = _PublishGroupFileOutputSpec

    def _run_interface(self, runtime):
        target = Path(self.inputs.out_dir) / GROUP_OUTPUTS[self.inputs.output]
        self._results["out_file"] = str(atomic_copy(self.inputs.in_file, target))
        return runtime


class _MakeSplitsInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    subjects = traits.List(traits.Str, mandatory=True, desc="participant ids (sub-XX)")
    participants_tsv = File(exists=True, desc="the raw dataset's participants.tsv")
    fractions = traits.List(traits.Float, mandatory=True)
    n_folds = traits.Int(0, usedefault=True)
    seed = traits.Int(mandatory=True)
    stratify_by = traits.Str("", usedefault=True)
    group_by = traits.Str("", usedefault=True)
    stratify_bins = traits.Int(mandatory=True)


class _MakeSplitsOutputSpec(TraitedSpec):
    splits_file = File(exists=True, desc="splits.tsv")
    train = traits.List(traits.Str, desc="training participants (all when no split is 'train')")
    counts = traits.Dict(desc="participants per split")


class MakeSplits(MriflowInterface):
    """Subject-level train/validation/test splits (``splits.tsv`` and ``splits.json``)."""

    input_spec = _MakeSplitsInputSpec
    output_spec = _MakeSplitsOutputSpec

    def _run_interface(self, runtime):
        from mriflow.ml.splits import read_participants, split_participants, write_splits

        inputs = self.inputs
        participants = None
        if isdefined(inputs.participants_tsv):
            participants = read_participants(inputs.participants_tsv)
        splits = split_participants(
            list(inputs.subjects),
            participants,
            fractions=list(inputs.fractions),
            n_folds=inputs.n_folds,
            seed=inputs.seed,
            stratify_by=inputs.stratify_by,
            group_by=inputs.group_by,
            stratify_bins=inputs.stratify_bins,
        )
        out_dir = Path(inputs.out_dir)
        tsv, _ = write_splits(
            splits, out_dir / GROUP_OUTPUTS["splits"], out_dir / GROUP_OUTPUTS["splits_json"]
        )
        # Fitting on every image would leak the validation and test histograms
        # into the training data; with no training split, all subjects train.
        train = [s for s in inputs.subjects if splits.split.get(s) == "train"]
        self._results["splits_file"] = str(tsv)
        self._results["train"] = train or list(inputs.subjects)
        self._results["counts"] = dict(splits.counts())
        return runtime


class _SelectSubjectsInputSpec(BaseInterfaceInputSpec):
    subjects = traits.List(traits.Str, mandatory=True, desc="participant id of each item")
    in_files = traits.List(File(exists=True), mandatory=True)
    mask_files = traits.List(File(exists=True), mandatory=True)
    keep = traits.List(traits.Str, mandatory=True, desc="participant ids to keep")


class _SelectSubjectsOutputSpec(TraitedSpec):
    in_files = traits.List(File(exists=True))
    mask_files = traits.List(File(exists=True))
    names = traits.List(traits.Str, desc="file names of the kept images")


class SelectSubjects(MriflowInterface):
    """The image/mask pairs of the participants in ``keep`` (e.g. the training split)."""

    input_spec = _SelectSubjectsInputSpec
    output_spec = _SelectSubjectsOutputSpec

    def _run_interface(self, runtime):
        keep = set(self.inputs.keep)
        rows = [
            row
            for row in zip(
                self.inputs.subjects, self.inputs.in_files, self.inputs.mask_files, strict=True
            )
            if row[0] in keep
        ]
        if not rows:
            raise ValueError(
                f"no image of the participants {sorted(keep)} to fit the Nyúl standard"
            )
        self._results["in_files"] = [r[1] for r in rows]
        self._results["mask_files"] = [r[2] for r in rows]
        self._results["names"] = [Path(r[1]).name for r in rows]
        return runtime


class _ApplyNyulInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    in_file = File(exists=True, mandatory=True, desc="native desc-preproc T1w")
    mask_file = File(exists=True, mandatory=True, desc="its brain mask")
    standard_file = File(exists=True, mandatory=True, desc="the fitted Nyúl standard")
    relpath = traits.Str(mandatory=True, desc="where the output goes, relative to out_dir")
    sources = traits.List(traits.Str, mandatory=True, desc="in_file and mask_file, relative")


class _ApplyNyulOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the published standardized image")


class ApplyNyulStandard(MriflowInterface):
    """Map one image onto the Nyúl standard scale and publish it with its sidecar."""

    input_spec = _ApplyNyulInputSpec
    output_spec = _ApplyNyulOutputSpec

    def _run_interface(self, runtime):
        from mriflow.image.intensity import NyulStandard, apply_nyul

        out_dir = Path(self.inputs.out_dir)
        standard = NyulStandard.load(self.inputs.standard_file)
        img = nib.load(self.inputs.in_file)
        data = np.asanyarray(img.dataobj, dtype=np.float64)
        mask = np.asanyarray(nib.load(self.inputs.mask_file).dataobj, dtype=np.float64) > 0
        out = apply_nyul(data, mask, standard).astype(np.float32)
        result = nib.Nifti1Image(out, img.affine, img.header)
        result.set_data_dtype(np.float32)
        target = out_dir / self.inputs.relpath
        atomic_write(target, lambda tmp: nib.save(result, str(tmp)))
        standard_name = GROUP_OUTPUTS["nyul_standard"]
        step = step_record("nyul", {**standard.to_dict(), "StandardFile": standard_name})
        atomic_write_json(
            out_dir / sidecar_path(self.inputs.relpath),
            {
                "Sources": [bids_uri(r, "") for r in self.inputs.sources]
                + [bids_uri(standard_name, "")],
                **NYUL_SPEC.metadata,
                "Steps": [step],
            },
        )
        self._results["out_file"] = str(target)
        return runtime


class _WriteManifestInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    entries = traits.List(traits.Dict, mandatory=True, desc="model-ready files per row")
    splits_file = File(exists=True, mandatory=True)
    seed = traits.Int(mandatory=True)
    space = traits.Str(mandatory=True)
    channels = traits.List(traits.Str, desc="channels besides the reference (default: common)")
    channel_layout = traits.Enum(
        "files", "stacked", usedefault=True, desc="image_<channel> columns, or 4D stacks in image"
    )


class _WriteManifestOutputSpec(TraitedSpec):
    manifest = traits.Str(desc="dataset.csv ('' when no model-ready volume exists)")
    slices_manifest = traits.Str(desc="dataset_slices.csv ('' without slices)")
    n_rows = traits.Int()


class WriteManifest(MriflowInterface):
    """``dataset.csv``/``.json`` (one row per model-ready volume) and the slices manifest."""

    input_spec = _WriteManifestInputSpec
    output_spec = _WriteManifestOutputSpec

    def _run_interface(self, runtime):
        from mriflow.ml.manifest import (
            ManifestEntry,
            build_manifest,
            select_rows,
            write_manifest,
            write_slices_manifest,
        )
        from mriflow.ml.splits import read_splits

        out_dir = Path(self.inputs.out_dir)
        self._results.update(manifest="", slices_manifest="", n_rows=0)
        entries = [ManifestEntry(**entry) for entry in self.inputs.entries]
        if not entries:
            return runtime
        wanted = self.inputs.channels if isdefined(self.inputs.channels) else []
        selection = select_rows(entries, wanted, self.inputs.channel_layout)
        for note in selection.notes:
            log.warning("multi-channel manifest: %s", note)
        kept = selection.entries
        left_out = {e.participant_id for e in entries} - {e.participant_id for e in kept}
        rows = build_manifest(
            kept, read_splits(self.inputs.splits_file), out_dir, left_out=sorted(left_out)
        )
        csv_path, _ = write_manifest(
            rows,
            out_dir,
            csv_name=GROUP_OUTPUTS["manifest"],
            json_name=GROUP_OUTPUTS["manifest_json"],
            metadata={
                "seed": self.inputs.seed,
                "space": self.inputs.space,
                "Channels": selection.columns,
                # only when image is a stack: a default run's dataset.json is unchanged
                **({"ChannelLayout": "stacked"} if selection.stacked else {}),
            },
            descriptions=selection.descriptions,
        )
        self._results["manifest"] = str(csv_path)
        self._results["n_rows"] = len(rows)
        if any(e.slices for e in entries):
            slices = write_slices_manifest(rows, out_dir, csv_name=GROUP_OUTPUTS["slices_manifest"])
            self._results["slices_manifest"] = str(slices)
        return runtime


class _GroupReportInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    subjects = traits.List(traits.Str, mandatory=True, desc="participant ids in the report")
    n_rows = traits.Int(desc="manifest rows (connected so the report comes last)")
    nyul_files = traits.List(traits.Str, desc="Nyúl outputs (connected so the report comes last)")


class _GroupReportOutputSpec(TraitedSpec):
    out_report = File(exists=True)


class GroupReport(MriflowInterface):
    """``group.html`` and the group IQM table of the given subjects."""

    input_spec = _GroupReportInputSpec
    output_spec = _GroupReportOutputSpec

    def _run_interface(self, runtime):
        from mriflow.reports import write_group_report

        report = write_group_report(self.inputs.out_dir, subjects=list(self.inputs.subjects))
        self._results["out_report"] = str(report)
        return runtime

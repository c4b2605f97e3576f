"""The one Nipype node that publishes a subject: stage, report, rename into place, record.

:class:`PublishSubject` runs after every step of the subject succeeded (it takes
all their outputs), so a failed subject publishes nothing. It writes each output
under its BIDS name (from a plan made by the workflow out of
:mod:`mriflow.bids.outputs`) into a staging folder inside OUT_DIR, assembles the QC
report there (the IQMs and figures the graph's QC nodes already made from the same
files, :mod:`mriflow.interfaces.reports`; whatever they did not, from the staged
files), and moves the subject into place following the protocol of
:mod:`mriflow.bids.publish`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    DynamicTraitedSpec,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.derivatives import derivative_sidecar, prewrite_derivatives, write_derivative
from mriflow.bids.paths import atomic_copy, atomic_write_json, sidecar_path, staged_relpath
from mriflow.bids.publish import begin_subject, carry_over, commit_subject
from mriflow.interfaces.base import DynamicInputsInterface

log = logging.getLogger("mriflow")

__all__ = ["PrewriteDerivatives", "PublishSubject"]


class _PrewriteDerivativesInputSpec(DynamicTraitedSpec, BaseInterfaceInputSpec):
    plan = traits.List(
        traits.Dict, mandatory=True, desc="publishing plan items (field, relpath, data_dtype)"
    )


class _PrewriteDerivativesOutputSpec(TraitedSpec):
    written = traits.Dict(traits.Str, traits.Str, desc="plan field -> written derivative")


class PrewriteDerivatives(DynamicInputsInterface):
    """Write some of a subject's derivatives ahead of :class:`PublishSubject`, in the work dir.

    Parameters
    ----------
    fields : list of str
        The plan fields the workflow connects (their work files).
    """

    input_spec = _PrewriteDerivativesInputSpec
    output_spec = _PrewriteDerivativesOutputSpec

    def _run_interface(self, runtime):
        files = {name: getattr(self.inputs, name) for name in self._fields}
        self._results["written"] = prewrite_derivatives(self.inputs.plan, files, runtime.cwd)
        return runtime


class _PublishSubjectInputSpec(DynamicTraitedSpec, BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="root of the derivatives dataset")
    subject = traits.Str(mandatory=True, desc="subject label without 'sub-'")
    run_id = traits.Str(mandatory=True, desc="this run (names the staging folder and record)")
    plan = traits.List(
        traits.Dict,
        mandatory=True,
        desc="one dict per derivative: field, relpath, raw_relpath, metadata, step_names, "
        "derived_from, data_dtype, steps_field, metadata_field",
    )
    staged_fields = traits.List(
        traits.Str, desc="fields holding files a step already staged under its BIDS path"
    )
    bias_fields = traits.Dict(
        traits.Str, traits.Str, desc="raw image (relative path) -> field of its N4 bias field"
    )
    report = traits.Bool(True, usedefault=True, desc="write the QC report from the staged files")
    qc_fields = traits.List(
        traits.Str,
        desc="fields holding records of the graph's QC nodes (ImageQC): the IQMs and "
        "figures they hold are not measured and drawn again",
    )
    prewritten = traits.Dict(
        traits.Str,
        traits.Str,
        desc="plan field -> the derivative PrewriteDerivatives already wrote (copied as is)",
    )


class _PublishSubjectOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="published derivatives (absolute paths)")
    out_report = traits.Str(desc="the subject's HTML report")


class PublishSubject(DynamicInputsInterface):
    """Publish one subject's outputs and its QC report into OUT_DIR, atomically.

    Parameters
    ----------
    fields : list of str
        Names of the dynamic inputs the workflow connects (outputs of every image's
        chain: derivatives, step records, run-time metadata, bias fields).
    """

    input_spec = _PublishSubjectInputSpec
    output_spec = _PublishSubjectOutputSpec

    def _field(self, name: str):
        value = getattr(self.inputs, name)
        return value if isdefined(value) else None

    def _run_interface(self, runtime):
        out_dir = Path(self.inputs.out_dir)
        subject, run_id = self.inputs.subject, self.inputs.run_id
        staging = begin_subject(out_dir, subject, run_id)
        prewritten = self.inputs.prewritten if isdefined(self.inputs.prewritten) else {}
        published = []
        for item in self.inputs.plan:
            steps = self._field(item["steps_field"]) if item.get("steps_field") else None
            extra = self._field(item["metadata_field"]) if item.get("metadata_field") else None
            relpath = item["relpath"]
            if item["field"] in prewritten:
                atomic_copy(prewritten[item["field"]], staging / relpath)
            else:
                source = self._field(item["field"])
                write_derivative(source, staging / relpath, item.get("data_dtype"))
            sidecar = derivative_sidecar(
                item["raw_relpath"],
                derived_from=item.get("derived_from", ()),
                metadata=item.get("metadata"),
                extra_metadata=extra,
                steps=steps,
                step_names=item.get("step_names"),
            )
            atomic_write_json(staging / sidecar_path(relpath), sidecar)
            published += [relpath, sidecar_path(relpath)]
        for name in self.inputs.staged_fields if isdefined(self.inputs.staged_fields) else []:
            for staged in _flatten(self._field(name) or []):
                relpath = staged_relpath(staged)
                atomic_copy(staged, staging / relpath)
                published.append(relpath)
        carry_over(out_dir, subject, staging)
        report = ""
        if self.inputs.report:
            report = self._write_report(staging, subject, runtime)
        commit_subject(out_dir, subject, staging, run_id)
        self._results["out_files"] = [str(out_dir / p) for p in published]
        self._results["out_report"] = str(out_dir / report) if report else ""
        return runtime

    def _graph_qc(self, staging: Path) -> list[dict]:
        fields = self.inputs.qc_fields if isdefined(self.inputs.qc_fields) else []
        return _qc_records([f for f in map(self._field, fields) if f], staging)

    def _write_report(self, staging: Path, subject: str, runtime) -> str:
        """IQM files, figures, HTML and PROV record (from the QC nodes' records, else from
        the staged files); never fails the subject."""
        from mriflow.reports import write_subject_qc

        bias_fields = {}
        if isdefined(self.inputs.bias_fields):
            bias_fields = {
                raw: self._field(field)
                for raw, field in self.inputs.bias_fields.items()
                if self._field(field)
            }
        # the node runs in the subject's workflow folder: its siblings hold the run times
        subject_work_dir = Path(runtime.cwd).parent
        try:
            return write_subject_qc(
                staging,
                subject,
                work_dir=subject_work_dir,
                bias_fields=bias_fields,
                graph_qc=self._graph_qc(staging),
            )
        except Exception as err:  # a report must never turn a good subject into a failed one
            log.warning("sub-%s: QC report not (fully) written: %s", subject, err)
            return ""


def _qc_records(record_files: list[str], staging: Path) -> list[dict]:
    """The records of the graph's QC nodes; their figures copied into ``staging``."""
    records = []
    for record_file in record_files:
        record = json.loads(Path(record_file).read_text())
        for figure in record.get("figures") or []:
            atomic_copy(Path(record_file).parent / figure["relpath"], staging / figure["relpath"])
        records.append(record)
    return records


def _flatten(items) -> list[str]:
    flat: list[str] = []
    for item in items if isinstance(items, (list, tuple)) else [items]:
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            flat.append(os.fspath(item))
    return flat

"""The per-subject QC report as a Nipype node, so reports are made in parallel (and on
cluster nodes) right after a subject's derivatives are published."""

from __future__ import annotations

import logging

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

log = logging.getLogger("mriflow")


class _SubjectReportInputSpec(BaseInterfaceInputSpec):
    out_dir = traits.Str(mandatory=True, desc="the derivatives dataset")
    subject = traits.Str(mandatory=True, desc="subject label without 'sub-'")
    published = InputMultiObject(
        File(exists=True), desc="published files: the report reruns when their content changes"
    )
    work_dir = traits.Str(desc="Nipype work folder, for run times per step")
    template = File(exists=True, desc="template image of the standard space")
    template_mask = File(exists=True, desc="its brain mask")
    space = traits.Str("MNI152NLin2009aSym", usedefault=True)


class _SubjectReportOutputSpec(TraitedSpec):
    out_report = traits.Str(desc="the HTML report")
    out_files = traits.List(traits.Str, desc="every file written (IQMs, report, provenance)")


class SubjectReport(SimpleInterface):
    """IQMs (JSON/TSV), ``sub-XX.html`` with figures, and the subject's PROV record."""

    input_spec = _SubjectReportInputSpec
    output_spec = _SubjectReportOutputSpec

    def _run_interface(self, runtime):
        from mriflow.reports.html import write_subject_report
        from mriflow.reports.iqms import compute_subject_iqms
        from mriflow.reports.provenance import write_provenance

        templates = None
        if isdefined(self.inputs.template):
            mask = self.inputs.template_mask if isdefined(self.inputs.template_mask) else None
            templates = {self.inputs.space: (self.inputs.template, mask)}
        work_dir = self.inputs.work_dir if isdefined(self.inputs.work_dir) else None
        out_dir, subject = self.inputs.out_dir, self.inputs.subject
        files = [
            str(p) for p in compute_subject_iqms(out_dir, subject, templates=templates)
        ]
        report = write_subject_report(out_dir, subject, work_dir=work_dir, templates=templates)
        files += [str(report), str(write_provenance(out_dir, subject))]
        self._results["out_report"] = str(report)
        self._results["out_files"] = files
        return runtime

"""The graph's QC nodes: an image's IQMs and figures as soon as their inputs exist.

:class:`ImageQC` with ``part="native"`` takes the native outputs of one image
(preproc image, brain mask, tissue classes, N4 field; a co-registered contrast also
its reference T1w's) and runs beside registration; with ``part="template"`` it
takes the image in template space (and its brain mask there) and runs beside the
last resamplings. Each measures and draws what
:func:`mriflow.reports.write_subject_qc` would from the published files, so the
publishing node only assembles the HTML and PROV record.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    DynamicTraitedSpec,
    File,
    TraitedSpec,
    isdefined,
    traits,
)

from mriflow.bids.paths import bids_uri
from mriflow.interfaces.base import DynamicInputsInterface

log = logging.getLogger("mriflow")

__all__ = ["NATIVE_QC_OUTPUTS", "TEMPLATE_QC_OUTPUTS", "ImageQC"]

#: The outputs of an image's chain the native QC reads (and the run-time metadata
#: of its preproc image: ``SkullStripped``).
NATIVE_QC_OUTPUTS = (
    "preproc",
    "brain_mask",
    "dseg",
    "probseg_csf",
    "probseg_gm",
    "probseg_wm",
    "preproc_metadata",
)
#: The outputs the template-space part reads.
TEMPLATE_QC_OUTPUTS = ("std_preproc", "std_mask")


class _ImageQCInputSpec(DynamicTraitedSpec, BaseInterfaceInputSpec):
    part = traits.Enum("native", "template", usedefault=True, desc="which IQMs and figures")
    image = traits.Str(mandatory=True, desc="the measured raw image, relative to the dataset")
    reference = traits.Str(desc="raw image (relative path) of the T1w a contrast is aligned to")
    raw_files = traits.Dict(traits.Str, traits.Str, desc="raw relative path -> raw file")
    plan = traits.List(traits.Dict, mandatory=True, desc="the publishing plan's items")
    field_map = traits.Dict(
        traits.Str,
        traits.Tuple(traits.Str, traits.Str),
        desc="dynamic input -> (raw relative path, output) it holds",
    )
    bias_field = File(exists=True, desc="the image's N4 bias field")


class _ImageQCOutputSpec(TraitedSpec):
    out_record = File(desc="JSON: source, iqms, figures (relative to this node's folder)")
    out_figures = traits.List(File, desc="the figures drawn")


class ImageQC(DynamicInputsInterface):
    """Native or template-space IQMs and figures of one image from the graph's files.

    Never fails: a QC error leaves the record's ``iqms`` and ``figures`` empty and
    the publishing node measures and draws that image from the published files
    (a report must never turn a good subject into a failed one).

    Parameters
    ----------
    fields : list of str
        Names of the dynamic inputs the workflow connects (see ``inputs.field_map``).
    """

    input_spec = _ImageQCInputSpec
    output_spec = _ImageQCOutputSpec

    def _group(self, raw_relpath: str):
        from mriflow.reports import graph_image

        files, metadata = {}, {}
        for name, (raw, output) in self.inputs.field_map.items():
            value = getattr(self.inputs, name)
            if raw != raw_relpath or not isdefined(value) or not value:
                continue
            if output == "preproc_metadata":
                metadata["preproc"] = value
            else:
                files[output] = value
        raw_files = self.inputs.raw_files if isdefined(self.inputs.raw_files) else {}
        return graph_image(
            raw_relpath, raw_files.get(raw_relpath), self.inputs.plan, files, metadata
        )

    def _run_interface(self, runtime):
        from mriflow.reports import native_qc, template_qc

        out_dir = Path(runtime.cwd)
        image = self.inputs.image
        part = self.inputs.part
        record = {"source": bids_uri(image, "raw"), "part": part, "iqms": None, "figures": None}
        try:
            if part == "template":
                record = template_qc(self._group(image), out_dir)
            else:
                reference = None
                if isdefined(self.inputs.reference) and self.inputs.reference:
                    reference = self._group(self.inputs.reference)
                bias = self.inputs.bias_field if isdefined(self.inputs.bias_field) else None
                record = native_qc(
                    self._group(image), out_dir, reference=reference, bias_field=bias
                )
        except Exception as err:  # the publishing node measures from the published files
            log.warning("%s: QC in the graph failed (%s); the report measures it later", image, err)
        record_file = out_dir / f"{part}_qc.json"
        record_file.write_text(json.dumps(record, indent=1, sort_keys=True))
        self._results["out_record"] = str(record_file)
        self._results["out_figures"] = [
            str(out_dir / f["relpath"]) for f in record.get("figures") or []
        ]
        return runtime

"""Top-level workflows: one per subject, all subjects in one Nipype graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.pipeline import engine as pe

from mriflow.bids.discovery import AnatInput, SubjectInputs
from mriflow.bids.outputs import anat_derivatives, derivative_relpath
from mriflow.config import Config
from mriflow.interfaces.bids import PublishSubject
from mriflow.workflows.anatomical import init_anat_preproc_wf

__all__ = [
    "init_mriflow_wf",
    "init_single_subject_wf",
    "publish_plan",
    "subject_workflow_name",
]


def subject_workflow_name(subject: str) -> str:
    return f"sub_{subject}_wf"


def init_mriflow_wf(
    subjects: Sequence[SubjectInputs],
    *,
    config: Config,
    bids_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    run_id: str = "",
    name: str = "mriflow_wf",
) -> pe.Workflow:
    """All runnable subjects, each as an independent sub-workflow (they run in parallel)."""
    workflow = pe.Workflow(name=name, base_dir=str(work_dir))
    for subject in subjects:
        if subject.error:
            continue
        workflow.add_nodes(
            [
                init_single_subject_wf(
                    subject,
                    config=config,
                    bids_dir=bids_dir,
                    out_dir=out_dir,
                    work_dir=work_dir,
                    run_id=run_id,
                )
            ]
        )
    return workflow


def _field(image: AnatInput, output: str) -> str:
    """The publishing node's input for ``output`` of ``image``'s chain."""
    return f"{image.key}__{output}"


def publish_plan(image: AnatInput, config: Config) -> tuple[list[dict], list[str]]:
    """What the publishing node writes for ``image``: one dict per derivative, and the
    ``outputnode`` fields of its chain that the node needs."""
    specs = anat_derivatives(image.suffix, config)
    relpaths = {s.output: derivative_relpath(image.entities, image.suffix, s) for s in specs}
    plan = []
    outputs = {"steps", "bias_field"}
    for spec in specs:
        plan.append(
            {
                "field": _field(image, spec.output),
                "relpath": relpaths[spec.output],
                "raw_relpath": image.relpath,
                "metadata": dict(spec.metadata),
                "step_names": list(spec.steps),
                "derived_from": [relpaths[o] for o in spec.derived_from if o in relpaths],
                "data_dtype": spec.data_dtype,
                "steps_field": _field(image, "steps"),
                "metadata_field": _field(image, spec.dynamic_metadata)
                if spec.dynamic_metadata
                else None,
            }
        )
        outputs.add(spec.output)
        if spec.dynamic_metadata:
            outputs.add(spec.dynamic_metadata)
    if image.suffix == "T1w" and config.export.slices:
        outputs.add("slices_staged")
    return plan, sorted(outputs)


def init_single_subject_wf(
    subject: SubjectInputs,
    *,
    config: Config,
    bids_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    run_id: str = "",
    name: str | None = None,
) -> pe.Workflow:
    """Preprocess every anatomical image of one subject and publish it in one step.

    One :class:`~mriflow.interfaces.bids.PublishSubject` node takes every output of
    the subject's chains once they all exist, writes them under their BIDS names,
    draws the QC report from them (with the N4 fields and the run times of the
    subject's work folder) and moves the subject into ``out_dir`` atomically.
    """
    workflow = pe.Workflow(name=name or subject_workflow_name(subject.subject))
    wiring: list[tuple[pe.Workflow, str, str]] = []
    plan: list[dict] = []
    staged_fields: list[str] = []
    bias_fields: dict[str, str] = {}
    for image in subject.images:
        anat_wf = init_anat_preproc_wf(
            config=config, contrast=image.suffix, name=f"anat_{image.key}_wf"
        )
        anat_wf.inputs.inputnode.in_file = str(image.path)
        image_plan, outputs = publish_plan(image, config)
        plan += image_plan
        for output in outputs:
            wiring.append((anat_wf, f"outputnode.{output}", _field(image, output)))
        if "slices_staged" in outputs:
            staged_fields.append(_field(image, "slices_staged"))
        bias_fields[image.relpath] = _field(image, "bias_field")

    publish = pe.Node(
        PublishSubject(
            fields=[field for _, _, field in wiring],
            out_dir=str(Path(out_dir).resolve()),
            subject=subject.subject,
            run_id=run_id or "norun",
            plan=plan,
            staged_fields=staged_fields,
            bias_fields=bias_fields,
        ),
        name="publish",
        mem_gb=2.0,
        overwrite=True,  # cheap, and restores outputs deleted since the last run
    )
    for node, output, field in wiring:
        workflow.connect(node, output, publish, field)
    return workflow

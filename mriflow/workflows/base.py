"""Top-level workflows: one per subject, all subjects in one Nipype graph."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.bids.derivatives import build_path
from mriflow.bids.discovery import AnatInput, SubjectInputs
from mriflow.bids.outputs import DerivativeSpec, anat_derivatives
from mriflow.config import Config
from mriflow.interfaces.bids import DerivativesDataSink, PublishDerivatives
from mriflow.interfaces.reports import SubjectReport
from mriflow.workflows.anatomical import init_anat_preproc_wf

__all__ = ["init_mriflow_wf", "init_single_subject_wf", "subject_workflow_name"]


def _relpath(image: AnatInput, spec: DerivativeSpec) -> str:
    """Where ``spec``'s derivative of ``image`` is published (for ``Sources`` links)."""
    entities = {**image.entities, **spec.entities}
    extension = spec.extension or ".nii.gz"
    return build_path(entities, suffix=spec.suffix or image.suffix, extension=extension)


def subject_workflow_name(subject: str) -> str:
    return f"sub_{subject}_wf"


def init_mriflow_wf(
    subjects: Sequence[SubjectInputs],
    *,
    config: Config,
    bids_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path,
    name: str = "mriflow_wf",
) -> pe.Workflow:
    """All runnable subjects, each as an independent sub-workflow (they run in parallel)."""
    workflow = pe.Workflow(name=name, base_dir=str(work_dir))
    for subject in subjects:
        if subject.error:
            continue
        workflow.add_nodes(
            [init_single_subject_wf(subject, config=config, bids_dir=bids_dir, out_dir=out_dir)]
        )
    return workflow


def init_single_subject_wf(
    subject: SubjectInputs,
    *,
    config: Config,
    bids_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    name: str | None = None,
) -> pe.Workflow:
    """Preprocess every anatomical image of one subject and publish its derivatives.

    The subject's derivatives are staged by one sink per output and copied into
    ``out_dir`` by a single publishing node after all of them exist; the QC report
    (IQMs, HTML, provenance) is made from the published files.
    """
    workflow = pe.Workflow(name=name or subject_workflow_name(subject.subject))
    staged: list[tuple[pe.Node, str]] = []
    for image in subject.images:
        anat_wf = init_anat_preproc_wf(
            config=config, contrast=image.suffix, name=f"anat_{image.key}_wf"
        )
        anat_wf.inputs.inputnode.in_file = str(image.path)
        specs = anat_derivatives(image.suffix, config)
        relpaths = {spec.output: _relpath(image, spec) for spec in specs}
        for spec in specs:
            sink = pe.Node(
                DerivativesDataSink(
                    source_file=str(image.path),
                    raw_relpath=image.relpath,
                    suffix=spec.suffix or image.suffix,
                    entities=dict(spec.entities),
                    metadata=dict(spec.metadata),
                    step_names=list(spec.steps),
                    derived_from=[relpaths[o] for o in spec.derived_from if o in relpaths],
                ),
                name=f"ds_{image.key}_{spec.output}",
                run_without_submitting=True,
            )
            if spec.data_dtype:
                sink.inputs.data_dtype = spec.data_dtype
            if spec.extension:
                sink.inputs.extension = spec.extension
            workflow.connect([
                (anat_wf, sink, [
                    (f"outputnode.{spec.output}", "in_file"),
                    ("outputnode.steps", "steps"),
                ]),
            ])  # fmt:skip
            if spec.dynamic_metadata:
                workflow.connect(
                    anat_wf, f"outputnode.{spec.dynamic_metadata}", sink, "extra_metadata"
                )
            staged.append((sink, "staged"))
        if image.suffix == "T1w" and config.export.slices:
            staged.append((anat_wf, "outputnode.slices_staged"))

    collect = pe.Node(niu.Merge(len(staged)), name="collect_derivatives")
    for index, (node, field) in enumerate(staged, start=1):
        workflow.connect(node, field, collect, f"in{index}")
    publish = pe.Node(
        PublishDerivatives(out_dir=str(Path(out_dir).resolve())),
        name="publish",
        run_without_submitting=True,
        overwrite=True,  # cheap, and restores outputs deleted since the last run
    )
    report = pe.Node(
        SubjectReport(out_dir=str(Path(out_dir).resolve()), subject=subject.subject),
        name="report",
        mem_gb=2.0,
    )
    if work_dir is not None:
        report.inputs.work_dir = str(Path(work_dir).resolve())
    workflow.connect([
        (collect, publish, [("out", "in_files")]),
        (publish, report, [("out_files", "published")]),
    ])  # fmt:skip
    return workflow

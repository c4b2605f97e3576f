"""Top-level workflows: one per subject, all subjects in one Nipype graph."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nipype.pipeline import engine as pe

from mriflow.bids.discovery import AnatInput, SessionInputs, SubjectInputs
from mriflow.bids.outputs import (
    LONGITUDINAL_SPACE,
    anat_derivatives,
    channel_name,
    channel_names,
    derivative_relpath,
    longitudinal_derivatives,
    stack_derivative,
)
from mriflow.bids.paths import bids_uri
from mriflow.config import Config
from mriflow.execution import hash_inputs_by_mtime
from mriflow.interfaces.bids import PrewriteDerivatives, PublishSubject
from mriflow.interfaces.reports import NATIVE_QC_OUTPUTS, TEMPLATE_QC_OUTPUTS, ImageQC
from mriflow.workflows.session import (
    init_longitudinal_wf,
    init_session_wf,
    session_output_field,
    stacked_contrasts,
)

log = logging.getLogger("mriflow")

# A reference T1w's outputs that exist well before registration ends (native space): the
# publishing node's copies of them are written while it runs (PrewriteDerivatives)
_PREWRITTEN_OUTPUTS = frozenset(
    {"preproc", "brain_mask", "norm", "dseg", "probseg_csf", "probseg_gm", "probseg_wm"}
)

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


def _field(image: AnatInput, output: str, chain: str = "") -> str:
    """The publishing node's input for ``output`` of ``image``'s chain (``chain``: another
    chain of the image, e.g. ``longitudinal``)."""
    return f"{image.key}{'_' + chain if chain else ''}__{output}"


def publish_plan(
    image: AnatInput, config: Config, reference: AnatInput | None = None
) -> tuple[list[dict], list[str]]:
    """What the publishing node writes for ``image``: one dict per derivative, and the
    ``outputnode`` fields of its chain that the node needs.

    ``reference``: the session's reference T1w when ``image`` is another contrast
    aligned to it (its derivatives are then on the reference's grids).
    """
    specs = anat_derivatives(image.suffix, config, reference=reference is None)
    plan, outputs = _plan(image, specs, _spatial_reference(reference, config))
    outputs.add("bias_field")
    if config.export.slices and reference is None:  # the reference's slices hold every channel
        outputs.add("slices_staged")
    return plan, sorted(outputs)


def longitudinal_plan(image: AnatInput, base: AnatInput, config: Config) -> tuple[list, list]:
    """The publishing plan of a later session's reference T1w on the first session's grid."""
    reference = _spatial_reference(base, config)
    plan, outputs = _plan(image, longitudinal_derivatives(), reference, chain="longitudinal")
    return plan, sorted(outputs)


def _spatial_reference(reference: AnatInput | None, config: Config) -> dict[str, str]:
    if reference is None:
        return {}
    reference_spec = anat_derivatives(reference.suffix, config)[0]  # its preproc
    relpath = derivative_relpath(reference.entities, reference.suffix, reference_spec)
    return {"SpatialReference": bids_uri(relpath, dataset="")}


def _plan(
    image: AnatInput, specs: list, spatial_reference: dict[str, str], chain: str = ""
) -> tuple[list[dict], set[str]]:
    relpaths = {s.output: derivative_relpath(image.entities, image.suffix, s) for s in specs}
    plan = []
    outputs = {"steps"}
    for spec in specs:
        plan.append(
            {
                "field": _field(image, spec.output, chain),
                "output": spec.output,
                "relpath": relpaths[spec.output],
                "raw_relpath": image.relpath,
                # the reference's grid is the space of the images without a template space-
                "metadata": {
                    **spec.metadata,
                    **(
                        spatial_reference
                        if spec.entities.get("space") in (None, LONGITUDINAL_SPACE)
                        else {}
                    ),
                },
                "step_names": list(spec.steps),
                "derived_from": [relpaths[o] for o in spec.derived_from if o in relpaths],
                "data_dtype": spec.data_dtype,
                "steps_field": _field(image, "steps", chain),
                "metadata_field": _field(image, spec.dynamic_metadata)
                if spec.dynamic_metadata
                else None,
            }
        )
        outputs.add(spec.output)
        if spec.dynamic_metadata:
            outputs.add(spec.dynamic_metadata)
    return plan, outputs


def stack_plan(session: SessionInputs, stacked: list[str], config: Config) -> dict:
    """The publishing plan item of a session's 4D model-ready stack (``export.channel_layout
    = "stacked"``): named after the reference, its channels' 3D volumes in ``Sources``."""
    reference = session.reference
    spec = stack_derivative(config)
    others = {image.key: image for image in session.others}
    channels = [(reference, True), *((others[key], False) for key in stacked)]
    sources = [
        derivative_relpath(
            image.entities,
            image.suffix,
            next(
                s
                for s in anat_derivatives(image.suffix, config, reference=is_reference)
                if s.output == "model"
            ),
        )
        for image, is_reference in channels
    ]
    return {
        "field": _field(reference, spec.output),
        "relpath": derivative_relpath(reference.entities, reference.suffix, spec),
        "raw_relpath": reference.relpath,
        "metadata": dict(spec.metadata),
        "step_names": list(spec.steps),
        "derived_from": sources,
        "data_dtype": spec.data_dtype,
        "steps_field": _field(reference, "model_stack_steps"),
        "metadata_field": _field(reference, spec.dynamic_metadata),
    }


def session_channel_names(session: SessionInputs) -> dict[str, str]:
    """``image key -> channel name`` of a session's other images (:func:`channel_names`)."""
    names = channel_names(
        (session.reference.entities, session.reference.suffix),
        [(image.entities, image.suffix) for image in session.others],
    )
    return {image.key: name for image, name in zip(session.others, names, strict=True)}


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

    Each session is a :func:`~mriflow.workflows.session.init_session_wf`: its
    reference T1w, and every other image aligned to it.

    One :class:`~mriflow.interfaces.bids.PublishSubject` node takes every output of
    the subject's chains once they all exist, writes them under their BIDS names,
    assembles the QC report (from the records of the QC nodes of :func:`_qc_nodes`,
    which measure and draw each image as soon as its inputs exist, the run times of
    the subject's work folder and the N4 fields) and moves the subject into
    ``out_dir`` atomically.
    """
    workflow = pe.Workflow(name=name or subject_workflow_name(subject.subject))
    wiring: list[tuple[pe.Workflow, str, str]] = []
    plan: list[dict] = []
    staged_fields: list[str] = []
    bias_fields: dict[str, str] = {}
    qc_fields: list[str] = []
    prewritten: set[str] = set()
    session_wfs: list[tuple[SessionInputs, pe.Workflow]] = []
    for session in subject.sessions(config.coregistration.reference):
        reference = session.reference
        names = session_channel_names(session)
        stacked, missing = stacked_contrasts([i.key for i in session.others], names, config)
        session_wf = init_session_wf(
            config=config,
            contrasts={image.key: image.suffix for image in session.others},
            reference_key=reference.key,
            channel_names=names,
            reference_channel=channel_name(reference.entities, reference.suffix),
            stacked=stacked,
            name=f"{session.key}_wf",
        )
        if missing:
            label = reference.entities.get("session")
            log.warning(
                "sub-%s%s: no %s: no multi-channel stack for this session (a channel is "
                "never zero-filled or shifted; coregistration.channels = %s)",
                subject.subject, f" ses-{label}" if label else "", ", ".join(missing),
                ",".join(config.coregistration.channels),
            )  # fmt: skip
        if stacked:
            plan.append(stack_plan(session, stacked, config))
            for output in ("model_stack", "model_stack_metadata", "model_stack_steps"):
                wiring.append((session_wf, f"outputnode.{output}", _field(reference, output)))
        session_wf.inputs.inputnode.t1w = str(reference.path)
        for image in session.others:
            setattr(session_wf.inputs.inputnode, image.key, str(image.path))
        for image in (reference, *session.others):
            is_reference = image is reference
            image_plan, outputs = publish_plan(image, config, None if is_reference else reference)
            plan += image_plan
            if is_reference:
                prewritten |= {
                    item["field"] for item in image_plan if item["output"] in _PREWRITTEN_OUTPUTS
                }
            for output in outputs:
                source = output if is_reference else session_output_field(image.key, output)
                wiring.append((session_wf, f"outputnode.{source}", _field(image, output)))
            if "slices_staged" in outputs:
                staged_fields.append(_field(image, "slices_staged"))
            bias_fields[image.relpath] = _field(image, "bias_field")
        qc_fields += _qc_nodes(workflow, session, session_wf, plan, config)
        session_wfs.append((session, session_wf))
    if config.longitudinal.align and len(session_wfs) > 1:
        (base, base_wf), *later = session_wfs
        for session, session_wf in later:
            image = session.reference
            long_wf = init_longitudinal_wf(config=config, name=f"longitudinal_{session.key}_wf")
            workflow.connect([
                (base_wf, long_wf, [
                    ("outputnode.brain", "inputnode.base_brain"),
                    ("outputnode.brain_mask", "inputnode.base_mask"),
                ]),
                (session_wf, long_wf, [
                    ("outputnode.brain", "inputnode.brain"),
                    ("outputnode.preproc", "inputnode.preproc"),
                    ("outputnode.brain_mask", "inputnode.brain_mask"),
                ]),
            ])  # fmt:skip
            long_plan, outputs = longitudinal_plan(image, base.reference, config)
            plan += long_plan
            for output in outputs:
                field = _field(image, output, "longitudinal")
                wiring.append((long_wf, f"outputnode.{output}", field))

    prewrite = _prewrite_node(workflow, plan, wiring, prewritten)
    publish = pe.Node(
        PublishSubject(
            fields=[field for _, _, field in wiring],
            out_dir=str(Path(out_dir).resolve()),
            subject=subject.subject,
            run_id=run_id or "norun",
            plan=plan,
            staged_fields=staged_fields,
            bias_fields=bias_fields,
            qc_fields=qc_fields,
        ),
        name="publish",
        mem_gb=2.0,
        overwrite=True,  # cheap, and restores outputs deleted since the last run
    )
    # its inputs are most of the subject's work files (730 MB for one 1 mm T1w), and it
    # always runs: hashing their content only delayed its start
    hash_inputs_by_mtime(publish)
    for node, output, field in wiring:
        workflow.connect(node, output, publish, field)
    for field in qc_fields:
        workflow.connect(workflow.get_node(field), "out_record", publish, field)
    if prewrite is not None:
        workflow.connect(prewrite, "written", publish, "prewritten")
    return workflow


def _prewrite_node(
    workflow: pe.Workflow, plan: list[dict], wiring: list, fields: set[str]
) -> pe.Node | None:
    """The node that writes the plan items of ``fields`` ahead of publishing, if any."""
    items = [item for item in plan if item["field"] in fields]
    if not items:
        return None
    node = pe.Node(
        PrewriteDerivatives(fields=[item["field"] for item in items], plan=items),
        name="prewrite",
        mem_gb=1.0,
    )
    hash_inputs_by_mtime(node)  # it only reads them
    for source, output, field in wiring:
        if field in fields:
            workflow.connect(source, output, node, field)
    return node


def _qc_nodes(
    workflow: pe.Workflow,
    session: SessionInputs,
    session_wf: pe.Workflow,
    plan: list[dict],
    config: Config,
) -> list[str]:
    """The :class:`~mriflow.interfaces.reports.ImageQC` nodes of each image of ``session``.

    The native part takes only its image's native outputs (and its reference T1w's,
    for a contrast measured in that T1w's masks and tissues), so it runs beside
    registration; the template-space part takes the image in template space and
    runs beside the last resamplings. The publishing node, after every step, then
    only assembles the report. Several template spaces: the publishing node
    measures and draws the template-space part from the published files (which
    space's image is "the" template-space one is decided there).
    Returns the nodes' names (also the publishing node's inputs of their records).
    """
    reference = session.reference
    single_space = len(config.registration.template_spaces()) == 1
    names = []
    for image in (reference, *session.others):
        native = [image] if image is reference else [image, reference]
        parts = [("native", native, NATIVE_QC_OUTPUTS)]
        if single_space:
            parts.append(("template", [image], TEMPLATE_QC_OUTPUTS))
        for part, images, outputs in parts:
            fields = _qc_fields(reference, images, outputs, plan)
            if part == "template" and not fields:
                continue
            name = f"qc_{part}_{image.key}"
            node = pe.Node(
                ImageQC(
                    fields=list(fields),
                    part=part,
                    image=image.relpath,
                    reference="" if image is reference else reference.relpath,
                    raw_files={i.relpath: str(i.path) for i in images},
                    plan=[item for item in plan if item["field"] in fields],
                    field_map={field: value for field, (_, value) in fields.items()},
                ),
                name=name,
                mem_gb=1.0,
            )
            hash_inputs_by_mtime(node)  # 200 MB of inputs it only reads
            for field, (source, _) in fields.items():
                workflow.connect(session_wf, f"outputnode.{source}", node, field)
            if part == "native":
                bias = "bias_field"
                if image is not reference:
                    bias = session_output_field(image.key, bias)
                workflow.connect(session_wf, f"outputnode.{bias}", node, "bias_field")
            names.append(name)
    return names


def _qc_fields(
    reference: AnatInput, images: list[AnatInput], outputs: Sequence[str], plan: list[dict]
) -> dict[str, tuple[str, tuple[str, str]]]:
    """``field -> (session outputnode field, (raw relpath, output))`` a QC node reads:
    the ``outputs`` of ``images`` that the publishing plan holds."""
    planned = {item["field"] for item in plan} | {item.get("metadata_field") for item in plan}
    fields = {}
    for image in images:
        for output in outputs:
            field = _field(image, output)
            if field in planned:
                source = output if image is reference else session_output_field(image.key, output)
                fields[field] = (source, (image.relpath, output))
    return fields

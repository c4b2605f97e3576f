"""A session's package of sequences: every contrast aligned to the reference T1w (wiring only).

The reference T1w runs the anatomical chain (:func:`init_anat_preproc_wf`). Every other
image of the session (T2w, FLAIR, PD, a contrast-enhanced or second T1w) runs
:func:`init_contrast_wf`: denoising and N4 on its own grid, a rigid co-registration to
the reference's N4-corrected brain, then one interpolation from its raw grid to each
output grid (the reference T1w grid; the template through the composed transforms).
The reference's brain mask is every contrast's brain mask, so the model-ready volumes
of all contrasts share one crop box and their 2D slices one index; with
``export.channel_layout = "stacked"`` they are also stacked into one 4D volume.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.bids.outputs import contrast_normalization
from mriflow.config import Config
from mriflow.interfaces.anatomical import (
    ApplyTransforms,
    RemoveBiasField,
)
from mriflow.interfaces.coregistration import Coregister, MaskOnMovingGrid
from mriflow.interfaces.deface import ApplyFaceMask
from mriflow.interfaces.ml import StackChannels
from mriflow.ml.channel_stack import channel_order
from mriflow.workflows.anatomical import (
    _collect_steps,
    _denoise_node,
    _model_ready_node,
    _n4_node,
    _normalize_node,
    _resample_into,
    _slices_node,
    _step_threads,
    anat_output_fields,
    init_anat_preproc_wf,
)

__all__ = [
    "CONTRAST_FIELDS",
    "init_contrast_wf",
    "init_longitudinal_wf",
    "init_session_wf",
    "session_output_field",
    "stacked_contrasts",
]

#: Outputs of :func:`init_contrast_wf` (besides ``steps``).
CONTRAST_FIELDS = (
    "preproc",
    "preproc_metadata",
    "bias_field",
    "xfm_coreg",
    "std_preproc",
    "norm",
    "std_norm",
    "model",
)

# N4 on a contrast fits inside the reference brain mask brought back onto its grid,
# grown by this much: a rim of tissue steadies the fit at the brain's edge.
N4_MASK_DILATION_MM = 4.0


def session_output_field(key: str, field: str) -> str:
    """The session workflow's ``outputnode`` field of output ``field`` of contrast ``key``."""
    return f"{key}__{field}"


def stacked_contrasts(
    contrasts: Sequence[str], channel_names: Mapping[str, str] | None, config: Config
) -> tuple[list[str], list[str]]:
    """Which contrasts go into a session's 4D model-ready stack, after the reference.

    Parameters
    ----------
    contrasts : sequence of str
        Keys of the session's other images, in the session's order.
    channel_names : mapping, optional
        ``key -> channel name`` (default: the key).
    config : Config
        ``export.channel_layout`` and ``coregistration.channels``.

    Returns
    -------
    keys : list of str
        The stacked contrasts' keys in channel order (``coregistration.channels`` when
        set, else the session's order); empty: no stack (``files`` layout, no other
        contrast, or a requested channel missing).
    missing : list of str
        Requested channels the session lacks (the caller warns: no stack then).
    """
    if config.export.channel_layout != "stacked":
        return [], []
    names = {key: (channel_names or {}).get(key, key) for key in contrasts}
    order, missing = channel_order(list(names.values()), config.coregistration.channels)
    by_name = {name: key for key, name in names.items()}
    return [by_name[name] for name in order], missing


def init_session_wf(
    *,
    config: Config | None = None,
    contrasts: Mapping[str, str] | None = None,
    reference_key: str = "T1w",
    channel_names: Mapping[str, str] | None = None,
    reference_channel: str = "T1w",
    stacked: Sequence[str] = (),
    name: str = "session_wf",
) -> pe.Workflow:
    """Preprocess one session: the reference T1w, and every other contrast aligned to it.

    Parameters
    ----------
    config : Config
    contrasts : mapping
        ``key -> BIDS suffix`` of the session's other images (e.g. ``{"T2w": "T2w",
        "ceT1w": "T1w"}``); keys must be valid Python identifiers.
    reference_key : str
        Names the reference chain (``anat_<reference_key>_wf``).
    channel_names : mapping, optional
        ``key -> channel name`` in the 2D slices' index (``file_<name>`` columns;
        default: the key).
    reference_channel : str
        The reference's channel name (first in the 4D stack's ``Channels``).
    stacked : sequence of str
        Keys of the contrasts in the session's 4D model-ready stack, in channel order
        (:func:`stacked_contrasts`); empty: no stack.
    name : str

    Inputs
    ------
    t1w
        The reference T1w (raw).
    <key>
        Each other contrast (raw), one field per key of ``contrasts``.

    Outputs
    -------
    <field>
        The reference chain's outputs (:func:`init_anat_preproc_wf`), and ``steps``.
    <key>__<field>
        Each contrast's outputs (:data:`CONTRAST_FIELDS`) and ``steps``
        (:func:`session_output_field`).
    model_stack, model_stack_metadata, model_stack_steps
        With ``stacked``: the ``(X, Y, Z, C)`` model-ready volume, its
        sidecar fields (``Channels``) and the reference's steps with the stacking.
    """
    config = config or Config()
    contrasts = dict(contrasts or {})
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["t1w", *contrasts]), name="inputnode")
    reference_fields = [*anat_output_fields("T1w"), "steps"]
    stack_fields = ["model_stack", "model_stack_metadata", "model_stack_steps"] if stacked else []
    contrast_fields = [
        session_output_field(key, field)
        for key in contrasts
        for field in (*CONTRAST_FIELDS, "steps")
    ]
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*reference_fields, *contrast_fields, *stack_fields]),
        name="outputnode",
    )
    # with other contrasts, the reference's 2D slices are cut here, after every
    # contrast's model-ready volume exists (one index, one column per channel)
    slice_here = bool(contrasts) and config.export.slices
    anat_config = copy.deepcopy(config)
    if slice_here:
        anat_config.set("export.slices", False)
    anat_wf = init_anat_preproc_wf(config=anat_config, name=f"anat_{reference_key}_wf")
    workflow.connect(inputnode, "t1w", anat_wf, "inputnode.in_file")
    for field in reference_fields:
        if field != "slices_staged" or not slice_here:
            workflow.connect(anat_wf, f"outputnode.{field}", outputnode, field)
    from_reference = ("brain", "brain_mask")
    if config.registration.template_spaces():
        from_reference += ("xfm_fwd", "std_mask")
    if config.deface.enabled:
        from_reference += ("face_mask",)
    for key, contrast in contrasts.items():
        contrast_wf = init_contrast_wf(config=config, contrast=contrast, name=f"anat_{key}_wf")
        workflow.connect(inputnode, key, contrast_wf, "inputnode.in_file")
        for field in from_reference:
            workflow.connect(anat_wf, f"outputnode.{field}", contrast_wf, f"inputnode.{field}")
        for field in (*CONTRAST_FIELDS, "steps"):
            workflow.connect(
                contrast_wf, f"outputnode.{field}", outputnode, session_output_field(key, field)
            )
    names = channel_names or {}
    if slice_here:
        slices = _slices_node(config)
        slices.inputs.channel_names = [names.get(key, key) for key in contrasts]
        models = pe.Node(niu.Merge(len(contrasts)), name="channel_models")
        for position, key in enumerate(contrasts, start=1):
            contrast_wf = workflow.get_node(f"anat_{key}_wf")
            workflow.connect(contrast_wf, "outputnode.model", models, f"in{position}")
        workflow.connect([
            (inputnode, slices, [("t1w", "source_file")]),
            (anat_wf, slices, [
                ("outputnode.model", "in_file"), ("outputnode.model_mask", "mask_file"),
            ]),
            (models, slices, [("out", "channel_files")]),
            (slices, outputnode, [("staged", "slices_staged")]),
        ])  # fmt:skip
        if config.segmentation.method != "none":
            workflow.connect(anat_wf, "outputnode.model_dseg", slices, "dseg_file")
    if stacked:
        stack = pe.Node(
            StackChannels(channel_names=[reference_channel, *(names.get(k, k) for k in stacked)]),
            name="model_stack",
            mem_gb=1.0,
        )
        volumes = pe.Node(niu.Merge(1 + len(stacked)), name="stack_volumes")
        # the reference's chain, then the stacking (the published sidecar's Steps)
        stack_steps = pe.Node(niu.Merge(2), name="stack_steps", run_without_submitting=True)
        workflow.connect([
            (anat_wf, volumes, [("outputnode.model", "in1")]),
            (volumes, stack, [("out", "in_files")]),
            (anat_wf, stack_steps, [("outputnode.steps", "in1")]),
            (stack, stack_steps, [("step", "in2")]),
            (stack, outputnode, [
                ("out_file", "model_stack"), ("out_metadata", "model_stack_metadata"),
            ]),
            (stack_steps, outputnode, [("out", "model_stack_steps")]),
        ])  # fmt:skip
        for position, key in enumerate(stacked, start=2):
            contrast_wf = workflow.get_node(f"anat_{key}_wf")
            workflow.connect(contrast_wf, "outputnode.model", volumes, f"in{position}")
    return workflow


def init_contrast_wf(
    *, config: Config | None = None, contrast: str = "T2w", name: str = "contrast_wf"
) -> pe.Workflow:
    """Align one contrast of a session to its reference T1w and export it like the T1w.

    denoise (raw grid) and N4 (raw grid, head mask) -> rigid co-registration to the
    reference brain -> N4 again inside the reference brain mask brought back -> one
    interpolation to the reference grid (``preproc``) and, through the composed
    transforms, one to the template (``std_preproc``) -> normalization in the
    reference brain mask -> model-ready volume on the reference's crop box and its
    slices.

    Inputs
    ------
    in_file
        The contrast's raw image.
    brain, brain_mask
        The reference T1w's N4-corrected brain and brain mask (its ``outputnode``).
    xfm_fwd, std_mask
        The reference's transform to the template and template-space brain mask
        (when registration is enabled).

    Outputs
    -------
    See :data:`CONTRAST_FIELDS`; ``xfm_coreg`` is the ITK text transform
    (reference -> contrast points), ``steps`` the step records in chain order.
    """
    config = config or Config()
    threads = max(1, config.execution.omp_nthreads)
    spaces = config.registration.template_spaces()
    registered = bool(spaces)
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"The {contrast} image was denoised ({config.denoise.method}) and corrected for "
        "intensity non-uniformity (N4) on its own grid, aligned to the reference T1w "
        f"with a {config.coregistration.transform} registration (SimpleITK, "
        "Mattes mutual information inside the T1w brain mask), and resampled once to "
        "each output grid through the composed transforms."
    )
    inputnode = pe.Node(
        niu.IdentityInterface(
            fields=["in_file", "brain", "brain_mask", "xfm_fwd", "std_mask", "face_mask"]
        ),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*CONTRAST_FIELDS, "steps"]), name="outputnode"
    )
    outputnode.inputs.preproc_metadata = {"SkullStripped": False}

    denoise = _denoise_node(config)
    n4_head = _n4_node(config, "n4_head")
    coregister_threads = _step_threads(config, "coregistration")
    coregister = pe.Node(
        Coregister(
            transform=config.coregistration.transform,
            initialisation=config.coregistration.initialisation,
            num_threads=coregister_threads,
        ),
        name="coregister",
        n_procs=coregister_threads,
        mem_gb=1.5,
    )
    brain_mask_here = pe.Node(
        MaskOnMovingGrid(dilation_mm=N4_MASK_DILATION_MM), name="brain_mask_native", mem_gb=1.0
    )
    n4 = _n4_node(config, "n4")
    to_t1w = pe.Node(
        ApplyTransforms(interpolation="linear", num_threads=threads, step_name="to_t1w"),
        name="to_t1w",
        mem_gb=1.0,
    )
    workflow.connect([
        (inputnode, n4_head, [("in_file", "in_file")]),
        (n4_head, coregister, [("out_file", "moving_file")]),
        (inputnode, coregister, [("brain", "fixed_file"), ("brain_mask", "fixed_mask_file")]),
        (inputnode, brain_mask_here, [("brain_mask", "mask_file"), ("in_file", "moving_file")]),
        (coregister, brain_mask_here, [("transform_file", "transform_file")]),
        (inputnode, n4, [("in_file", "in_file")]),
        (brain_mask_here, n4, [("out_file", "mask_file")]),
        (n4, outputnode, [("bias_field", "bias_field")]),
        (coregister, outputnode, [("transform_file", "xfm_coreg")]),
        (coregister, to_t1w, [("transform_file", "transforms")]),
        (inputnode, to_t1w, [("brain_mask", "reference_file")]),
        (to_t1w, outputnode, [("out_file", "preproc")]),
    ])  # fmt:skip
    if config.denoise.order == "before_n4":
        remove_bias = pe.Node(RemoveBiasField(), name="remove_bias_field", mem_gb=1.0)
        workflow.connect([
            (inputnode, denoise, [("in_file", "in_file")]),
            (denoise, remove_bias, [("out_file", "in_file")]),
            (n4, remove_bias, [("bias_field", "bias_field")]),
        ])  # fmt:skip
        native = (remove_bias, "out_file")
        steps = [denoise, coregister, n4, to_t1w]
    else:
        workflow.connect(n4, "out_file", denoise, "in_file")
        native = (denoise, "out_file")
        steps = [coregister, n4, denoise, to_t1w]
    if config.deface.enabled:
        # the reference's face, brought onto this grid (grown a little: a coarser grid
        # samples it sparsely), removed before any resampling, so no output shows it
        face_here = pe.Node(
            MaskOnMovingGrid(dilation_mm=2.0, allow_empty=True), name="face_mask_native"
        )
        deface = pe.Node(ApplyFaceMask(), name="deface", mem_gb=1.0)
        steps.append(deface)
        workflow.connect([
            (inputnode, face_here, [("face_mask", "mask_file"), ("in_file", "moving_file")]),
            (coregister, face_here, [("transform_file", "transform_file")]),
            (native[0], deface, [(native[1], "in_file")]),
            (face_here, deface, [("out_file", "face_mask")]),
        ])  # fmt:skip
        native = (deface, "out_file")
    workflow.connect(native[0], native[1], to_t1w, "in_file")

    export_image, export_mask = (to_t1w, "out_file"), (inputnode, "brain_mask")
    if registered:
        # reference -> template, then contrast -> reference (ANTs applies the last first)
        compose = pe.Node(niu.Merge(2), name="compose_to_template", run_without_submitting=True)
        workflow.connect([
            (inputnode, compose, [("xfm_fwd", "in1")]),
            (coregister, compose, [("transform_file", "in2")]),
        ])  # fmt:skip
        # the first template space (the model-ready grid) only
        resampled = _resample_into(
            workflow, config, spaces[0], 1, (compose, "out"), {"std_preproc": native},
            outputnode, steps,
        )  # fmt: skip
        std_preproc = resampled["std_preproc"]
        export_image, export_mask = std_preproc, (inputnode, "std_mask")

    method = contrast_normalization(config)
    if method != "none":
        normalize = _normalize_node(config, method, "normalize")
        steps.append(normalize)
        workflow.connect([
            (to_t1w, normalize, [("out_file", "in_file")]),
            (inputnode, normalize, [("brain_mask", "mask_file")]),
            (normalize, outputnode, [("out_file", "norm")]),
        ])  # fmt:skip
        export_image = (normalize, "out_file")
        if registered:
            # normalized in template space, from the once-interpolated image: the
            # same voxelwise mapping as in T1w space, without resampling a resample
            std_normalize = _normalize_node(config, method, "std_normalize")
            workflow.connect([
                (std_preproc[0], std_normalize, [(std_preproc[1], "in_file")]),
                (inputnode, std_normalize, [("std_mask", "mask_file")]),
                (std_normalize, outputnode, [("out_file", "std_norm")]),
            ])  # fmt:skip
            export_image = (std_normalize, "out_file")

    model = _model_ready_node(config)
    steps.append(model)
    workflow.connect([
        (export_image[0], model, [(export_image[1], "in_file")]),
        (export_mask[0], model, [(export_mask[1], "mask_file")]),
        (model, outputnode, [("out_file", "model")]),
    ])  # fmt:skip
    return _collect_steps(workflow, steps, outputnode)


def init_longitudinal_wf(
    *, config: Config | None = None, name: str = "longitudinal_wf"
) -> pe.Workflow:
    """A later session's reference T1w on the first session's grid (``longitudinal.align``).

    The two N4-corrected brains are registered rigidly (as a session's contrasts are,
    :func:`~mriflow.image.coregistration.coregister`); the later session's ``preproc``
    and brain mask are resampled once onto the first session's grid, so a
    longitudinal model gets voxel-aligned time points.

    Inputs
    ------
    base_brain, base_mask
        The first session's reference brain and brain mask.
    brain, brain_mask, preproc
        The later session's.

    Outputs
    -------
    xfm_longitudinal, longitudinal_preproc, longitudinal_mask, steps
    """
    config = config or Config()
    threads = max(1, config.execution.omp_nthreads)
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        "The T1w image of each later session was aligned rigidly to the first session's "
        "T1w (SimpleITK, Mattes mutual information inside its brain mask) and "
        "resampled onto its grid."
    )
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["base_brain", "base_mask", "brain", "brain_mask", "preproc"]),
        name="inputnode",
    )
    fields = ["xfm_longitudinal", "longitudinal_preproc", "longitudinal_mask", "steps"]
    outputnode = pe.Node(niu.IdentityInterface(fields=fields), name="outputnode")
    coregister_threads = _step_threads(config, "coregistration")
    coregister = pe.Node(
        Coregister(
            transform="rigid",
            initialisation=config.coregistration.initialisation,
            num_threads=coregister_threads,
            step_name="longitudinal_coregistration",
        ),
        name="coregister",
        n_procs=coregister_threads,
        mem_gb=1.5,
    )
    resampled = {
        field: pe.Node(
            ApplyTransforms(interpolation=interpolation, num_threads=threads, step_name=field),
            name=field,
            mem_gb=1.0,
        )
        for field, interpolation in (
            ("longitudinal_preproc", "linear"),
            ("longitudinal_mask", "nearest"),
        )
    }
    workflow.connect([
        (inputnode, coregister, [
            ("brain", "moving_file"),
            ("base_brain", "fixed_file"),
            ("base_mask", "fixed_mask_file"),
        ]),
        (coregister, outputnode, [("transform_file", "xfm_longitudinal")]),
        (inputnode, resampled["longitudinal_preproc"], [("preproc", "in_file")]),
        (inputnode, resampled["longitudinal_mask"], [("brain_mask", "in_file")]),
    ])  # fmt:skip
    for field, node in resampled.items():
        workflow.connect([
            (coregister, node, [("transform_file", "transforms")]),
            (inputnode, node, [("base_mask", "reference_file")]),
            (node, outputnode, [("out_file", field)]),
        ])  # fmt:skip
    return _collect_steps(workflow, [coregister, *resampled.values()], outputnode)

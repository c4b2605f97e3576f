"""Anatomical preprocessing workflow (wiring only; parameters come from the config)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.bids.outputs import SPACE_OUTPUTS, space_output
from mriflow.config import NATIVE_SPACE, Config, OutputSpace
from mriflow.execution import hash_inputs_by_mtime, step_threads
from mriflow.image.intensity import method_parameters
from mriflow.interfaces.anatomical import (
    Denoise,
    N4BiasFieldCorrection,
    RegisterToTemplate,
    RemoveBiasField,
    ResampleToTemplate,
    SkullStrip,
    TemplateTissuePriors,
)
from mriflow.interfaces.deface import Deface
from mriflow.interfaces.intensity import Normalize
from mriflow.interfaces.ml import ExportSlices, ModelReady
from mriflow.interfaces.segmentation import TissueSegmentation
from mriflow.interfaces.spatial import Conform

__all__ = ["init_anat_preproc_wf", "anat_output_fields"]

#: Outputs of the T1w chain; other contrasts have ``preproc`` and ``bias_field`` only.
T1W_FIELDS = (
    "preproc",
    "preproc_metadata",
    "bias_field",
    "brain",
    "brain_mask",
    "face_mask",
    "dseg",
    "probseg_csf",
    "probseg_gm",
    "probseg_wm",
    "tissue_warnings",
    "norm",
    "xfm_fwd",
    "xfm_rev",
    "std_preproc",
    "std_mask",
    "std_dseg",
    "std_norm",
    "model",
    "model_mask",
    "model_dseg",
    "slices_staged",
)


def anat_output_fields(contrast: str, config: Config | None = None) -> tuple[str, ...]:
    """The ``outputnode`` fields of :func:`init_anat_preproc_wf` (besides ``steps``).

    With ``config``, a T1w's fields include ``std_preproc_space2``, ... for every
    template space after the first (``--output-spaces``).
    """
    if contrast != "T1w":
        return ("preproc", "preproc_metadata", "bias_field")
    if config is None:
        return T1W_FIELDS
    n_spaces = len(config.registration.template_spaces())
    extra = [space_output(o, i) for i in range(2, n_spaces + 1) for o in SPACE_OUTPUTS]
    return (*T1W_FIELDS, *extra)


def init_anat_preproc_wf(
    *, config: Config | None = None, contrast: str = "T1w", name: str = "anat_preproc_wf"
) -> pe.Workflow:
    """Preprocess one anatomical image.

    T1w: denoise -> conform (RAS, isotropic) -> N4 (or conform -> N4 -> denoise) -> skull strip
    -> registration to MNI152NLin2009aSym -> tissue segmentation (template priors) ->
    intensity normalization -> model-ready fixed-shape MNI volume and its 2D slices.
    Other contrasts (T2w, FLAIR): denoise, conform, N4 only.

    N4 fits its field on the conformed image before denoising, and skull stripping
    and registration take that corrected image, so they run while the image is being
    denoised; the published ``preproc`` (and everything derived from its
    intensities: segmentation, normalization, MNI-space images) is the denoised,
    conformed image divided by the same field.

    Parameters
    ----------
    config : Config
        Parameters of every step (defaults when omitted).
    contrast : {"T1w", "T2w", "FLAIR"}
    name : str

    Inputs
    ------
    in_file
        The raw anatomical image (a BIDS file: its name gives the slices' names).

    Outputs
    -------
    preproc
        Bias-corrected image in native RAS space (desc-preproc).
    preproc_metadata
        Sidecar fields that depend on the data (``SkullStripped``).
    bias_field
        The N4 multiplicative field (for the report).
    brain
        The N4-corrected brain, before denoising (what other contrasts are aligned to).
    face_mask
        The voxels defacing removed (with ``deface.enabled``).
    brain_mask, dseg, probseg_{csf,gm,wm}, norm
        Native-space brain mask, tissue labels (1=GM 2=WM 3=CSF), probabilities,
        intensity-normalized image (T1w only).
    xfm_fwd, xfm_rev
        Composite ANTs transforms T1w -> template and back (T1w only).
    std_preproc, std_mask, std_dseg, std_norm
        The same in template space (T1w only).
    model, model_mask, model_dseg
        Fixed-shape, normalized MNI-space volume with its mask and labels (T1w only).
    slices_staged
        Staged 2D slice files and their index (T1w only, when enabled).
    steps
        Step records (name, parameters, software versions) in chain order.
    """
    config = config or Config()
    threads = max(1, config.execution.omp_nthreads)
    is_t1w = contrast == "T1w"
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"The {contrast} image was reoriented to RAS and resampled to "
        f"{config.spatial.voxel_size:g} mm isotropic voxels, denoised "
        f"({config.denoise.method}) and corrected for intensity non-uniformity (N4)."
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(
        niu.IdentityInterface(fields=[*anat_output_fields(contrast, config), "steps"]),
        name="outputnode",
    )

    def conform_node(name: str) -> pe.Node:
        return pe.Node(
            Conform(
                voxel_size=config.spatial.voxel_size,
                interpolation=config.spatial.image_interpolation,
                reorient=config.spatial.reorient,
            ),
            name=name,
        )

    conform = conform_node("conform")
    denoise = _denoise_node(config)
    n4 = _n4_node(config, "n4")
    # N4 fits its field on the conformed raw image, and skull stripping and
    # registration run on that corrected image, so none of them waits for the
    # denoising; the denoised image (the published preproc) gets the same field.
    workflow.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, n4, [("out_file", "in_file")]),
        (n4, outputnode, [("bias_field", "bias_field")]),
    ])  # fmt:skip
    if config.denoise.order == "before_n4":
        # As sMRIPrep: denoise the raw grid, before conforming. Noise is still
        # independent between voxels there, and an anisotropic scan has several
        # times fewer voxels than its 1 mm resampling.
        steps = [denoise, conform, n4]
        conform_denoised = conform_node("conform_denoised")
        remove_bias = pe.Node(RemoveBiasField(), name="remove_bias_field", mem_gb=1.0)
        workflow.connect([
            (inputnode, denoise, [("in_file", "in_file")]),
            (denoise, conform_denoised, [("out_file", "in_file")]),
            (conform_denoised, remove_bias, [("out_file", "in_file")]),
            (n4, remove_bias, [("bias_field", "bias_field")]),
        ])  # fmt:skip
        preproc_source = (remove_bias, "out_file")
    else:
        steps = [conform, n4, denoise]
        workflow.connect(n4, "out_file", denoise, "in_file")
        preproc_source = (denoise, "out_file")
    if not is_t1w:
        workflow.connect(preproc_source[0], preproc_source[1], outputnode, "preproc")
        outputnode.inputs.preproc_metadata = {"SkullStripped": False}
        return _collect_steps(workflow, steps, outputnode)

    skullstrip = pe.Node(
        SkullStrip(
            method=config.skull_strip.method,
            detect_stripped=config.skull_strip.detect_stripped,
            deepbet_threshold=config.skull_strip.deepbet_threshold,
            deepbet_n_dilate=config.skull_strip.deepbet_n_dilate,
            random_seed=config.seed,
            num_threads=threads,
        ),
        name="skull_strip",
        n_procs=threads,
        mem_gb=2.0,
    )
    preproc_meta = pe.Node(
        niu.Function(
            input_names=["skull_stripped"], output_names=["meta"], function=_skullstripped_meta
        ),
        name="preproc_meta",
        run_without_submitting=True,
    )
    steps.append(skullstrip)
    workflow.connect([
        (n4, skullstrip, [("out_file", "in_file")]),
        (skullstrip, preproc_meta, [("skull_stripped", "skull_stripped")]),
        (preproc_meta, outputnode, [("meta", "preproc_metadata")]),
        (skullstrip, outputnode, [("out_mask", "brain_mask"), ("out_file", "brain")]),
    ])  # fmt:skip
    if config.deface.enabled:
        # before anything is resampled from it, so the template-space head and the
        # model-ready volume are defaced too; the brain mask comes from the N4 image,
        # and brain voxels are never changed, so masks, tissues and intensities are
        # those of a run without defacing
        deface = pe.Node(
            Deface(margin_mm=config.deface.margin_mm, num_threads=threads),
            name="deface",
            mem_gb=1.0,
        )
        steps.append(deface)
        workflow.connect([
            (preproc_source[0], deface, [(preproc_source[1], "in_file")]),
            (skullstrip, deface, [("out_mask", "mask_file")]),
        ])  # fmt:skip
        workflow.connect(deface, "face_mask", outputnode, "face_mask")
        preproc_source = (deface, "out_file")
    workflow.connect(preproc_source[0], preproc_source[1], outputnode, "preproc")

    spaces = config.registration.template_spaces()
    registered = bool(spaces)
    if registered:
        # registered once; each requested space/resolution is a resampling of its transform
        register_threads = _step_threads(config, "registration")
        register = pe.Node(
            RegisterToTemplate(
                preset=config.registration.preset,
                template_resolution=config.registration.template_resolution,
                random_seed=config.seed,
                num_threads=register_threads,
                write_warped=False,
                **_template_inputs(config),
            ),
            name="register",
            n_procs=register_threads,
            mem_gb=2.0,
        )
        # pass paths on, in the main process: no need to read the transforms to hash them
        first_fwd = hash_inputs_by_mtime(
            pe.Node(niu.Select(index=[0]), name="first_fwd", run_without_submitting=True)
        )
        first_rev = hash_inputs_by_mtime(
            pe.Node(niu.Select(index=[0]), name="first_rev", run_without_submitting=True)
        )
        steps.append(register)
        workflow.connect([
            # the extracted brain is the moving image; a moving-mask metric adds nothing
            # and antspyx's mask argument breaks its 3D call (seen: 2x2 spacing, exit 1)
            (skullstrip, register, [("out_file", "in_file")]),
            (register, first_fwd, [("forward_transforms", "inlist")]),
            (register, first_rev, [("reverse_transforms", "inlist")]),
            (first_fwd, outputnode, [("out", "xfm_fwd")]),
            (first_rev, outputnode, [("out", "xfm_rev")]),
        ])  # fmt:skip
    export_image, export_mask = preproc_source, (skullstrip, "out_mask")

    if config.intensity.method != "none":
        intensity = config.intensity
        if intensity.method == "nyul" and not intensity.nyul_landmarks_file:
            raise ValueError(
                "intensity.method = 'nyul' needs a fitted standard at participant level: set "
                "intensity.nyul_landmarks_file (written by the group level) or use another method"
            )
        normalize = _normalize_node(config, intensity.method, "normalize")
        steps.append(normalize)
        workflow.connect([
            (preproc_source[0], normalize, [(preproc_source[1], "in_file")]),
            (skullstrip, normalize, [("out_mask", "mask_file")]),
            (normalize, outputnode, [("out_file", "norm")]),
        ])  # fmt:skip
        export_image = (normalize, "out_file")

    export_dseg = None
    # sources of the images resampled into each template space: (node, field) by output
    space_sources = {"std_preproc": preproc_source, "std_mask": (skullstrip, "out_mask")}
    if config.intensity.method != "none":
        space_sources["std_norm"] = (normalize, "out_file")
    if config.segmentation.method != "none":
        seg = config.segmentation
        # a user template given without tissue maps has no priors to offer
        use_priors = seg.use_priors and registered and _template_has_priors(config)
        segment = pe.Node(
            TissueSegmentation(
                method=seg.method,
                contrast="T1w",
                use_priors=use_priors,
                prior_weight=seg.prior_weight,
                mrf_beta=seg.mrf_beta,
                hmrf_iterations=seg.hmrf_iterations,
                pv_beta=seg.pv_beta,
                csf_hull_mm=seg.csf_hull_mm,
                mrf_weight=seg.mrf_weight,
                n_iterations=seg.n_iterations,
                clip_percentiles=tuple(seg.clip_percentiles),
                seed=config.seed,
            ),
            name="segment",
            mem_gb=2.0,
        )
        # passes paths on, in the main process: hashing the three maps' content took
        # 0.1-0.8 s there, holding up every other hand-over
        split_probseg = hash_inputs_by_mtime(
            pe.Node(
                niu.Split(splits=[1, 1, 1], squeeze=True),
                name="split_probseg",
                run_without_submitting=True,
            )
        )
        workflow.connect([
            (preproc_source[0], segment, [(preproc_source[1], "in_file")]),
            (skullstrip, segment, [("out_mask", "mask_file")]),
            (segment, outputnode, [("dseg_file", "dseg"), ("warnings", "tissue_warnings")]),
            (segment, split_probseg, [("probseg_files", "inlist")]),
            (split_probseg, outputnode, [
                ("out1", "probseg_csf"), ("out2", "probseg_gm"), ("out3", "probseg_wm"),
            ]),
        ])  # fmt:skip
        export_dseg = (segment, "dseg_file")
        if use_priors:
            priors = pe.Node(
                TemplateTissuePriors(num_threads=threads, **_template_inputs(config)),
                name="template_priors",
                mem_gb=1.5,
            )
            steps.append(priors)
            workflow.connect([
                (register, priors, [("reverse_transforms", "reverse_transforms")]),
                # any image on the native grid: N4's comes before the denoised one
                (n4, priors, [("out_file", "reference_file")]),
                (priors, segment, [
                    ("gm_prior", "gm_prior"), ("wm_prior", "wm_prior"), ("csf_prior", "csf_prior"),
                ]),
            ])  # fmt:skip
        steps.append(segment)
        space_sources["std_dseg"] = (segment, "dseg_file")

    for index, space in enumerate(spaces, start=1):
        resampled = _resample_into(
            workflow, config, space, index, (register, "forward_transforms"), space_sources,
            outputnode, steps,
        )  # fmt: skip
        if index == 1:
            # the ML export works in the first template space when there is one
            export_image = resampled.get("std_norm", resampled["std_preproc"])
            export_mask = resampled["std_mask"]
            export_dseg = resampled.get("std_dseg")
    _init_export(workflow, config, inputnode, outputnode, steps,
                 export_image, export_mask, export_dseg)  # fmt:skip
    return _collect_steps(workflow, steps, outputnode)


def _init_export(workflow, config, inputnode, outputnode, steps, image, mask, dseg) -> None:
    """Fixed-shape model-ready volume (+ mask, labels) and its 2D slices."""
    model = _model_ready_node(config)
    steps.append(model)
    workflow.connect([
        (image[0], model, [(image[1], "in_file")]),
        (mask[0], model, [(mask[1], "mask_file")]),
        (model, outputnode, [
            ("out_file", "model"), ("out_mask", "model_mask"), ("out_dseg", "model_dseg"),
        ]),
    ])  # fmt:skip
    if dseg:
        workflow.connect(dseg[0], dseg[1], model, "dseg_file")
    if not config.export.slices:
        return
    slices = _slices_node(config)
    steps.append(slices)
    workflow.connect([
        (inputnode, slices, [("in_file", "source_file")]),
        (model, slices, [("out_file", "in_file"), ("out_mask", "mask_file")]),
        (slices, outputnode, [("staged", "slices_staged")]),
    ])  # fmt:skip
    if dseg:
        workflow.connect(model, "out_dseg", slices, "dseg_file")


def _step_threads(config: Config, step: str) -> int:
    """Threads of ``step``'s node: one for a step that cannot repeat itself on several
    threads, when the run asks for reproducible outputs (the default)."""
    return step_threads(
        step, max(1, config.execution.omp_nthreads), reproducible=config.execution.reproducible
    )


def _denoise_node(config: Config) -> pe.Node:
    threads = _step_threads(config, "denoise")
    return pe.Node(
        Denoise(
            method=config.denoise.method,
            noise_model=config.denoise.noise_model,
            patch_radius=config.denoise.patch_radius,
            search_radius=config.denoise.search_radius,
            h_factor=config.denoise.h_factor,
            num_threads=threads,
        ),
        name="denoise",
        n_procs=threads,
        mem_gb=1.0,
    )


def _n4_node(config: Config, name: str) -> pe.Node:
    threads = max(1, config.execution.omp_nthreads)
    return pe.Node(
        N4BiasFieldCorrection(
            shrink_factor=config.n4.shrink_factor,
            iterations=config.n4.iterations,
            convergence_threshold=config.n4.convergence_threshold,
            spline_distance_mm=config.n4.spline_distance_mm,
            num_threads=threads,
        ),
        name=name,
        n_procs=threads,
        mem_gb=1.0,
    )


def _normalize_node(config: Config, method: str, name: str) -> pe.Node:
    parameters = method_parameters(method, config.section_dict("intensity"))
    return pe.Node(Normalize(method=method, parameters=parameters), name=name, mem_gb=1.0)


def _model_ready_node(config: Config) -> pe.Node:
    export = config.export
    return pe.Node(
        ModelReady(
            target_shape=export.target_shape, margin_mm=export.crop_margin_mm, fit=export.fit
        ),
        name="model_ready",
        mem_gb=1.0,
    )


def _slices_node(config: Config) -> pe.Node:
    """2D slices of the model-ready volume, named after the raw image (``source_file``)."""
    export = config.export
    entities = {"desc": "model"}
    spaces = config.registration.template_spaces()
    if spaces:
        entities.update(spaces[0].entities)
    return pe.Node(
        ExportSlices(
            space=spaces[0].name if spaces else NATIVE_SPACE,
            entities=entities,
            axes=export.slice_axes,
            min_brain_fraction=export.min_brain_fraction,
            fmt=export.slice_format,
            png_bit_depth=export.png_bit_depth,
        ),
        name="slices",
        mem_gb=1.0,
    )


def _template_inputs(config: Config) -> dict:
    """Interface inputs naming a user template; none for the embedded one (its defaults)."""
    reg = config.registration
    if not reg.template_files:
        return {}
    return {"template_name": reg.template, "template_files": dict(reg.template_files)}


def _template_has_priors(config: Config) -> bool:
    files = config.registration.template_files
    return not files or ("gm" in files and "wm" in files)


def _resample_into(
    workflow: pe.Workflow,
    config: Config,
    space: OutputSpace,
    index: int,
    transforms: tuple[pe.Node, str],
    sources: dict[str, tuple[pe.Node, str]],
    outputnode: pe.Node,
    steps: list[pe.Node],
) -> dict[str, tuple[pe.Node, str]]:
    """The images of ``sources`` resampled into the ``index``-th template space through
    the chain ``transforms`` gives (subject -> template), in one node (the chain is
    evaluated once for all of them); returns where each output can be taken from, by
    output name."""
    interpolation = {"std_mask": "nearest", "std_dseg": "genericLabel"}
    names = [space_output(output, index) for output in sources]
    suffix = "" if index == 1 else f"_space{index}"
    gather = pe.Node(niu.Merge(len(sources)), name=f"to_template{suffix}_inputs",
                     run_without_submitting=True)  # fmt: skip
    resample = pe.Node(
        ResampleToTemplate(
            interpolations=[interpolation.get(output, "linear") for output in sources],
            step_names=names,
            template_resolution=(
                config.registration.space_resolution(space)
                or config.registration.template_resolution
            ),
            num_threads=max(1, config.execution.omp_nthreads),
            **_template_inputs(config),
        ),
        name=f"to_template{suffix}",
        mem_gb=1.5,
    )
    # passes paths on, in the main process (as split_probseg)
    split = hash_inputs_by_mtime(
        pe.Node(
            niu.Split(splits=[1] * len(sources), squeeze=True),
            name=f"to_template{suffix}_outputs",
            run_without_submitting=True,
        )
    )
    steps.append(resample)
    workflow.connect([
        (transforms[0], resample, [(transforms[1], "transforms")]),
        (gather, resample, [("out", "in_files")]),
        (resample, split, [("out_files", "inlist")]),
    ])  # fmt:skip
    resampled = {}
    for position, ((output, (node, field)), name) in enumerate(
        zip(sources.items(), names, strict=True), start=1
    ):
        workflow.connect(node, field, gather, f"in{position}")
        workflow.connect(split, f"out{position}", outputnode, name)
        resampled[output] = (split, f"out{position}")
    return resampled


def _collect_steps(workflow: pe.Workflow, nodes: list[pe.Node], outputnode: pe.Node):
    collect = pe.Node(niu.Merge(len(nodes)), name="collect_steps", run_without_submitting=True)
    for index, node in enumerate(nodes, start=1):
        workflow.connect(node, "step", collect, f"in{index}")
    workflow.connect(collect, "out", outputnode, "steps")
    return workflow


def _skullstripped_meta(skull_stripped):
    return {"SkullStripped": bool(skull_stripped)}

"""The output contract: every file mriflow writes, participant and group level, in one table.

- per image (:func:`anat_derivatives`): preproc, masks, tissues, transforms, MNI
  images, model-ready volumes (sMRIPrep naming), read by the workflows when they
  wire publishing and, backwards, by :class:`mriflow.bids.layout.DerivativesLayout`;
- per image at the group level: the Nyúl-standardized image (:data:`NYUL_SPEC`);
- per subject: QC metrics, figures, report, provenance record, completion record;
- per dataset (:data:`GROUP_OUTPUTS`): Nyúl standard, splits, manifests, group QC.

Names are built from these entities by :mod:`mriflow.bids.paths`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mriflow.bids.paths import build_filename, build_path, entity_tag, subject_dirname
from mriflow.config import Config, OutputSpace
from mriflow.image.template import TEMPLATE_SPACE

__all__ = [
    "CONTRASTS",
    "GROUP_OUTPUTS",
    "NYUL_SPEC",
    "TEMPLATE_SPACE",
    "DerivativeSpec",
    "all_anat_derivatives",
    "anat_derivatives",
    "channel_name",
    "channel_names",
    "contrast_derivatives",
    "longitudinal_derivatives",
    "LONGITUDINAL_SPACE",
    "STACK_SUFFIX",
    "contrast_normalization",
    "derivative_relpath",
    "figure_relpath",
    "figure_relpath_of",
    "iqm_relpath",
    "provenance_relpath",
    "report_relpath",
    "slices_index_relpath",
    "slices_stem",
    "stack_derivative",
    "status_relpath",
]

#: Anatomical contrasts whose derivatives mriflow names after the source (``desc-preproc_T2w``).
CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw", "T2starw")

_PREPROC = ("denoise", "conform", "n4")  # names, not order: the chain keeps run order
_MASK = (*_PREPROC, "skull_strip")
_REGISTER = (*_MASK, "registration")
_SEGMENT = (*_REGISTER, "template_priors", "tissue_segmentation")
_NORM = (*_MASK, "intensity_normalization")


@dataclass(frozen=True)
class DerivativeSpec:
    """One derivative: which workflow output it is, its name entities and sidecar fields."""

    output: str
    """Field of the anatomical workflow's ``outputnode``."""
    suffix: str | None = None
    """BIDS suffix; ``None``: the contrast of the source image (T1w, T2w, FLAIR)."""
    entities: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    steps: tuple[str, ...] = ()
    """Names of the step records (in chain order) that made this output."""
    data_dtype: str | None = None
    extension: str | None = None
    derived_from: tuple[str, ...] = ()
    """Other outputs (by ``output`` name) listed in ``Sources`` as ``bids::`` URIs."""
    dynamic_metadata: str | None = None
    """An ``outputnode`` field holding sidecar fields known only at run time."""


def anat_derivatives(
    contrast: str, config: Config | None = None, *, reference: bool | None = None
) -> list[DerivativeSpec]:
    """The derivatives written for one anatomical image of contrast ``contrast``.

    ``reference`` (default: ``contrast == "T1w"``): the image is its session's
    reference T1w (masks, tissues, transforms to the template); otherwise it is a
    contrast aligned to the reference (:func:`contrast_derivatives`).
    """
    config = config or Config()
    if not (contrast == "T1w" if reference is None else reference):
        return contrast_derivatives(contrast, config)
    specs = [
        DerivativeSpec(
            output="preproc",
            suffix=contrast,
            entities={"desc": "preproc"},
            steps=_PREPROC,
            dynamic_metadata="preproc_metadata",
        )
    ]
    spaces = config.registration.template_spaces()
    registered = bool(spaces)
    # the first template space is the model-ready grid (and the one without a suffix)
    space = spaces[0].entities if registered else {}
    segmentation = config.segmentation.method != "none"
    normalized = config.intensity.method != "none"
    norm_steps = ("intensity_normalization",) if normalized else ()
    specs.append(
        DerivativeSpec(
            output="brain_mask",
            suffix="mask",
            entities={"desc": "brain"},
            metadata={"Type": "Brain"},
            steps=_MASK,
            data_dtype="uint8",
            derived_from=("preproc",),
        )
    )
    if registered:
        specs += _template_space_specs(space)
        for index, extra in enumerate(spaces[1:], start=2):
            specs += _extra_space_specs(extra, index, config)
    image_source = (
        ("std_norm" if normalized else "std_preproc")
        if registered
        else ("norm" if normalized else "preproc")
    )
    mask_source = "std_mask" if registered else "brain_mask"
    specs += [
        DerivativeSpec(
            output="model",
            suffix="T1w",
            entities={**space, "desc": "model"},
            metadata={"SkullStripped": True},
            steps=(*_REGISTER, *norm_steps, image_source, "model_ready"),
            derived_from=(image_source, mask_source),
        ),
        DerivativeSpec(
            output="model_mask",
            suffix="mask",
            entities={**space, "desc": "model"},
            metadata={"Type": "Brain"},
            steps=(*_REGISTER, "std_mask", "model_ready"),
            data_dtype="uint8",
            derived_from=(mask_source,),
        ),
    ]
    if normalized:
        specs.append(
            DerivativeSpec(
                output="norm",
                suffix="T1w",
                entities={"desc": "norm"},
                metadata={"SkullStripped": True},
                steps=_NORM,
                derived_from=("preproc", "brain_mask"),
            )
        )
        if registered:
            specs.append(
                DerivativeSpec(
                    output="std_norm",
                    suffix="T1w",
                    entities={**space, "desc": "norm"},
                    metadata={"SkullStripped": True},
                    steps=(*_REGISTER, "intensity_normalization", "std_norm"),
                    derived_from=("norm", "xfm_fwd"),
                )
            )
    if segmentation:
        specs += [
            DerivativeSpec(
                output="dseg",
                suffix="dseg",
                steps=_SEGMENT,
                data_dtype="uint8",
                derived_from=("preproc", "brain_mask"),
            ),
            *[
                DerivativeSpec(
                    output=f"probseg_{label.lower()}",
                    suffix="probseg",
                    entities={"label": label},
                    steps=_SEGMENT,
                    data_dtype="float32",
                    derived_from=("preproc", "brain_mask"),
                )
                for label in ("CSF", "GM", "WM")
            ],
            DerivativeSpec(
                output="model_dseg",
                suffix="dseg",
                entities={**space, "desc": "model"},
                steps=(*_SEGMENT, "std_dseg", "model_ready"),
                data_dtype="uint8",
                derived_from=("std_dseg" if registered else "dseg",),
            ),
        ]
        if registered:
            specs.append(
                DerivativeSpec(
                    output="std_dseg",
                    suffix="dseg",
                    entities=space,
                    steps=(*_SEGMENT, "std_dseg"),
                    data_dtype="uint8",
                    derived_from=("dseg", "xfm_fwd"),
                )
            )
    specs = [_with_space_metadata(spec, config) for spec in specs]
    return _defaced(specs) if config.deface.enabled else specs


_COREG = ("denoise", "n4", "coregistration")


def contrast_derivatives(contrast: str, config: Config | None = None) -> list[DerivativeSpec]:
    """The derivatives of an image aligned to its session's reference T1w.

    Every image is on a grid of the reference (sMRIPrep's convention: no ``space-`` is
    the reference T1w's space), interpolated once from the raw image through the
    composed transforms; the reference's brain mask applies to all of them.
    """
    config = config or Config()
    spaces = config.registration.template_spaces()
    registered = bool(spaces)
    # the first template space only: the model-ready grid
    space = spaces[0].entities if registered else {}
    normalized = contrast_normalization(config) != "none"
    specs = [
        DerivativeSpec(
            output="preproc",
            suffix=contrast,
            entities={"desc": "preproc"},
            steps=(*_COREG, "to_t1w"),
            derived_from=("xfm_coreg",),
            dynamic_metadata="preproc_metadata",
        ),
        DerivativeSpec(
            output="xfm_coreg",
            suffix="xfm",
            entities={"from": contrast, "to": "T1w", "mode": "image"},
            metadata={
                "Type": "ITK affine transform (text)",
                "FromSpace": contrast,
                "ToSpace": "T1w",
            },
            steps=_COREG,
            extension=".txt",
        ),
    ]
    if registered:
        specs.append(
            DerivativeSpec(
                output="std_preproc",
                suffix=contrast,
                entities={**space, "desc": "preproc"},
                metadata={"SkullStripped": False},
                steps=(*_COREG, "std_preproc"),
                derived_from=("xfm_coreg",),
            )
        )
    if normalized:
        specs.append(
            DerivativeSpec(
                output="norm",
                suffix=contrast,
                entities={"desc": "norm"},
                metadata={"SkullStripped": True},
                steps=(*_COREG, "to_t1w", "intensity_normalization"),
                derived_from=("preproc",),
            )
        )
        if registered:
            specs.append(
                DerivativeSpec(
                    output="std_norm",
                    suffix=contrast,
                    entities={**space, "desc": "norm"},
                    metadata={"SkullStripped": True},
                    steps=(*_COREG, "std_preproc", "intensity_normalization"),
                    derived_from=("std_preproc",),
                )
            )
    source = ("std_" if registered else "") + ("norm" if normalized else "preproc")
    specs.append(
        DerivativeSpec(
            output="model",
            suffix=contrast,
            entities={**space, "desc": "model"},
            metadata={"SkullStripped": True},
            steps=(*_COREG, source, "model_ready"),
            derived_from=(source,),
        )
    )
    specs = [_with_space_metadata(spec, config) for spec in specs]
    return _defaced(specs) if config.deface.enabled else specs


#: Suffix of a session's 4D model-ready volume (``export.channel_layout = "stacked"``).
#: Not a BIDS contrast: BIDS requires a ``T1w`` to be 3D (the validator's
#: T1W_FILE_WITH_TOO_MANY_DIMENSIONS) and has no suffix for a stack of contrasts, so
#: the stack is named apart from every image suffix and listed in ``.bidsignore``.
STACK_SUFFIX = "channels"


def stack_derivative(config: Config | None = None) -> DerivativeSpec:
    """A session's model-ready channels as one 4D volume, channels last, named after the
    reference T1w's raw image (``space-<tpl>_desc-model_channels``, on the grid of its
    ``desc-model_T1w``).

    Its channels (the reference's model-ready volume first, then each aligned contrast's)
    are listed in ``Sources``, after the raw reference, and named in order in the
    sidecar's ``Channels`` (run-time metadata of the stacking step).
    """
    config = config or Config()
    model = next(s for s in anat_derivatives("T1w", config) if s.output == "model")
    spec = DerivativeSpec(
        output="model_stack",
        suffix=STACK_SUFFIX,
        entities=dict(model.entities),
        metadata=model.metadata,
        steps=(*model.steps, "stack_channels"),
        dynamic_metadata="model_stack_metadata",
    )
    return _with_space_metadata(spec, config)


#: The grid of a subject's first session's reference T1w, for the later sessions'
#: images aligned to it (``longitudinal.align``).
LONGITUDINAL_SPACE = "longitudinal"


def longitudinal_derivatives() -> list[DerivativeSpec]:
    """A later session's reference T1w on the first session's grid (rigid, one transform)."""
    space = {"space": LONGITUDINAL_SPACE}
    return [
        DerivativeSpec(
            output="xfm_longitudinal",
            suffix="xfm",
            entities={"from": "T1w", "to": LONGITUDINAL_SPACE, "mode": "image"},
            metadata={
                "Type": "ITK affine transform (text)",
                "FromSpace": "T1w",
                "ToSpace": LONGITUDINAL_SPACE,
            },
            steps=("longitudinal_coregistration",),
            extension=".txt",
        ),
        DerivativeSpec(
            output="longitudinal_preproc",
            suffix="T1w",
            entities={**space, "desc": "preproc"},
            metadata={"SkullStripped": False},
            steps=("longitudinal_coregistration", "longitudinal_preproc"),
            derived_from=("xfm_longitudinal",),
        ),
        DerivativeSpec(
            output="longitudinal_mask",
            suffix="mask",
            entities={**space, "desc": "brain"},
            metadata={"Type": "Brain"},
            steps=("longitudinal_coregistration", "longitudinal_mask"),
            data_dtype="uint8",
            derived_from=("xfm_longitudinal",),
        ),
    ]


def channel_name(entities: Mapping[str, str], suffix: str, *, full: bool = False) -> str:
    """The channel of an image in the multi-channel export: ``T2w``, ``ce-gadolinium_T1w``.

    The suffix and the contrast agent name a channel the same way in every subject;
    ``full`` adds the other entities (acq, rec, run, ...) for a session holding two
    images of one channel.
    """
    keep = {k: v for k, v in entities.items() if k not in ("subject", "session")}
    if not full:
        keep = {k: v for k, v in keep.items() if k == "ceagent"}
    return entity_tag(suffix=suffix, **keep)


def channel_names(
    reference: tuple[Mapping[str, str], str], others: list[tuple[Mapping[str, str], str]]
) -> list[str]:
    """Channel names of a session's images aligned to ``reference`` (``(entities, suffix)``
    each), in order: :func:`channel_name`, with all entities where two would clash."""
    short = [channel_name(entities, suffix) for entities, suffix in others]
    taken = [channel_name(*reference), *short]
    return [
        channel_name(entities, suffix, full=True) if taken.count(name) > 1 else name
        for (entities, suffix), name in zip(others, short, strict=True)
    ]


def contrast_normalization(config: Config) -> str:
    """The intensity normalization of the aligned contrasts: the T1w's method, except
    Nyúl, whose standard the group level learns from T1w images only."""
    method = config.intensity.method
    return "none" if method == "nyul" else method


def space_output(output: str, index: int) -> str:
    """``outputnode`` field of ``output`` (``std_preproc``, ...) in the ``index``-th
    template space (1: the first, which keeps the plain name; 2: ``std_preproc_space2``)."""
    return output if index == 1 else f"{output}_space{index}"


#: Template-space outputs written once per requested space and resolution.
SPACE_OUTPUTS = ("std_preproc", "std_mask", "std_norm", "std_dseg")


def _with_space_metadata(spec: DerivativeSpec, config: Config) -> DerivativeSpec:
    """Sidecar fields BIDS requires of a template-space image: ``Resolution`` when it is
    named with ``res-``, ``SpatialReference`` (the template's T1w file) when its space is
    not a standard one (a user template)."""
    from dataclasses import replace
    from pathlib import Path

    res = spec.entities.get("resolution")
    space = spec.entities.get("space")
    files = config.registration.template_files
    extra: dict[str, Any] = {}
    if res is not None:
        extra["Resolution"] = (
            f"{res} mm isotropic grid of {space} (mriflow's embedded template, block means)"
        )
    if files and space == config.registration.template:
        extra["SpatialReference"] = Path(files["t1w"]).as_uri()
    return replace(spec, metadata={**spec.metadata, **extra}) if extra else spec


def _extra_space_specs(space: OutputSpace, index: int, config: Config) -> list[DerivativeSpec]:
    """The template-space images of a second (third, ...) requested space or resolution:
    the same transforms, resampled on another grid."""
    from dataclasses import replace

    first = [s for s in _first_space_derivatives(config) if s.output in SPACE_OUTPUTS]
    out = []
    for spec in first:
        steps = tuple(
            space_output(step, index) if step in SPACE_OUTPUTS else step for step in spec.steps
        )
        entities = {k: v for k, v in spec.entities.items() if k not in ("space", "resolution")}
        metadata = {k: v for k, v in spec.metadata.items() if k != "Resolution"}
        out.append(
            replace(
                spec,
                output=space_output(spec.output, index),
                entities={**entities, **space.entities},
                metadata=metadata,
                steps=steps,
            )
        )
    return out


def _first_space_derivatives(config: Config) -> list[DerivativeSpec]:
    """The T1w derivatives of ``config`` as if its first template space were the only one."""
    from copy import deepcopy

    single = deepcopy(config)
    spaces = config.registration.template_spaces()
    single.registration.output_spaces = [str(spaces[0])] if spaces else []
    return anat_derivatives("T1w", single)


#: Head images (not brain-only) that ``--deface`` changes.
_HEAD_IMAGES = ("preproc", "std_preproc", "model")


def _defaced(specs: list[DerivativeSpec]) -> list[DerivativeSpec]:
    """``specs`` with the defacing step and ``Defaced`` in the head images' sidecars."""
    from dataclasses import replace

    return [
        replace(spec, metadata={**spec.metadata, "Defaced": True}, steps=(*spec.steps, "deface"))
        if spec.output in _HEAD_IMAGES
        else spec
        for spec in specs
    ]


def _template_space_specs(space: dict[str, str]) -> list[DerivativeSpec]:
    """Transforms and template-space images (only when registration runs)."""
    template = space["space"]
    return [
        DerivativeSpec(
            output="xfm_fwd",
            suffix="xfm",
            entities={"from": "T1w", "to": template, "mode": "image"},
            metadata={
                "Type": "composite ANTs transform (HDF5)",
                "FromSpace": "T1w",
                "ToSpace": template,
            },
            steps=_REGISTER,
            extension=".h5",
            derived_from=("preproc", "brain_mask"),
        ),
        DerivativeSpec(
            output="xfm_rev",
            suffix="xfm",
            entities={"from": template, "to": "T1w", "mode": "image"},
            metadata={
                "Type": "composite ANTs transform (HDF5)",
                "FromSpace": template,
                "ToSpace": "T1w",
            },
            steps=_REGISTER,
            extension=".h5",
            derived_from=("preproc", "brain_mask"),
        ),
        DerivativeSpec(
            output="std_preproc",
            suffix="T1w",
            entities={**space, "desc": "preproc"},
            metadata={"SkullStripped": False},
            steps=(*_REGISTER, "std_preproc"),
            derived_from=("preproc", "xfm_fwd"),
        ),
        DerivativeSpec(
            output="std_mask",
            suffix="mask",
            entities={**space, "desc": "brain"},
            metadata={"Type": "Brain"},
            steps=(*_REGISTER, "std_mask"),
            data_dtype="uint8",
            derived_from=("brain_mask", "xfm_fwd"),
        ),
    ]


#: The group level's Nyúl-standardized copy of each native T1w (fitted on the training split).
NYUL_SPEC = DerivativeSpec(
    output="nyul",
    suffix="T1w",
    entities={"desc": "nyul"},
    metadata={"SkullStripped": True},
    steps=("nyul",),
    derived_from=("preproc", "brain_mask"),
)

#: Dataset-level files (relative to OUT_DIR), by output name.
GROUP_OUTPUTS: dict[str, str] = {
    "nyul_standard": "nyul_standard.json",
    "splits": "splits.tsv",
    "splits_json": "splits.json",
    "manifest": "dataset.csv",
    "manifest_json": "dataset.json",
    "slices_manifest": "dataset_slices.csv",
    "group_iqms": "group_desc-qc_metrics.tsv",  # every IQM of every image
    "group_report": "group.html",
    "dseg_lut": "dseg.tsv",
    "config": "mriflow_config.toml",
    "citation": "logs/CITATION.md",  # methods boilerplate of the last participant run
    "citation_bib": "logs/CITATION.bib",
    "dataset_description": "dataset_description.json",
}


def all_anat_derivatives(contrast: str) -> list[DerivativeSpec]:
    """Every derivative any configuration can write for ``contrast`` (for reading back)."""
    specs: dict[tuple, DerivativeSpec] = {}
    for registered in (True, False):
        config = Config()
        config.set("registration.enabled", registered)
        config.set("intensity.method", "zscore")
        if config.segmentation.method == "none":
            config.set("segmentation.method", "atropos")
        # a T1w is its session's reference, or a ce-/second T1w aligned to it
        specs_of_config = [
            *(anat_derivatives(contrast, config) if contrast == "T1w" else []),
            *(longitudinal_derivatives() if contrast == "T1w" else []),
            *([stack_derivative(config)] if contrast == "T1w" else []),
            *contrast_derivatives(contrast, config),
            NYUL_SPEC,
        ]
        for spec in specs_of_config:
            key = (spec.suffix or contrast, tuple(sorted(spec.entities.items())), spec.extension)
            specs.setdefault(key, spec)
    return list(specs.values())


def derivative_relpath(
    source_entities: Mapping[str, str], contrast: str, spec: DerivativeSpec
) -> str:
    """Where ``spec``'s derivative of a raw image (``source_entities``, ``contrast``) goes."""
    return build_path(
        {**source_entities, **spec.entities},
        suffix=spec.suffix or contrast,
        extension=spec.extension or ".nii.gz",
    )


def slices_index_relpath(entities: Mapping[str, str]) -> str:
    """``sub-01/slices/sub-01_space-X_desc-model_slices.csv``: the 2D slices' index."""
    return build_path(entities, suffix="slices", extension=".csv", datatype="slices")


def slices_stem(entities: Mapping[str, str]) -> tuple[str, str]:
    """``("sub-01/slices", "sub-01_space-X_desc-model")``: folder and name prefix of the slices."""
    folder, _, name = slices_index_relpath(entities).rpartition("/")
    return folder, name.removesuffix("_slices.csv")


def iqm_relpath(
    entities: Mapping[str, str], contrast: str = "T1w", extension: str = ".json"
) -> str:
    """``sub-01/[ses-a/]anat/sub-01_[ses-a_]desc-qc_metrics.json`` for a raw image's entities.

    Contrasts other than T1w get ``desc-qc<contrast>`` (e.g. ``desc-qcT2w``) so the
    files of two contrasts of one session do not collide.
    """
    desc = "qc" if contrast == "T1w" else f"qc{contrast}"
    return build_path({**entities, "description": desc}, suffix="metrics", extension=extension)


def figure_relpath(subject: str, entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """``sub-01/figures/<BIDS name>``: a report figure of the subject."""
    return figure_relpath_of(subject, build_filename(entities, suffix=suffix, extension=extension))


def figure_relpath_of(subject: str, filename: str) -> str:
    """``sub-01/figures/<filename>``: where a figure made elsewhere is copied for the report."""
    return f"{subject_dirname(subject)}/figures/{filename}"


def report_relpath(subject: str) -> str:
    """``sub-01.html``: the subject's QC report, at the top of OUT_DIR."""
    return f"{subject_dirname(subject)}.html"


def provenance_relpath(subject: str) -> str:
    """``provenance/sub-01_prov.jsonld``: the subject's W3C PROV record."""
    return f"provenance/{subject_dirname(subject)}_prov.jsonld"


def status_relpath(subject: str) -> str:
    """``logs/sub-01_status.json``: the subject's completion record (ok/failed, reason, run)."""
    return f"logs/{subject_dirname(subject)}_status.json"

"""What each workflow output is called as a BIDS derivative (sMRIPrep naming).

One table, read by the workflows when they wire their data sinks; names are
built from these entities by :func:`mriflow.bids.derivatives.build_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mriflow.config import Config

__all__ = ["DerivativeSpec", "anat_derivatives", "TEMPLATE_SPACE"]

TEMPLATE_SPACE = "MNI152NLin2009aSym"

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


def anat_derivatives(contrast: str, config: Config | None = None) -> list[DerivativeSpec]:
    """The derivatives written for one anatomical image of contrast ``contrast``."""
    config = config or Config()
    specs = [
        DerivativeSpec(
            output="preproc",
            suffix=contrast,
            entities={"desc": "preproc"},
            steps=_PREPROC,
            dynamic_metadata="preproc_metadata",
        )
    ]
    if contrast != "T1w":
        return specs
    registered = config.registration.enabled
    space = {"space": TEMPLATE_SPACE} if registered else {}
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
    return specs


def _template_space_specs(space: dict[str, str]) -> list[DerivativeSpec]:
    """Transforms and template-space images (only when registration runs)."""
    return [
        DerivativeSpec(
            output="xfm_fwd",
            suffix="xfm",
            entities={"from": "T1w", "to": TEMPLATE_SPACE, "mode": "image"},
            metadata={
                "Type": "composite ANTs transform (HDF5)",
                "FromSpace": "T1w",
                "ToSpace": TEMPLATE_SPACE,
            },
            steps=_REGISTER,
            extension=".h5",
            derived_from=("preproc", "brain_mask"),
        ),
        DerivativeSpec(
            output="xfm_rev",
            suffix="xfm",
            entities={"from": TEMPLATE_SPACE, "to": "T1w", "mode": "image"},
            metadata={
                "Type": "composite ANTs transform (HDF5)",
                "FromSpace": TEMPLATE_SPACE,
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

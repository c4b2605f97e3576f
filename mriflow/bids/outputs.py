"""What each workflow output is called as a BIDS derivative (sMRIPrep naming).

One table, read by the workflows when they wire their data sinks; names are
built from these entities by :func:`mriflow.bids.derivatives.build_path`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DerivativeSpec", "anat_derivatives"]


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


def anat_derivatives(contrast: str) -> list[DerivativeSpec]:
    """The derivatives written for one anatomical image of contrast ``contrast``."""
    return [
        DerivativeSpec(
            output="preproc",
            suffix=contrast,
            entities={"desc": "preproc"},
            metadata={"SkullStripped": False},
            steps=("conform",),
        ),
    ]

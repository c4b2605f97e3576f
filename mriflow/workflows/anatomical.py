"""Anatomical preprocessing workflow (wiring only; parameters come from the config)."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.config import Config
from mriflow.interfaces.spatial import Conform

__all__ = ["init_anat_preproc_wf"]


def init_anat_preproc_wf(
    *, config: Config | None = None, contrast: str = "T1w", name: str = "anat_preproc_wf"
) -> pe.Workflow:
    """Preprocess one anatomical image.

    Parameters
    ----------
    config : Config
        Parameters of every step (defaults when omitted).
    contrast : {"T1w", "T2w", "FLAIR"}
    name : str

    Inputs
    ------
    in_file
        The raw anatomical image.

    Outputs
    -------
    preproc
        The image in RAS orientation, resampled to isotropic voxels.
    steps
        List of step records (name, parameters, software versions), in chain order.
    """
    config = config or Config()
    workflow = pe.Workflow(name=name)
    workflow.__desc__ = (
        f"The {contrast} image was reoriented to RAS and resampled to "
        f"{config.spatial.voxel_size:g} mm isotropic voxels ({config.spatial.image_interpolation} "
        "interpolation) with nibabel."
    )
    inputnode = pe.Node(niu.IdentityInterface(fields=["in_file"]), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["preproc", "steps"]), name="outputnode")
    conform = pe.Node(
        Conform(
            voxel_size=config.spatial.voxel_size,
            interpolation=config.spatial.image_interpolation,
            reorient=config.spatial.reorient,
        ),
        name="conform",
    )
    collect_steps = pe.Node(niu.Merge(1), name="collect_steps")

    workflow.connect([
        (inputnode, conform, [("in_file", "in_file")]),
        (conform, collect_steps, [("step", "in1")]),
        (conform, outputnode, [("out_file", "preproc")]),
        (collect_steps, outputnode, [("out", "steps")]),
    ])  # fmt:skip
    return workflow

"""Defacing sub-workflow: wire :class:`mriflow.interfaces.deface.Deface`.

The lead wires it into the participant workflow: ``inputnode.in_file`` is a
head image that is published (native or MNI ``desc-preproc``), ``brain_mask``
its brain mask on the same grid, and optionally ``template_to_subject`` the
kept reverse transform (only for native-space heads).
"""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.interfaces.deface import Deface

__all__ = ["init_deface_wf"]


def init_deface_wf(
    *,
    margin_mm: float = 5.0,
    ear_depth_mm: float = 45.0,
    use_template: bool = False,
    num_threads: int = 1,
    name: str = "deface_wf",
) -> pe.Workflow:
    """Deface one head image.

    Parameters
    ----------
    margin_mm : float
        Distance kept between the brain mask and anything removed.
    ear_depth_mm : float
        How far behind the brain's centroid the shave reaches.
    use_template : bool
        Also remove the template face mask brought back through
        ``inputnode.template_to_subject`` (must then be connected).
    num_threads : int
        ITK threads for the template resampling.

    Inputs (``inputnode``)
    ----------------------
    in_file, brain_mask, template_to_subject

    Outputs (``outputnode``)
    ------------------------
    out_file (defaced head), face_mask, metadata (sidecar fields
    ``Defaced``/``DefacingMethod``), step. The report draws the defacing figure from
    the published images.
    """
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(
        niu.IdentityInterface(fields=["in_file", "brain_mask", "template_to_subject"]),
        name="inputnode",
    )
    outputnode = pe.Node(
        niu.IdentityInterface(fields=["out_file", "face_mask", "metadata", "step"]),
        name="outputnode",
    )
    deface = pe.Node(
        Deface(margin_mm=margin_mm, ear_depth_mm=ear_depth_mm, num_threads=num_threads),
        name="deface",
        n_procs=num_threads,
        mem_gb=1.0,
    )
    workflow.connect(
        [
            (inputnode, deface, [("in_file", "in_file"), ("brain_mask", "mask_file")]),
            (
                deface,
                outputnode,
                [
                    ("out_file", "out_file"),
                    ("face_mask", "face_mask"),
                    ("metadata", "metadata"),
                    ("step", "step"),
                ],
            ),
        ]
    )
    if use_template:
        workflow.connect(inputnode, "template_to_subject", deface, "template_to_subject")
    return workflow

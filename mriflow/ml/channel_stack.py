"""A session's model-ready channels as one 4D volume, channels last (``export.channel_layout``).

The 3D model-ready volumes of a session (the reference T1w's and those of the contrasts
aligned to it) share one grid: the reference's crop box. :func:`stack_channels` puts
them along a fourth axis, ``(X, Y, Z, C)``, which TorchIO (``tio.ScalarImage``) and
MONAI (``LoadImage`` + ``EnsureChannelFirst``) read as ``(C, X, Y, Z)``.
:func:`channel_order` applies the missing-channel rule before anything is stacked: a
channel is never filled in or shifted, so a session lacking a requested channel gets
no stack at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np

__all__ = ["ChannelStackError", "channel_order", "stack_channels"]

#: Largest difference between two volumes' affines (mm) still called one grid: the
#: model-ready volumes of one session are cut by one function from one box.
GRID_ATOL_MM = 1e-4


class ChannelStackError(ValueError):
    """The volumes cannot be stacked; the message names the files and the problem."""


def channel_order(
    available: Sequence[str], wanted: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Which of a session's channels (besides the reference) go into its stack, in order.

    Parameters
    ----------
    available : sequence of str
        The session's channel names, in the session's order (e.g. ``["ce-gadolinium_T1w",
        "T2w", "FLAIR"]``).
    wanted : sequence of str, optional
        ``coregistration.channels``: these channels, in this order. Empty: every
        available channel, in the session's order.

    Returns
    -------
    order : list of str
        The channels to stack after the reference; empty when one is missing.
    missing : list of str
        The wanted channels the session lacks (then there is no stack: a missing
        channel is never zero-filled, and the next one never takes its place).
    """
    if len(set(available)) != len(available):
        raise ChannelStackError(f"channel names must be unique, got {list(available)}")
    if not wanted:
        return list(available), []
    missing = [name for name in wanted if name not in available]
    return ([] if missing else list(wanted)), missing


def stack_channels(
    images: Sequence[nib.spatialimages.SpatialImage], names: Sequence[str] = ()
) -> nib.Nifti1Image:
    """Stack 3D volumes of one grid into one ``(X, Y, Z, C)`` float32 image.

    Parameters
    ----------
    images : sequence of nibabel images
        The channels, in order: 3D volumes (a trailing axis of length 1 is allowed)
        with one shape and one affine.
    names : sequence of str, optional
        What to call each image in an error when it has no file name.

    Returns
    -------
    nibabel.Nifti1Image
        ``(X, Y, Z, C)`` float32, the first image's affine; channel ``i`` holds
        ``images[i]``'s values exactly (model-ready volumes are float32 already).

    Raises
    ------
    ChannelStackError
        Fewer than one image, a volume that is not 3D, or two grids that differ
        (one line naming both files).
    """
    if not images:
        raise ChannelStackError("no volumes to stack")
    labels = [
        img.get_filename() or (names[i] if i < len(names) else f"channel {i}")
        for i, img in enumerate(images)
    ]
    first = images[0]
    shape = first.shape[:3]
    channels = []
    for img, label in zip(images, labels, strict=True):
        if len(img.shape) not in (3, 4) or (len(img.shape) == 4 and img.shape[3] != 1):
            raise ChannelStackError(f"{label}: shape {img.shape} is not a 3D volume")
        if img.shape[:3] != shape:
            raise ChannelStackError(
                f"{label}: shape {img.shape[:3]} differs from {shape} of {labels[0]}; "
                "the channels of a stack must share one grid"
            )
        if not np.allclose(img.affine, first.affine, atol=GRID_ATOL_MM):
            raise ChannelStackError(
                f"{label}: affine differs from that of {labels[0]}; "
                "the channels of a stack must share one grid"
            )
        channels.append(np.asarray(img.dataobj, dtype=np.float32).reshape(shape))
    out = nib.Nifti1Image(np.stack(channels, axis=-1), first.affine)
    out.set_data_dtype(np.float32)
    # the fourth axis holds channels, not time: no repetition time in the header
    out.header.set_zooms((*first.header.get_zooms()[:3], 1.0))
    return out

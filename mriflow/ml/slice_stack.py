"""Packed 2D slices: one memory-mappable ``.npy`` stack per subject, axis and kind.

A slice export as one file per slice (PNG) costs hundreds of files per subject:
tens of millions on a biobank-sized dataset, past the inode quota of most cluster
file systems and slow to list, copy and load. The packed form (``slice_format =
"stack"``, the default) writes, per axis, one array of shape ``(n_slices, rows,
columns)`` for the image (float32, the values themselves, unscaled) and one each
for the mask (uint8 0/1) and the dseg (smallest unsigned type). The slice index
CSV lists every slice as before, with ``file`` naming its stack and
``stack_index`` its position there, so the index reads the same in both forms.

:func:`mriflow.ml.slices.load_slice_batch` reads any rows of an index, from either form, as one
array; stacks are opened with ``mmap_mode="r"`` so a batch reads only its slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mriflow.bids.derivatives import atomic_write

__all__ = ["open_stack", "write_stack"]


def write_stack(path: str | Path, planes: Sequence[np.ndarray], dtype: np.dtype | type) -> Path:
    """Write ``planes`` (2D arrays of one shape) as one ``(n, rows, columns)`` ``.npy``.

    Written atomically, so a reader never maps half a stack.
    """
    path = Path(path)
    if planes:
        shapes = {p.shape for p in planes}
        if len(shapes) != 1:
            raise ValueError(f"{path.name}: slices of one stack must share a shape, got {shapes}")
        stack = np.stack([np.asarray(p, dtype=dtype) for p in planes])
    else:  # an axis with no slice selected still gets its (empty) stack: the index says so
        stack = np.zeros((0, 0, 0), dtype=dtype)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, stack, allow_pickle=False)

    atomic_write(path, write)
    return path


def open_stack(path: str | Path) -> np.ndarray:
    """Memory-map a stack read-only (nothing is read until a slice is indexed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: slice stack not found")
    try:
        stack = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a slice stack ({err})") from None
    if stack.ndim != 3:
        raise ValueError(f"{path}: a slice stack is 3D (n, rows, columns), got {stack.shape}")
    return stack

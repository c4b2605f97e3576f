"""Packed 2D slices: one memory-mappable ``.npy`` stack per subject, axis and kind.

A slice export as one file per slice (PNG) costs hundreds of files per subject:
tens of millions on a biobank-sized dataset, past the inode quota of most cluster
file systems and slow to list, copy and load. The packed form (``slice_format =
"stack"``, the default) writes, per axis, one array of shape ``(n_slices, rows,
columns)`` for the image (float32, the values themselves, unscaled) and one each
for the mask (uint8 0/1) and the dseg (smallest unsigned type). The slice index
CSV lists every slice as before, with ``file`` naming its stack and
``stack_index`` its position there, so the index reads the same in both forms.

:func:`load_slice_batch` reads any rows of an index, from either form, as one
array; stacks are opened with ``mmap_mode="r"`` so a batch reads only its slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mriflow.bids.derivatives import atomic_write

__all__ = ["load_slice_batch", "open_stack", "write_stack"]


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


def load_slice_batch(
    index_file: str | Path,
    rows: Sequence[Mapping[str, Any]],
    kind: Literal["image", "mask", "dseg"] = "image",
) -> np.ndarray:
    """A batch of slices ``(len(rows), rows, columns)`` listed by a slice index.

    Parameters
    ----------
    index_file : path
        The slice index CSV the rows come from (files are relative to its folder).
    rows : sequence of mapping
        Rows of :func:`mriflow.ml.slices.read_slice_index` (any subset, any order;
        all of one axis, so that the slices share a shape).
    kind : {"image", "mask", "dseg"}
        Image values as float32 (PNG slices unscaled with the row's offset/scale),
        masks as bool, dseg as stored labels.

    Notes
    -----
    Works on both forms of an export: packed stacks (the row has ``stack_index``)
    and one file per slice (PNG or NPY), so code that trains on slices does not
    depend on the export's format.
    """
    from mriflow.ml.slices import load_slice

    folder = Path(index_file).parent
    column = {"image": "file", "mask": "mask_file", "dseg": "dseg_file"}[kind]
    stacks: dict[str, np.ndarray] = {}
    planes = []
    for row in rows:
        name = row.get(column)
        if not name:
            raise ValueError(f"{index_file}: slice {row.get('index')} has no {column}")
        position = row.get("stack_index")
        if position is not None:
            if name not in stacks:
                stacks[name] = open_stack(folder / name)
            stored = np.asarray(stacks[name][int(position)])
            # stacks hold values unscaled (offset 0, scale 1)
            plane = stored.astype(np.float32) if kind == "image" else stored
        elif kind == "image":
            offset, scale = row.get("value_offset") or 0.0, row.get("value_scale") or 1.0
            plane = load_slice(folder / name, offset, scale).astype(np.float32)
        else:
            plane = load_slice(folder / name, labels=True)
        planes.append(plane > 0 if kind == "mask" else plane)
    if not planes:
        return np.zeros((0, 0, 0), dtype=np.float32 if kind == "image" else np.uint8)
    return np.stack(planes)

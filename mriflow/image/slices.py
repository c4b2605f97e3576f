"""3D volumes to 2D slices: axis from the affine, display orientation, brain fraction, scaling.

Plain functions on numpy arrays and affines; writing files is done by
:mod:`mriflow.ml.slices`.

Conventions
-----------
The anatomical axis is found from the image's affine (``nibabel.io_orientation``),
never assumed from the voxel order: ``axial`` slices are perpendicular to the
world z axis (inferior-superior), ``coronal`` to y (posterior-anterior) and
``sagittal`` to x (left-right). Every 2D slice is then flipped/transposed (no
interpolation) into one display orientation, so slices of images stored in
different voxel orders look alike:

=========  =========================  ===========================
axis       rows (top to bottom)       columns (left to right)
=========  =========================  ===========================
axial      anterior to posterior      left to right (neurological)
coronal    superior to inferior       left to right
sagittal   superior to inferior       posterior to anterior
=========  =========================  ===========================

For an oblique acquisition the slice follows the voxel axis closest to the
anatomical one; only images resampled to a common space (e.g. MNI) give slices
that correspond across subjects.

Intensity scaling for integer images (PNG) is linear::

    stored = clip(rint((value - offset) / scale), 0, 2**bit_depth - 1)
    value  ~ offset + scale * stored        (error <= scale / 2 inside the range)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import nibabel as nib
import numpy as np

__all__ = [
    "SLICE_AXES",
    "SliceLayout",
    "LinearScaling",
    "slice_layout",
    "extract_slice",
    "slice_world_coordinate",
    "brain_fractions",
    "select_slices",
    "linear_scaling",
    "label_dtype",
]

SliceAxis = Literal["axial", "coronal", "sagittal"]
SLICE_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")

# World (RAS+) axis perpendicular to each slice orientation.
_NORMAL_WORLD_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
# (world axis shown down the rows, world axis shown along the columns) and whether the
# rows run towards decreasing world coordinates (top = anterior or superior).
_DISPLAY = {
    "axial": (1, 0),  # rows: y (A at top), columns: x (L to R)
    "coronal": (2, 0),  # rows: z (S at top), columns: x (L to R)
    "sagittal": (2, 1),  # rows: z (S at top), columns: y (P to A)
}
_AXIS_NAMES = {0: ("L", "R"), 1: ("P", "A"), 2: ("I", "S")}


def _check_axis(axis: str) -> str:
    if axis not in _NORMAL_WORLD_AXIS:
        raise ValueError(f"axis must be one of {list(SLICE_AXES)}, got {axis!r}")
    return axis


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine is degenerate (det 0): {affine.tolist()}")
    return affine


@dataclass(frozen=True)
class SliceLayout:
    """How a 2D slice is cut from the voxel array and oriented for display.

    Attributes
    ----------
    axis : str
        ``axial``, ``coronal`` or ``sagittal``.
    voxel_axis : int
        The voxel axis indexed by the slice number.
    row_voxel_axis, col_voxel_axis : int
        The voxel axes running down the rows and along the columns of the 2D slice.
    row_flipped, col_flipped : bool
        Whether the voxel index decreases down the rows / along the columns.
    rows, columns : str
        Anatomical direction of the rows and columns, e.g. ``"A->P"`` and ``"L->R"``.
    """

    axis: str
    voxel_axis: int
    row_voxel_axis: int
    col_voxel_axis: int
    row_flipped: bool
    col_flipped: bool
    rows: str
    columns: str

    def voxel_index(self, slice_index: int, row: int, col: int, shape: Sequence[int]) -> tuple:
        """The (i, j, k) voxel shown at pixel (``row``, ``col``) of slice ``slice_index``."""
        ijk = [0, 0, 0]
        ijk[self.voxel_axis] = slice_index
        n_row, n_col = shape[self.row_voxel_axis], shape[self.col_voxel_axis]
        ijk[self.row_voxel_axis] = n_row - 1 - row if self.row_flipped else row
        ijk[self.col_voxel_axis] = n_col - 1 - col if self.col_flipped else col
        return tuple(ijk)


def slice_layout(affine: np.ndarray, axis: str) -> SliceLayout:
    """Find the voxel axis of ``axis`` slices and the display orientation from ``affine``.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel-to-world (RAS+ mm) affine of the volume.
    axis : {"axial", "coronal", "sagittal"}

    Returns
    -------
    SliceLayout
    """
    axis = _check_axis(axis)
    affine = _check_affine(affine)
    # ornt[i] = (world axis, +1/-1) of voxel axis i: the closest world axis, so an
    # oblique image still gets a consistent, if approximate, anatomical labelling.
    ornt = nib.orientations.io_orientation(affine)
    voxel_of_world = {int(ornt[i, 0]): i for i in range(3)}
    sign_of_voxel = {i: int(ornt[i, 1]) for i in range(3)}
    row_world, col_world = _DISPLAY[axis]
    row_voxel, col_voxel = voxel_of_world[row_world], voxel_of_world[col_world]
    # Rows run towards decreasing world coordinate (anterior/superior at the top),
    # columns towards increasing (left/posterior at the left).
    row_flipped = sign_of_voxel[row_voxel] > 0
    col_flipped = sign_of_voxel[col_voxel] < 0
    low, high = _AXIS_NAMES[row_world]
    rows = f"{high}->{low}"
    low, high = _AXIS_NAMES[col_world]
    columns = f"{low}->{high}"
    return SliceLayout(
        axis=axis,
        voxel_axis=voxel_of_world[_NORMAL_WORLD_AXIS[axis]],
        row_voxel_axis=row_voxel,
        col_voxel_axis=col_voxel,
        row_flipped=row_flipped,
        col_flipped=col_flipped,
        rows=rows,
        columns=columns,
    )


def extract_slice(data: np.ndarray, layout: SliceLayout, index: int) -> np.ndarray:
    """The 2D slice number ``index`` of ``data``, in display orientation (a copy).

    Parameters
    ----------
    data : (X, Y, Z) array
    layout : SliceLayout
        From :func:`slice_layout` with the volume's affine.
    index : int
        Voxel index along ``layout.voxel_axis``.

    Returns
    -------
    (rows, columns) array of ``data.dtype``
    """
    if data.ndim != 3:
        raise ValueError(f"data must be a 3D array, got shape {data.shape}")
    n = data.shape[layout.voxel_axis]
    if not 0 <= index < n:
        raise ValueError(f"slice index {index} is outside 0..{n - 1} for axis {layout.axis}")
    # Basic indexing gives a view; np.take would first copy a Fortran-ordered volume
    # (as nibabel loads NIfTI) into C order, once per slice.
    where: list[int | slice] = [slice(None)] * 3
    where[layout.voxel_axis] = index
    plane = data[tuple(where)]
    # The two remaining voxel axes keep their order; put the row axis first.
    remaining = [a for a in range(3) if a != layout.voxel_axis]
    if remaining.index(layout.row_voxel_axis) != 0:
        plane = plane.T
    if layout.row_flipped:
        plane = plane[::-1, :]
    if layout.col_flipped:
        plane = plane[:, ::-1]
    return np.ascontiguousarray(plane)


def slice_world_coordinate(
    affine: np.ndarray, shape: Sequence[int], layout: SliceLayout, index: int
) -> float:
    """World coordinate (mm) of slice ``index`` along the slice normal, at the slice centre.

    That is z for axial, y for coronal and x for sagittal slices. For images
    without obliquity every voxel of the slice has this coordinate.
    """
    affine = _check_affine(affine)
    centre = (np.asarray(shape[:3], dtype=float) - 1) / 2
    centre[layout.voxel_axis] = index
    world = nib.affines.apply_affine(affine, centre)
    return float(world[_NORMAL_WORLD_AXIS[layout.axis]])


def brain_fractions(mask: np.ndarray, layout: SliceLayout) -> np.ndarray:
    """Fraction of each slice's pixels inside ``mask`` (> 0), one value per slice index."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be a 3D array, got shape {mask.shape}")
    inside = np.asarray(mask) > 0
    other = tuple(a for a in range(3) if a != layout.voxel_axis)
    return inside.mean(axis=other)


def select_slices(
    n_slices: int,
    *,
    fractions: np.ndarray | None = None,
    index_range: tuple[int, int] | None = None,
    min_brain_fraction: float = 0.0,
) -> list[int]:
    """Slice indices to export: inside ``index_range`` and with enough brain.

    Parameters
    ----------
    n_slices : int
        Number of slices along the axis.
    fractions : (n_slices,) array, optional
        Brain fraction per slice (:func:`brain_fractions`); required when
        ``min_brain_fraction > 0``.
    index_range : (start, stop), optional
        Half-open voxel index range ``start <= index < stop``; ``None`` for all.
    min_brain_fraction : float
        Skip slices whose brain fraction is below this (0 keeps all; a slice
        with no brain at all is skipped whenever this is > 0).
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be >= 1, got {n_slices}")
    if not 0.0 <= min_brain_fraction <= 1.0:
        raise ValueError(f"min_brain_fraction must be in [0, 1], got {min_brain_fraction}")
    start, stop = 0, n_slices
    if index_range is not None:
        if len(index_range) != 2:
            raise ValueError(f"index_range must be (start, stop), got {index_range!r}")
        start, stop = int(index_range[0]), int(index_range[1])
        if not 0 <= start < stop <= n_slices:
            raise ValueError(
                f"index_range must satisfy 0 <= start < stop <= {n_slices}, got {index_range!r}"
            )
    indices = list(range(start, stop))
    if min_brain_fraction > 0:
        if fractions is None:
            raise ValueError("a brain mask is needed to select slices by min_brain_fraction > 0")
        fractions = np.asarray(fractions)
        if fractions.shape != (n_slices,):
            raise ValueError(f"fractions must have shape ({n_slices},), got {fractions.shape}")
        indices = [i for i in indices if fractions[i] > 0 and fractions[i] >= min_brain_fraction]
    return indices


@dataclass(frozen=True)
class LinearScaling:
    """Linear map between float values and unsigned integers of ``bit_depth`` bits.

    ``stored = clip(rint((value - offset) / scale), 0, 2**bit_depth - 1)`` and
    ``value ~ offset + scale * stored``.
    """

    offset: float
    scale: float
    bit_depth: int

    @property
    def max_stored(self) -> int:
        return 2**self.bit_depth - 1

    @property
    def dtype(self) -> type:
        return np.uint8 if self.bit_depth == 8 else np.uint16

    def to_stored(self, values: np.ndarray) -> np.ndarray:
        """Float values to integers (rounded half to even, clipped to the range)."""
        scaled = (np.asarray(values, dtype=np.float64) - self.offset) / self.scale
        return np.clip(np.rint(scaled), 0, self.max_stored).astype(self.dtype)

    def to_values(self, stored: np.ndarray) -> np.ndarray:
        """Stored integers back to float64 values."""
        return self.offset + self.scale * np.asarray(stored, dtype=np.float64)


def linear_scaling(
    data: np.ndarray,
    bit_depth: int = 16,
    value_range: tuple[float, float] | None = None,
) -> LinearScaling:
    """The scaling that maps ``value_range`` (default: data min..max) to 0..2**bit_depth-1.

    Using the whole volume's range (not each slice's) keeps intensities
    comparable between the slices of a volume. Values outside an explicit
    ``value_range`` are clipped when stored.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if value_range is None:
        finite = np.asarray(data)[np.isfinite(data)]
        if finite.size == 0:
            raise ValueError("data has no finite values to scale")
        low, high = float(finite.min()), float(finite.max())
    else:
        if len(value_range) != 2:
            raise ValueError(f"value_range must be (low, high), got {value_range!r}")
        low, high = float(value_range[0]), float(value_range[1])
        if not (np.isfinite(low) and np.isfinite(high) and high > low):
            raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    max_stored = 2**bit_depth - 1
    # A constant volume maps to 0 with scale 1: still exact, and no division by zero.
    scale = (high - low) / max_stored if high > low else 1.0
    return LinearScaling(offset=low, scale=scale, bit_depth=bit_depth)


def label_dtype(labels: np.ndarray) -> type:
    """The smallest unsigned PNG dtype (uint8 or uint16) that holds these integer labels."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.uint8
    if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.rint(labels)):
        raise ValueError("label values must be integers")
    low, high = labels.min(), labels.max()
    if low < 0 or high > 65535:
        raise ValueError(f"label values must be in 0..65535 to store as PNG, got {low}..{high}")
    return np.uint8 if high <= 255 else np.uint16

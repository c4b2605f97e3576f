"""QC figures a reviewer can judge in seconds, one function per preprocessing step.

Every function takes nibabel images and an output path (``.png`` or ``.svg``; the
format follows the extension), writes the figure atomically and returns the path.
Images are shown in RAS orientation (``as_closest_canonical``) in neurological
convention: the subject's right is on the right of each panel, anterior up in axial
views, superior up in coronal and sagittal views. Overlays (masks, labels) are
resampled to the base image's grid (nearest neighbour) when their grids differ.

Rendering uses matplotlib's Agg backend only (no display, no network).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from nibabel.processing import resample_from_to  # noqa: E402

from mriflow.bids.paths import atomic_write_bytes  # noqa: E402

__all__ = [
    "TISSUE_COLORS",
    "DefacingSection",
    "defacing_sections",
    "plot_bias_correction",
    "plot_coregistration",
    "plot_defacing",
    "plot_histograms",
    "plot_mask_contour",
    "plot_registration",
    "plot_segmentation",
    "figure_slices",
    "reduced",
]

#: Colours of the dseg labels 1=GM, 2=WM, 3=CSF (sMRIPrep's report colours are similar).
TISSUE_COLORS = {1: ("GM", "#1f9e3a"), 2: ("WM", "#f2c80f"), 3: ("CSF", "#2b7bde")}
PLANES = ("axial", "coronal", "sagittal")
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_FORMATS = {".png": "png", ".svg": "svg"}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def reduced(img: nib.spatialimages.SpatialImage, display_mm: float | None):
    """Every k-th voxel of each axis so voxels are at most ``display_mm`` (affine kept).

    Striding keeps label values (masks, dseg) and keeps images that share a grid on a
    shared grid, so overlays stay aligned; ``None`` or a coarse image: unchanged.
    """
    if display_mm is None:
        return img
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    step = max(1, int(display_mm // max(float(zooms.min()), 1e-6)))
    if step == 1:
        return img
    return img.slicer[(slice(None, None, step),) * 3]


def _check_out(out_path: str | os.PathLike[str]) -> tuple[Path, str]:
    path = Path(out_path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: figure files must end in .png or .svg")
    return path, fmt


def _canonical(img: nib.spatialimages.SpatialImage, name: str) -> nib.Nifti1Image:
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise TypeError(f"{name}: expected a nibabel image, got {type(img).__name__}")
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    if len(img.shape) != 3:
        raise ValueError(f"{name}: expected a 3D image, got shape {img.shape}")
    return nib.as_closest_canonical(img)


def _on_grid(
    img: nib.spatialimages.SpatialImage, like: nib.Nifti1Image, name: str, order: int = 0
) -> np.ndarray:
    """Voxels of ``img`` on the grid of ``like`` (unchanged when the grids agree)."""
    img = _canonical(img, name)
    if img.shape == like.shape and np.allclose(img.affine, like.affine, atol=1e-3):
        return np.asanyarray(img.dataobj)
    return np.asanyarray(resample_from_to(img, like, order=order).dataobj)


def _zooms(img: nib.Nifti1Image) -> np.ndarray:
    return np.sqrt((img.affine[:3, :3] ** 2).sum(0))


def _window(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Display range: 0.5th-99.5th percentile of the nonzero (or masked) voxels."""
    values = data[mask] if mask is not None and mask.any() else data[data != 0]
    if values.size > 1_000_000:  # a regular subsample gives the same percentiles, faster
        values = values[:: values.size // 1_000_000]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def figure_slices(reference: np.ndarray, axis: int, n: int, margin: float = 0.12) -> list[int]:
    """``n`` evenly spaced slice indices along ``axis`` across the extent of the object.

    The object is where ``|reference|`` exceeds 5 % of its maximum (so faint noise or
    interpolation residue does not count). The first and last ``margin`` fraction of
    the extent are skipped: edge slices show little anatomy. ``n == 1`` gives the
    middle slice.
    """
    if n < 1:
        raise ValueError(f"figure_slices: n must be >= 1, got {n}")
    other = tuple(a for a in range(reference.ndim) if a != axis)
    reference = np.asarray(reference)
    if reference.dtype == bool:
        support = reference
    else:
        peak = float(np.abs(reference).max()) if reference.size else 0.0
        support = np.abs(reference) > 0.05 * peak if peak > 0 else np.zeros(reference.shape, bool)
    present = np.flatnonzero(np.any(support, axis=other))
    if present.size == 0:
        low, high = 0, reference.shape[axis] - 1
    else:
        low, high = int(present[0]), int(present[-1])
    span = high - low
    if n == 1:
        return [int(round((low + high) / 2))]
    positions = np.linspace(low + margin * span, high - margin * span, n)
    return [int(round(p)) for p in positions]


def _slice(data: np.ndarray, plane: str, index: int) -> np.ndarray:
    # basic indexing (a view; np.take copies and is slow on large volumes); transpose
    # so that the displayed x is R (sagittal: A) and displayed y is A or S
    where: list[int | slice] = [slice(None)] * 3
    where[_AXIS[plane]] = index
    return data[tuple(where)].T


def _aspect(zooms: np.ndarray, plane: str) -> float:
    x, y = [a for a in range(3) if a != _AXIS[plane]]
    return float(zooms[y] / zooms[x])


def _save(fig: plt.Figure, out_path: str | os.PathLike[str]) -> Path:
    path, fmt = _check_out(out_path)
    buffer = io.BytesIO()
    # metadata without dates keeps reruns byte-identical (publishing skips equal files)
    metadata = {"Date": None} if fmt == "svg" else {"Software": "mriflow (matplotlib)"}
    # zlib level 1: half the encoding time of the default 6, files as small (these
    # figures are mostly flat black and grey)
    extra = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    fig.savefig(
        buffer, format=fmt, facecolor=fig.get_facecolor(), dpi=fig.dpi, metadata=metadata, **extra
    )
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _grid_figure(rows: int, cols: int, title: str, panel: float = 1.9, header: float = 0.4):
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(panel * cols, panel * rows + header + 0.1),
        dpi=90,
        squeeze=False,
        facecolor="black",
    )
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - header / (panel * rows + header + 0.1),
        wspace=0.02,
        hspace=0.02,
    )
    fig.suptitle(title, color="white", fontsize=11)
    for ax in axes.ravel():
        ax.set_facecolor("black")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    return fig, axes


def _label_panel(ax, plane: str, index: int) -> None:
    ax.text(
        0.02,
        0.98,
        f"{plane[0].upper()} {index}",
        color="white",
        fontsize=7,
        transform=ax.transAxes,
        va="top",
    )
    if plane != "sagittal":
        ax.text(
            0.98, 0.98, "R", color="white", fontsize=7, transform=ax.transAxes, ha="right", va="top"
        )


def _row(volume: np.ndarray, plane: str, indices: Sequence[int], gap: int, fill: float):
    """The sections of ``volume`` at ``indices`` side by side, ``gap`` columns of ``fill`` apart.

    One image per row of a mosaic: one axes and one artist per row instead of one per
    panel (matplotlib's cost is per axes and per artist, not per pixel).
    """
    sections = [_slice(volume, plane, index) for index in indices]
    height = sections[0].shape[0]
    spacer = np.full((height, gap), fill, dtype=np.result_type(sections[0].dtype, type(fill)))
    parts = []
    for number, section in enumerate(sections):
        if number:
            parts.append(spacer)
        parts.append(section)
    return np.concatenate(parts, axis=1)


class _Row:
    """One row of a mosaic: its axes, plane, slice indices and where each panel starts."""

    def __init__(self, ax, plane: str, indices: Sequence[int], width: int, gap: int) -> None:
        self.ax, self.plane, self.indices, self.gap = ax, plane, list(indices), gap
        self.width = width
        self.starts = [n * (width + gap) for n in range(len(self.indices))]
        self.total_width = len(self.indices) * (width + gap) - gap

    def compose(self, volume: np.ndarray, fill: float = 0) -> np.ndarray:
        return _row(volume, self.plane, self.indices, self.gap, fill)


def _row_axes(fig, title_height: float, row_heights: Sequence[float]):
    """One axes per mosaic row, stacked, full width, on a black figure."""
    total = sum(row_heights) + title_height
    axes, top = [], 1.0 - title_height / total
    for height in row_heights:
        bottom = top - height / total
        ax = fig.add_axes((0.005, bottom + 0.002, 0.99, height / total - 0.004))
        ax.set_facecolor("black")
        ax.set_axis_off()
        axes.append(ax)
        top = bottom
    return axes


def _label_row(row: _Row, height: int) -> None:
    for start, index in zip(row.starts, row.indices):
        row.ax.text(
            start + 1, height - 1, f"{row.plane[0].upper()} {index}",
            color="white", fontsize=7, va="top", ha="left",
        )  # fmt: skip
        if row.plane != "sagittal":
            row.ax.text(
                start + row.width - 2, height - 1, "R",
                color="white", fontsize=7, va="top", ha="right",
            )  # fmt: skip


@dataclass
class _Block:
    """Rows of a mosaic: ``volume`` in grey (its own window) and what is drawn over it."""

    volume: np.ndarray
    overlay: Callable[[_Row], None] | None = None
    """Draws on one row; ``row.compose(other_volume)`` gives that row's sections of it."""
    label: str = ""
    color: str = "white"


def _mosaic(
    blocks: Sequence[_Block],
    zooms: np.ndarray,
    out_path: str | os.PathLike[str],
    title: str,
    *,
    n_slices: int,
    reference: np.ndarray,
    planes: Sequence[str] = PLANES,
    panel: float = 1.9,
) -> Path:
    """A figure of ``len(planes)`` rows of ``n_slices`` sections per block.

    Slices are spread over the extent of ``reference`` (see :func:`figure_slices`).
    Each row is one image (the sections side by side, 2 black columns apart) on
    one axes: matplotlib's cost is per axes and artist, so a row costs what a
    panel did.
    """
    if reference.dtype != bool:  # once here, not once per plane
        reference = np.abs(reference) > 0.05 * float(np.abs(reference).max() or 1)
    indices = {plane: figure_slices(reference, _AXIS[plane], n_slices) for plane in planes}
    gap = 2
    shapes = {plane: _slice(blocks[0].volume, plane, 0).shape for plane in planes}
    # each row as wide as n_slices panels of `panel` inches, as high as its sections'
    # aspect asks: no row wastes space on letterboxing
    heights = []
    for _ in blocks:
        for plane in planes:
            rows_px, cols_px = shapes[plane]
            width_px = n_slices * cols_px + (n_slices - 1) * gap
            heights.append(panel * n_slices * rows_px * _aspect(zooms, plane) / width_px)
    header = 0.4
    total = sum(heights) + header
    fig = plt.figure(figsize=(panel * n_slices, total), dpi=90, facecolor="black")
    fig.suptitle(title, color="white", fontsize=11, y=1 - 0.06 / total)
    axes = iter(_row_axes(fig, header, heights))
    for block in blocks:
        vmin, vmax = _window(block.volume)
        for plane in planes:
            ax = next(axes)
            row = _Row(ax, plane, indices[plane], shapes[plane][1], gap)
            ax.imshow(
                row.compose(block.volume, np.nan), cmap=_GRAY, vmin=vmin, vmax=vmax,
                origin="lower", aspect=_aspect(zooms, plane), interpolation="nearest",
            )  # fmt: skip
            ax.set_xlim(-0.5, row.total_width - 0.5)
            ax.set_ylim(-0.5, shapes[plane][0] - 0.5)
            if block.overlay is not None:
                block.overlay(row)
            _label_row(row, shapes[plane][0])
            if block.label and plane == planes[0]:
                ax.text(1, 1, block.label, color=block.color, fontsize=7)
    return _save(fig, out_path)


#: Grey colour map whose NaNs (the gaps between panels) are black.
_GRAY = matplotlib.colormaps["gray"].with_extremes(bad="black")


def _check_slices(n_slices: int) -> None:
    if not 1 <= n_slices <= 12:
        raise ValueError(f"n_slices must be between 1 and 12, got {n_slices}")


# --------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------


def plot_mask_contour(
    t1w: nib.spatialimages.SpatialImage,
    mask: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    n_slices: int = 6,
    title: str = "Brain mask",
    color: str = "#ff3b3b",
) -> Path:
    """Brain mask contour over the image: 3 planes x ``n_slices`` slices through the mask.

    Look for: the contour hugging the brain surface, no dura/skull/eyes inside,
    no cortex (especially the top of the head and the temporal poles) outside.
    """
    _check_slices(n_slices)
    base = _canonical(t1w, "t1w")
    mask_data = _on_grid(mask, base, "mask") > 0
    if not mask_data.any():
        raise ValueError("plot_mask_contour: the mask is empty")

    def overlay(row: _Row) -> None:
        _contour(row, mask_data, color, 0.9)

    return _mosaic(
        [_Block(_grey(base), overlay)], _zooms(base), out_path, title,
        n_slices=n_slices, reference=mask_data,
    )  # fmt: skip


def plot_segmentation(
    t1w: nib.spatialimages.SpatialImage,
    dseg: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    n_slices: int = 6,
    title: str = "Tissue segmentation (GM green, WM yellow, CSF blue)",
    alpha: float = 0.35,
) -> Path:
    """Tissue labels (1=GM, 2=WM, 3=CSF) as translucent colours with outlines.

    Look for: WM following the gyri, GM as a ribbon of even thickness, CSF in the
    ventricles and sulci, no tissue labels outside the brain.
    """
    _check_slices(n_slices)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _canonical(t1w, "t1w")
    labels = np.rint(_on_grid(dseg, base, "dseg")).astype(int)
    if not labels.any():
        raise ValueError("plot_segmentation: the segmentation has no labels")
    colors = ["#00000000"] + [TISSUE_COLORS[k][1] for k in (1, 2, 3)]
    cmap = ListedColormap(colors)

    def overlay(row: _Row) -> None:
        section = row.compose(labels)
        masked = np.ma.masked_where((section < 1) | (section > 3), section)
        row.ax.imshow(
            masked, cmap=cmap, vmin=0, vmax=3, alpha=alpha, origin="lower",
            aspect=row.ax.get_aspect(), interpolation="nearest",
        )  # fmt: skip
        for label, (_, color) in TISSUE_COLORS.items():
            _contour(row, labels == label, color, 0.5)

    return _mosaic(
        [_Block(_grey(base), overlay)], _zooms(base), out_path, title,
        n_slices=n_slices, reference=labels > 0,
    )  # fmt: skip


def _grey(img: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(img.dataobj).astype(np.float32)


def _contour(row: _Row, mask: np.ndarray, color: str, width: float) -> None:
    """The outline of ``mask`` on every panel of ``row`` (one contour call per row)."""
    section = row.compose(mask).astype(np.float32)
    if section.any() and not section.all():
        row.ax.contour(section, levels=[0.5], colors=[color], linewidths=width, origin="lower")


def _edge_overlay(edges_of: np.ndarray, color: str) -> Callable[[_Row], None]:
    """Draws the Canny edges of ``edges_of`` (each section's own) in ``color``."""
    cmap = ListedColormap([color])

    def overlay(row: _Row) -> None:
        sections = [_edges(_slice(edges_of, row.plane, index)) for index in row.indices]
        height = sections[0].shape[0]
        spacer = np.zeros((height, row.gap), bool)
        edge = np.concatenate([x for part in sections for x in (spacer, part)][1:], axis=1)
        row.ax.imshow(
            np.ma.masked_where(~edge, edge), cmap=cmap, origin="lower",
            aspect=row.ax.get_aspect(), interpolation="nearest",
        )  # fmt: skip

    return overlay


def _edges(section: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Canny edges of a 2D slice, on intensities scaled to [0, 1]."""
    from skimage.feature import canny

    low, high = _window(section)
    scaled = np.clip((section - low) / (high - low), 0, 1)
    return canny(scaled, sigma=sigma, low_threshold=0.05, high_threshold=0.15)


def plot_registration(
    moving: nib.spatialimages.SpatialImage,
    template: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    n_slices: int = 5,
    title: str = "Registration to template",
) -> Path:
    """Registration check: subject edges over the template, and template edges over the subject.

    ``moving`` is the subject's image already resampled into template space (it is
    resampled onto the template grid if needed). Top three rows: template with the
    subject's edges (red); bottom three: subject with the template's edges (cyan).
    Look for: edges of ventricles, the brain outline and the major sulci landing on
    the same structures in both halves.
    """
    return _edge_pairs(
        template, moving, out_path, title, ("template", "subject"), n_slices=n_slices
    )


def _edge_pairs(
    fixed_img: nib.spatialimages.SpatialImage,
    moving_img: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    title: str,
    names: tuple[str, str],
    *,
    n_slices: int,
    brain_mask: nib.spatialimages.SpatialImage | None = None,
) -> Path:
    """Fixed image with the moving one's edges (red), moving with the fixed one's (cyan).

    ``moving_img`` is resampled onto the fixed grid if needed; a ``brain_mask`` (fixed
    grid) is outlined in yellow on the moving image and sets the slices' extent.
    """
    _check_slices(n_slices)
    fixed = _canonical(fixed_img, names[0])
    fixed_data = _grey(fixed)
    moving_data = _on_grid(moving_img, fixed, names[1], order=1).astype(np.float32)
    mask = _on_grid(brain_mask, fixed, "brain_mask") > 0 if brain_mask is not None else None
    edges_of_fixed = _edge_overlay(fixed_data, "#25e0f0")

    def on_moving(row: _Row) -> None:
        edges_of_fixed(row)
        if mask is not None:
            _contour(row, mask, "#f2c80f", 0.8)

    with_mask = " (brain mask yellow)" if mask is not None else ""
    blocks = [
        _Block(fixed_data, _edge_overlay(moving_data, "#ff3b3b"),
               f"{names[0]}, {names[1]} edges", "#ff3b3b"),
        _Block(moving_data, on_moving, f"{names[1]}, {names[0]} edges{with_mask}", "#25e0f0"),
    ]  # fmt: skip
    extent = mask if mask is not None and mask.any() else fixed_data
    return _mosaic(
        blocks, _zooms(fixed), out_path, title, n_slices=n_slices, reference=extent, panel=1.7
    )


def plot_coregistration(
    contrast: nib.spatialimages.SpatialImage,
    reference: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    brain_mask: nib.spatialimages.SpatialImage | None = None,
    n_slices: int = 5,
    title: str = "Co-registration to the T1w",
) -> Path:
    """Co-registration check of another contrast to its reference T1w (the MNI figure's look).

    ``contrast`` is the co-registered image (resampled onto the reference's grid if
    needed). Top three rows: the reference with the contrast's edges (red); bottom
    three: the contrast with the reference's edges (cyan) and, if given, the
    reference's brain-mask outline (yellow). Look for: ventricles, the brain outline
    and the major sulci on the same structures in both halves; the mask outline on
    the contrast's brain surface.
    """
    return _edge_pairs(
        reference, contrast, out_path, title, ("T1w", "contrast"),
        n_slices=n_slices, brain_mask=brain_mask,
    )  # fmt: skip


def plot_bias_correction(
    raw: nib.spatialimages.SpatialImage,
    corrected: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    bias_field: nib.spatialimages.SpatialImage | None = None,
    *,
    title: str = "Intensity non-uniformity correction (N4)",
    labels: tuple[str, str] = ("raw", "corrected"),
) -> Path:
    """Raw vs bias-corrected image (and the estimated bias field), middle slice of each plane.

    Columns: raw, corrected (named by ``labels``), bias field (if given; colour scale
    centred on 1).
    Look for: the corrected WM equally bright from top to bottom and front to back;
    a smooth field without anatomy in it.
    """
    base = _canonical(corrected, "corrected")
    raw_data = _on_grid(raw, base, "raw", order=1).astype(float)
    corr_data = np.asanyarray(base.dataobj).astype(float)
    columns: list[tuple[str, np.ndarray, dict]] = [
        (labels[0], raw_data, {"cmap": "gray", **dict(zip(("vmin", "vmax"), _window(raw_data)))}),
        (
            labels[1],
            corr_data,
            {"cmap": "gray", **dict(zip(("vmin", "vmax"), _window(corr_data)))},
        ),
    ]
    if bias_field is not None:
        field_data = _on_grid(bias_field, base, "bias_field", order=1).astype(float)
        inside = field_data[field_data > 0]
        spread = float(np.max(np.abs(np.percentile(inside, [1, 99]) - 1))) if inside.size else 0.1
        spread = max(spread, 0.02)
        columns.append(
            ("bias field", field_data, {"cmap": "RdBu_r", "vmin": 1 - spread, "vmax": 1 + spread})
        )
    zooms = _zooms(base)
    fig, axes = _grid_figure(len(PLANES), len(columns), title, panel=2.4, header=0.7)
    support = corr_data > 0.05 * float(np.abs(corr_data).max() or 1)
    for row, plane in enumerate(PLANES):
        index = figure_slices(support, _AXIS[plane], 1)[0]
        for col, (name, data, style) in enumerate(columns):
            ax = axes[row, col]
            shown = ax.imshow(
                _slice(data, plane, index), origin="lower", aspect=_aspect(zooms, plane), **style
            )
            if row == 0:
                ax.set_title(name, color="white", fontsize=9)
            _label_panel(ax, plane, index)
            if name == "bias field" and row == len(PLANES) - 1:
                bar = fig.colorbar(shown, ax=ax, orientation="horizontal", fraction=0.05, pad=0.01)
                bar.ax.tick_params(colors="white", labelsize=7)
    return _save(fig, out_path)


def plot_histograms(
    before: nib.spatialimages.SpatialImage,
    after: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    mask: nib.spatialimages.SpatialImage | None = None,
    dseg: nib.spatialimages.SpatialImage | None = None,
    bins: int = 128,
    title: str = "Intensity normalization",
) -> Path:
    """Intensity histograms before and after normalization, inside the brain.

    With ``dseg``, the histograms of GM, WM and CSF are drawn separately (their
    peaks should sit at the method's target values after normalization); else the
    histogram of the voxels in ``mask`` (or all nonzero voxels).
    """
    if bins < 4:
        raise ValueError(f"bins must be >= 4, got {bins}")
    after_img = _canonical(after, "after")
    after_data = np.asanyarray(after_img.dataobj).astype(float)
    before_data = _on_grid(before, after_img, "before", order=1).astype(float)
    if mask is not None:
        inside = _on_grid(mask, after_img, "mask") > 0
    else:
        inside = (after_data != 0) | (before_data != 0)
    if not inside.any():
        raise ValueError("plot_histograms: no voxel inside the mask")
    labels = np.rint(_on_grid(dseg, after_img, "dseg")).astype(int) if dseg is not None else None

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)
    # fixed margins: tight_layout measured every text twice (a sixth of the figure's time)
    fig.subplots_adjust(left=0.03, right=0.98, bottom=0.16, top=0.82, wspace=0.08)
    fig.suptitle(title, fontsize=11)
    for ax, (name, data) in zip(axes, (("before", before_data), ("after", after_data))):
        # bins over the 0.1-99.9th percentiles: a few extreme voxels must not squeeze the peaks
        edges = np.linspace(*np.percentile(data[inside], [0.1, 99.9]), bins + 1)
        if labels is None:
            ax.hist(data[inside], bins=edges, color="#555555", histtype="stepfilled")
        else:
            for label, (tissue, color) in TISSUE_COLORS.items():
                values = data[inside & (labels == label)]
                if values.size:
                    ax.hist(
                        values,
                        bins=edges,
                        color=color,
                        histtype="step",
                        linewidth=1.4,
                        label=tissue,
                    )
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("intensity", fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        for spine in ("top", "right", "left"):
            ax.spines[spine].set_visible(False)
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------
# defacing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefacingSection:
    """One panel of the defacing figure, as drawn (rows: superior/anterior up).

    ``image`` is the defaced head, 0 wherever ``removed`` is True (whatever image it
    was made from); ``brain`` the brain-mask section (or ``None``).
    """

    title: str
    image: np.ndarray
    removed: np.ndarray
    brain: np.ndarray | None
    aspect: float


def defacing_sections(
    defaced: nib.spatialimages.SpatialImage,
    removed: nib.spatialimages.SpatialImage,
    *,
    brain_mask: nib.spatialimages.SpatialImage | None = None,
    lateral_mm: float = 60.0,
    below_frontal_mm: float = 12.0,
) -> list[DefacingSection]:
    """The sections the defacing figure shows: two sagittal, one axial.

    Sagittal through the head's left-right centre (the brain mask's centroid, else
    the image's) and ``lateral_mm`` to its right (the ear shave); axial
    ``below_frontal_mm`` under the lowest frontal brain (eye level: the face cut
    beside the temporal lobes).

    The figure lives in OUT_DIR, which may be shared: the removed voxels are set
    to 0 here, so even an undefaced head passed by mistake shows no face; only the
    *mask* of the removed region is drawn.
    """
    base = _canonical(defaced, "defaced")
    data = _grey(base)  # a copy: zeroing it changes nothing of the caller's
    gone = _on_grid(removed, base, "removed") > 0
    if not gone.any():
        raise ValueError("plot_defacing: the mask of removed voxels is empty")
    data[gone] = 0
    brain = _on_grid(brain_mask, base, "brain_mask") > 0 if brain_mask is not None else None
    zooms = _zooms(base)
    support = brain if brain is not None and brain.any() else data > 0
    centre = np.argwhere(support).mean(axis=0)
    x_mid = int(round(centre[0]))
    x_side = int(np.clip(round(centre[0] + lateral_mm / zooms[0]), 0, data.shape[0] - 1))
    # eye level: ``below_frontal_mm`` under the frontal lobe's lowest point (the
    # orbitofrontal cortex sits on the orbits); without a brain mask, the middle
    # of the removed region's height
    if brain is not None and brain.any():
        # the front third of the brain: the brainstem and temporal lobes reach lower
        front = np.flatnonzero(brain.any(axis=(0, 2)))[-1]
        frontal = brain[:, int(round(centre[1] + 0.6 * (front - centre[1]))) :, :]
        bottom = np.flatnonzero(frontal.any(axis=(0, 1)))
        z_eyes = (bottom[0] if bottom.size else centre[2]) - below_frontal_mm / zooms[2]
    else:
        heights = np.flatnonzero(gone.any(axis=(0, 1)))
        z_eyes = (heights[0] + heights[-1]) / 2
    z_face = int(np.clip(round(z_eyes), 0, data.shape[2] - 1))
    sections = []
    for plane, index in (("sagittal", x_mid), ("sagittal", x_side), ("axial", z_face)):
        world = base.affine[:3, :3] @ np.eye(3)[_AXIS[plane]] * index + base.affine[:3, 3]
        sections.append(
            DefacingSection(
                title=f"{plane} {'xyz'[_AXIS[plane]]} = {world[_AXIS[plane]]:.0f} mm",
                image=_slice(data, plane, index),
                removed=_slice(gone, plane, index),
                brain=_slice(brain, plane, index) if brain is not None else None,
                aspect=_aspect(zooms, plane),
            )
        )
    return sections


def plot_defacing(
    defaced: nib.spatialimages.SpatialImage,
    removed: nib.spatialimages.SpatialImage,
    out_path: str | os.PathLike[str],
    *,
    brain_mask: nib.spatialimages.SpatialImage | None = None,
    title: str = "Defacing: removed region red, brain mask cyan",
) -> Path:
    """The defaced head with the removed region tinted and outlined (see :func:`defacing_sections`).

    Look for: the red region covering the face (nose, mouth, eyes' front) and the
    ears; a gap between it and the cyan brain outline everywhere (the margin); no
    facial surface left in grey in front of the brain.
    """
    sections = defacing_sections(defaced, removed, brain_mask=brain_mask)
    vmin, vmax = _window(np.concatenate([s.image[s.image > 0] for s in sections]))
    widths = [s.image.shape[1] for s in sections]
    fig, axes = plt.subplots(
        1, len(sections), figsize=(9.0, 3.4), dpi=90, facecolor="black",
        gridspec_kw={"width_ratios": widths},
    )  # fmt: skip
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.04)
    fig.suptitle(title, color="white", fontsize=11)
    tint = np.zeros(4)
    tint[:] = (0.95, 0.15, 0.15, 0.4)
    for ax, section in zip(axes, sections):
        ax.set_facecolor("black")
        ax.set_axis_off()
        ax.imshow(section.image, cmap=_GRAY, vmin=vmin, vmax=vmax, origin="lower",
                  aspect=section.aspect, interpolation="nearest")  # fmt: skip
        shade = np.zeros((*section.removed.shape, 4))
        shade[section.removed] = tint
        ax.imshow(shade, origin="lower", aspect=section.aspect, interpolation="nearest")
        for mask, color, width in ((section.removed, "#ff3b3b", 0.9),
                                   (section.brain, "#25e0f0", 0.7)):  # fmt: skip
            if mask is not None and mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color],
                           linewidths=width, origin="lower")  # fmt: skip
        ax.set_title(section.title, color="white", fontsize=8)
    return _save(fig, out_path)

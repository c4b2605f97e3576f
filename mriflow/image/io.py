"""Loading images with errors that name the file and the problem.

Two levels of checking:

* :func:`load_image` and :func:`check_readable` accept any readable 3D grid; every
  step uses them on its inputs (raw or intermediate).
* :func:`check_input_header` and :func:`load_input_image` add what only makes sense for
  a *raw* anatomical input: a greyscale, real-valued volume large enough to process.
  Discovery checks the header of every input before any work (so a bad image fails its
  subject at once), and the first steps load the raw image with :func:`load_input_image`,
  which also repairs non-finite voxels and reports what it found for the sidecar.

Every problem is one line that starts with the file's path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "ImageError",
    "InputReport",
    "MIN_VOXELS_PER_AXIS",
    "load_image",
    "load_input_image",
    "check_readable",
    "check_input_header",
    "load_header_quietly",
]

log = logging.getLogger("mriflow")

#: Smallest grid a raw input may have along each axis. N4 fits its field on the image
#: shrunk by 4 (its default), which must keep 2 voxels per axis, and NL-means needs a
#: 3x3x3 patch inside a 3x3x3 search window: below 8 voxels the steps fail or fit noise.
MIN_VOXELS_PER_AXIS = 8

#: Largest ratio of the longest to the shortest voxel side that passes without a warning.
#: 1x1x2 mm (common T2w) passes; 0.5x0.5x10 mm (a thick-slice clinical scan) is warned:
#: resampled to isotropic voxels, it is interpolated across slabs.
MAX_VOXEL_ANISOTROPY = 4.0

#: qform and sform rotations further apart than this (degrees) are reported: nibabel,
#: like mriflow, uses the sform, but another tool reading the qform sees another brain.
MAX_QFORM_SFORM_ANGLE = 1.0


class ImageError(ValueError):
    """An input image cannot be used; the message names the file and the problem."""


@dataclass
class InputReport:
    """What :func:`load_input_image` found and repaired in a raw input, for the sidecar."""

    nonfinite_voxels: int = 0
    """Voxels that were NaN or infinite and were set to 0."""
    warnings: list[str] = field(default_factory=list)
    """One line each, starting with the file's path."""

    def as_record(self) -> dict[str, object]:
        """The sidecar form: empty when nothing was found."""
        record: dict[str, object] = {}
        if self.nonfinite_voxels:
            record["NonFiniteVoxelsSetToZero"] = self.nonfinite_voxels
        if self.warnings:
            record["InputWarnings"] = list(self.warnings)
        return record


def load_image(path: str | Path, *, ndim: int | None = 3) -> nib.Nifti1Image:
    """Load a NIfTI image, check it is readable and has the expected dimensionality.

    A 4D image with a single volume is squeezed to 3D. The voxel data are read
    once here so that a truncated file fails now, with its name, not in a later step.

    Raises
    ------
    ImageError
        Missing, empty, truncated or unparsable file, complex or RGB voxels, or wrong
        dimensionality.
    """
    return _load_with_data(path, ndim)[0]


def _load_with_data(path: str | Path, ndim: int | None) -> tuple[nib.Nifti1Image, np.ndarray]:
    """:func:`load_image`, and the voxels it read (reading them again costs a decompression)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    _check_size(path)
    try:
        img = load_header_quietly(path)
    except Exception as err:  # nibabel raises many types for damaged files
        raise ImageError(f"{path}: not a readable image ({_one_line(err)})") from None
    _check_voxel_type(path, img)  # before reading: numpy would drop an imaginary part
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise ImageError(f"{path}: not a readable image ({_one_line(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        img = nib.Nifti1Image(data, img.affine, img.header)
    if ndim is not None:
        if data.ndim == ndim + 1 and data.shape[-1] == 1:
            img = nib.Nifti1Image(data[..., 0], img.affine, img.header)
            data = data[..., 0]
        if data.ndim != ndim:
            raise ImageError(f"{path}: expected a {ndim}D image, got shape {data.shape}")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-8:
        raise ImageError(f"{path}: the header's affine is degenerate ({img.affine.tolist()})")
    return img, data


def check_readable(path: str | Path) -> None:
    """Raise :class:`ImageError` if ``path`` is not an image with a 3D grid.

    Reads the header only (fast enough for planning hundreds of subjects); an
    uncompressed file shorter than its header promises is caught here too, a
    truncated ``.nii.gz`` only when :func:`load_image` reads the voxels. Raw
    anatomical inputs also pass :func:`check_input_header`, whose warnings are
    logged here.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    size = _check_size(path)
    try:
        img = load_header_quietly(path)
    except Exception as err:
        raise ImageError(f"{path}: not a readable image ({_one_line(err)})") from None
    shape = img.shape
    if len(shape) < 3 or (len(shape) > 3 and int(np.prod(shape[3:])) != 1):
        _check_voxel_type(path, img)  # an RGB volume is often stored as 5D: say that
        raise ImageError(f"{path}: expected a 3D image, got shape {shape}")
    if not str(path).endswith(".gz") and hasattr(img.header, "get_data_offset"):
        expected = int(img.header.get_data_offset()) + int(
            np.prod(shape) * img.get_data_dtype().itemsize
        )
        if size < expected:
            raise ImageError(
                f"{path}: truncated image (file is {size} bytes, header needs {expected})"
            )
    for warning in check_input_header(path, img):
        log.warning("%s", warning)


def check_input_header(path: str | Path, img: nib.spatialimages.SpatialImage) -> list[str]:
    """Check what the header of a raw anatomical input says, before reading its voxels.

    Parameters
    ----------
    path : str or Path
        The file, for the messages.
    img : nibabel image
        The loaded (lazy) image of ``path``.

    Returns
    -------
    list of str
        Warnings about a usable input (thick slices, qform and sform that disagree),
        one line each, starting with the path.

    Raises
    ------
    ImageError
        Complex or RGB voxels, a grid too small to process (one slice included), or a
        negative ``scl_slope`` (stored intensities would be inverted).
    """
    path = Path(path)
    _check_voxel_type(path, img)
    shape = tuple(int(n) for n in img.shape[:3])
    if len(shape) < 3:
        raise ImageError(f"{path}: expected a 3D image, got shape {tuple(img.shape)}")
    if min(shape) < MIN_VOXELS_PER_AXIS:
        what = "a single slice" if sorted(shape)[0] == 1 else "too small to process"
        raise ImageError(
            f"{path}: {what} (shape {shape}): needs at least {MIN_VOXELS_PER_AXIS} voxels per axis"
        )
    header = img.header
    # nibabel moves scl_slope from the header into the array proxy when it loads a file
    slope = getattr(img.dataobj, "slope", None)
    if slope is None and "scl_slope" in header:
        slope = header["scl_slope"]
    if slope is not None:
        slope = float(slope)
        # 0 and NaN mean "no scaling" in NIfTI; a negative slope turns tissue contrast upside down
        if np.isfinite(slope) and slope < 0:
            raise ImageError(
                f"{path}: negative scl_slope ({slope:g}) in the header: stored intensities "
                "would be inverted; fix the header or rescale the image"
            )
    warnings = []
    zero_sides = _zero_voxel_sides(path, img)
    if zero_sides:
        axes = ", ".join(map(str, zero_sides))
        warnings.append(
            f"{path}: the header gives voxels 0 mm wide along axis {axes}; read as 1 mm "
            "(nibabel's repair): check the geometry in the report"
        )
    zooms = np.asarray(header.get_zooms()[:3], dtype=float)
    if np.all(zooms > 0) and zooms.max() / zooms.min() >= MAX_VOXEL_ANISOTROPY:
        sides = "x".join(f"{z:g}" for z in zooms)
        warnings.append(
            f"{path}: voxels of {sides} mm are {zooms.max() / zooms.min():.0f}x anisotropic: "
            "resampling to isotropic voxels interpolates across the thick slices "
            "(outputs are blurred along that axis)"
        )
    angle = _qform_sform_angle(img)
    if angle is not None and angle > MAX_QFORM_SFORM_ANGLE:
        warnings.append(
            f"{path}: the header's qform and sform are {angle:.0f} degrees apart: mriflow uses "
            "the sform; check the orientation in the report (other tools may use the qform)"
        )
    return warnings


def load_input_image(path: str | Path) -> tuple[nib.Nifti1Image, InputReport]:
    """Load a raw anatomical input, refuse what cannot be processed, repair what can.

    On top of :func:`load_image` and :func:`check_input_header`: an image whose voxels
    are all equal (all zero, say) is refused; NaN and infinite voxels (left by some
    converters and reconstructions) are set to 0 with a warning that names the file
    and the count, which is also returned for the step's sidecar record.

    Returns
    -------
    img : nibabel.Nifti1Image
        The image, with finite float32 voxels if any had to be repaired.
    report : InputReport
        Warnings and the count of repaired voxels.

    Raises
    ------
    ImageError
        See :func:`load_image` and :func:`check_input_header`; also an image with no
        finite voxel or only one value.
    """
    path = Path(path)
    img, data = _load_with_data(path, 3)
    report = InputReport(warnings=check_input_header(path, img))
    n_bad = 0
    if not np.issubdtype(data.dtype, np.integer):  # integers are always finite
        finite = np.isfinite(data)
        n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == data.size:
        raise ImageError(f"{path}: every voxel is NaN or infinite")
    values = data[finite] if n_bad else data  # no copy of a clean image
    if values.min() == values.max():
        raise ImageError(
            f"{path}: the image is constant (every voxel is {values.min():g}): nothing to process"
        )
    if n_bad:
        repaired = np.where(finite, data, 0).astype(np.float32)
        img = nib.Nifti1Image(repaired, img.affine, img.header)
        img.header.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)  # the repaired voxels are already scaled
        report.nonfinite_voxels = n_bad
        report.warnings.append(
            f"{path}: {n_bad} non-finite voxel(s) (NaN/inf) of {data.size} set to 0"
        )
        # the header's warnings were logged when the inputs were planned
        # (check_readable); this one only the voxels tell
        log.warning("%s", report.warnings[-1])
    return img, report


def _check_size(path: Path) -> int:
    size = path.stat().st_size
    # an uncompressed NIfTI-1 is at least its 348-byte header; a small .nii.gz can be less
    if size == 0 or (size < 348 and not path.name.endswith(".gz")):
        raise ImageError(f"{path}: not a readable image (file is {size} bytes)")
    return size


def _check_voxel_type(path: Path, img: nib.spatialimages.SpatialImage) -> None:
    dtype = np.dtype(img.get_data_dtype())
    if dtype.names:  # NIfTI RGB24 / RGBA32 are structured dtypes
        raise ImageError(
            f"{path}: an RGB colour image (voxel type {'/'.join(dtype.names)}): expected a "
            "greyscale intensity image"
        )
    if dtype.kind == "c":
        raise ImageError(
            f"{path}: complex-valued voxels ({dtype.name}): expected a real intensity image "
            "(save the magnitude, e.g. abs(), instead)"
        )


def load_header_quietly(path: str | Path) -> nib.spatialimages.SpatialImage:
    """``nib.load`` (lazy: header only) without nibabel's messages about header repairs.

    nibabel logs the fixes it makes ("setting 0 dims to 1") without the file's name;
    :func:`check_input_header` reports them with it.
    """
    nib_logger = nib.imageglobals.logger
    disabled = nib_logger.disabled
    nib_logger.disabled = True
    try:
        return nib.load(str(path))
    finally:
        nib_logger.disabled = disabled


def _zero_voxel_sides(path: Path, img: nib.spatialimages.SpatialImage) -> list[int]:
    """Axes whose voxel size the file's header stores as 0 (nibabel reads them as 1 mm)."""
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return []
    try:
        with nib.openers.ImageOpener(str(path)) as fileobj:
            raw = type(img.header).from_fileobj(fileobj, check=False)
    except Exception:
        return []
    if int(raw["sform_code"]) > 0:
        return []  # the sform gives the grid; pixdim is not used
    return [axis for axis in range(3) if float(raw["pixdim"][axis + 1]) == 0.0]


def _qform_sform_angle(img: nib.spatialimages.SpatialImage) -> float | None:
    """Angle (degrees) between the rotations of qform and sform, when both are set."""
    header = img.header
    if not hasattr(header, "get_qform"):
        return None
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return None
    rotations = []
    for affine in (qform, sform):
        linear = np.asarray(affine, dtype=float)[:3, :3]
        norms = np.linalg.norm(linear, axis=0)
        if np.any(norms == 0) or not np.all(np.isfinite(linear)):
            return None
        rotations.append(linear / norms)
    relative = rotations[0].T @ rotations[1]
    cosine = np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())

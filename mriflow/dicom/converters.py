"""Run the two DICOM-to-NIfTI converters and compare their results in RAS.

``dcm2niix`` (from its PyPI package, which ships the binary) is the field's
reference converter and writes the BIDS sidecar. ``dicom2nifti`` is an
independent implementation in pure Python. Converting every series with both
and comparing the images in world (RAS) space catches errors that neither
tool reports: dicom2nifti 2.6.2, for instance, returns the right affine but a
mirrored brain for Siemens coronal and sagittal mosaics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation, ornt_transform

__all__ = [
    "ConverterError",
    "ConvertedImage",
    "ImageAgreement",
    "dcm2niix_binary",
    "dcm2niix_version",
    "dicom2nifti_version",
    "run_dcm2niix",
    "run_dicom2nifti",
    "compare_images",
    "reorient_like",
]

logger = logging.getLogger("mriflow.dicom")


class ConverterError(RuntimeError):
    """A converter could not convert a series; the message says which and why."""


@dataclass
class ConvertedImage:
    """One NIfTI image written by a converter, with its sidecar and diffusion files.

    ``postfix`` is what dcm2niix appended to the requested base name when one
    series gave several images (``_e2`` for a second echo, ``_ph`` for phase,
    ``a`` for a second stack, ...); it is empty for the usual single image.
    """

    nifti: Path
    sidecar: dict[str, Any]
    bval: Path | None = None
    bvec: Path | None = None
    postfix: str = ""


@dataclass
class ImageAgreement:
    """How two conversions of one series compare once both are in RAS+.

    Attributes
    ----------
    agree : bool
        Same shape, affines within ``affine_tolerance_mm`` and voxel
        correlation at least ``min_correlation``.
    shape_equal : bool
    max_affine_difference_mm : float or None
        Largest absolute difference between the two affines (None if shapes differ).
    correlation : float or None
        Pearson correlation of the voxel values (None if shapes differ).
    details : str
        What differs, in words (empty when they agree).
    """

    agree: bool
    shape_equal: bool
    max_affine_difference_mm: float | None
    correlation: float | None
    details: str

    def as_sidecar(self) -> dict[str, Any]:
        """BIDS-style (CamelCase) keys for the image's JSON sidecar."""
        d = asdict(self)
        return {
            "Agreement": d["agree"],
            "ShapeEqual": d["shape_equal"],
            "MaxAffineDifferenceMm": d["max_affine_difference_mm"],
            "Correlation": d["correlation"],
            **({"Details": d["details"]} if d["details"] else {}),
        }


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable shipped by the ``dcm2niix`` PyPI package.

    Raises
    ------
    ConverterError
        The package is not installed or its binary is missing.
    """
    try:
        import dcm2niix
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConverterError(
            "dcm2niix is not installed (expected the 'dcm2niix' PyPI package: pip install dcm2niix)"
        ) from None
    binary = Path(dcm2niix.bin)
    if not binary.is_file():  # pragma: no cover - broken install
        raise ConverterError(f"{binary}: the dcm2niix package has no executable binary")
    return str(binary)


@lru_cache(maxsize=1)
def dcm2niix_version() -> str:
    """The version string the dcm2niix binary reports (for example ``v1.0.20260724``)."""
    proc = subprocess.run(
        [dcm2niix_binary(), "--version"], capture_output=True, text=True, check=False
    )
    for token in (proc.stdout + proc.stderr).split():
        if token.startswith("v1.") or token.startswith("v2."):
            return token
    return "unknown"


@lru_cache(maxsize=1)
def dicom2nifti_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicom2nifti")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _link_inputs(files: Sequence[Path], in_dir: Path) -> None:
    # dcm2niix converts folders, so the series' files are linked into one of
    # their own: other series in the same source folder are never touched.
    in_dir.mkdir(parents=True, exist_ok=True)
    for k, src in enumerate(files):
        dst = in_dir / f"{k:06d}.dcm"
        try:
            os.symlink(Path(src).resolve(), dst)
        except OSError:  # file systems without symlinks
            shutil.copyfile(src, dst)


def _tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    interesting = [ln for ln in lines if "error" in ln.lower() or "warning" in ln.lower()]
    return " | ".join((interesting or lines)[-n:])


def run_dcm2niix(
    files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    anonymize: bool = True,
    basename: str = "series",
    compress: bool = True,
    timeout: float = 1800.0,
) -> list[ConvertedImage]:
    """Convert one series with dcm2niix into ``out_dir``.

    Parameters
    ----------
    files : sequence of path
        The DICOM files of the series (nothing else is read).
    out_dir : path
        Empty folder for the output; a sub-folder ``in`` holds links to ``files``.
    anonymize : bool
        Pass ``-ba y`` (dcm2niix drops patient fields and dates from the sidecar).
        mriflow de-identifies again on top of this; ``False`` keeps all fields.
    basename : str
        Base name of the output files (never derived from the headers, so no
        patient data can reach a file name).
    compress : bool
        Write ``.nii.gz`` (True) or ``.nii`` (False, faster when the caller
        rewrites the file anyway).
    timeout : float
        Seconds before the conversion is abandoned.

    Returns
    -------
    list of ConvertedImage
        Usually one; several when the series holds several echoes, stacks or
        orientations.

    Raises
    ------
    ConverterError
        dcm2niix failed or wrote no image; the message quotes its last lines.
    """
    if not files:
        raise ValueError("run_dcm2niix: expected at least one DICOM file, got none")
    out_dir = Path(out_dir)
    in_dir = out_dir / "in"
    nii_dir = out_dir / "nii"
    nii_dir.mkdir(parents=True, exist_ok=True)
    _link_inputs([Path(f) for f in files], in_dir)
    cmd = [
        dcm2niix_binary(),
        "-b",
        "y",
        "-ba",
        "y" if anonymize else "n",
        "-z",
        "y" if compress else "n",
        "-w",
        "1",
        "-f",
        basename,
        "-o",
        str(nii_dir),
        str(in_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ConverterError(f"dcm2niix did not finish within {timeout:.0f} s") from None
    images = []
    for nii in sorted(nii_dir.glob(f"{basename}*.nii*")):
        stem = nii.name[: -len(".nii.gz")] if nii.name.endswith(".nii.gz") else nii.stem
        js = nii_dir / f"{stem}.json"
        sidecar = _read_json(js) if js.exists() else {}
        bval, bvec = nii_dir / f"{stem}.bval", nii_dir / f"{stem}.bvec"
        images.append(
            ConvertedImage(
                nifti=nii,
                sidecar=sidecar,
                bval=bval if bval.exists() else None,
                bvec=bvec if bvec.exists() else None,
                postfix=stem[len(basename) :],
            )
        )
    if proc.returncode != 0 or not images:
        reason = _tail(proc.stdout + "\n" + proc.stderr) or "no output"
        raise ConverterError(
            f"dcm2niix failed (exit code {proc.returncode}, {len(images)} images): {reason}"
        )
    return images


def _read_json(path: Path) -> dict[str, Any]:
    import json

    # dcm2niix copies DICOM text as is: a description holding a newline or an
    # escape character makes its JSON invalid for a strict parser. Accept it;
    # such text is removed or rejected by the sidecar allow-list later.
    with open(path, encoding="utf-8", errors="replace") as fh:
        return json.load(fh, strict=False)


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    # dicom2nifti logs every validation step at INFO/WARNING; only its errors
    # matter here because mriflow reports the outcome itself.
    lib_logger = logging.getLogger(logger_name)
    old = lib_logger.level
    lib_logger.setLevel(level)
    try:
        yield
    finally:
        lib_logger.setLevel(old)


def run_dicom2nifti(files: Sequence[str | Path], out_file: str | Path) -> nib.Nifti1Image:
    """Convert one series with dicom2nifti and write it to ``out_file``.

    The image is returned as dicom2nifti leaves it (reoriented to LAS by the
    library); compare it with :func:`compare_images`, which works in RAS.

    Raises
    ------
    ConverterError
        dicom2nifti does not support the series or failed on it.
    """
    if not files:
        raise ValueError("run_dicom2nifti: expected at least one DICOM file, got none")
    import pydicom
    from dicom2nifti import convert_dicom

    try:
        datasets = [pydicom.dcmread(str(f)) for f in files]
        with _quiet("dicom2nifti"), np.errstate(all="ignore"):
            result = convert_dicom.dicom_array_to_nifti(
                datasets, str(out_file), reorient_nifti=True
            )
    except Exception as err:  # dicom2nifti raises many types for what it does not support
        message = str(err) or type(err).__name__
        raise ConverterError(f"dicom2nifti failed: {type(err).__name__}: {message}") from None
    img = result.get("NII")
    if img is None:
        raise ConverterError("dicom2nifti wrote no image")
    return img


def _squeeze_trailing(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data, img.affine


def compare_images(
    reference: nib.spatialimages.SpatialImage,
    other: nib.spatialimages.SpatialImage,
    *,
    affine_tolerance_mm: float = 1e-3,
    min_correlation: float = 0.99,
) -> ImageAgreement:
    """Compare two conversions of the same series after putting both in RAS+.

    Parameters
    ----------
    reference, other : nibabel image
        3D or 4D images (trailing singleton dimensions are ignored).
    affine_tolerance_mm : float
        Largest allowed absolute difference between affine entries (mm).
    min_correlation : float
        Smallest Pearson correlation of the voxel values for agreement; it is
        insensitive to the scaling and integer type each converter chooses,
        and falls far below 1 when one image is mirrored along an axis.

    Returns
    -------
    ImageAgreement
    """
    if affine_tolerance_mm <= 0:
        raise ValueError(f"affine_tolerance_mm must be > 0, got {affine_tolerance_mm}")
    if not -1.0 <= min_correlation <= 1.0:
        raise ValueError(f"min_correlation must be in [-1, 1], got {min_correlation}")
    a_data, a_aff = _squeeze_trailing(nib.as_closest_canonical(reference))
    b_data, b_aff = _squeeze_trailing(nib.as_closest_canonical(other))
    if a_data.shape != b_data.shape:
        return ImageAgreement(
            agree=False,
            shape_equal=False,
            max_affine_difference_mm=None,
            correlation=None,
            details=f"shape {a_data.shape} vs {b_data.shape} in RAS",
        )
    aff_diff = float(np.max(np.abs(a_aff - b_aff)))
    corr = _correlation(a_data, b_data)
    problems = []
    if aff_diff > affine_tolerance_mm:
        problems.append(f"affines differ by up to {aff_diff:.4g} mm")
    if corr < min_correlation:
        flips = []
        for axis, name in enumerate(("left-right", "posterior-anterior", "inferior-superior")):
            # A mirrored image correlates well once flipped back: say which axis.
            if _correlation(a_data, np.flip(b_data, axis=axis)) >= min_correlation:
                flips.append(name)
        hint = f"; it matches once flipped {' or '.join(flips)} (mirrored)" if flips else ""
        problems.append(f"voxel correlation {corr:.3f} < {min_correlation}{hint}")
    return ImageAgreement(
        agree=not problems,
        shape_equal=True,
        max_affine_difference_mm=aff_diff,
        correlation=corr,
        details="; ".join(problems),
    )


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two same-shape arrays, one 3D volume at a time.

    Sums are accumulated in float64 volume by volume so that a long 4D series
    never needs two full float64 copies in memory.
    """
    n = 0
    sa = sb = saa = sbb = sab = 0.0
    a4 = a.reshape(*a.shape[:3], -1)
    b4 = b.reshape(*b.shape[:3], -1)
    # Shifting by the first volume's mean keeps the one-pass sums accurate.
    shift_a, shift_b = float(np.mean(a4[..., 0])), float(np.mean(b4[..., 0]))
    for t in range(a4.shape[-1]):
        x = a4[..., t].astype(np.float64).ravel() - shift_a
        y = b4[..., t].astype(np.float64).ravel() - shift_b
        n += x.size
        sa, sb = sa + x.sum(), sb + y.sum()
        saa, sbb, sab = saa + x @ x, sbb + y @ y, sab + x @ y
    va = saa / n - (sa / n) ** 2
    vb = sbb / n - (sb / n) ** 2
    scale = max(saa / n, sbb / n, 1e-300)
    if va <= 1e-12 * scale or vb <= 1e-12 * scale:  # a constant image
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((sab / n - sa * sb / n**2) / np.sqrt(va * vb))


def reorient_like(
    img: nib.spatialimages.SpatialImage, target_affine: np.ndarray
) -> nib.Nifti1Image:
    """Permute and flip the voxel axes of ``img`` to the axis order of ``target_affine``.

    Only the storage order changes (world coordinates of every voxel are
    kept), so axis-dependent sidecar fields written for the target
    (``PhaseEncodingDirection``, ``SliceTiming``) apply to the result.
    """
    transform = ornt_transform(io_orientation(img.affine), io_orientation(target_affine))
    return img.as_reoriented(transform)

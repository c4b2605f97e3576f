"""Defacing: remove the face and ears of a head image, never a brain voxel.

A raw T1w/T2w/FLAIR head shows a face that a surface rendering turns back into
a recognisable portrait. Two published methods remove it:

* **quickshear** (Schimke & Hale 2011; BSD-3): project the brain mask onto the
  sagittal plane, take the convex hull of the projection, and cut the head
  along the hull's lower-front edge shifted outwards by a margin; everything
  in front of / below that plane is zeroed. It needs only a brain mask.
* **pydeface** (Gulban et al.; MIT): register the head to a template, bring the
  template's hand-drawn face mask back by the inverse transform, zero it. It
  needs a registration (and ships its own template).

:func:`deface` does what a raw image allows (``mriflow convert --deface`` has
no transform yet): a brain mask from mriflow's skull stripper, and

0. **the head's frame**: heads lie tilted in the scanner (chin up by 5-25
   degrees); the tilt is the pitch of the long axis of the brain mask's
   sagittal projection minus that of the MNI template's brain (10.45 degrees),
   so "below" and "in front of" the brain follow the head, not the scanner;
1. **the plane** (quickshear's idea, our own implementation): among the edges
   of the convex hull of the brain mask's sagittal projection (world
   anterior/superior coordinates), the one whose outward normal points
   closest to the head's anterior-inferior direction (45 degrees); voxels
   more than ``margin_mm`` beyond it are removed;
2. **the shave** (for what a plane cannot reach: the eyes and nose beside the
   frontal lobe, the cheeks, and the ears beside the temporal lobes): below
   the brain's centroid and in front of a coronal plane ``ear_depth_mm``
   behind it (both in the head's frame), every voxel farther than
   ``margin_mm`` from the brain mask (filled to its convex hull in each coronal
   slice, which restores lateral edges a skull stripper missed) is removed.
   The back of the head and the skull cap are kept (the skull stripper and
   registration use them).

The brain mask's voxels are never removed: the plane lies outside the hull of
the mask, the shave keeps ``margin_mm`` around it, and :func:`deface` asserts
it. :func:`template_face_mask` adds pydeface's approach for images that do have
a kept template transform. The report's figure (the removed region on the defaced
head) is drawn by :func:`mriflow.reports.figures.plot_defacing`.

Limits: defacing removes the face surface; it does not anonymise the brain
itself (its shape and folding can identify a person to someone who has
another scan of them), and a brain mask that misses tissue moves the margin
with it.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

__all__ = [
    "DefaceResult",
    "brain_pitch",
    "deface",
    "face_mask",
    "template_face_mask",
    "apply_face_mask",
    "write_defaced_nifti",
]

# Pitch (degrees, anterior end up) of the long axis of the brain's sagittal
# projection in MNI152NLin2009aSym, from mriflow's template brain mask
# (:func:`brain_pitch` on ``load_template(1).mask``; a test keeps it current).
# A subject's pitch minus this is how far its head is tilted from the template's.
_TEMPLATE_PITCH_DEG = 10.45
_MAX_TILT_DEG = 35.0  # beyond this the mask, not the head, is odd: clip
# Face region of the MNI152 template (RAS mm): below the brain's lowest frontal
# tissue and in front of the temporal poles, for the template-based mask.
_MNI_FACE_BOX = ((-90.0, 90.0), (20.0, 160.0), (-110.0, 0.0))


@dataclass(frozen=True)
class DefaceResult:
    """What :func:`deface` returns; unpacks as ``defaced, face_mask = deface(...)``.

    Attributes
    ----------
    defaced : nibabel.Nifti1Image
        The head with the face mask's voxels set to 0; same grid, data type
        and scaling as the input, every other voxel unchanged.
    face_mask : nibabel.Nifti1Image
        uint8 {0, 1}: 1 where voxels were removed.
    description : dict
        For the sidecar's ``DefacingMethod``: method, parameters, the plane.
    """

    defaced: nib.Nifti1Image
    face_mask: nib.Nifti1Image
    description: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[nib.Nifti1Image]:
        return iter((self.defaced, self.face_mask))


def _check_pair(
    head: nib.spatialimages.SpatialImage, brain_mask: nib.spatialimages.SpatialImage
) -> np.ndarray:
    if len(head.shape) != 3:
        raise ValueError(f"defacing expects a 3D head image, got shape {head.shape}")
    if tuple(brain_mask.shape[:3]) != tuple(head.shape):
        raise ValueError(
            f"brain mask shape {brain_mask.shape} differs from the head's {head.shape}"
        )
    if not np.allclose(brain_mask.affine, head.affine, atol=1e-3):
        raise ValueError("brain mask and head are on different grids (affines differ)")
    mask = np.asarray(brain_mask.dataobj).reshape(head.shape) > 0
    if not mask.any():
        raise ValueError("the brain mask is empty: nothing to protect, refusing to deface")
    return mask


def _axis_coordinates(affine: np.ndarray, row: int, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinate ``row`` (0 R, 1 A, 2 S) of every voxel centre, float32."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    a = affine[row].astype(np.float32)
    return (
        a[0] * i[:, None, None] + a[1] * j[None, :, None] + a[2] * k[None, None, :] + a[3]
    ).astype(np.float32, copy=False)


def brain_pitch(mask_img: nib.spatialimages.SpatialImage) -> float:
    """Pitch in degrees (anterior end up) of the brain mask's long sagittal axis, in world space.

    The first principal axis of the mask's (anterior, superior) coordinates:
    the brain is about 1.4 times longer than high, so the axis is well defined
    and tells how the head is tilted in the scanner without a registration.
    """
    mask = np.asarray(mask_img.dataobj) > 0
    if mask.sum() < 10:
        raise ValueError("the brain mask is too small to estimate the head's pitch")
    ijk = np.argwhere(mask)[::5].astype(float)
    world = ijk @ mask_img.affine[:3, :3].T + mask_img.affine[:3, 3]
    centred = world[:, 1:3] - world[:, 1:3].mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    axis = vectors[:, int(np.argmax(values))]
    if axis[0] < 0:
        axis = -axis
    return float(np.degrees(np.arctan2(axis[1], axis[0])))


def _shear_plane(
    mask: np.ndarray, affine: np.ndarray, face_direction: np.ndarray
) -> tuple[np.ndarray, float]:
    """Unit normal (anterior, superior) and offset of the hull edge facing the face.

    Every brain voxel centre p satisfies ``normal @ p <= offset``.
    """
    surface = mask & ~ndi.binary_erosion(mask)
    ijk = np.argwhere(surface).astype(float)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    points = np.unique(np.round(world[:, 1:3], 3), axis=0)
    if len(points) < 3:
        raise ValueError("the brain mask is too small to define a defacing plane")
    try:
        hull = ConvexHull(points)
    except Exception as err:  # flat masks (one slice) have no 2D hull
        raise ValueError(f"the brain mask has no 2D extent in the sagittal plane ({err})") from None
    normals = hull.equations[:, :2]  # outward unit normals; n @ p + c <= 0 inside
    best = int(np.argmax(normals @ face_direction))
    normal = normals[best]
    offset = float(np.max(points @ normal))  # exact support of the hull along this normal
    return normal, offset


def _coronal_hull(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The brain mask filled to its convex hull in every coronal slice.

    What the shave keeps its margin from. A mask that misses the lateral
    surface of a temporal lobe (thick slices, a head cut by the field of
    view) would otherwise let the shave reach into that lobe; the coronal
    outline of the brain is convex laterally, so its hull restores it, while
    the face (in front of the brain) and the ears (beyond the hull) stay outside.
    """
    from skimage.morphology import convex_hull_image

    axis = int(np.argmax(np.abs(affine[1, :3])))  # voxel axis closest to anterior
    out = mask.copy()
    # Work in the mask's bounding box: the hull never leaves it, and
    # convex_hull_image costs in proportion to the section's size.
    bbox = ndi.find_objects(mask.astype(np.uint8))[0]
    crop, view = mask[bbox], out[bbox]
    for index in range(crop.shape[axis]):
        where: list[Any] = [slice(None)] * 3
        where[axis] = index
        section = crop[tuple(where)]  # a view (np.take copied the whole crop each time)
        if section.sum() < 3:
            continue
        try:
            filled = convex_hull_image(section)
        except Exception:  # collinear voxels: nothing to fill
            continue
        view[tuple(where)] |= filled
    return out


def face_mask(
    head_img: nib.spatialimages.SpatialImage,
    brain_mask_img: nib.spatialimages.SpatialImage,
    *,
    margin_mm: float = 5.0,
    ear_depth_mm: float = 45.0,
    shave: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean mask of the voxels to remove (see the module docstring), and its record.

    Parameters
    ----------
    head_img, brain_mask_img : nibabel images, 3D, same grid
        The head and a brain mask (nonzero = brain), e.g. from
        :func:`mriflow.image.skullstrip.skull_strip`.
    margin_mm : float > 0
        Distance kept between the brain mask and anything removed.
    ear_depth_mm : float >= 0
        How far behind the brain's centroid the shave reaches (covers the ears).
    shave : bool
        Also shave below the brain's centroid (face beside the brain, ears);
        False gives the plane alone (quickshear's method).

    Returns
    -------
    (ndarray of bool, dict)
        Shape of the head; never True on a brain-mask voxel.
    """
    if not margin_mm > 0:
        raise ValueError(f"margin_mm must be > 0, got {margin_mm}")
    if not ear_depth_mm >= 0:
        raise ValueError(f"ear_depth_mm must be >= 0, got {ear_depth_mm}")
    mask = _check_pair(head_img, brain_mask_img)
    affine = head_img.affine
    shape = tuple(int(n) for n in head_img.shape)

    # The head's own frame in the sagittal plane: heads lie tilted in the
    # scanner (4-19 degrees from the template on the shared heads), and "below the brain"
    # must follow the head, not the scanner's axes.
    tilt = float(
        np.clip(brain_pitch(brain_mask_img) - _TEMPLATE_PITCH_DEG, -_MAX_TILT_DEG, _MAX_TILT_DEG)
    )
    c, s = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
    head_anterior = np.array([c, s])  # (anterior, superior) world components
    head_superior = np.array([-s, c])
    face_direction = (head_anterior - head_superior) / np.sqrt(2.0)

    normal, offset = _shear_plane(mask, affine, face_direction)
    anterior = _axis_coordinates(affine, 1, shape)
    superior = _axis_coordinates(affine, 2, shape)
    remove = normal[0] * anterior + normal[1] * superior > offset + margin_mm

    centroid = np.argwhere(mask).mean(axis=0) @ affine[:3, :3].T + affine[:3, 3]
    if shave:
        protected = _coronal_hull(mask, affine)
        zooms = np.asarray(head_img.header.get_zooms()[:3], dtype=float)
        anterior -= centroid[1]
        superior -= centroid[2]
        below = head_superior[0] * anterior + head_superior[1] * superior < 0
        front = head_anterior[0] * anterior + head_anterior[1] * superior > -ear_depth_mm
        region = below & front
        del below, front
        # Distances only where they matter: crop to the region's bounding box.
        found = ndi.find_objects(region.astype(np.uint8))
        if found and found[0] is not None:
            box = found[0]
            pad = [int(np.ceil(margin_mm / z)) + 1 for z in zooms]
            grown = tuple(
                slice(max(0, s.start - p), min(n, s.stop + p))
                for s, p, n in zip(box, pad, shape, strict=True)
            )
            sub_mask = protected[grown]
            if sub_mask.any():
                far = ndi.distance_transform_edt(~sub_mask, sampling=zooms) > margin_mm
            else:  # no brain near the region: all of it is farther than the margin
                far = np.ones(sub_mask.shape, dtype=bool)
            remove[grown] |= far & region[grown]
    del anterior, superior
    remove &= ~mask
    # Never a brain voxel: by construction (hull and margin), checked anyway.
    assert not (remove & mask).any(), "defacing would remove brain-mask voxels"
    record = {
        "Method": "mriflow quickshear-style plane + shave below the brain (no template)",
        "MarginMM": float(margin_mm),
        "EarDepthMM": float(ear_depth_mm) if shave else None,
        "Shave": bool(shave),
        "HeadTiltDeg": round(tilt, 1),
        "PlaneNormalAS": [round(float(v), 4) for v in normal],
        "PlaneOffsetMM": round(float(offset + margin_mm), 2),
        "RemovedFraction": round(float(remove.mean()), 4),
    }
    return remove, record


@lru_cache(maxsize=1)
def _template_brain_distance() -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) to the 1 mm MNI template brain mask, and the grid's affine."""
    from mriflow.image.template import load_template

    tpl = load_template(1)
    brain = np.asarray(tpl.mask.dataobj) > 0
    zooms = np.asarray(tpl.mask.header.get_zooms()[:3], dtype=float)
    distance = ndi.distance_transform_edt(~brain, sampling=zooms).astype(np.float32)
    distance.setflags(write=False)
    return distance, tpl.mask.affine.copy()


def template_face_mask(
    head_img: nib.spatialimages.SpatialImage,
    brain_mask_img: nib.spatialimages.SpatialImage,
    template_to_subject: list[str | os.PathLike[str]],
    *,
    margin_mm: float = 5.0,
    num_threads: int = 1,
) -> np.ndarray:
    """pydeface's approach with mriflow's own template and kept transform.

    A face region defined once in ``MNI152NLin2009aSym`` (the template box in
    front of / below the brain, minus the template brain mask grown by
    ``margin_mm``) is resampled onto the subject grid through
    ``template_to_subject`` (the reverse composite of
    :func:`mriflow.image.registration.register_to_template`), nearest neighbour.
    The subject's own brain mask grown by ``margin_mm`` is then taken out, so a
    registration error can never remove brain.

    Returns
    -------
    ndarray of bool
        On the head's grid.
    """
    from mriflow.image.registration import apply_transforms

    if not margin_mm > 0:
        raise ValueError(f"margin_mm must be > 0, got {margin_mm}")
    mask = _check_pair(head_img, brain_mask_img)
    distance, tpl_affine = _template_brain_distance()
    # The face region lives on its own 2 mm grid spanning the box: the template
    # grid ends at y = +98 mm, short of a large nose.
    (x0, x1), (y0, y1), (z0, z1) = _MNI_FACE_BOX
    step = 2.0
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = (x0, y0, z0)
    shape = tuple(int(np.floor((hi - lo) / step)) + 1 for lo, hi in _MNI_FACE_BOX)
    world = np.indices(shape).reshape(3, -1).T * step + np.array([x0, y0, z0])
    inv = np.linalg.inv(tpl_affine)
    voxel = world @ inv[:3, :3].T + inv[:3, 3]
    # Outside the template grid there is no brain: distance is "far" there.
    far = ndi.map_coordinates(distance, voxel.T, order=0, mode="constant", cval=1e3)
    face = (far > 2 * margin_mm).reshape(shape)
    face_tpl = nib.Nifti1Image(face.astype(np.uint8), affine)
    ref = nib.Nifti1Image(np.zeros(head_img.shape, np.uint8), head_img.affine)
    back = apply_transforms(
        face_tpl,
        [str(t) for t in template_to_subject],
        ref,
        interpolation="nearest",
        num_threads=num_threads,
    )
    remove = np.asarray(back.dataobj) > 0
    zooms = np.asarray(head_img.header.get_zooms()[:3], dtype=float)
    remove &= ndi.distance_transform_edt(~mask, sampling=zooms) > margin_mm
    assert not (remove & mask).any(), "defacing would remove brain-mask voxels"
    return remove


def apply_face_mask(
    head_img: nib.spatialimages.SpatialImage, remove: np.ndarray
) -> nib.Nifti1Image:
    """The head with ``remove`` voxels set to 0, keeping data type, scaling and header."""
    proxy = head_img.dataobj
    if hasattr(proxy, "get_unscaled"):  # on disk: keep the stored values and scaling
        raw = np.asanyarray(proxy.get_unscaled()).copy()
        slope, inter = proxy.slope, proxy.inter
    else:
        raw = np.array(proxy, copy=True)
        slope, inter = None, None
    if remove.shape != raw.shape:
        raise ValueError(f"face mask shape {remove.shape} differs from the head's {raw.shape}")
    raw[remove] = _raw_zero(raw.dtype, slope, inter)
    header = head_img.header.copy()
    out = nib.Nifti1Image(raw, head_img.affine, header)
    out.header.set_slope_inter(slope, inter)
    return out


def _raw_zero(dtype: np.dtype, slope: float | None, inter: float | None) -> Any:
    """The stored value that reads as (closest to) 0 under the header's scaling."""
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    value = -inter / slope
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return dtype.type(np.clip(np.rint(value), info.min, info.max))
    return dtype.type(value)


def deface(
    head_img: nib.spatialimages.SpatialImage,
    brain_mask_img: nib.spatialimages.SpatialImage,
    *,
    margin_mm: float = 5.0,
    ear_depth_mm: float = 45.0,
    shave: bool = True,
    template_to_subject: list[str | os.PathLike[str]] | None = None,
    num_threads: int = 1,
) -> DefaceResult:
    """Remove the face and ears below / in front of the brain, never a brain voxel.

    Parameters
    ----------
    head_img : nibabel image, 3D
        The head (raw or preprocessed; any orientation).
    brain_mask_img : nibabel image, 3D, same grid
        Brain mask (nonzero = brain).
    margin_mm, ear_depth_mm, shave
        See :func:`face_mask`.
    template_to_subject : list of paths, optional
        The kept template -> subject transform: adds :func:`template_face_mask`
        to the removed region (pydeface's approach).
    num_threads : int
        ITK threads for the template resampling.

    Returns
    -------
    DefaceResult
        ``defaced, face_mask = deface(head, mask)`` also works.
    """
    remove, record = face_mask(
        head_img, brain_mask_img, margin_mm=margin_mm, ear_depth_mm=ear_depth_mm, shave=shave
    )
    if template_to_subject:
        remove |= template_face_mask(
            head_img,
            brain_mask_img,
            template_to_subject,
            margin_mm=margin_mm,
            num_threads=num_threads,
        )
        record["Method"] += " + template face mask through the kept transform"
        record["RemovedFraction"] = round(float(remove.mean()), 4)
    face = nib.Nifti1Image(remove.astype(np.uint8), head_img.affine)
    face.set_qform(head_img.affine, code=1)
    face.set_sform(head_img.affine, code=1)
    return DefaceResult(apply_face_mask(head_img, remove), face, record)


def write_defaced_nifti(
    source: str | os.PathLike[str], target: str | os.PathLike[str], remove: np.ndarray
) -> None:
    """Copy a NIfTI-1 file (``.nii``/``.nii.gz``) to ``target`` (``.nii``), ``remove`` zeroed.

    Works on the stored bytes: the header (including scaling) and every other
    voxel are copied bit for bit, so a defaced image differs from the original
    only inside the face mask.
    """
    import gzip

    source, target = Path(source), Path(target)
    opener = gzip.open if source.name.endswith(".gz") else open
    with opener(source, "rb") as fh:
        raw = bytearray(fh.read())
    img = nib.load(str(source))
    header = img.header
    if not isinstance(header, nib.Nifti1Header) or isinstance(header, nib.Nifti2Header):
        raise ValueError(f"{source}: only NIfTI-1 files can be defaced in place")
    endian = "<" if struct.unpack("<i", bytes(raw[:4]))[0] == 348 else ">"
    offset = int(struct.unpack(endian + "f", bytes(raw[108:112]))[0])
    dtype = header.get_data_dtype()
    shape = tuple(int(n) for n in header.get_data_shape())
    if remove.shape != shape:
        raise ValueError(f"{source}: face mask shape {remove.shape} differs from image {shape}")
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    data = np.frombuffer(bytes(raw[offset : offset + n_bytes]), dtype=dtype).reshape(
        shape, order="F"
    )
    data = data.copy()
    # nibabel moves scl_slope/scl_inter from the loaded header to the proxy
    data[remove] = _raw_zero(dtype, img.dataobj.slope, img.dataobj.inter)
    raw[offset : offset + n_bytes] = data.tobytes(order="F")
    Path(target).write_bytes(bytes(raw))

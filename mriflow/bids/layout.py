"""Reading an mriflow output folder: the output table of :mod:`mriflow.bids.outputs` read backwards.

Code that needs a subject's published files asks :class:`DerivativesLayout`; it never
globs or parses names itself. Every derivative image has a JSON sidecar whose
``Sources`` start with the raw image it derives from (``bids:raw:...``) and whose
``Steps`` list the step records that made it; derivatives are grouped per raw source
image (one group per T1w/T2w/... run), and each file's *role* is the name of its
output in the table (``preproc``, ``brain_mask``, ``std_mask``, ``probseg_gm``,
``model``, ``nyul``, ... and ``iqms`` for the QC metrics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mriflow.bids.outputs import (
    GROUP_OUTPUTS,
    NYUL_SPEC,
    TEMPLATE_SPACE,
    all_anat_derivatives,
    channel_names,
    derivative_relpath,
    iqm_relpath,
    slices_index_relpath,
    status_relpath,
)
from mriflow.bids.paths import (
    ENTITY_KEYS,
    ENTITY_ORDER,
    DerivativeNameError,
    parse_bids_uri,
    parse_entities,
    parse_subject_dirname,
    session_dirname,
    subject_dirname,
    subject_label,
)

__all__ = [
    "Derivative",
    "DerivativesLayout",
    "ModelReady",
    "ImageDerivatives",
    "find_subject_derivatives",
    "find_subjects",
    "raw_dataset_root",
    "resolve_bids_uri",
]

#: Entities that name what a derivative is (the rest name which raw image it comes from).
_NAMING = ("space", "label", "description", "from", "to", "mode")


@cache
def _roles(contrast: str) -> dict[tuple, str]:
    """``(suffix, naming entities, extension) -> output name`` for one contrast's table."""
    roles: dict[tuple, str] = {}
    for spec in all_anat_derivatives(contrast):
        entities, suffix, extension = parse_entities(
            derivative_relpath({"subject": "x"}, contrast, spec)
        )
        naming = {k: v for k, v in entities.items() if k in _NAMING}
        roles[(suffix, tuple(sorted(naming.items())), extension)] = spec.output
    iqm_entities, _, _ = parse_entities(iqm_relpath({"subject": "x"}, contrast))
    naming = {k: v for k, v in iqm_entities.items() if k in _NAMING}
    roles[("metrics", tuple(sorted(naming.items())), ".json")] = "iqms"
    return roles


def role_of(contrast: str, entities: dict[str, str], suffix: str, extension: str) -> str:
    """The output name of a derivative of a ``contrast`` image (``"other"``: not in the table).

    Any template (``space-``, ``from-``/``to-`` other than ``T1w``: a user template,
    ``--output-spaces``) plays the role of the table's embedded one; the ``res-`` entity
    does not name a role (``space-X_res-2_desc-preproc`` is a ``std_preproc`` too).
    """
    roles = _roles(contrast)
    exact = tuple(sorted((k, v) for k, v in entities.items() if k in _NAMING))
    if (suffix, exact, extension) in roles:  # T1w, longitudinal, from-T2w, the template
        return roles[(suffix, exact, extension)]
    naming = tuple(
        sorted(
            (k, TEMPLATE_SPACE if k in _SPACE_ENTITIES and v != "T1w" else v)
            for k, v in entities.items()
            if k in _NAMING
        )
    )
    return roles.get((suffix, naming, extension), "other")


_SPACE_ENTITIES = ("space", "from", "to")


@dataclass
class Derivative:
    """One derivative file with its BIDS name parts and sidecar."""

    path: Path
    relpath: str
    entities: dict[str, str]
    suffix: str
    extension: str
    sidecar: dict[str, Any]
    role: str = "other"
    """Its output in the table of :mod:`mriflow.bids.outputs` (``preproc``, ``std_mask``, ...)."""


@dataclass
class ImageDerivatives:
    """Every derivative of one raw image, by role."""

    source: str
    """BIDS URI of the raw image (``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``)."""
    source_path: Path | None
    """The raw file, when the raw dataset is reachable (``DatasetLinks.raw``)."""
    contrast: str
    entities: dict[str, str]
    """Entities of the raw image (subject, session, run, ...)."""
    files: list[Derivative] = field(default_factory=list)

    def get(self, role: str) -> Derivative | None:
        return next((d for d in self.files if d.role == role), None)

    def all(self, role_prefix: str) -> list[Derivative]:
        return [d for d in self.files if d.role.startswith(role_prefix)]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """Every step that made any of the image's derivatives, in chain order.

        The chains of the derivatives are merged: the longest first, then each step
        of another chain that is not in it yet is inserted after that chain's
        previous step and after the other branches' steps that follow it (e.g. the
        std image's ``registration`` after the dseg's ``segmentation``, both after
        ``skull_strip``).
        """
        chains = sorted(
            (d.sidecar.get("Steps") or [] for d in self.files if d.role != "iqms"),
            key=len,
            reverse=True,
        )
        merged: list[dict[str, Any]] = []
        for chain in chains:
            position = 0
            for step in chain:
                if step in merged:
                    position = merged.index(step) + 1
                    continue
                # a branch goes after the steps of branches already merged at this point
                while position < len(merged) and merged[position] not in chain:
                    position += 1
                merged.insert(position, step)
                position += 1
        return merged

    @property
    def key(self) -> str:
        """A short unique label such as ``ses-a_run-2_T1w``."""
        parts = [f"{k}-{v}" for k, v in _short(self.entities).items() if k != "sub"]
        return "_".join([*parts, self.contrast])


def _short(entities: dict[str, str]) -> dict[str, str]:
    return {ENTITY_KEYS[k]: entities[k] for k in ENTITY_ORDER if k in entities}


def raw_dataset_root(out_dir: str | os.PathLike[str]) -> Path | None:
    """The raw dataset of a derivatives folder (``DatasetLinks.raw`` of its description)."""
    description = Path(out_dir) / "dataset_description.json"
    try:
        links = json.loads(description.read_text()).get("DatasetLinks", {})
    except (OSError, json.JSONDecodeError):
        return None
    uri = links.get("raw")
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme:
        return Path(uri)
    return None


def resolve_bids_uri(uri: str, out_dir: str | os.PathLike[str]) -> Path | None:
    """The file a ``bids:<dataset>:<path>`` URI names (``bids::`` is ``out_dir`` itself)."""
    parsed = parse_bids_uri(uri)
    if parsed is None:
        return None
    dataset, relpath = parsed
    if dataset == "":
        return Path(out_dir) / relpath
    if dataset == "raw":
        root = raw_dataset_root(out_dir)
        return root / relpath if root else None
    return None


def find_subjects(out_dir: str | os.PathLike[str]) -> list[str]:
    """Labels of the subjects with a folder in ``out_dir`` (without ``sub-``), sorted."""
    return DerivativesLayout(out_dir).subjects()


def _load_sidecar(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _same_grid(a: Path, b: Path) -> bool:
    """Whether two images share shape and affine (headers only: no voxel is read)."""
    import nibabel as nib
    import numpy as np

    try:
        first, second = nib.load(str(a)), nib.load(str(b))
    except Exception:
        return False
    return first.shape[:3] == second.shape[:3] and bool(
        np.allclose(first.affine, second.affine, atol=1e-4)
    )


def find_subject_derivatives(
    out_dir: str | os.PathLike[str], subject: str
) -> list[ImageDerivatives]:
    """``DerivativesLayout(out_dir).find(subject)``."""
    return DerivativesLayout(out_dir).find(subject)


@dataclass
class ModelReady:
    """The model-ready files of one subject/session (one manifest row)."""

    participant_id: str
    session_id: str
    image: Path
    mask: Path | None = None
    dseg: Path | None = None
    slices: Path | None = None
    channels: dict[str, Path] = field(default_factory=dict)
    """The session's other contrasts on the same grid (channel name -> model-ready volume)."""
    stack: Path | None = None
    """The session's 4D model-ready volume, channels last (``export.channel_layout``)."""
    stack_channels: list[str] = field(default_factory=list)
    """Its channel names in order (its sidecar's ``Channels``), the reference first."""


class DerivativesLayout:
    """An mriflow output folder, read through the output table.

    Parameters
    ----------
    out_dir : path
        The derivatives dataset (OUT_DIR), or a subject's staging folder laid out like it.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.root = Path(out_dir)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def group_file(self, output: str) -> Path:
        """A dataset-level file of :data:`~mriflow.bids.outputs.GROUP_OUTPUTS`."""
        return self.root / GROUP_OUTPUTS[output]

    def subjects(self) -> list[str]:
        """Labels (without ``sub-``) of the subjects with a folder here, sorted."""
        if not self.root.is_dir():
            return []
        labels = [parse_subject_dirname(p.name) for p in self.root.iterdir() if p.is_dir()]
        return sorted(label for label in labels if label)

    def status(self, subject: str) -> dict[str, Any] | None:
        """The subject's completion record (``{"status": "ok"|"failed", "reason", "run_id"}``)."""
        record = _load_sidecar(self.root / status_relpath(subject))
        return record or None

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every completion record in OUT_DIR, by subject label."""
        logs = self.root / Path(status_relpath("x")).parent
        found = {}
        for path in sorted(logs.glob("*.json")) if logs.is_dir() else []:
            record = _load_sidecar(path)
            label = subject_label(str(record.get("participant_id", "")))
            # a file is a record only where the table puts that subject's record
            if label and path == self.root / status_relpath(label):
                found[label] = record
        return found

    def find(self, subject: str) -> list[ImageDerivatives]:
        """The subject's derivatives, grouped per raw source image, each with its role.

        Files without a BIDS name or without a sidecar naming a raw source are ignored
        (figures, reports, slices). Groups are sorted by source; files by relative path.
        """
        subject = subject_label(subject)
        root = self.root / subject_dirname(subject)
        groups: dict[str, ImageDerivatives] = {}
        if not root.is_dir():
            return []
        for path in sorted(root.rglob("*")):
            if not path.is_file() or "figures" in path.relative_to(root).parts:
                continue
            try:
                entities, suffix, extension = parse_entities(path)
            except DerivativeNameError:
                continue
            if extension == ".json" and suffix != "metrics":
                continue  # sidecars are read with their image
            stem = path.name[: -len(extension)] if extension else path.name
            sidecar_path = path if extension == ".json" else path.with_name(stem + ".json")
            sidecar = _load_sidecar(sidecar_path)
            sources = [parse_bids_uri(str(s)) for s in sidecar.get("Sources") or []]
            raw = next((s for s in sources if s and s[0] == "raw"), None)
            if raw is None:
                continue
            uri = f"bids:raw:{raw[1]}"
            if uri not in groups:
                try:
                    raw_entities, contrast, _ = parse_entities(raw[1])
                except DerivativeNameError:
                    raw_entities, contrast = {"subject": subject}, suffix
                groups[uri] = ImageDerivatives(
                    source=uri,
                    source_path=resolve_bids_uri(uri, self.root),
                    contrast=contrast,
                    entities=raw_entities,
                )
            contrast = groups[uri].contrast
            groups[uri].files.append(
                Derivative(
                    path=path,
                    relpath=path.relative_to(self.root).as_posix(),
                    entities=entities,
                    suffix=suffix,
                    extension=extension,
                    sidecar=sidecar,
                    role=role_of(contrast, entities, suffix, extension),
                )
            )
        return [groups[k] for k in sorted(groups)]

    def reference_of(
        self, group: ImageDerivatives, groups: list[ImageDerivatives] | None = None
    ) -> ImageDerivatives | None:
        """The T1w image ``group``'s contrast was co-registered to, or ``None``.

        A reference is a T1w image with its own brain mask (a non-reference image,
        e.g. a T2w or a ``ce-`` T1w, is masked by its reference's). ``group`` is
        co-registered to it when its sidecar's ``SpatialReference`` names a file of the
        reference, or else when its ``desc-preproc`` lies on the grid (shape and
        affine) of the reference's brain mask in the same session: derivatives
        without ``space-`` are in the T1w's space (sMRIPrep's convention). Images in
        their own native space have no reference.
        """
        if group.get("brain_mask") is not None or group.get("preproc") is None:
            return None
        groups = self.find(group.entities["subject"]) if groups is None else groups
        candidates = [
            g
            for g in groups
            if g is not group
            and g.contrast == "T1w"
            and g.get("brain_mask") is not None
            and g.entities.get("session") == group.entities.get("session")
        ]
        preproc = group.get("preproc")
        named = preproc.sidecar.get("SpatialReference")
        if isinstance(named, str):
            target = resolve_bids_uri(named, self.root)
            for candidate in candidates:
                if target is not None and any(d.path == target for d in candidate.files):
                    return candidate
        on_grid = [g for g in candidates if _same_grid(preproc.path, g.get("brain_mask").path)]
        return on_grid[0] if len(on_grid) == 1 else None

    def model_ready(self, subjects: list[str]) -> list[ModelReady]:
        """One entry per T1w image with a model-ready volume (manifest rows), sorted."""
        entries = []
        for subject in subjects:
            groups = self.find(subject)
            for group in groups:
                image = group.get("model")
                # the reference of a session: the image that has the session's brain mask
                if image is None or group.get("model_mask") is None:
                    continue
                mask, dseg = group.get("model_mask"), group.get("model_dseg")
                stack = group.get("model_stack")
                naming = {k: v for k, v in image.entities.items() if k in _NAMING}
                index = self.root / slices_index_relpath({**group.entities, **naming})
                entries.append(
                    ModelReady(
                        participant_id=subject_dirname(subject),
                        session_id=session_dirname(group.entities),
                        image=image.path,
                        mask=mask.path if mask else None,
                        dseg=dseg.path if dseg else None,
                        slices=index if index.is_file() else None,
                        channels=self._channels(group, groups),
                        stack=stack.path if stack else None,
                        stack_channels=list(stack.sidecar.get("Channels") or []) if stack else [],
                    )
                )
        return sorted(entries, key=lambda e: (e.participant_id, e.session_id))

    def _channels(
        self, reference: ImageDerivatives, groups: list[ImageDerivatives]
    ) -> dict[str, Path]:
        """Model-ready volumes of the images aligned to ``reference``, by channel name."""
        aligned = [
            group
            for group in groups
            if group.get("model") is not None and self.reference_of(group, groups) is reference
        ]
        names = channel_names(
            (reference.entities, reference.contrast), [(g.entities, g.contrast) for g in aligned]
        )
        return {name: g.get("model").path for name, g in zip(names, aligned, strict=True)}

    def nyul_inputs(self, subjects: list[str]) -> list[tuple[str, Path, Path, str]]:
        """``(subject, preproc, brain mask, relpath of the Nyúl output)`` per native T1w."""
        found = []
        for subject in subjects:
            for group in self.find(subject):
                preproc, mask = group.get("preproc"), group.get("brain_mask")
                if group.contrast != "T1w" or preproc is None or mask is None:
                    continue
                target = derivative_relpath(group.entities, group.contrast, NYUL_SPEC)
                found.append((subject_label(subject), preproc.path, mask.path, target))
        return found

"""Find a subject's published derivatives and read their sidecars (for reports and provenance).

The BIDS derivatives in ``OUT_DIR`` are the single source of truth: every image
has a JSON sidecar whose ``Sources`` start with the raw image it derives from
(``bids:raw:...``) and whose ``Steps`` list the step records that made it.
Derivatives are grouped per raw source image (one group per T1w/T2w/... run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mriflow.bids.derivatives import DerivativeNameError, parse_entities

__all__ = [
    "Derivative",
    "ImageDerivatives",
    "find_subject_derivatives",
    "find_subjects",
    "raw_dataset_root",
    "resolve_bids_uri",
]

_CONTRASTS = ("T1w", "T2w", "FLAIR", "PDw", "T2starw")


@dataclass
class Derivative:
    """One derivative file with its BIDS name parts and sidecar."""

    path: Path
    relpath: str
    entities: dict[str, str]
    suffix: str
    extension: str
    sidecar: dict[str, Any]

    @property
    def role(self) -> str:
        """What the file is: ``preproc``, ``brain_mask``, ``dseg``, ``probseg_GM``, ``xfm``,
        ``std_preproc``, ``std_brain_mask``, ``std_dseg``, ``iqms`` or ``other``."""
        e, s = self.entities, self.suffix
        prefix = "std_" if "space" in e else ""
        desc = e.get("description")
        if s in _CONTRASTS and desc == "preproc":
            return prefix + "preproc"
        if s == "mask" and desc == "brain":
            return prefix + "brain_mask"
        if s == "dseg" and desc is None:
            return prefix + "dseg"
        if s == "probseg" and "label" in e:
            return f"{prefix}probseg_{e['label']}"
        if s == "xfm":
            return "xfm"
        if s == "metrics" and (desc or "").startswith("qc"):
            return "iqms"
        return "other"


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
    from mriflow.bids.derivatives import ENTITY_KEYS, ENTITY_ORDER

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
    if not uri.startswith("bids:"):
        return None
    _, dataset, relpath = uri.split(":", 2)
    if dataset == "":
        return Path(out_dir) / relpath
    if dataset == "raw":
        root = raw_dataset_root(out_dir)
        return root / relpath if root else None
    return None


def find_subjects(out_dir: str | os.PathLike[str]) -> list[str]:
    """Labels of the subjects with a folder in ``out_dir`` (without ``sub-``), sorted."""
    return sorted(p.name[4:] for p in Path(out_dir).glob("sub-*") if p.is_dir() and len(p.name) > 4)


def _load_sidecar(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def find_subject_derivatives(
    out_dir: str | os.PathLike[str], subject: str
) -> list[ImageDerivatives]:
    """The subject's derivatives in ``out_dir``, grouped per raw source image.

    Files without a BIDS name or without a sidecar naming a raw source are ignored
    (figures, reports). Groups are sorted by source; files by relative path.
    """
    out_dir = Path(out_dir)
    subject = subject[4:] if subject.startswith("sub-") else subject
    root = out_dir / f"sub-{subject}"
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
        sources = sidecar.get("Sources") or []
        raw = next((s for s in sources if str(s).startswith("bids:raw:")), None)
        if raw is None:
            continue
        if raw not in groups:
            try:
                raw_entities, contrast, _ = parse_entities(raw.split(":", 2)[2])
            except DerivativeNameError:
                raw_entities, contrast = {"subject": subject}, suffix
            groups[raw] = ImageDerivatives(
                source=raw,
                source_path=resolve_bids_uri(raw, out_dir),
                contrast=contrast,
                entities=raw_entities,
            )
        groups[raw].files.append(
            Derivative(
                path=path,
                relpath=path.relative_to(out_dir).as_posix(),
                entities=entities,
                suffix=suffix,
                extension=extension,
                sidecar=sidecar,
            )
        )
    return [groups[k] for k in sorted(groups)]

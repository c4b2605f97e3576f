"""Name converted series in BIDS: the default heuristic and dcm2bids configs.

A heuristic looks at the sidecar of one converted image (the JSON that
dcm2niix writes, after de-identification) and says where it goes in BIDS
(datatype, suffix, entities) or that it is unknown. The default heuristic
recognises T1w, T2w, T2starw, FLAIR, bold and dwi from the series
description, the reproin naming convention and, failing those, the
acquisition parameters. A user's ``dcm2bids`` configuration file replaces it,
so that existing study configs keep working.

:func:`make_unique` then adds ``acq-`` (different protocols) and ``run-``
(repeats) entities so that no two images get the same name.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from mriflow.bids.paths import ENTITY_KEYS, DerivativeNameError, build_filename

__all__ = [
    "BidsTarget",
    "HeuristicError",
    "Dcm2BidsConfig",
    "default_heuristic",
    "load_dcm2bids_config",
    "make_unique",
    "sanitize_label",
    "bids_basename",
]

logger = logging.getLogger("mriflow.dicom")

_DATATYPES = {"anat", "func", "dwi", "fmap", "perf"}
_ANAT_SUFFIXES = {
    "T1w",
    "T2w",
    "PDw",
    "T2starw",
    "FLAIR",
    "inplaneT1",
    "inplaneT2",
    "PDT2",
    "angio",
    "T1map",
    "T2map",
    "UNIT1",
    "MP2RAGE",
}


class HeuristicError(ValueError):
    """A heuristic file is unreadable or invalid; the message names the file and entry."""


@dataclass(frozen=True)
class BidsTarget:
    """Where one image goes in BIDS.

    Attributes
    ----------
    datatype : str
        ``anat``, ``func``, ``dwi``, ...
    suffix : str
        ``T1w``, ``bold``, ...
    entities : dict
        Entities other than ``sub``/``ses`` (``{"task": "rest", "run": "1"}``).
    sidecar_changes : dict
        Keys to set in the sidecar (``TaskName`` for bold, a config's ``sidecar_changes``).
    rule : str
        Which rule matched, for the conversion summary.
    """

    datatype: str
    suffix: str
    entities: dict[str, str] = field(default_factory=dict)
    sidecar_changes: dict[str, Any] = field(default_factory=dict)
    rule: str = "default"

    def __hash__(self) -> int:  # dicts inside: hash the name instead
        return hash((self.datatype, self.suffix, tuple(sorted(self.entities.items()))))


def sanitize_label(text: str) -> str:
    """Keep only letters and digits: a valid BIDS label (may be empty)."""
    return re.sub(r"[^A-Za-z0-9]", "", str(text))


def bids_basename(subject: str, session: str | None, target: BidsTarget) -> str:
    """``sub-01_ses-pre_task-rest_run-1_bold`` from the target's entities, in BIDS order."""
    entities = {"sub": subject, **({"ses": session} if session else {}), **target.entities}
    try:
        return build_filename(entities, suffix=target.suffix)
    except DerivativeNameError as err:
        expected = list(ENTITY_KEYS.values())
        raise HeuristicError(
            f"unknown BIDS entities or labels: {err} (expected some of {expected})"
        ) from None


# --------------------------------------------------------------------------- default rules

_REPROIN = re.compile(r"(?:^|[_\s])(task|acq|ce|rec|dir|run|echo)-([A-Za-z0-9]+)")
_REPROIN_SEQTYPE = re.compile(r"^(anat|func|dwi|fmap)(?:-([A-Za-z0-9]+))?(?:[_\s]|$)")
# Words of a series name that mark service images, never data for a pipeline.
_SKIP_WORDS = frozenset(
    {
        "localizer",
        "localiser",
        "loc",
        "scout",
        "survey",
        "aahead",
        "aascout",
        "phoenixzipreport",
        "mip",
        "adc",
        "tracew",
        "trace",
        "fa",
        "colfa",
        "screenshot",
        "calibration",
        "setter",
    }
)


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9*]+", text.lower()) if w}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def default_heuristic(
    sidecar: dict[str, Any], *, n_volumes: int = 1, bvals: Sequence[float] | None = None
) -> BidsTarget | None:
    """Classify one converted image with mriflow's default rules.

    Parameters
    ----------
    sidecar : dict
        The image's BIDS sidecar (dcm2niix's, de-identified).
    n_volumes : int
        Number of volumes (4th dimension) of the image.
    bvals : sequence of float, optional
        b-values when the converter wrote a ``.bval`` file.

    Returns
    -------
    BidsTarget or None
        None for localizers, derived maps (ADC, FA, trace), phase-only
        service images and anything the rules do not recognise: such series
        are listed and left out (or kept under ``sourcedata/``).

    Notes
    -----
    Order of the rules: derived / localizer first (never data), then reproin
    names (``anat-T1w_acq-tfl``), diffusion (b-values), FLAIR before T2w (a
    FLAIR is T2-weighted too), T2*, T2w, T1w, bold, and last the acquisition
    parameters for series whose names say nothing.
    """
    if n_volumes < 1:
        raise ValueError(f"n_volumes must be >= 1, got {n_volumes}")
    description = str(sidecar.get("SeriesDescription", ""))
    protocol = str(sidecar.get("ProtocolName", ""))
    text = f"{description} {protocol}".strip().lower()
    words = _words(text)
    image_type = [str(v).upper() for v in (sidecar.get("ImageType") or [])]
    modality = str(sidecar.get("Modality", "MR")).upper()
    if modality and modality != "MR":
        return None
    if "DERIVED" in image_type or "LOCALIZER" in image_type or "SECONDARY" in image_type:
        return None
    if words & _SKIP_WORDS or "localizer" in text or "scout" in text:
        return None
    if any(t in image_type for t in ("ADC", "TRACEW", "FA", "TENSOR")):
        return None

    entities: dict[str, str] = {}
    for name in (protocol, description):
        for key, value in _REPROIN.findall(name):
            if key not in ("run", "echo"):  # runs and echoes are numbered by mriflow
                entities.setdefault(key, value)

    # reproin: "anat-T1w_acq-tfl", "func_task-rest", "dwi_dir-AP"
    m = _REPROIN_SEQTYPE.match(protocol) or _REPROIN_SEQTYPE.match(description)
    if m:
        datatype, label = m.group(1), m.group(2)
        if datatype == "anat" and label in _ANAT_SUFFIXES:
            return BidsTarget("anat", label, entities, rule="reproin")
        if datatype == "func" and (label in (None, "bold")):
            task = entities.pop("task", None) or "unknown"
            return BidsTarget(
                "func", "bold", {"task": task, **entities}, {"TaskName": task}, rule="reproin"
            )
        if datatype == "dwi" and bvals is not None:
            return BidsTarget("dwi", "dwi", entities, rule="reproin")

    te = _number(sidecar.get("EchoTime"))
    tr = _number(sidecar.get("RepetitionTime"))
    ti = _number(sidecar.get("InversionTime"))
    scanning = str(sidecar.get("ScanningSequence", "")).upper()
    is_epi = "EP" in scanning.replace("\\", " ").split() or "EP" in scanning
    has_b = bvals is not None and any(b > 50 for b in bvals)

    if (
        has_b
        or "DIFFUSION" in image_type
        or words & {"dwi", "dti", "diff", "diffusion", "hardi", "dsi"}
    ):
        if bvals is None:  # without gradient tables it cannot be used as dwi
            return None
        return BidsTarget("dwi", "dwi", entities, rule="default: diffusion")
    if "flair" in text or "dark fluid" in text or "darkfluid" in text or "dark-fluid" in text:
        return BidsTarget("anat", "FLAIR", entities, rule="default: name says FLAIR")
    if "t2*" in text or "t2star" in text or "t2_star" in text or words & {"swi", "t2s"}:
        return BidsTarget("anat", "T2starw", entities, rule="default: name says T2*")
    t2 = re.search(r"(?<![a-z0-9])t2(w|wi|_?tse|_?space|_?frfse)?(?![a-z0-9*])", text)
    t1 = (
        re.search(r"(?<![a-z0-9])t1(w|wi)?(?![a-z0-9])", text)
        or words & {"mprage", "mpr", "tfl", "spgr", "fspgr", "bravo", "tfe", "t1mprage"}
        or "mprage" in text
        or "mp-rage" in text
        or "mp_rage" in text
    )
    if t2 and not t1:
        return BidsTarget("anat", "T2w", entities, rule="default: name says T2")
    if t1 and not t2:
        return BidsTarget("anat", "T1w", entities, rule="default: name says T1")
    if n_volumes > 1 and (is_epi or words & {"bold", "fmri", "rest", "resting"}):
        task = entities.pop("task", None)
        if task is None:
            task = (
                "rest"
                if words & {"rest", "resting", "rsfmri"}
                else sanitize_label(protocol or description) or "unknown"
            )
        return BidsTarget(
            "func",
            "bold",
            {"task": task, **entities},
            {"TaskName": task},
            rule="default: EPI time series",
        )
    # Names said nothing: fall back on contrast from the acquisition parameters.
    if te is not None and tr is not None and n_volumes == 1 and not is_epi:
        if ti is not None and ti >= 1.5 and te >= 0.06:
            return BidsTarget("anat", "FLAIR", entities, rule="default: long TI, long TE")
        if ti is not None and 0.4 <= ti <= 1.5 and te <= 0.01:
            return BidsTarget("anat", "T1w", entities, rule="default: inversion-recovery GRE")
        if ti is None and te <= 0.02 and tr <= 0.8:
            return BidsTarget("anat", "T1w", entities, rule="default: short TR, short TE")
        if ti is None and te >= 0.06 and tr >= 1.5:
            return BidsTarget("anat", "T2w", entities, rule="default: long TR, long TE")
    return None


# --------------------------------------------------------------------------- dcm2bids configs

_NUMERIC_OPS = {"lt", "lte", "le", "gt", "gte", "ge", "btw", "btwe"}


@dataclass
class _Description:
    datatype: str
    suffix: str
    criteria: dict[str, Any]
    custom_entities: list[str]
    sidecar_changes: dict[str, Any]
    ident: str


@dataclass
class Dcm2BidsConfig:
    """A ``dcm2bids`` configuration (JSON with ``descriptions`` and ``criteria``).

    Supported: ``descriptions`` entries with ``datatype``/``dataType``,
    ``suffix``/``modalityLabel``, ``custom_entities``/``customEntities``/
    ``customLabels`` (``"acq-highres"`` or a bare entity name filled from
    ``extractors``), ``criteria`` (glob patterns with ``search_method``
    ``fnmatch``, regular expressions with ``re``, lists compared element by
    element, ``{"any": [...]}``, and numeric ``lt``/``lte``/``gt``/``gte``/
    ``btw``/``btwe``), ``sidecar_changes``/``sidecarChanges``,
    ``case_sensitive`` and ``extractors``. A series matching several
    descriptions is ambiguous and left out, as dcm2bids does. ``IntendedFor``,
    ``post_op`` and defacing are not supported (ignored with a warning).
    """

    descriptions: list[_Description]
    search_method: str = "fnmatch"
    case_sensitive: bool = True
    extractors: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def match(self, sidecar: dict[str, Any]) -> tuple[BidsTarget | None, list[str]]:
        """Find the description that matches ``sidecar``.

        Returns
        -------
        (BidsTarget or None, list of str)
            The target (None if no description or several match) and the
            ids of all descriptions that matched.
        """
        hits = [d for d in self.descriptions if self._is_link(sidecar, d.criteria)]
        if len(hits) != 1:
            return None, [d.ident for d in hits]
        d = hits[0]
        entities, changes = self._entities(d, sidecar)
        target = BidsTarget(
            datatype=d.datatype,
            suffix=d.suffix,
            entities=entities,
            sidecar_changes={**changes, **d.sidecar_changes},
            rule=f"{Path(self.source).name}: {d.ident}",
        )
        return target, [d.ident]

    # -- criteria, as dcm2bids compares them
    def _compare(self, value: Any, pattern: Any) -> bool:
        name = str(value)
        if self.search_method == "re":
            flags = 0 if self.case_sensitive else re.IGNORECASE
            return re.match(str(pattern), name, flags) is not None
        pat = str(pattern)
        if not self.case_sensitive:
            name, pat = name.lower(), pat.lower()
        return fnmatch(name, pat)

    def _compare_list(self, value: Any, pattern: Any) -> bool:
        if not isinstance(value, list) or not isinstance(pattern, list):
            return False
        return len(value) == len(pattern) and all(
            self._compare(v, p) for v, p in zip(value, pattern, strict=True)
        )

    def _compare_numeric(self, value: Any, op: str, operand: Any) -> bool:
        x = _number(value)
        if x is None:
            return False
        if op in ("btw", "btwe"):
            try:
                lo, hi = (float(v) for v in operand)
            except (TypeError, ValueError):
                return False
            return lo < x < hi if op == "btw" else lo <= x <= hi
        y = _number(operand[0] if isinstance(operand, list) and len(operand) == 1 else operand)
        if y is None:
            return False
        return {
            "lt": x < y,
            "lte": x <= y,
            "le": x <= y,
            "gt": x > y,
            "gte": x >= y,
            "ge": x >= y,
        }[op]

    def _is_link(self, sidecar: dict[str, Any], criteria: dict[str, Any]) -> bool:
        for tag, pattern in criteria.items():
            value = sidecar.get(tag, "")
            if isinstance(pattern, dict):
                ((op, operand),) = pattern.items()
                if op == "any":
                    ok = any(
                        self._compare_list(value, p)
                        if isinstance(value, list)
                        else self._compare(value, p)
                        for p in operand
                    )
                else:
                    ok = self._compare_numeric(value, op, operand)
            elif isinstance(value, list):
                ok = self._compare_list(value, pattern)
            else:
                ok = self._compare(value, pattern)
            if not ok:
                return False
        return True

    def _entities(
        self, d: _Description, sidecar: dict[str, Any]
    ) -> tuple[dict[str, str], dict[str, Any]]:
        found: dict[str, str] = {}
        for tag, patterns in self.extractors.items():
            values = sidecar.get(tag)
            values = values if isinstance(values, list) else [values]
            for pattern in patterns:
                for v in values:
                    m = re.search(pattern, str(v)) if v is not None else None
                    if m:
                        found.update({k: x for k, x in m.groupdict().items() if x})
        entities: dict[str, str] = {}
        changes: dict[str, Any] = {}
        for item in d.custom_entities:
            key, _, value = item.partition("-")
            if not value:
                value = found.get(key, "")
                if not value:
                    logger.warning(
                        "%s: entity '%s' of description '%s' was not found by the extractors; "
                        "left out",
                        self.source,
                        key,
                        d.ident,
                    )
                    continue
            entities[key] = sanitize_label(value) if key != "run" else value
        if d.suffix == "bold" and "task" in entities:
            changes["TaskName"] = entities["task"]
        return entities, changes


def _first(entry: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in entry:
            return entry[k]
    return default


def load_dcm2bids_config(path: str | Path) -> Dcm2BidsConfig:
    """Read a dcm2bids JSON configuration file.

    Raises
    ------
    HeuristicError
        Missing or unparsable file, or an entry without datatype, suffix or
        criteria; the message names the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise HeuristicError(f"{path}: heuristic file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise HeuristicError(f"{path}: not a readable JSON dcm2bids config ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("descriptions"), list):
        raise HeuristicError(
            f"{path}: expected a dcm2bids config, a JSON object with a 'descriptions' list"
        )
    search = _first(raw, "search_method", "searchMethod", default="fnmatch")
    if search not in ("fnmatch", "re"):
        raise HeuristicError(f"{path}: search_method must be 'fnmatch' or 're', got {search!r}")
    case = _first(raw, "case_sensitive", "caseSensitive", default=True)
    if not isinstance(case, bool):
        raise HeuristicError(f"{path}: case_sensitive must be true or false, got {case!r}")
    dup = _first(raw, "dup_method", "dupMethod", default="run")
    if dup != "run":
        logger.warning("%s: dup_method %r is not supported; repeats get run- entities", path, dup)
    for unsupported in ("post_op", "defaceTpl", "compKeys", "comp_keys"):
        if unsupported in raw:
            logger.warning("%s: '%s' is not supported by mriflow and is ignored", path, unsupported)
    extractors = raw.get("extractors", {})
    if not isinstance(extractors, dict):
        raise HeuristicError(f"{path}: 'extractors' must map sidecar keys to lists of regexes")
    extractors = {k: v if isinstance(v, list) else [v] for k, v in extractors.items()}

    descriptions = []
    for i, entry in enumerate(raw["descriptions"]):
        where = f"{path}: descriptions[{i}]"
        if not isinstance(entry, dict):
            raise HeuristicError(f"{where}: expected an object")
        datatype = _first(entry, "datatype", "dataType")
        suffix = _first(entry, "suffix", "modalityLabel")
        criteria = entry.get("criteria")
        if not datatype or not suffix:
            raise HeuristicError(f"{where}: needs 'datatype' and 'suffix'")
        if not isinstance(criteria, dict) or not criteria:
            raise HeuristicError(f"{where}: needs a non-empty 'criteria' object")
        for tag, pattern in criteria.items():
            if isinstance(pattern, dict):
                if len(pattern) != 1 or next(iter(pattern)) not in _NUMERIC_OPS | {"any"}:
                    raise HeuristicError(
                        f"{where}: criterion {tag!r} must be a pattern, a list, or one of "
                        f"{sorted(_NUMERIC_OPS | {'any'})}, got {pattern!r}"
                    )
        custom = _first(entry, "custom_entities", "customEntities", "customLabels", default=[])
        if isinstance(custom, str):
            # dcm2bids 2 wrote "acq-highres_run-01"-style strings
            custom = [c for c in custom.split("_") if c]
        if "IntendedFor" in entry or "intendedFor" in entry:
            logger.warning("%s: IntendedFor is not supported and is ignored", where)
        descriptions.append(
            _Description(
                datatype=str(datatype),
                suffix=str(suffix),
                criteria=criteria,
                custom_entities=[str(c) for c in custom],
                sidecar_changes=dict(
                    _first(entry, "sidecar_changes", "sidecarChanges", default={})
                ),
                ident=str(entry.get("id", f"descriptions[{i}] {datatype}/{suffix}")),
            )
        )
    return Dcm2BidsConfig(
        descriptions=descriptions,
        search_method=search,
        case_sensitive=case,
        extractors=extractors,
        source=str(path),
    )


# --------------------------------------------------------------------------- unique names


def make_unique(
    items: Sequence[tuple[BidsTarget, str, tuple]], *, add_acq: bool = True
) -> list[BidsTarget]:
    """Add ``acq-`` and ``run-`` entities so that every target has its own name.

    Parameters
    ----------
    items : sequence of (BidsTarget, protocol_label, sort_key)
        One per image. ``protocol_label`` distinguishes different protocols
        (sanitized protocol name); ``sort_key`` orders repeats (series number,
        acquisition time).
    add_acq : bool
        When images of different protocols collide, name them by ``acq-<protocol>``
        first (the default heuristic); a user config gets only ``run-``, as in dcm2bids.

    Returns
    -------
    list of BidsTarget
        In the order of ``items``.
    """
    targets = [t for t, _, _ in items]

    def groups() -> dict[tuple, list[int]]:
        g: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(targets):
            key = (t.datatype, t.suffix, tuple(sorted(t.entities.items())))
            g[key].append(i)
        return {k: v for k, v in g.items() if len(v) > 1}

    if add_acq:
        for members in groups().values():
            labels = {items[i][1] for i in members}
            if len(labels) > 1 and all(items[i][1] for i in members):
                for i in members:
                    if "acq" not in targets[i].entities:
                        targets[i] = replace(
                            targets[i], entities={**targets[i].entities, "acq": items[i][1]}
                        )
    for members in groups().values():
        members = sorted(members, key=lambda i: items[i][2])
        for run, i in enumerate(members, start=1):
            targets[i] = replace(targets[i], entities={**targets[i].entities, "run": str(run)})
    remaining = groups()
    if remaining:  # only possible if a config hard-codes run- entities
        names = [bids_basename("X", None, targets[v[0]]) for v in remaining.values()]
        raise HeuristicError(f"several images would get the same name: {names}")
    return targets

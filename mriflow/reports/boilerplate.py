"""Methods boilerplate of a run (``OUT_DIR/logs/CITATION.md`` and ``.bib``), as fMRIPrep writes.

The text is built from the Nipype graph that was built for the run, node by node: each
processing step contributes one sentence made from its interface's inputs (the
parameters the config gave it), the packages it runs on and the references of its
method. A step disabled by the config is not in the graph, or is in it with
``method = "none"``, and then contributes nothing. Steps are keyed by interface class
(node names change with the wiring); a workflow's ``__desc__`` is used for workflows
holding processing nodes that this module does not describe, so a new step shows up
with its author's text until it gets a sentence here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from mriflow.bids.outputs import GROUP_OUTPUTS

__all__ = [
    "STEP_TEXTS",
    "Boilerplate",
    "StepText",
    "bibtex_entries",
    "build_boilerplate",
    "write_boilerplate",
]

#: Interfaces that only route data (no step of their own).
PLUMBING = {
    "IdentityInterface", "Select", "Merge", "Split", "Function", "PublishSubject",
    "MaskOnMovingGrid",  # a mask for the co-registered N4 and defacing, described there
}  # fmt: skip


@dataclass(frozen=True)
class StepText:
    """How one interface is described: ``sentence(inputs) -> (text, software, refs)``.

    ``sentence`` returns None when the inputs say the step does nothing (``method =
    "none"``). ``steps`` gives the names the node's steps have in the sidecars' ``Steps``
    (one node may make several outputs, each with its own step).
    """

    steps: Callable[[Any], tuple[str, ...]]
    sentence: Callable[[Any], tuple[str, tuple[str, ...], tuple[str, ...]] | None]


def _mm(value: float) -> str:
    return f"{value:g} mm"


def _conform(i):
    orient = "reoriented to RAS+ and " if i.reorient else ""
    return (
        f"was {orient}resampled to {_mm(i.voxel_size)} isotropic voxels "
        f"({i.interpolation} interpolation, nibabel)",
        ("nibabel", "scipy"),
        (),
    )


_DENOISE = {
    "nlm": (
        "non-local means with a {noise_model} noise model (patch radius {patch_radius}, search "
        "radius {search_radius}, h = {h_factor:g} x the estimated noise level; mriflow's numpy "
        "implementation)",
        ("numpy", "scipy"),
        ("buades2005", "manjon2010"),
    ),
    "ants": (
        "adaptive non-local means with a {noise_model} noise model (ANTs DenoiseImage, "
        "patch radius {patch_radius}, search radius {search_radius})",
        ("antspyx",),
        ("manjon2010", "tustison2021"),
    ),
    "skimage": (
        "non-local means (scikit-image, patch size 5, distance 6)",
        ("scikit-image",),
        ("buades2005", "vanderwalt2014"),
    ),
}


def _denoise(i):
    if i.method not in _DENOISE:
        return None
    template, software, refs = _DENOISE[i.method]
    values = {k: getattr(i, k) for k in ("noise_model", "patch_radius", "search_radius")}
    text = template.format(**values, h_factor=i.h_factor)
    return f"was denoised by {text}", software, refs


def _n4(i):
    iterations = "x".join(str(n) for n in i.iterations)
    return (
        "was corrected for intensity non-uniformity with N4 (SimpleITK; shrink factor "
        f"{i.shrink_factor}, {iterations} iterations, B-spline distance "
        f"{_mm(i.spline_distance_mm)}, convergence threshold {i.convergence_threshold:g})",
        ("SimpleITK",),
        ("tustison2010", "lowekamp2013"),
    )


def _remove_bias(i):
    return "had the N4 bias field divided out of its resampled image", (), ()


def _skull_strip(i):
    method = i.method
    if method == "auto":
        from mriflow.image.skullstrip import deepbet_available

        method = "deepbet" if deepbet_available() else "template"
    stripped = (
        " (an input found to be already skull-stripped is passed through)"
        if i.detect_stripped
        else ""
    )
    if method == "deepbet":
        return (
            f"was skull-stripped with deepbet, a convolutional neural network (threshold "
            f"{i.deepbet_threshold:g}){stripped}",
            ("deepbet", "torch"),
            ("fisch2024",),
        )
    if method == "template":
        return (
            "was skull-stripped by registering the MNI152NLin2009aSym template head to it "
            f"(ANTs SyN, antspyx) and mapping the template's brain mask back{stripped}",
            ("antspyx",),
            ("avants2008", "tustison2021", "fonov2009"),
        )
    return None


def _deface(i):
    return (
        f"was defaced: voxels of the face and ears farther than {_mm(i.margin_mm)} from the "
        "brain mask were set to zero (brain voxels unchanged)",
        ("scipy",),
        (),
    )


def _register(i):
    return (
        "was registered to the MNI152NLin2009aSym template (ICBM 2009a nonlinear symmetric, "
        f"as shipped by nilearn, {i.template_resolution} mm) with a rigid, affine and "
        f"symmetric normalization (SyN) cascade (antspyx, '{i.preset}' preset), brain to brain",
        ("antspyx", "nilearn"),
        ("avants2008", "tustison2021", "fonov2009"),
    )


_TEMPLATE_SPACE_OUTPUTS = {
    "std_preproc": "preprocessed image",
    "std_mask": "brain mask",
    "std_norm": "intensity-normalized image",
    "std_dseg": "tissue labels",
}


def _apply(i):
    what = _TEMPLATE_SPACE_OUTPUTS.get(i.step_name, i.step_name)
    if i.step_name == "to_t1w":
        return (
            f"was resampled onto the reference T1w grid ({i.interpolation} interpolation, antspyx)",
            ("antspyx",),
            (),
        )
    return (
        f"had its {what} resampled to template space in one step ({i.interpolation} "
        "interpolation, antspyx)",
        ("antspyx",),
        ("tustison2021",),
    )


def _resample_to_template(i):
    # one sentence per template grid; names of later grids end in _space2, _space3, ...
    what = [_TEMPLATE_SPACE_OUTPUTS[re.sub(r"_space\d+$", "", name)] for name in i.step_names]
    how = {"linear": "linearly", "nearest": "by nearest neighbour",
           "genericLabel": "by ANTs' label interpolation"}  # fmt: skip
    parts = [f"its {w} {how[interpolation]}" for w, interpolation in zip(what, i.interpolations)]
    listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return (
        f"was resampled to template space ({listed}), the transforms evaluated once for all "
        "(SimpleITK, scipy)",
        ("SimpleITK", "scipy"),
        ("lowekamp2013",),
    )


def _priors(i):
    return (
        "had the template's GM, WM and CSF probability maps mapped onto it as tissue priors",
        ("SimpleITK", "scipy", "nilearn"),
        ("fonov2009",),
    )


_SEGMENT = {
    "hmrf": (
        "a hidden Markov random field model fitted by expectation-maximization (mriflow's "
        "numpy implementation, as in FSL FAST; MRF beta {mrf_beta:g})",
        ("numpy", "scipy"),
        ("zhang2001",),
    ),
    "gmm": ("a Gaussian mixture model (scikit-learn)", ("scikit-learn",), ("pedregosa2011",)),
    "atropos": (
        "Atropos (antspyx; MRF weight {mrf_weight:g})",
        ("antspyx",),
        ("tustison2021",),
    ),
}


def _segment(i):
    if i.method not in _SEGMENT:
        return None
    template, software, refs = _SEGMENT[i.method]
    text = template.format(mrf_beta=i.mrf_beta, mrf_weight=i.mrf_weight)
    priors = " with the template's tissue priors" if i.use_priors else ""
    return (
        f"was segmented into cerebrospinal fluid, gray matter and white matter by {text}{priors}",
        software,
        refs,
    )


_NORMALIZE_REFS = {
    "zscore": ("shinohara2014",),
    "whitestripe": ("shinohara2014",),
    "fcm": ("reinhold2019",),
    "nyul": ("nyul2000",),
    "clahe": ("zuiderveld1994",),
}


def _normalize(i):
    if i.method == "none":
        return None
    return (
        f"had its brain intensities normalized ({i.method}, inside the brain mask)",
        ("numpy", "scikit-image") if i.method == "clahe" else ("numpy",),
        _NORMALIZE_REFS.get(i.method, ()),
    )


def _model_ready(i):
    shape = "x".join(str(n) for n in i.target_shape)
    fit = "cropped or padded" if i.fit == "crop_or_pad" else "resized"
    return f"was {fit} to a fixed {shape} grid for machine learning", ("numpy",), ()


def _slices(i):
    return (
        f"was exported as 2D {', '.join(i.axes)} slices ({i.fmt}) holding at least "
        f"{i.min_brain_fraction:.0%} brain",
        ("numpy",),
        (),
    )


def _coregister(i):
    start = {
        "auto": "from the headers and from aligned centres of mass, the better kept",
        "header": "from the headers",
        "moments": "from aligned centres of mass",
    }[i.initialisation]
    target = (
        "the first session's T1w"
        if i.step_name == "longitudinal_coregistration"
        else "the session's reference T1w"
    )
    return (
        f"was aligned to {target} with a {i.transform} registration "
        "(antsRegistration, Mattes mutual information inside the reference brain mask, "
        f"started {start}); every output was resampled from its own grid in one "
        "interpolation through the composed transforms",
        ("antspyx",),
        ("tustison2021",),
    )


def _face_removed(i):
    return (
        "had the reference T1w's face, brought onto its own grid, set to zero",
        ("nibabel",),
        (),
    )


def _name(step: str) -> Callable[[Any], tuple[str, ...]]:
    return lambda inputs: (step,)


def _step_name(inputs) -> tuple[str, ...]:
    return (inputs.step_name,)


#: interface class name -> its description
STEP_TEXTS: dict[str, StepText] = {
    "Conform": StepText(_name("conform"), _conform),
    "Denoise": StepText(_name("denoise"), _denoise),
    "N4BiasFieldCorrection": StepText(_name("n4"), _n4),
    "RemoveBiasField": StepText(_name("remove_bias_field"), _remove_bias),
    "SkullStrip": StepText(_name("skull_strip"), _skull_strip),
    "Deface": StepText(_name("deface"), _deface),
    "RegisterToTemplate": StepText(_name("registration"), _register),
    "ApplyTransforms": StepText(_step_name, _apply),
    "ResampleToTemplate": StepText(lambda i: tuple(i.step_names), _resample_to_template),
    "TemplateTissuePriors": StepText(_name("template_priors"), _priors),
    "TissueSegmentation": StepText(_name("tissue_segmentation"), _segment),
    "Normalize": StepText(_name("intensity_normalization"), _normalize),
    "ModelReady": StepText(_name("model_ready"), _model_ready),
    "ExportSlices": StepText(_name("slices"), _slices),
    "Coregister": StepText(_step_name, _coregister),
    "ApplyFaceMask": StepText(_name("deface"), _face_removed),
}


def bibtex_entries() -> dict[str, str]:
    """Every BibTeX entry a step may cite (``mriflow/data/boilerplate.bib``), by key."""
    text = (Path(__file__).parent.parent / "data" / "boilerplate.bib").read_text()
    entries = {}
    for chunk in text.split("\n@")[1:]:
        key = chunk[chunk.index("{") + 1 : chunk.index(",")]
        entries[key] = "@" + chunk.strip()
    return entries


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Boilerplate:
    """The methods text of a run and what it is made of."""

    paragraphs: list[str] = field(default_factory=list)
    steps: dict[str, set[str]] = field(default_factory=dict)
    """step name (as in the sidecars' ``Steps``) -> packages it ran on"""
    references: list[str] = field(default_factory=list)
    """BibTeX keys, in order of first citation"""

    @property
    def software(self) -> dict[str, str]:
        """Every package the described steps use, with its installed version."""
        packages = {"mriflow", "nipype"} | set().union(*self.steps.values())
        return {p: _version(p) for p in sorted(packages, key=str.lower)}

    def cite(self, keys: tuple[str, ...]) -> str:
        for key in keys:
            if key not in self.references:
                self.references.append(key)
        return f" [{'; '.join('@' + k for k in keys)}]" if keys else ""

    def markdown(self) -> str:
        versions = self.software
        lines = ["# Methods (mriflow boilerplate)", ""]
        for paragraph in self.paragraphs:
            lines += [paragraph, ""]
        lines += ["## Steps that ran", "", "| step (sidecar `Steps` name) | software |"]
        lines.append("|---|---|")
        for step, packages in self.steps.items():
            used = ", ".join(f"{p} {versions[p]}" for p in sorted(packages, key=str.lower))
            lines.append(f"| {step} | {used or 'mriflow'} |")
        lines += ["", "## Software versions", ""]
        lines += [f"- {package} {ver}" for package, ver in versions.items()]
        lines += [
            "",
            "## Copyright waiver",
            "",
            "The text above was generated by mriflow from the workflow it ran, so that users "
            "can paste it into their manuscripts unchanged. It is released under the "
            "[CC0](https://creativecommons.org/publicdomain/zero/1.0/) licence.",
            "",
            "## References",
            "",
            "BibTeX keys (entries in `CITATION.bib`): "
            + ", ".join(f"`{key}`" for key in self.references),
            "",
        ]
        return "\n".join(lines)

    def bibtex(self) -> str:
        entries = bibtex_entries()
        return "\n\n".join(entries[key] for key in self.references) + "\n"


def _walk(workflow) -> Iterator[tuple[Any, list[Any]]]:
    """``(workflow, its own nodes in execution order)`` for ``workflow`` and every sub-workflow."""
    import networkx as nx
    from nipype.pipeline.engine import Workflow

    nodes = list(nx.topological_sort(workflow._graph))
    yield workflow, _chain_order(workflow, [n for n in nodes if not isinstance(n, Workflow)])
    for node in nodes:
        if isinstance(node, Workflow):
            yield from _walk(node)


def _chain_order(workflow, nodes: list[Any]) -> list[Any]:
    """``nodes`` (topologically sorted) in the order of the chain's step records.

    A chain lists its steps in run order into its ``collect_steps`` node (what the
    sidecars' ``Steps`` show); a topological order alone may put the resampling before
    the denoising that ran first. Nodes outside that list follow the listed node that
    precedes them topologically.
    """
    collect = next((n for n in nodes if n.name == "collect_steps"), None)
    if collect is None:
        return nodes
    rank: dict[Any, int] = {}
    for source, _, data in workflow._graph.in_edges(collect, data=True):
        for _, field_name in data.get("connect", []):
            if field_name.startswith("in") and field_name[2:].isdigit():
                rank[source] = int(field_name[2:])
    keys, last = {}, 0
    for position, node in enumerate(nodes):
        last = rank.get(node, last)
        keys[node] = (last, node not in rank, position)
    return sorted(nodes, key=keys.__getitem__)


def _contrast(workflow, nodes: list[Any]) -> str:
    """The suffix of the raw image a chain starts from (``T1w``), else ``anatomical``."""
    from mriflow.bids.paths import parse_entities

    for node in nodes:
        in_file = getattr(node.inputs, "in_file", None) if node.name == "inputnode" else None
        if isinstance(in_file, str) and in_file:
            try:
                return parse_entities(in_file)[1] or "anatomical"
            except ValueError:
                break
    # a chain fed through a session workflow: its description names the contrast
    match = re.match(r"The (\w+) image", getattr(workflow, "__desc__", None) or "")
    return match.group(1) if match else "anatomical"


def build_boilerplate(workflow) -> Boilerplate:
    """The methods text of ``workflow`` (as built for the run; it is not run).

    Image chains with the same steps and parameters share one paragraph.
    """
    import nipype

    text = Boilerplate()
    intro = (
        f"Results included in this manuscript come from preprocessing performed using "
        f"*mriflow* {_version('mriflow')}, which is based on *Nipype* {nipype.__version__}"
        f"{text.cite(('gorgolewski2011',))}."
    )
    text.paragraphs.append(intro)
    seen: dict[tuple[str, ...], list[str]] = {}
    undescribed: dict[str, str] = {}
    for sub, nodes in _walk(workflow):
        sentences: list[str] = []
        unknown = False
        for node in nodes:
            kind = type(node.interface).__name__
            described = STEP_TEXTS.get(kind)
            if described is None:
                unknown = unknown or kind not in PLUMBING
                continue
            try:
                made = described.sentence(node.inputs)
            except (AttributeError, KeyError, TypeError, ValueError):
                # the interface changed under this text: its workflow's own words instead
                unknown = True
                continue
            if made is None:
                continue
            sentence, software, refs = made
            for step in described.steps(node.inputs):
                text.steps.setdefault(step, set()).update(software)
            sentence += text.cite(refs)
            if sentence not in sentences:  # e.g. the raw and the denoised image conformed
                sentences.append(sentence)
        description = getattr(sub, "__desc__", None)
        if unknown and description:
            undescribed.setdefault(description, sub.name)
        if sentences:
            seen.setdefault(tuple(sentences), []).append(_contrast(sub, nodes))
    for sentences, contrasts in seen.items():
        kinds = sorted(set(contrasts))
        subject = " and ".join(kinds)
        count = len(contrasts)
        head = f"Each {subject} image ({count} in this run)"
        body = ". It ".join(sentences)
        text.paragraphs.append(f"{head} {body}.")
    text.paragraphs += list(undescribed)
    text.paragraphs.append(
        "Outputs were written as BIDS Derivatives with JSON sidecars recording every step, "
        "its parameters and software versions, together with a visual quality-control report "
        "and image quality metrics per subject."
    )
    return text


def write_boilerplate(workflow, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``OUT_DIR/logs/CITATION.md`` and ``CITATION.bib`` for ``workflow``.

    Returns
    -------
    list of Path
        The two files written.
    """
    from mriflow.bids.paths import atomic_write_text

    text = build_boilerplate(workflow)
    out_dir = Path(out_dir)
    return [
        atomic_write_text(out_dir / GROUP_OUTPUTS["citation"], text.markdown()),
        atomic_write_text(out_dir / GROUP_OUTPUTS["citation_bib"], text.bibtex()),
    ]

"""Provenance: a W3C PROV record (JSON-LD) per subject and the Nipype workflow graph.

The record is built from what the derivatives themselves say (the sidecars'
``Sources`` and ``Steps``), so it describes exactly the files on disk:

- **entities** (``prov:Entity``): the raw inputs (``bids:raw:...``), every
  derivative (``bids::sub-01/anat/...``) and the run's configuration
  (``bids::mriflow_config.toml``);
- **activities** (``prov:Activity``): each step of each image's chain (``conform``,
  ``n4``, ...) with its parameters (``mriflow:parameters``, a JSON literal) and its
  position in the chain (``mriflow:stepIndex``, 1-based); a step ``prov:used`` the
  previous step's output (``prov:wasInformedBy`` the previous step), the first one
  the raw image; every step used the configuration;
- **agents** (``prov:SoftwareAgent``): mriflow and each library with its version
  (``https://pypi.org/project/<name>/<version>/``), associated with the steps that
  used them.

Each derivative ``prov:wasGeneratedBy`` the last step of its chain,
``prov:wasDerivedFrom`` its sources, and lists its whole chain in order as
``mriflow:steps`` (a JSON-LD ``@list``, i.e. an ordered RDF list). The JSON-LD
context is inline, so the file parses offline (json, rdflib).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mriflow import CODE_URL, __version__
from mriflow.bids.layout import ImageDerivatives, find_subject_derivatives
from mriflow.bids.outputs import provenance_relpath
from mriflow.bids.paths import atomic_copy, atomic_write_json

__all__ = [
    "PROV_CONTEXT",
    "build_provenance",
    "write_provenance",
    "write_workflow_graph",
]

MRIFLOW_NS = "https://github.com/mriflow/mriflow/ns#"

#: Inline JSON-LD context: PROV-O terms, RDFS label, and mriflow's own terms.
PROV_CONTEXT: dict[str, Any] = {
    "@version": 1.1,
    "prov": "http://www.w3.org/ns/prov#",
    "rdfs": "http://www.w3.org/2000/01/rdf-schema#",
    "xsd": "http://www.w3.org/2001/XMLSchema#",
    "mriflow": MRIFLOW_NS,
    "Entity": "prov:Entity",
    "Activity": "prov:Activity",
    "SoftwareAgent": "prov:SoftwareAgent",
    "label": "rdfs:label",
    "used": {"@id": "prov:used", "@type": "@id", "@container": "@set"},
    "wasGeneratedBy": {"@id": "prov:wasGeneratedBy", "@type": "@id"},
    "wasDerivedFrom": {"@id": "prov:wasDerivedFrom", "@type": "@id", "@container": "@set"},
    "wasInformedBy": {"@id": "prov:wasInformedBy", "@type": "@id"},
    "wasAssociatedWith": {"@id": "prov:wasAssociatedWith", "@type": "@id", "@container": "@set"},
    "atLocation": {"@id": "prov:atLocation"},
    "version": {"@id": "mriflow:version"},
    "stepName": {"@id": "mriflow:stepName"},
    "stepIndex": {"@id": "mriflow:stepIndex", "@type": "xsd:integer"},
    "parameters": {"@id": "mriflow:parameters", "@type": "@json"},
    "steps": {"@id": "mriflow:steps", "@type": "@id", "@container": "@list"},
}


def _agent_id(name: str, version: str) -> str:
    if name == "mriflow":
        return f"{CODE_URL}/releases/tag/v{version}"
    return f"https://pypi.org/project/{name}/{version}/"


def _activity_id(group: ImageDerivatives, step: dict[str, Any]) -> str:
    # same step with the same parameters on the same image = the same activity,
    # whichever derivative's sidecar lists it
    digest = hashlib.sha1(
        json.dumps(step.get("Parameters", {}), sort_keys=True, default=str).encode()
    ).hexdigest()[:10]
    raw = group.source.split(":", 2)[2]
    return f"urn:mriflow:{raw}:{step.get('Name', 'step')}-{digest}"


def build_provenance(out_dir: str | os.PathLike[str], subjects: Sequence[str]) -> dict[str, Any]:
    """The PROV JSON-LD document of ``subjects``' derivatives in ``out_dir``.

    Returns
    -------
    dict
        ``{"@context": PROV_CONTEXT, "@graph": [...]}``; nodes are sorted by id so
        the same derivatives always give the same document.
    """
    out_dir = Path(out_dir)
    nodes: dict[str, dict[str, Any]] = {}
    config_id = "bids::mriflow_config.toml"
    has_config = (out_dir / "mriflow_config.toml").is_file()
    if has_config:
        nodes[config_id] = {"@id": config_id, "@type": "Entity", "label": "mriflow configuration"}

    def agent(name: str, version: str) -> str:
        agent_id = _agent_id(name, version)
        nodes.setdefault(
            agent_id,
            {"@id": agent_id, "@type": "SoftwareAgent", "label": name, "version": version},
        )
        return agent_id

    agent("mriflow", __version__)
    for subject in subjects:
        label = subject[4:] if subject.startswith("sub-") else subject
        for group in find_subject_derivatives(out_dir, label):
            nodes.setdefault(
                group.source,
                {
                    "@id": group.source,
                    "@type": "Entity",
                    "label": group.source.split(":", 2)[2],
                    **({"atLocation": str(group.source_path)} if group.source_path else {}),
                },
            )
            reference = [s.get("Name") for s in group.steps]
            for derivative in group.files:
                chain = derivative.sidecar.get("Steps") or []
                entity_id = f"bids::{derivative.relpath}"
                activity_ids: list[str] = []
                previous: str | None = None
                for position, step in enumerate(chain, start=1):
                    activity_id = _activity_id(group, step)
                    index = (
                        reference.index(step.get("Name")) + 1
                        if step.get("Name") in reference
                        else position
                    )
                    node = nodes.setdefault(
                        activity_id,
                        {
                            "@id": activity_id,
                            "@type": "Activity",
                            "label": f"{step.get('Name')} ({group.key})",
                            "stepName": step.get("Name"),
                            "stepIndex": index,
                            "parameters": step.get("Parameters", {}),
                            "used": [],
                            "wasAssociatedWith": [],
                        },
                    )
                    used = group.source if previous is None else None
                    if used and used not in node["used"]:
                        node["used"].append(used)
                    if has_config and config_id not in node["used"]:
                        node["used"].append(config_id)
                    if previous is not None:
                        node["wasInformedBy"] = previous
                    for name, version in (step.get("Software") or {}).items():
                        agent_id = agent(name, str(version))
                        if agent_id not in node["wasAssociatedWith"]:
                            node["wasAssociatedWith"].append(agent_id)
                    activity_ids.append(activity_id)
                    previous = activity_id
                sources = [s for s in derivative.sidecar.get("Sources", []) if s != entity_id]
                entity: dict[str, Any] = {
                    "@id": entity_id,
                    "@type": "Entity",
                    "label": derivative.relpath,
                    "wasDerivedFrom": sources,
                    "steps": activity_ids,
                }
                if activity_ids:
                    entity["wasGeneratedBy"] = activity_ids[-1]
                nodes[entity_id] = entity
    return {"@context": PROV_CONTEXT, "@graph": [nodes[k] for k in sorted(nodes)]}


def write_provenance(
    out_dir: str | os.PathLike[str], subject: str, *, filename: str | None = None
) -> Path:
    """Write ``OUT_DIR/provenance/sub-<label>_prov.jsonld`` (one file per subject).

    One file per subject, so that participant runs of different subjects (separate
    jobs on a cluster) never write the same file.
    """
    label = subject[4:] if subject.startswith("sub-") else subject
    document = build_provenance(out_dir, [label])
    relpath = provenance_relpath(label)
    path = Path(out_dir) / (Path(relpath).with_name(filename) if filename else relpath)
    return atomic_write_json(path, document)


def write_workflow_graph(
    workflow, out_dir: str | os.PathLike[str], *, name: str = "workflow", render_svg: bool = True
) -> list[Path]:
    """Write the Nipype workflow graph as DOT (and SVG when graphviz's ``dot`` exists).

    Uses ``workflow.write_graph(graph2use="colored", format="dot")``, which needs no
    graphviz binary; the files land in ``OUT_DIR/provenance/<name>.dot`` (and
    ``<name>.svg``), written atomically. The workflow is not run or modified.

    Returns
    -------
    list of Path
        The files written.
    """
    target = Path(out_dir) / "provenance"
    written = []
    with tempfile.TemporaryDirectory(prefix="mriflow-graph-") as tmp:
        dotfile = Path(tmp) / f"{name}.dot"
        workflow.write_graph(
            dotfilename=str(dotfile), graph2use="colored", format="dot", simple_form=True
        )
        written.append(atomic_copy(dotfile, target / f"{name}.dot"))
        dot = shutil.which("dot")
        if render_svg and dot:
            svg = Path(tmp) / f"{name}.svg"
            done = subprocess.run(
                [dot, "-Tsvg", "-o", str(svg), str(dotfile)], capture_output=True, timeout=120
            )
            if done.returncode == 0 and svg.is_file():
                written.append(atomic_copy(svg, target / f"{name}.svg"))
    return written

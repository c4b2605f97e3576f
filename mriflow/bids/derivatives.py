"""The derivatives dataset's own files: ``dataset_description.json``, ``.bidsignore``,
and the writing of one derivative with its sidecar.

Names are made in :mod:`mriflow.bids.paths`; which outputs exist is in
:mod:`mriflow.bids.outputs`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriflow import CODE_URL, __version__

# atomic_write_text: re-exported for mriflow.config, which imports it from here
from mriflow.bids.paths import (
    atomic_copy,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    bids_uri,
)

__all__ = [
    "BIDSIGNORE",
    "atomic_write_text",
    "dataset_description",
    "derivative_sidecar",
    "prewrite_derivatives",
    "write_derivative",
    "write_derivatives_description",
]


def dataset_description(
    source_datasets: Iterable[str | os.PathLike[str]] = (),
    *,
    name: str = "mriflow derivatives",
) -> dict[str, Any]:
    """The ``dataset_description.json`` of an mriflow derivatives dataset."""
    sources = [Path(p).resolve() for p in source_datasets]
    description: dict[str, Any] = {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "mriflow",
                "Version": __version__,
                "CodeURL": CODE_URL,
                "Description": "Fast, offline anatomical MRI preprocessing to ML-ready volumes",
            }
        ],
        "HowToAcknowledge": "Please cite mriflow and the tools listed in each sidecar's Steps.",
    }
    if sources:
        description["SourceDatasets"] = [{"URL": src.as_uri()} for src in sources]
        description["DatasetLinks"] = {"raw": sources[0].as_uri()}
    return description


#: Files of an mriflow output folder that are not BIDS derivatives (reports, ML export,
#: records). The 3.x validator matches a bare name against every path component, while
#: a trailing slash (``figures/``) matches nothing there, so folders are given bare.
BIDSIGNORE = (
    "logs",  # status records, crash files
    "provenance",  # W3C PROV records
    "figures",  # report figures
    "slices",  # 2D slice export and its index
    ".mriflow_staging",  # a subject being published (left over only by a killed run)
    "*.html",  # QC reports
    # image quality metrics: no BIDS suffix for them. (The 3.x validator failed to match
    # "*_desc-qc*_metrics.*" below a session folder, so the pattern is kept plain.)
    "*_metrics.*",
    "*_xfm.*",  # transforms: BIDS 1.10 has no xfm files yet (sMRIPrep's names)
    "*.npy",  # packed split stacks
    "*_index.csv",  # row order of the packed stacks
    # a session's 4D model-ready channels (export.channel_layout = "stacked"): BIDS has
    # no suffix for a stack of contrasts, and a T1w must be 3D
    "*_desc-model_channels.*",
    "splits.*",
    "dataset.csv",
    "dataset.json",
    "dataset_slices.csv",
    "group_*",
    "mriflow_config.toml",
    "nyul_standard.json",
)

_README = """\
# mriflow derivatives

Anatomical MRI preprocessed by [mriflow]({code_url}) {version}, a BIDS App, from the raw
dataset(s) named in `dataset_description.json` (`SourceDatasets`).

## Layout

- `sub-*/[ses-*/]anat/`: BIDS derivatives named as sMRIPrep names them: the preprocessed
  image (`desc-preproc`), brain mask (`desc-brain_mask`), tissue labels (`dseg`, with the
  look-up table `dseg.tsv`) and probabilities (`label-*_probseg`), the transforms to and
  from the template (`from-*_to-*_mode-image_xfm.h5`), the same images in
  `space-MNI152NLin2009aSym`, the model-ready volumes (`desc-model`) and the
  intensity-normalized images (`desc-norm`, `desc-nyul`). Each image has a JSON sidecar
  whose `Sources` and `Steps` say what it was made from and how.
- `sub-*.html`, `group.html`, `sub-*/figures/`: visual QC reports.
- `*_desc-qc_metrics.json`, `group_desc-qc_metrics.tsv`: image quality metrics.
- `dataset.csv`, `dataset.json`, `splits.tsv`, `splits.json`, `sub-*/slices/`: the
  machine-learning export (file list per train/val/test split, 2D slices).
- `provenance/`, `logs/`, `mriflow_config.toml`: provenance records, run status and the
  exact configuration of the run (pass it back with `--config` to reproduce).

Files that are not BIDS derivatives are listed in `.bidsignore`.
"""


def write_derivatives_description(
    out_dir: str | os.PathLike[str], source_datasets: Iterable[str | os.PathLike[str]] = ()
) -> Path:
    """``dataset_description.json``, ``README.md`` and the ``.bidsignore`` of the non-BIDS files."""
    atomic_write_text(Path(out_dir) / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")
    atomic_write_text(
        Path(out_dir) / "README.md", _README.format(code_url=CODE_URL, version=__version__)
    )
    return atomic_write_json(
        Path(out_dir) / "dataset_description.json", dataset_description(source_datasets)
    )


def write_derivative(in_file: str | os.PathLike[str], target: Path, data_dtype: str | None) -> None:
    """Write ``in_file`` as the derivative ``target`` (NIfTI: compressed, clean header).

    NIfTI outputs get sMRIPrep-style header hygiene (qform and sform both set to the
    affine with the scanner-anatomical code, mm units) and, for masks and labels,
    the integer dtype of ``data_dtype``; other files are copied as they are.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not str(target).endswith((".nii", ".nii.gz")):
        atomic_copy(in_file, target)
        return
    img = nib.load(os.fspath(in_file))
    data = np.asanyarray(img.dataobj)
    if data_dtype:
        data = data.astype(data_dtype)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(data.dtype)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    if str(target).endswith(".nii.gz"):
        atomic_write(target, lambda tmp: tmp.write_bytes(gzip_bytes(out.to_bytes())))
    else:
        atomic_write(target, lambda tmp: nib.save(out, str(tmp)))


def gzip_bytes(data: bytes) -> bytes:
    """``data`` as one gzip member that says nothing of when or from what it was made
    (mtime 0, no file name), compressed by ISA-L at level 1: 10x faster than zlib's
    level 1, which nibabel uses, for 0.3 % larger files (a 1 mm float32 volume: 0.21
    against 2.1 s; docs/anatomical.md). A T1w publishes 14 volumes, and zlib was most
    of the publishing nodes' time (3.1 of 5.6 s for the example's sub-01)."""
    from isal import igzip

    return igzip.compress(data, compresslevel=1, mtime=0)


def prewrite_derivatives(
    items: Sequence[Mapping[str, Any]], files: Mapping[str, str], folder: str | os.PathLike[str]
) -> dict[str, str]:
    """Write derivatives before their subject is published, as :func:`write_derivative` does.

    Compressing a NIfTI is most of publishing (2.6 of 3.4 s for one 1 mm T1w); the
    images that exist early (native space) can be written while registration runs,
    and publishing then copies the same bytes.

    Parameters
    ----------
    items : sequence of mapping
        Publishing plan items: ``field``, ``relpath`` and ``data_dtype`` each.
    files : mapping
        ``field`` -> the work file that holds it.
    folder : path
        Where to write, under each item's ``relpath``.

    Returns
    -------
    dict
        ``field`` -> the written file.
    """
    written = {}
    for item in items:
        target = Path(folder) / item["relpath"]
        write_derivative(files[item["field"]], target, item.get("data_dtype"))
        written[item["field"]] = str(target)
    return written


def derivative_sidecar(
    raw_relpath: str,
    *,
    derived_from: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    steps: Sequence[Mapping[str, Any]] | None = None,
    step_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The JSON sidecar of a derivative: ``Sources`` (BIDS URIs), fixed and run-time fields,
    and the step records (those named in ``step_names``, all when ``None``) that made it."""
    sidecar: dict[str, Any] = {
        "Sources": [bids_uri(raw_relpath, "raw")] + [bids_uri(p, "") for p in derived_from]
    }
    for fields in (metadata, extra_metadata):
        if fields:
            sidecar.update(fields)
    if steps is not None:
        sidecar["Steps"] = [s for s in steps if step_names is None or s["Name"] in step_names]
    return sidecar

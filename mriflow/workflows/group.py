"""The group level as a workflow: splits, Nyúl fit on the training split and apply,
manifest, group QC."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from mriflow.bids.layout import DerivativesLayout
from mriflow.bids.paths import subject_dirname
from mriflow.config import Config
from mriflow.interfaces.group import (
    ApplyNyulStandard,
    GroupReport,
    MakeSplits,
    PublishGroupFile,
    SelectSubjects,
    WriteManifest,
)
from mriflow.interfaces.intensity import FitNyul

__all__ = ["init_group_wf"]


def init_group_wf(
    *,
    out_dir: str | Path,
    subjects: list[str],
    config: Config,
    participants_tsv: str | Path | None = None,
    name: str = "group_wf",
) -> pe.Workflow:
    """Group-level steps over the published participant outputs of ``subjects``.

    Parameters
    ----------
    out_dir : path
        The derivatives dataset the participant level wrote.
    subjects : list of str
        Labels (without ``sub-``) of the subjects to use: those whose completion
        record says ``ok`` (the caller checks).
    config : Config
        Splits (``split.*``), Nyúl percentiles (``intensity.nyul_percentiles``), seed.
    participants_tsv : path, optional
        The raw dataset's ``participants.tsv`` (stratification and grouping columns).

    Outputs (``outputnode``)
    ------------------------
    splits_file, counts, nyul_standard, nyul_files, manifest, slices_manifest,
    n_rows, group_report
    """
    out_dir = str(Path(out_dir).resolve())
    layout = DerivativesLayout(out_dir)
    participant_ids = [subject_dirname(s) for s in subjects]
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["subjects"]), name="inputnode")
    inputnode.inputs.subjects = participant_ids
    outputnode = pe.Node(
        niu.IdentityInterface(
            fields=[
                "splits_file",
                "counts",
                "nyul_standard",
                "nyul_files",
                "manifest",
                "slices_manifest",
                "n_rows",
                "group_report",
            ]
        ),
        name="outputnode",
    )
    split_cfg = config.split
    splits = pe.Node(
        MakeSplits(
            out_dir=out_dir,
            fractions=list(split_cfg.fractions),
            n_folds=split_cfg.n_folds or 0,
            seed=config.seed,
            stratify_by=split_cfg.stratify_by,
            group_by=split_cfg.group_by,
            stratify_bins=split_cfg.stratify_bins,
        ),
        name="splits",
    )
    if participants_tsv is not None:
        splits.inputs.participants_tsv = str(participants_tsv)
    model_ready = [
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(entry).items()}
        for entry in layout.model_ready(subjects)
    ]
    manifest = pe.Node(
        WriteManifest(
            out_dir=out_dir,
            entries=model_ready,
            seed=config.seed,
            space=config.registration.template,
            channels=list(config.coregistration.channels),
            channel_layout=config.export.channel_layout,
        ),
        name="manifest",
    )
    report = pe.Node(GroupReport(out_dir=out_dir), name="group_qc")
    workflow.connect([
        (inputnode, splits, [("subjects", "subjects")]),
        (inputnode, report, [("subjects", "subjects")]),
        (splits, manifest, [("splits_file", "splits_file")]),
        (splits, outputnode, [("splits_file", "splits_file"), ("counts", "counts")]),
        (manifest, report, [("n_rows", "n_rows")]),
        (manifest, outputnode, [
            ("manifest", "manifest"), ("slices_manifest", "slices_manifest"), ("n_rows", "n_rows"),
        ]),
        (report, outputnode, [("out_report", "group_report")]),
    ])  # fmt:skip

    pairs = layout.nyul_inputs(subjects)
    if not pairs:
        return workflow
    select = pe.Node(
        SelectSubjects(
            subjects=[subject_dirname(s) for s, _, _, _ in pairs],
            in_files=[str(p) for _, p, _, _ in pairs],
            mask_files=[str(m) for _, _, m, _ in pairs],
        ),
        name="select_training",
    )
    fit = pe.Node(FitNyul(percentiles=list(config.intensity.nyul_percentiles)), name="nyul_fit")
    publish_standard = pe.Node(
        PublishGroupFile(out_dir=out_dir, output="nyul_standard"), name="publish_standard"
    )
    apply = pe.MapNode(
        ApplyNyulStandard(out_dir=out_dir),
        iterfield=["in_file", "mask_file", "relpath", "sources"],
        name="nyul_apply",
    )
    apply.inputs.in_file = [str(p) for _, p, _, _ in pairs]
    apply.inputs.mask_file = [str(m) for _, _, m, _ in pairs]
    apply.inputs.relpath = [target for _, _, _, target in pairs]
    apply.inputs.sources = [
        [Path(p).relative_to(out_dir).as_posix() for p in (preproc, mask)]
        for _, preproc, mask, _ in pairs
    ]
    workflow.connect([
        (splits, select, [("train", "keep")]),
        (select, fit, [("in_files", "in_files"), ("mask_files", "mask_files"),
                       ("names", "subject_ids")]),
        (fit, publish_standard, [("out_file", "in_file")]),
        (publish_standard, apply, [("out_file", "standard_file")]),
        (publish_standard, outputnode, [("out_file", "nyul_standard")]),
        (apply, outputnode, [("out_file", "nyul_files")]),
        (apply, report, [("out_file", "nyul_files")]),
    ])  # fmt:skip
    return workflow

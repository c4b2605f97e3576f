"""The group level: subject-level splits, the dataset manifest, group-fitted steps."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from mriflow.bids.derivatives import DerivativeNameError, parse_entities
from mriflow.config import Config

log = logging.getLogger("mriflow")

__all__ = ["run_group", "find_model_ready"]

MODEL_SUFFIXES = {"T1w": "image", "mask": "mask", "dseg": "dseg"}


def find_model_ready(out_dir: Path, subjects: list[str]) -> list:
    """One manifest entry per subject/session from the ``desc-model`` files on disk."""
    from mriflow.ml.manifest import ManifestEntry

    found: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    for subject in subjects:
        for path in sorted((out_dir / subject).rglob("*_desc-model_*.nii.gz")):
            try:
                entities, suffix, _ = parse_entities(path)
            except DerivativeNameError:
                continue
            if suffix in MODEL_SUFFIXES:
                key = (f"sub-{entities['subject']}", entities.get("session", ""))
                found[key][MODEL_SUFFIXES[suffix]] = path
        for index in sorted((out_dir / subject).rglob("slices/*_desc-model_*slices.csv")):
            entities, _, _ = parse_entities(index)
            key = (f"sub-{entities['subject']}", entities.get("session", ""))
            found[key]["slices"] = index
    entries = []
    for (participant, session), files in sorted(found.items()):
        if "image" not in files:
            continue
        entries.append(
            ManifestEntry(
                participant_id=participant,
                session_id=f"ses-{session}" if session else "",
                image=files["image"],
                mask=files.get("mask"),
                dseg=files.get("dseg"),
                slices=files.get("slices"),
            )
        )
    return entries


def fit_and_apply_nyul(
    out_dir: Path, subjects: list[str], training: list[str], config: Config
) -> list[str]:
    """Fit the Nyúl standard on the training subjects only, apply it to every subject.

    Fitting on every image (as intensity-normalization's batch helper does) would
    leak the validation and test histograms into the training data.
    """
    import nibabel as nib
    import numpy as np

    from mriflow.bids.derivatives import atomic_write, atomic_write_json, bids_uri
    from mriflow.image.intensity import apply_nyul, fit_nyul
    from mriflow.interfaces.base import step_record

    pairs = []
    for subject in subjects:
        for preproc in sorted((out_dir / subject).rglob("*_desc-preproc_T1w.nii.gz")):
            if "space-" in preproc.name:
                continue
            mask = preproc.with_name(preproc.name.replace("_desc-preproc_T1w", "_desc-brain_mask"))
            if mask.is_file():
                pairs.append((subject, preproc, mask))
    fit_pairs = [p for p in pairs if p[0] in training]
    if not fit_pairs:
        return ["  Nyul: no native desc-preproc_T1w with a brain mask: not fitted"]

    def load(path):
        return np.asanyarray(nib.load(path).dataobj, dtype=np.float64)

    standard = fit_nyul(
        [load(p) for _, p, _ in fit_pairs],
        [load(m) > 0 for _, _, m in fit_pairs],
        percentiles=config.intensity.nyul_percentiles,
        subjects=[p.name for _, p, _ in fit_pairs],
    )
    standard_path = out_dir / "nyul_standard.json"
    atomic_write_json(standard_path, standard.to_dict())
    step = step_record("nyul", {**standard.to_dict(), "StandardFile": standard_path.name})
    for _, preproc, mask in pairs:
        img = nib.load(preproc)
        out = apply_nyul(load(preproc), load(mask) > 0, standard).astype(np.float32)
        target = preproc.with_name(preproc.name.replace("_desc-preproc_", "_desc-nyul_"))
        result = nib.Nifti1Image(out, img.affine, img.header)
        result.set_data_dtype(np.float32)
        atomic_write(target, lambda tmp, result=result: nib.save(result, str(tmp)))
        relative = [p.relative_to(out_dir).as_posix() for p in (preproc, mask)]
        atomic_write_json(
            target.with_name(target.name.replace(".nii.gz", ".json")),
            {
                "Sources": [bids_uri(r, "") for r in relative]
                + [bids_uri("nyul_standard.json", "")],
                "SkullStripped": True,
                "Steps": [step],
            },
        )
    return [
        f"  Nyul: fitted on {len(fit_pairs)} training image(s) -> {standard_path.name}; "
        f"applied to {len(pairs)} image(s) (desc-nyul_T1w)"
    ]


def run_group(
    *,
    bids_dir: Path,
    out_dir: Path,
    work_dir: Path,
    config: Config,
    participant_labels: list[str] | None = None,
) -> int:
    from mriflow.cli.run import EXIT_OK, UsageError
    from mriflow.ml.manifest import ManifestError, build_manifest, write_manifest
    from mriflow.ml.splits import (
        ParticipantsError,
        SplitError,
        read_participants,
        split_participants,
        write_splits,
    )

    if not (out_dir / "dataset_description.json").is_file():
        raise UsageError(
            f"OUT_DIR {out_dir} has no participant outputs: run the participant level first"
        )
    subjects = sorted(p.name for p in out_dir.glob("sub-*") if p.is_dir())
    if participant_labels:
        wanted = {f"sub-{label.removeprefix('sub-')}" for label in participant_labels}
        subjects = [s for s in subjects if s in wanted]
    if not subjects:
        raise UsageError(f"OUT_DIR {out_dir}: no participant outputs (sub-*) found")

    participants_tsv = bids_dir / "participants.tsv"
    split_cfg = config.split
    try:
        participants = read_participants(participants_tsv) if participants_tsv.is_file() else None
        if participants is None and (split_cfg.stratify_by or split_cfg.group_by):
            raise UsageError(
                f"{participants_tsv}: not found, but split.stratify_by/group_by need its columns"
            )
        splits = split_participants(
            subjects,
            participants,
            fractions=split_cfg.fractions,
            n_folds=split_cfg.n_folds,
            seed=config.seed,
            stratify_by=split_cfg.stratify_by,
            group_by=split_cfg.group_by,
            stratify_bins=split_cfg.stratify_bins,
        )
    except (ParticipantsError, SplitError) as err:
        raise UsageError(str(err)) from None
    tsv, _ = write_splits(splits, out_dir / "splits.tsv", out_dir / "splits.json")
    lines = [f"mriflow group: {len(subjects)} subject(s); splits {splits.counts()} -> {tsv.name}"]

    training = [s for s in subjects if splits.split.get(s) == "train"] or subjects
    lines += fit_and_apply_nyul(out_dir, subjects, training, config)

    entries = find_model_ready(out_dir, subjects)
    if entries:
        try:
            rows = build_manifest(entries, splits, out_dir)
        except ManifestError as err:
            raise UsageError(f"{out_dir}: {err}") from None
        csv_path, _ = write_manifest(
            rows, out_dir, metadata={"seed": config.seed, "space": config.registration.template}
        )
        lines.append(f"  manifest: {len(rows)} row(s) -> {csv_path.name}")
        if any(e.slices for e in entries):
            from mriflow.ml.manifest import write_slices_manifest

            lines.append(f"  slices: -> {write_slices_manifest(rows, out_dir).name}")
    else:
        log.warning("no model-ready (desc-model) volumes found: manifest not written")
    from mriflow.reports import write_group_report

    lines.append(f"  QC: -> {write_group_report(out_dir, subjects=subjects).name}")
    print("\n".join(lines))
    return EXIT_OK

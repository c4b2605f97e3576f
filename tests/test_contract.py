"""The output contract: names made and read only in mriflow/bids/, atomic publishing, the
group level trusting only complete subjects, and an import graph without cycles."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import mriflow
from mriflow.bids.layout import DerivativesLayout
from mriflow.bids.outputs import all_anat_derivatives, derivative_relpath, status_relpath
from mriflow.bids.paths import PART_MARKER, sidecar_path
from mriflow.bids.publish import STAGING_ROOT, begin_subject, commit_subject, write_status
from mriflow.cli.run import main
from tests.qc_phantoms import build_derivatives

PACKAGE = Path(mriflow.__file__).parent

#: Pieces of BIDS names: code that joins or splits them builds or parses names.
NAME_PIECES = (
    "desc-",
    "space-",
    "label-",
    "from-",
    "_T1w",
    "_T2w",
    "_FLAIR",
    "_dseg",
    "_probseg",
    "_xfm",
    "_metrics",
    "_mask.",
    "_slices.",
)
STRING_METHODS = {
    "replace", "glob", "rglob", "startswith", "endswith", "split", "rsplit", "partition",
    "rpartition", "removesuffix", "removeprefix", "format", "join", "match", "fnmatch",
}  # fmt: skip


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def name_building(path: Path) -> list[str]:
    """Lines of ``path`` that build or parse a BIDS name from string pieces."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            kind = "f-string"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            kind = "concatenation"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in STRING_METHODS:
            kind = f".{node.func.attr}()"
        elif isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.In, ast.NotIn)) for op in node.ops
        ):
            kind = "'in' test"
        else:
            continue
        pieces = {
            piece
            for sub in ast.walk(node)
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and id(sub) not in docs
            for piece in NAME_PIECES
            if piece in sub.value
        }
        if pieces:
            found.append(
                f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {kind} {sorted(pieces)}"
            )
    return found


def test_the_scan_catches_name_building(tmp_path):
    """The check itself can fail: each way of building a name is caught."""
    bad = tmp_path / "mriflow" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        textwrap.dedent(
            '''
            """A docstring may say sub-01_desc-preproc_T1w.nii.gz."""
            def f(label, path):
                a = f"sub-{label}_desc-preproc_T1w.nii.gz"
                b = path.name.replace("_desc-preproc", "_desc-nyul")
                c = "sub-" + label + "_dseg.nii.gz"
                d = sorted(path.rglob("*_desc-model_*.nii.gz"))
                e = "space-" in path.name
                return a, b, c, d, e
            '''
        )
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "mriflow"
    try:
        hits = name_building(bad)
    finally:
        PACKAGE = saved
    assert len(hits) == 5, hits


def test_no_module_outside_bids_builds_or_parses_names():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "bids") in path.parents:
            continue
        hits += name_building(path)
    assert hits == [], "\n".join(hits)


def _imports(path: Path, module: str) -> set[str]:
    """mriflow modules ``module`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from mriflow.reports import figures" imports the submodule
            names = [
                f"{node.module}.{a.name}"
                if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").is_file()
                else node.module
                for a in node.names
            ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("mriflow")}
    return found


def test_import_graph_has_no_cycle():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }
    # a package's __init__ importing its own submodules is not a cycle through the package
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle.extend([*stack[stack.index(dep) :], dep])
                return True
            if state.get(dep) is None and visit(dep, [*stack, dep]):
                return True
        state[node] = 2
        return False

    for name in sorted(graph):
        if state.get(name) is None and visit(name, [name]):
            break
    assert cycle == [], " -> ".join(cycle)


# --------------------------------------------------------------------------------------
# the table read backwards
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("contrast", ["T1w", "T2w"])
def test_layout_finds_every_output_of_the_table_by_its_name(tmp_path, contrast):
    raw = {"subject": "01", "session": "a", "run": "2"}
    raw_relpath = f"sub-01/ses-a/anat/sub-01_ses-a_run-2_{contrast}.nii.gz"
    specs = all_anat_derivatives(contrast)
    for spec in specs:
        relpath = derivative_relpath(raw, contrast, spec)
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_bytes(b"")
        sidecar = {"Sources": [f"bids:raw:{raw_relpath}"]}
        (tmp_path / sidecar_path(relpath)).write_text(json.dumps(sidecar))
    (groups,) = DerivativesLayout(tmp_path).find("01")
    assert groups.contrast == contrast and groups.entities == raw
    roles = sorted(d.role for d in groups.files)
    # every file gets the output it was written as (model with and without space-)
    assert roles == sorted(s.output for s in specs)
    assert "other" not in roles


# --------------------------------------------------------------------------------------
# publishing: complete or absent, whatever kills it
# --------------------------------------------------------------------------------------

_PUBLISHER = """
import os, sys, time
from pathlib import Path
from mriflow.bids import publish
from mriflow.bids.paths import atomic_write_bytes

out, run_id, pause_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
staging = publish.begin_subject(out, "01", run_id)
for i in range(40):
    atomic_write_bytes(staging / f"sub-01/anat/f{i:02d}.bin", run_id.encode() * 1000)
    if pause_at == "staging" and i == 20:
        print("ready", flush=True); time.sleep(60)
if pause_at == "swap":
    rename = os.rename
    def slow_rename(src, dst):
        rename(src, dst)
        if Path(dst).name.endswith(".old"):
            print("ready", flush=True); time.sleep(60)
    os.rename = slow_rename
publish.commit_subject(out, "01", staging, run_id)
print("done", flush=True)
"""


def _publish_in_child(out: Path, run_id: str, pause_at: str) -> None:
    """Publish sub-01 in a child process; kill -9 it at ``pause_at`` (or let it finish)."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    child = subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(out), run_id, pause_at],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = child.stdout.readline().strip()
    if pause_at in ("staging", "swap"):
        assert line == "ready"
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()


def _state(out: Path) -> str:
    """``absent``, or the run whose files are all there; fails on a partial subject."""
    subject = out / "sub-01"
    if not subject.exists():
        return "absent"
    files = sorted(p for p in subject.rglob("*") if p.is_file())
    assert [p.name for p in files] == [f"f{i:02d}.bin" for i in range(40)], "partial subject"
    contents = {p.read_bytes() for p in files}
    assert len(contents) == 1, "files of two runs mixed"
    return contents.pop()[: len("runN")].decode()


@pytest.mark.parametrize("pause_at", ["staging", "swap"])
def test_kill_9_while_publishing_leaves_subject_absent_or_complete(tmp_path, pause_at):
    out = tmp_path / "out"
    out.mkdir()
    _publish_in_child(out, "run1", "none")
    assert _state(out) == "run1"
    assert (DerivativesLayout(out).status("01") or {}).get("run_id") == "run1"

    _publish_in_child(out, "run2", pause_at)
    # killed while staging: the old subject is untouched; between the two renames:
    # the subject is absent (the old one aside), never half old and half new
    assert _state(out) == ("run1" if pause_at == "staging" else "absent")
    assert (DerivativesLayout(out).status("01") or {}).get("run_id") == "run1"
    # a crash leaves the temporary files of atomic writes behind ...
    (out / f".sub-01.html.abc{PART_MARKER}.html").write_text("half")
    if (out / "sub-01").exists():
        (out / "sub-01" / "anat" / f".f00.bin.xyz{PART_MARKER}.bin").write_text("half")

    _publish_in_child(out, "run3", "none")
    assert _state(out) == "run3"
    assert (DerivativesLayout(out).status("01") or {}).get("run_id") == "run3"
    # ... and the next publication of the subject removes them
    leftovers = [p for p in out.rglob("*") if PART_MARKER in p.name]
    assert leftovers == []
    assert list((out / STAGING_ROOT).iterdir()) == []


def test_publishing_one_session_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    for session, run_id in (("a", "r1"), ("b", "r2")):
        staging = begin_subject(out, "01", run_id)
        target = staging / f"sub-01/ses-{session}/anat/sub-01_ses-{session}_desc-preproc_T1w.nii.gz"
        target.parent.mkdir(parents=True)
        target.write_text(session)
        from mriflow.bids.publish import carry_over

        carry_over(out, "01", staging)
        commit_subject(out, "01", staging, run_id)
    names = sorted(p.name for p in (out / "sub-01").rglob("*.nii.gz"))
    assert names == ["sub-01_ses-a_desc-preproc_T1w.nii.gz", "sub-01_ses-b_desc-preproc_T1w.nii.gz"]


def test_republishing_unchanged_files_keeps_them_untouched(tmp_path):
    out = tmp_path / "out"

    def publish(run_id: str, content: dict[str, str]) -> None:
        staging = begin_subject(out, "01", run_id)
        for name, text in content.items():
            (staging / "sub-01/anat").mkdir(parents=True, exist_ok=True)
            (staging / "sub-01/anat" / name).write_text(text)
        commit_subject(out, "01", staging, run_id)

    publish("r1", {"a.nii.gz": "same", "b.nii.gz": "old"})
    before = {p.name: p.stat() for p in (out / "sub-01/anat").iterdir()}
    time.sleep(0.05)
    publish("r2", {"a.nii.gz": "same", "b.nii.gz": "new"})
    after = {p.name: p.stat() for p in (out / "sub-01/anat").iterdir()}
    assert after["a.nii.gz"].st_ino == before["a.nii.gz"].st_ino
    assert after["a.nii.gz"].st_mtime_ns == before["a.nii.gz"].st_mtime_ns
    assert (out / "sub-01/anat/b.nii.gz").read_text() == "new"
    assert after["b.nii.gz"].st_ino != before["b.nii.gz"].st_ino


# --------------------------------------------------------------------------------------
# the group level trusts only complete subjects
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    raw, out = build_derivatives(root, {"01": 4.0, "02": 4.5, "03": 5.0, "04": 4.2})
    for label in ("01", "02", "03"):
        write_status(out, label, ok=True, run_id="r1")
    write_status(out, "04", ok=False, run_id="r1", reason="image has NaN voxels [step n4]")
    return raw, out


def test_group_uses_only_ok_subjects_says_which_it_skipped_and_exits_1(published, tmp_path, capsys):
    raw, out = published
    code = main([str(raw), str(out), "group", "-w", str(tmp_path / "work"), "-q"])
    printed = capsys.readouterr()
    assert code == 1
    assert "sub-04  SKIPPED  participant level failed: image has NaN voxels" in printed.out
    splits = (out / "splits.tsv").read_text()
    assert "sub-04" not in splits and all(f"sub-0{i}" in splits for i in (1, 2, 3))
    standard = json.loads((out / "nyul_standard.json").read_text())
    assert not any("sub-04" in name for name in standard["subjects"])
    nyul = sorted(p.relative_to(out).as_posix() for p in out.rglob("*desc-nyul_T1w.nii.gz"))
    assert nyul == [f"sub-0{i}/anat/sub-0{i}_desc-nyul_T1w.nii.gz" for i in (1, 2, 3)]
    group_iqms = (out / "group_desc-qc_metrics.tsv").read_text()
    assert "sub-04" not in group_iqms

    # selecting only complete subjects succeeds
    args = ["--participant-label", "01", "02", "03"]
    assert main([str(raw), str(out), "group", "-w", str(tmp_path / "work"), "-q", *args]) == 0


def test_group_refuses_unknown_participant_labels(published, tmp_path, capsys):
    raw, out = published
    args = [
        str(raw),
        str(out),
        "group",
        "-w",
        str(tmp_path / "w"),
        "--participant-label",
        "01",
        "9",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--participant-label 9: not in OUT_DIR" in err[0]


def test_group_skips_subject_without_completion_record(published, tmp_path, capsys):
    raw, out = published
    (out / status_relpath("03")).unlink()
    try:
        code = main([str(raw), str(out), "group", "-w", str(tmp_path / "w"), "-q"])
        assert code == 1
        assert "sub-03  SKIPPED  no completion record" in capsys.readouterr().out
        assert "sub-03" not in (out / "splits.tsv").read_text()
    finally:
        write_status(out, "03", ok=True, run_id="r1")


# --------------------------------------------------------------------------------------
# end to end: kill -9 of a real participant run while it publishes
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_participant_publishing_then_rerun(tmp_path):
    from tests.helpers import QUICK_CHAIN, make_bids_dataset

    raw = make_bids_dataset(tmp_path / "raw", {"01": [""]})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(raw), str(out), "participant", "-w", str(work), "-q", *QUICK_CHAIN]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    child = subprocess.Popen(
        [sys.executable, "-m", "mriflow.cli.run", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = out / STAGING_ROOT
    deadline = time.monotonic() + 600
    # wait until the publishing node has staged some of the subject, then kill everything
    while time.monotonic() < deadline and child.poll() is None:
        staged = list(staging.glob("sub-01.*/sub-01/anat/*.nii.gz")) if staging.is_dir() else []
        if len(staged) >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it published"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "sub-01").exists()  # killed while staging: nothing published
    assert DerivativesLayout(out).status("01") is None

    assert main(args) == 0
    assert (DerivativesLayout(out).status("01") or {}).get("status") == "ok"
    (group,) = DerivativesLayout(out).find("01")
    assert {"preproc", "brain_mask"} <= {d.role for d in group.files}
    assert [p for p in out.rglob("*") if PART_MARKER in p.name] == []
    assert list(staging.iterdir()) == []
    assert np.isfinite(
        np.asarray(__import__("nibabel").load(group.get("preproc").path).dataobj)
    ).all()

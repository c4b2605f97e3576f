"""Templates already in TemplateFlow's local cache, found offline (never downloaded).

TemplateFlow keeps each template in ``$TEMPLATEFLOW_HOME/tpl-<Name>/`` (default home
``~/.cache/templateflow``) with files such as ``tpl-<Name>_res-01_T1w.nii.gz``,
``tpl-<Name>_res-01_desc-brain_mask.nii.gz`` and ``tpl-<Name>_res-01_label-GM_probseg.nii.gz``.
mriflow reads such a template as a user template (``registration.template_files``) when
the T1w and the brain mask of the requested resolution are present as real files; it
never calls the TemplateFlow client (which would download what is missing).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["templateflow_home", "templateflow_files"]


def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME``, else TemplateFlow's default ``~/.cache/templateflow``."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    return Path(home) if home else Path.home() / ".cache" / "templateflow"


def _name(template: str, resolution: int, rest: str) -> str:
    return f"tpl-{template}_res-{resolution:02d}_{rest}.nii.gz"


def templateflow_files(template: str, resolution: int = 1) -> dict[str, str] | None:
    """``registration.template_files`` for ``template`` at TemplateFlow resolution index
    ``resolution``, from the local cache; ``None`` when the cache lacks its T1w or mask.

    Files that are not there as real, non-empty files (a DataLad/git-annex placeholder,
    a dangling link) count as missing.
    """
    if not template.isalnum():
        return None
    folder = templateflow_home() / f"tpl-{template}"
    wanted = {
        "t1w": "T1w",
        "mask": "desc-brain_mask",
        "gm": "label-GM_probseg",
        "wm": "label-WM_probseg",
        "csf": "label-CSF_probseg",
    }
    found = {}
    for key, rest in wanted.items():
        path = folder / _name(template, resolution, rest)
        if path.is_file() and path.stat().st_size > 0:
            found[key] = str(path)
    if "t1w" not in found or "mask" not in found:
        return None
    if "gm" not in found or "wm" not in found:
        # priors come as GM and WM together (CSF optional)
        for key in ("gm", "wm", "csf"):
            found.pop(key, None)
    return found

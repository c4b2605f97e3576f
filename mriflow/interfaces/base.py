"""What every mriflow interface shares: the record of a step for the sidecar."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["step_record", "package_version"]


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def step_record(
    name: str, parameters: dict[str, Any], software: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """One entry of a sidecar's ``Steps`` list: what ran, with which parameters and versions.

    Every interface returns this as its ``step`` output; the derivatives sink
    writes the chain of them, in order, into the JSON sidecar of each image.
    """
    return {
        "Name": name,
        "Parameters": parameters,
        "Software": {pkg: package_version(pkg) for pkg in ("mriflow", *software)},
    }

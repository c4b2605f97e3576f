"""mriflow: fast, offline, BIDS-native brain MRI preprocessing to ML-ready volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mriflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

CODE_URL = "https://github.com/mriflow/mriflow"

__all__ = ["__version__", "CODE_URL"]

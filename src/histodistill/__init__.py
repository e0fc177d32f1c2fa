"""histodistill: distill pathology foundation models into small, robust students, and benchmark them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("histodistill")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

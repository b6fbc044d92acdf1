"""The PACS router: follows Orthanc's changes feed, sends each new study to the gateway's STOW-RS, and stores
the answer back into the study as a DICOM SR and one heatmap Secondary Capture per image.

    python -m xrayfm_router          # run it (XRAYFM_ORTHANC_URL, XRAYFM_GATEWAY_URL...: RouterSettings)

A client of the gateway like any other (HTTP, API key): it imports neither the gateway nor the worker.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-router")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

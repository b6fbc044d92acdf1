"""xrayfm web UI: ``streamlit run services/frontend/xrayfm_frontend/app.py``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-frontend")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

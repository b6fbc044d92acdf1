"""xrayfm REST gateway (FastAPI): ``uvicorn xrayfm_gateway.app:create_app --factory``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrayfm-gateway")  # written once, in its pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

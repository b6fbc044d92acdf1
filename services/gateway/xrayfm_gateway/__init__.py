"""xrayfm REST gateway (FastAPI): ``uvicorn xrayfm_gateway.app:create_app --factory``."""

__version__ = "0.1.0"

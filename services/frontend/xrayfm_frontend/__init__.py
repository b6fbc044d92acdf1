"""xrayfm web UI: ``streamlit run services/frontend/xrayfm_frontend/app.py``."""

__version__ = "0.1.0"

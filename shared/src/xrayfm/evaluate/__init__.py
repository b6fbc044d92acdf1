"""Evaluation: AUROC with bootstrap CIs, thresholded metrics, calibration, reports and figures."""

from typing import Any

# name -> its module, imported on first use: the metrics need scikit-learn and the plots matplotlib, and
# xrayfm.evaluate.calibration (read by the torch-free serving path) must import without either
_WHERE = {
    **dict.fromkeys(
        ("auroc_with_ci", "expected_calibration_error", "roc_curves", "threshold_metrics"), "metrics"
    ),
    **dict.fromkeys(
        (
            "plot_cv",
            "plot_label_efficiency",
            "plot_optimization_history",
            "plot_param_importances",
            "plot_reliability",
            "plot_roc",
            "summarise_label_efficiency",
        ),
        "plots",
    ),
    **dict.fromkeys(("binary_report", "multilabel_report", "study_level", "write_report"), "reports"),
}


def __getattr__(name: str) -> Any:
    """The package's names, each imported from its module on first use."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"xrayfm.evaluate.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "auroc_with_ci",
    "binary_report",
    "expected_calibration_error",
    "multilabel_report",
    "plot_cv",
    "plot_label_efficiency",
    "plot_optimization_history",
    "plot_param_importances",
    "plot_reliability",
    "plot_roc",
    "roc_curves",
    "study_level",
    "summarise_label_efficiency",
    "threshold_metrics",
    "write_report",
]

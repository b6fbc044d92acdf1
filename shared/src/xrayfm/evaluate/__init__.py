"""Evaluation: AUROC with bootstrap CIs, thresholded metrics, calibration, reports and figures."""

from xrayfm.evaluate.metrics import (
    auroc_with_ci,
    expected_calibration_error,
    roc_curves,
    threshold_metrics,
)
from xrayfm.evaluate.plots import (
    plot_cv,
    plot_label_efficiency,
    plot_optimization_history,
    plot_param_importances,
    plot_reliability,
    plot_roc,
    summarise_label_efficiency,
)
from xrayfm.evaluate.reports import binary_report, multilabel_report, study_level, write_report

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

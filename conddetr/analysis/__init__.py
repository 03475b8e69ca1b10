"""Tested library code behind the analysis notebooks: convergence curves and speedups, cross-attention bands."""

from conddetr.analysis.bands import band_stats, cross_attention, plot_bands, query_attention, region_masks
from conddetr.analysis.convergence import (
    PUBLISHED,
    Curve,
    RunCurves,
    Speedup,
    convergence_speedup,
    epochs_to_reach,
    load_run,
    load_runs,
    plot_ap_curves,
    plot_published,
    plot_train_loss,
)

__all__ = [
    "PUBLISHED",
    "Curve",
    "RunCurves",
    "Speedup",
    "band_stats",
    "convergence_speedup",
    "cross_attention",
    "epochs_to_reach",
    "load_run",
    "load_runs",
    "plot_ap_curves",
    "plot_bands",
    "plot_published",
    "plot_train_loss",
    "query_attention",
    "region_masks",
]

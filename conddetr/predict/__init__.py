"""Inference on image files: `python -m conddetr predict` (cli), checkpoint loading, drawing, the predict loop."""

from conddetr.predict.loading import PredictError, Predictor, load_predictor
from conddetr.predict.run import AttentionOptions, Summary, predict

__all__ = ["AttentionOptions", "PredictError", "Predictor", "Summary", "load_predictor", "predict"]

"""DETR and Conditional DETR models, their criterion and post-processing (see docs/architecture.md)."""

from conddetr.models.build import build_model
from conddetr.models.criterion import build_criterion
from conddetr.models.postprocess import build_postprocessor

__all__ = ["build_model", "build_criterion", "build_postprocessor"]

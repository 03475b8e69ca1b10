"""Numeric speed switches: the autocast dtype a device really gets (optim.amp), CUDA TF32, torch.compile.

bf16 autocast on a CPU without native bf16 kernels (AVX512-BF16 / AMX; `torch.ops.mkldnn._is_mkldnn_bf16_supported`)
runs convolutions many times slower than float32, so there it falls back to float32 with a warning. Losses and
matching stay in float32 under any autocast (criterion.py, matcher.py).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for optim.amp ("none" | "bf16" | "fp16") on `device`; None = float32, no autocast."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"optim.amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is torch.bfloat16 and device.type == "cpu" and not cpu_supports_bf16():
        warnings.warn(
            "optim.amp=bf16: this CPU has no native bf16 kernels (torch.ops.mkldnn._is_mkldnn_bf16_supported() is "
            "False), where bf16 convolutions are many times slower than float32; running in float32",
            UserWarning,
            stacklevel=2,
        )
        return None
    return dtype


def set_tf32(enabled: bool, device: torch.device) -> None:
    """CUDA: allow TF32 in matmuls and cuDNN convolutions (perf.tf32); nothing to do elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        log.info("TF32 matmuls and convolutions %s", "on" if enabled else "off")


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(module) when perf.compile is set; the caller keeps the plain module for checkpoints."""
    if not enabled:
        return module
    log.info("torch.compile of %s (the first steps compile; checkpoints hold the plain module)", type(module).__name__)
    return torch.compile(module)

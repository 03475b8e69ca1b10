"""Fast forward of a ResNet trunk with frozen batch norm: each norm folded into its convolution at run time,
channels_last activations and, on the CPU, oneDNN's fused convolution + bias (+ residual add) + ReLU.

The modules, parameters and state dict are the plain trunk's (nothing is rewritten, released checkpoints load and
export as before); outputs equal the plain forward to float rounding. Stages without trainable parameters (stem and
layer1 as published; all of them when lr_backbone = 0 or under no_grad) run without autograd from folded weights
cached until a parameter or buffer changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """conv then frozen norm as one convolution: weight W * s, bias b - mean * s, with s = gamma / sqrt(var + eps)."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out], as FrozenBatchNorm2d computes it
    return conv.weight * scale[:, None, None, None], norm.bias - norm.running_mean * scale


def _onednn_fusion_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_FUSION = _onednn_fusion_available()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def use_onednn(x: Tensor) -> bool:
    """oneDNN's fused kernels: float32 CPU tensors outside autocast and torch.compile (which fuses by itself)."""
    return (
        ONEDNN_FUSION
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not _autocast_on("cpu")
        and not torch.compiler.is_compiling()
    )


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv_act(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Tensor, relu: bool, other: Tensor | None = None):
    """relu?(conv(x, weight) + bias (+ other)): fused on the CPU (differentiable), else separate ops."""
    if use_onednn(x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if needs_grad or other is not None or relu:
            return _FusedConv.apply(x, weight, bias, other, relu, *_conv_args(conv))
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if other is not None:
        y = y + other
    return F.relu(y) if relu else y


class _FusedConv(torch.autograd.Function):
    """y = relu?(conv(x, W) + b (+ other)) in one oneDNN kernel; backward through aten.convolution_backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, other, relu, padding, stride, dilation, groups):
        unary = "relu" if relu else "none"
        if other is None:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, padding, stride, dilation, groups, unary, [], ""
            )
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, weight, bias, padding, stride, dilation, groups, "add", 1.0, unary if relu else None, [], ""
            )
        ctx.conv = (padding, stride, dilation, groups, relu)
        ctx.save_for_backward(x, weight, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        padding, stride, dilation, groups, relu = ctx.conv
        grad = torch.ops.aten.threshold_backward(grad_y, y, 0) if relu else grad_y  # ReLU' from its output
        grad = grad.contiguous(memory_format=_memory_format(x))
        need_x, need_w, need_b, need_other = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            [weight.shape[0]],
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b],
        )
        return grad_x, grad_w, grad_b, grad if need_other else None, None, None, None, None, None


def _layout(x: Tensor, frozen: bool) -> Tensor:
    """channels_last where it measured faster: CUDA, and CPU stages without autograd. CPU backward kernels of this
    oneDNN build were slower in channels_last (AVX2), so trainable CPU stages stay contiguous."""
    fmt = torch.channels_last if frozen or x.device.type != "cpu" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _frozen(module: nn.Module) -> bool:
    return not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters())


class FoldedWeights:
    """Folded (weight, bias) per (conv, norm) pair of frozen stages, recomputed only when a tensor changed."""

    def __init__(self):
        self._entries: dict[int, tuple[tuple, tuple[Tensor, Tensor]]] = {}

    def get(self, conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
        tensors = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        entry = self._entries.get(id(conv))
        if entry is None or entry[0] != key:
            with torch.no_grad():
                weight, bias = fold(conv, norm)
            entry = (key, (weight, bias))
            self._entries[id(conv)] = entry
        return entry[1]


def _pair(conv: nn.Conv2d, norm: nn.Module, frozen: bool, cache: FoldedWeights) -> tuple[Tensor, Tensor]:
    if frozen and not torch.compiler.is_compiling():
        return cache.get(conv, norm)
    return fold(conv, norm)


def _block(block: nn.Module, x: Tensor, cache: FoldedWeights) -> Tensor:
    """torchvision BasicBlock / Bottleneck: conv-norm-relu pairs, the last one adding the shortcut before its ReLU."""
    frozen = _frozen(block)
    x = _layout(x, frozen)
    names = ("1", "2", "3") if hasattr(block, "conv3") else ("1", "2")
    identity = x
    if block.downsample is not None:
        conv, norm = block.downsample[0], block.downsample[1]
        identity = conv_act(x, conv, *_pair(conv, norm, frozen, cache), relu=False)
    y = x
    for i, n in enumerate(names):
        conv, norm = getattr(block, f"conv{n}"), getattr(block, f"bn{n}")
        last = i == len(names) - 1
        y = conv_act(y, conv, *_pair(conv, norm, frozen, cache), relu=True, other=identity if last else None)
    return y


def trunk_forward(trunk: nn.Sequential, images: Tensor, cache: FoldedWeights) -> Tensor:
    """The trunk's output for images [B, 3, H, W]; `trunk` as built by ResNetBody (frozen norms)."""
    x = images
    for name, module in trunk.named_children():
        if name == "conv1":
            stem_frozen = _frozen(trunk.conv1)
            x = _layout(x, stem_frozen)
            x = conv_act(x, trunk.conv1, *_pair(trunk.conv1, trunk.bn1, stem_frozen, cache), relu=True)
        elif name == "maxpool":
            x = module(x)
        elif name.startswith("layer"):
            for block in module:
                x = _block(block, x, cache)
        # bn1 and relu are part of the stem's fused convolution
    return x

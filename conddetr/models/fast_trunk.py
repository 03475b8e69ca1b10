"""Fast forward of a ResNet trunk with frozen batch norm: each norm folded into its convolution at run time,
channels_last activations and, on the CPU, oneDNN's fused convolution + bias (+ residual add) + ReLU.

The modules, parameters and state dict are the plain trunk's (nothing is rewritten, released checkpoints load and
export as before); outputs equal the plain forward to float rounding. Stages without trainable parameters (stem and
layer1 as published; all of them when lr_backbone = 0 or under no_grad) run without autograd from folded weights
cached until a parameter or buffer changes; trainable stages fold at each call and keep no folded copy for the
backward (it folds again).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Frozen norm as y = x * s + t: s = gamma / sqrt(var + eps), t = beta - mean * s (both [C])."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out], as FrozenBatchNorm2d computes it
    return scale, norm.bias - norm.running_mean * scale


def fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """conv then frozen norm as one convolution: weight W * s, bias b - mean * s, with s = gamma / sqrt(var + eps)."""
    scale, shift = norm_scale_shift(norm)
    return conv.weight * scale[:, None, None, None], shift


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


def conv_act(x: Tensor, conv: nn.Conv2d, weight: Tensor, bias: Tensor, relu: bool, other: Tensor | None = None,
             overwrite_other: bool = False) -> Tensor:  # fmt: skip
    """relu?(conv(x, weight) + bias (+ other)): fused on the CPU (differentiable), else separate ops.

    overwrite_other: the result may be written into `other` (a shortcut nobody reads afterwards) when no gradient
    is needed; this saves a fresh output tensor, which above glibc's 32 MiB mmap limit (layer1 at 512x640) is a new
    mapping whose page faults cost more than the convolution itself.
    """
    if use_onednn(x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        grad_to_other = other is not None and torch.is_grad_enabled() and other.requires_grad
        if other is not None and overwrite_other and not (needs_grad or grad_to_other):
            unary = "relu" if relu else None
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                other, x, weight, bias, *_conv_args(conv), "add", 1.0, unary, [], ""
            )
        if needs_grad or other is not None or relu:
            return _FusedConv.apply(x, weight, None, bias, other, relu, *_conv_args(conv))
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if other is not None:
        y = y + other
    return F.relu(y) if relu else y


def conv_norm_act(x: Tensor, conv: nn.Conv2d, norm: nn.Module, relu: bool, other: Tensor | None = None) -> Tensor:
    """relu?(norm(conv(x)) (+ other)) of a trainable convolution and its frozen norm, the norm folded in.

    On the CPU the fused kernel folds the weight itself and saves the parameter, not the folded copy, for the
    backward (which folds it again): one weight-sized tensor less per convolution held until the backward.
    """
    if use_onednn(x):
        scale, shift = norm_scale_shift(norm)
        return _FusedConv.apply(x, conv.weight, scale, shift, other, relu, *_conv_args(conv))
    return conv_act(x, conv, *fold(conv, norm), relu=relu, other=other)


def _scaled(weight: Tensor, scale: Tensor | None) -> Tensor:
    return weight if scale is None else weight * scale[:, None, None, None]


class _FusedConv(torch.autograd.Function):
    """y = relu?(conv(x, W * s) + b (+ other)) in one oneDNN kernel (s = None: W is already folded); backward
    through aten.convolution_backward. Gradients flow to x, W and other (the norm's s and b are buffers)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, other, relu, padding, stride, dilation, groups):
        unary = "relu" if relu else "none"
        folded = _scaled(weight, scale)
        if other is None:
            y = torch.ops.mkldnn._convolution_pointwise(
                x, folded, bias, padding, stride, dilation, groups, unary, [], ""
            )
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, other, folded, bias, padding, stride, dilation, groups, "add", 1.0, unary if relu else None, [], ""
            )
        ctx.conv = (padding, stride, dilation, groups, relu)
        ctx.save_for_backward(x, weight, scale, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, scale, y = ctx.saved_tensors
        padding, stride, dilation, groups, relu = ctx.conv
        grad = torch.ops.aten.threshold_backward(grad_y, y, 0) if relu else grad_y  # ReLU' from its output
        grad = grad.contiguous(memory_format=_memory_format(x))
        need_x, need_w, need_scale, need_b, need_other = ctx.needs_input_grad[:5]
        if need_scale:
            raise RuntimeError("fused convolution: the frozen norm's scale cannot take a gradient")
        folded = _scaled(weight.detach(), scale)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad,
            x,
            folded,
            [weight.shape[0]],
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b],
        )
        del folded
        if grad_w is not None and scale is not None:
            grad_w = grad_w * scale[:, None, None, None]  # d(W * s)/dW
        return grad_x, grad_w, None, grad_b, grad if need_other else None, None, None, None, None, None


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

    def drop(self, conv: nn.Conv2d) -> None:
        self._entries.pop(id(conv), None)


def _conv(x: Tensor, conv: nn.Conv2d, norm: nn.Module, frozen: bool, cache: FoldedWeights, relu: bool,
          other: Tensor | None = None) -> Tensor:  # fmt: skip
    """One conv-norm(-add)(-ReLU) unit: from cached folded weights when frozen, else folded at this call.
    `other` is a block's shortcut, free to be overwritten once added."""
    if frozen and not torch.compiler.is_compiling():
        return conv_act(x, conv, *cache.get(conv, norm), relu=relu, other=other, overwrite_other=True)
    cache.drop(conv)  # a stage training now: its folded copy from an evaluation would only hold memory
    return conv_norm_act(x, conv, norm, relu=relu, other=other)


def _block(block: nn.Module, x: Tensor, cache: FoldedWeights) -> Tensor:
    """torchvision BasicBlock / Bottleneck: conv-norm-relu pairs, the last one adding the shortcut before its ReLU."""
    frozen = _frozen(block)
    x = _layout(x, frozen)
    names = ("1", "2", "3") if hasattr(block, "conv3") else ("1", "2")
    identity = x
    if block.downsample is not None:
        conv, norm = block.downsample[0], block.downsample[1]
        identity = _conv(x, conv, norm, frozen, cache, relu=False)
    y = x
    for i, n in enumerate(names):
        conv, norm = getattr(block, f"conv{n}"), getattr(block, f"bn{n}")
        last = i == len(names) - 1
        y = _conv(y, conv, norm, frozen, cache, relu=True, other=identity if last else None)
    return y


def trunk_forward(trunk: nn.Sequential, images: Tensor, cache: FoldedWeights) -> Tensor:
    """The trunk's output for images [B, 3, H, W]; `trunk` as built by ResNetBody (frozen norms)."""
    x = images
    for name, module in trunk.named_children():
        if name == "conv1":
            stem_frozen = _frozen(trunk.conv1)
            x = _layout(x, stem_frozen)
            x = _conv(x, trunk.conv1, trunk.bn1, stem_frozen, cache, relu=True)
        elif name == "maxpool":
            x = module(x)
        elif name.startswith("layer"):
            for block in module:
                x = _block(block, x, cache)
        # bn1 and relu are part of the stem's fused convolution
    return x

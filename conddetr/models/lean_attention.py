"""Attention for CPU training with dropout that keeps less for the backward (same numbers as attention.attend).

With dropout on, the CPU runs scaled_dot_product_attention's math path, whose autograd graph holds the softmax
weights, a float dropout mask and the dropped weights: three [B, heads, Q, K] float tensors per attention. The
kernel here does the same operations in the same order, the same random draws included, but saves the softmax and
a bool mask only and rebuilds the dropped weights in the backward. Everywhere else (evaluation, no dropout, CUDA,
autocast, torch.compile) calls go to attention.attend unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from conddetr.attention import PackedAttention, attend, merge_heads, split_heads


class _LeanAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) with dropout, times v; per head: q, k [B, h, N, d], v [B, h, K, dv]."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, additive_mask: Tensor | None, p: float) -> Tensor:
        root_scale = math.sqrt(1.0 / math.sqrt(q.shape[-1]))  # SDPA's math path scales q and k by sqrt(scale) each
        q_s, k_s = q * root_scale, k * root_scale
        logits = q_s @ k_s.transpose(-2, -1)  # [B, h, Q, K]
        if additive_mask is not None:
            logits.add_(additive_mask)
        weights = torch.ops.aten._safe_softmax(logits, -1)
        del logits
        noise = torch.empty_like(weights).bernoulli_(1 - p)  # as aten's CPU dropout: 1 = keep
        keep = noise.bool()
        out = (weights * noise.div_(1 - p)) @ v  # [B, h, Q, dv]
        ctx.p, ctx.root_scale = p, root_scale
        ctx.save_for_backward(q_s, k_s, v, weights, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q_s, k_s, v, weights, keep = ctx.saved_tensors
        noise = keep.to(weights.dtype).div_(1 - ctx.p)  # the forward's noise, bit for bit
        dropped = weights * noise
        grad_v = dropped.transpose(-2, -1) @ grad_out
        del dropped
        grad_weights = (grad_out @ v.transpose(-2, -1)).mul_(noise)
        del noise
        grad_logits = torch.ops.aten._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_q = (grad_logits @ k_s).mul_(ctx.root_scale)
        grad_k = (grad_logits.transpose(-2, -1) @ q_s).mul_(ctx.root_scale)
        return grad_q, grad_k, grad_v, None, None


def _lean_applies(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> bool:
    return (
        0 < dropout_p < 1
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def lean_attend(
    q: Tensor, k: Tensor, v: Tensor, num_heads: int, key_padding_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """attention.attend(q [B, Q, Dqk], k [B, K, Dqk], v [B, K, Dv], ...) -> [B, Q, Dv]; the lean kernel when
    training on the CPU with dropout (key_padding_mask [B, K] True = padding)."""
    if not _lean_applies(q, k, v, dropout_p):
        return attend(q, k, v, num_heads, key_padding_mask, dropout_p)
    additive = None
    if key_padding_mask is not None:  # as SDPA converts a boolean mask: 0 where attended, -inf at padding
        zeros = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        additive = zeros.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, K]
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))  # [B, heads, N, d]
    return merge_heads(_LeanAttention.apply(qh, kh, vh, additive, dropout_p))  # [B, Q, Dv]


def self_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None) -> Tensor:
    """`module(query, key, value, key_padding_mask)` for attention.PackedAttention (inputs projected here) and
    attention.OutProjAttention (inputs already projected), through lean_attend."""
    if isinstance(module, PackedAttention):
        query, key, value = module.project(query, 0), module.project(key, 1), module.project(value, 2)
    p = module.dropout if module.training else 0.0
    return module.out_proj(lean_attend(query, key, value, module.num_heads, key_padding_mask, p))

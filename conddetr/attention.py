"""Multi-head attention kernels and modules, and the per-head spatial / content / combined attention maps.

Conditional DETR's cross-attention has q/k heads twice as wide as v heads; `attend` picks the kernel that
benchmarks/bench_cross_attention.py measured fastest for each case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, D] -> [B, heads, N, D / heads]."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads * d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_logits(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Scaled per-head dot products: q [B, Q, D], k [B, K, D] -> [B, heads, Q, K]."""
    return (split_heads(q, num_heads) * scale) @ split_heads(k, num_heads).transpose(-2, -1)


def masked_softmax(logits: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over keys; logits [B, heads, Q, K], key_padding_mask [B, K] True = padding (weight 0)."""
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    kernel: str = "auto",
) -> torch.Tensor:
    """softmax(q_h k_h^T / sqrt(d_qk)) v_h per head: q [B, Q, Dqk], k [B, K, Dqk], v [B, K, Dv] -> [B, Q, Dv].

    kernel (all give the same numbers):
      "sdpa"         F.scaled_dot_product_attention as is (leaves its fused CPU path when d_v != d_qk);
      "sdpa_padded"  SDPA with v heads zero-padded to the q/k width, extra output columns dropped;
      "matmul"       explicit matmul-softmax-matmul;
      "auto"         "sdpa" for equal widths, else "sdpa_padded": the fastest on the CPU for Conditional DETR's
                     2D/heads-wide q/k and D/heads-wide v (benchmarks/bench_cross_attention.py); when training on
                     the CPU with dropout, the memory-lean kernel below (SDPA's math path, same random draws).
    """
    if kernel == "auto" and _lean_applies(q, k, v, dropout_p):
        return _lean_attend(q, k, v, num_heads, key_padding_mask, dropout_p)
    if kernel == "auto":
        kernel = "sdpa" if q.shape[-1] == v.shape[-1] else "sdpa_padded"
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # autocast may mix fp32/bf16
    qh, kh, vh = (split_heads(t.to(dtype), num_heads) for t in (q, k, v))  # [B, heads, N, d]
    if kernel in ("sdpa", "sdpa_padded"):
        d_v = vh.shape[-1]
        if kernel == "sdpa_padded" and qh.shape[-1] > d_v:
            vh = F.pad(vh, (0, qh.shape[-1] - d_v))  # [B, heads, K, d_qk], zeros beyond d_v
        attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask, dropout_p=dropout_p)[..., :d_v]
    elif kernel == "matmul":
        logits = (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-2, -1)  # [B, heads, Q, K]
        weights = F.dropout(masked_softmax(logits, key_padding_mask), p=dropout_p, training=dropout_p > 0)
        out = weights.to(vh.dtype) @ vh  # [B, heads, Q, dv]
    else:
        raise ValueError(f"attention kernel must be 'auto', 'sdpa', 'sdpa_padded' or 'matmul', got {kernel!r}")
    return merge_heads(out)  # [B, Q, Dv]


class PackedAttention(nn.Module):
    """Multi-head attention in the `nn.MultiheadAttention` parameter layout (batch-first inputs).

    Keys: in_proj_weight [3D, D] (q, k, v stacked), in_proj_bias [3D], out_proj. Used by the encoder and by
    the DETR decoder; `project` exposes the q/k/v pieces so the DETR maps can split content from position.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by nheads {num_heads}")
        self.dim, self.num_heads, self.dropout = dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project(self, x: torch.Tensor, part: int, bias: bool = True) -> torch.Tensor:
        """Apply the q (part 0), k (1) or v (2) input projection: [B, N, D] -> [B, N, D]."""
        rows = slice(part * self.dim, (part + 1) * self.dim)
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows] if bias else None)

    def forward(self, query, key, value, key_padding_mask=None) -> torch.Tensor:
        """query [B, Q, D], key/value [B, K, D], key_padding_mask [B, K] -> [B, Q, D]."""
        q, k, v = self.project(query, 0), self.project(key, 1), self.project(value, 2)
        p = self.dropout if self.training else 0.0
        return self.out_proj(attend(q, k, v, self.num_heads, key_padding_mask, p))


class OutProjAttention(nn.Module):
    """Conditional DETR attention: q, k, v arrive already projected, the module owns only `out_proj`.

    q/k may be wider than v (cross-attention: 2D vs D); the scale is 1/sqrt(q head width), as published.
    """

    def __init__(self, v_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.out_proj = nn.Linear(v_dim, v_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, k, v, key_padding_mask=None, kernel: str = "auto") -> torch.Tensor:
        """q [B, Q, Dqk], k [B, K, Dqk], v [B, K, Dv] -> [B, Q, Dv]."""
        p = self.dropout if self.training else 0.0
        return self.out_proj(attend(q, k, v, self.num_heads, key_padding_mask, p, kernel))


def cross_attention_maps(
    content_logits: torch.Tensor,
    spatial_logits: torch.Tensor,
    combined_logits: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Softmax maps {"spatial", "content", "combined"} [B, heads, Q, K] from their scaled logits.

    All three use the scale of the real attention, so in Conditional DETR combined = softmax(content + spatial
    logits), the paper's Figure 1 decomposition; `combined` is always exactly the attention the layer applies.
    """
    return {
        "spatial": masked_softmax(spatial_logits.float(), key_padding_mask),
        "content": masked_softmax(content_logits.float(), key_padding_mask),
        "combined": masked_softmax(combined_logits.float(), key_padding_mask),
    }


def apply_attention(weights: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Weighted sum of values with given maps: weights [B, heads, Q, K], v [B, K, Dv] -> [B, Q, Dv]."""
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return merge_heads(weights.to(v.dtype) @ split_heads(v, weights.shape[1]))


def head_scale(head_dim: int) -> float:
    """1 / sqrt(head width): the dot-product scale of a head of that width."""
    return 1.0 / math.sqrt(head_dim)


# --- CPU training with dropout: SDPA's math path holds the softmax weights, a float dropout mask and the dropped
# weights (three [B, heads, Q, K] float tensors per attention) for the backward. This kernel does the same
# operations in the same order, random draws included, but saves the softmax and a bool mask only and rebuilds the
# dropped weights in the backward. Everywhere else (evaluation, no dropout, CUDA, autocast, compile) attend is SDPA.


class _LeanAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) with dropout, times v; per head: q, k [B, h, N, d], v [B, h, K, dv]."""

    @staticmethod
    def forward(ctx, q, k, v, additive_mask, p: float) -> torch.Tensor:
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
    def backward(ctx, grad_out: torch.Tensor):
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


def _lean_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    return (
        0 < dropout_p < 1
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _lean_attend(q, k, v, num_heads: int, key_padding_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    additive = None
    if key_padding_mask is not None:  # as SDPA converts a boolean mask: 0 where attended, -inf at padding
        zeros = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        additive = zeros.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]  # [B, 1, 1, K]
    qh, kh, vh = (split_heads(t, num_heads) for t in (q, k, v))  # [B, heads, N, d]
    return merge_heads(_LeanAttention.apply(qh, kh, vh, additive, dropout_p))  # [B, Q, Dv]

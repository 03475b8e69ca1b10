"""Post-norm transformer encoder, the MLP used by heads and decoders, and the encoder-decoder wrapper.

The decoder (DETR or Conditional DETR, see decoder.py) is passed in, so this file is shared by both papers.
Tensors are batch-first: image tokens [B, HW, D], queries [B, Q, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conddetr.attention import PackedAttention


class _ReluDropout(torch.autograd.Function):
    """dropout(relu(x)) as F.dropout computes it on the CPU (same random draws, same numbers), saving for the
    backward only the output (which the next Linear saves anyway) and a bool keep-mask: autograd's version holds
    the ReLU output and a float noise tensor besides, two FFN-sized tensors per layer until the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)  # as aten's CPU dropout: 1 = keep
        keep = noise.bool()
        out = F.relu(x).mul_(noise.div_(1 - p))
        ctx.p = p
        ctx.save_for_backward(out, keep)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, keep = ctx.saved_tensors
        noise = keep.to(grad_out.dtype).div_(1 - ctx.p)  # the forward's noise, bit for bit
        # ReLU' from the output: where dropout zeroed it the gradient is 0 either way
        return torch.ops.aten.threshold_backward(grad_out * noise, out, 0), None


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(F.relu(x), p, training); on the CPU with autograd, the memory-lean _ReluDropout (equal numbers)."""
    lean = training and 0 < p < 1 and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad
    if lean and not torch.compiler.is_compiling():
        return _ReluDropout.apply(x, p)
    return F.dropout(F.relu(x), p, training)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU in between (keys `layers.{i}`, as published)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; the position embedding is added to queries and keys, not values."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = PackedAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """src, pos [B, HW, D], mask [B, HW] True = padding -> [B, HW, D]."""
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src, key_padding_mask=mask)))
        ffn = self.linear2(relu_dropout(self.linear1(src), self.dropout.p, self.training))
        return self.norm2(src + self.dropout(ffn))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, mask)
        return src  # [B, HW, D]; post-norm, so no final norm


class Transformer(nn.Module):
    """Encoder over image tokens, then `decoder` over the object queries (content input starts at zero).

    decoder(memory [B, HW, D], memory_mask [B, HW], pos [B, HW, D], query_pos [B, Q, D], return_attention)
    must return (hs [L, B, Q, D] after the shared final norm, ref_points [B, Q, 2] or None, maps or None).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        num_encoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        decoder: nn.Module,
    ):
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.encoder = Encoder(num_encoder_layers, d_model, nhead, dim_feedforward, dropout)
        self.decoder = decoder
        # Published init: xavier-uniform on every matrix of the transformer (decoder MLPs included).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos, return_attention: bool = False) -> dict:
        """src [B, D, h, w], mask [B, h, w], query_embed [Q, D], pos [B, D, h, w] ->
        {"memory" [B, HW, D], "hs" [L, B, Q, D], "ref_points" [B, Q, 2] | None,
         "cross_attention" {"spatial", "content", "combined"} [L, B, heads, Q, h, w] | None}.
        """
        b, _, h, w = src.shape
        # [B, D, h, w] -> [B, HW, D]: a view, no copy, for channels_last maps (the fused backbone's) and pos
        src = src.permute(0, 2, 3, 1).flatten(1, 2)  # [B, HW, D]
        pos = pos.permute(0, 2, 3, 1).flatten(1, 2)  # [B, HW, D]
        mask = mask.flatten(1)  # [B, HW]
        query_pos = query_embed[None].expand(b, -1, -1)  # [B, Q, D]
        memory = self.encoder(src, pos, mask)  # [B, HW, D]
        hs, ref_points, maps = self.decoder(memory, mask, pos, query_pos, return_attention)
        if maps is not None:
            maps = {k: m.unflatten(-1, (h, w)) for k, m in maps.items()}  # [L, B, heads, Q, h, w]
        return {"memory": memory, "hs": hs, "ref_points": ref_points, "cross_attention": maps}

"""DETR and Conditional DETR decoders side by side: the one place where the two papers differ.

DETR adds the object query / image position to the content before a packed projection (one dot product mixes
content and position). Conditional DETR (Meng et al. 2021, Sec. 3.3) keeps them apart in the cross-attention:
per head q = [c_q ; p_q], k = [c_k ; p_k], with the spatial query p_q = T(f) * PE(s) built from a reference point s.
"""

from __future__ import annotations

import torch
from torch import nn

from conddetr.attention import (
    OutProjAttention,
    PackedAttention,
    apply_attention,
    attend,
    attention_logits,
    cross_attention_maps,
    head_scale,
)
from conddetr.models.position import sine_embed_points
from conddetr.models.transformer import MLP, relu_dropout


class _FFNMixin:
    def _ffn(self, tgt: torch.Tensor) -> torch.Tensor:
        """Post-norm FFN block shared by both layers: norm3(tgt + FFN(tgt))."""
        ffn = self.linear2(relu_dropout(self.linear1(tgt), self.dropout.p, self.training))
        return self.norm3(tgt + self.dropout(ffn))


class DETRDecoderLayer(_FFNMixin, nn.Module):
    """DETR: positional queries added to the content in every layer, `nn.MultiheadAttention` packed projections."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.nhead = nhead
        self.self_attn = PackedAttention(d_model, nhead, dropout)
        self.multihead_attn = PackedAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_mask, pos, query_pos, return_attention=False):
        """tgt, query_pos [B, Q, D]; memory, pos [B, HW, D]; memory_mask [B, HW] -> (tgt [B, Q, D], maps | None).

        maps [B, heads, Q, HW]: content = (W_q c_q + b_q).(W_k c_k + b_k), spatial = (W_q p_q).(W_k p_k) from the
        packed projection pieces; combined = the real attention (it also holds the content x position cross terms).
        """
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt)))

        ca = self.multihead_attn
        q = ca.project(tgt + query_pos, 0)  # [B, Q, D]
        k = ca.project(memory + pos, 1)  # [B, HW, D]
        v = ca.project(memory, 2)  # [B, HW, D]
        p = ca.dropout if self.training else 0.0
        maps = None
        if return_attention:
            scale = head_scale(q.shape[-1] // self.nhead)
            maps = cross_attention_maps(
                content_logits=attention_logits(ca.project(tgt, 0), ca.project(memory, 1), self.nhead, scale),
                spatial_logits=attention_logits(
                    ca.project(query_pos, 0, bias=False), ca.project(pos, 1, bias=False), self.nhead, scale
                ),
                combined_logits=attention_logits(q, k, self.nhead, scale),
                key_padding_mask=memory_mask,
            )
            out = apply_attention(maps["combined"], v, p)  # [B, Q, D]
        else:
            out = attend(q, k, v, self.nhead, memory_mask, p)  # [B, Q, D]
        tgt = self.norm2(tgt + self.dropout(ca.out_proj(out)))
        return self._ffn(tgt), maps


def concat_per_head(content: torch.Tensor, spatial: torch.Tensor, nhead: int) -> torch.Tensor:
    """[B, N, D] x2 -> [B, N, 2D] where each head's slice is [content_h ; spatial_h] (paper Sec. 3.3)."""
    b, n, d = content.shape
    both = torch.cat((content.view(b, n, nhead, d // nhead), spatial.view(b, n, nhead, d // nhead)), dim=-1)
    return both.view(b, n, 2 * d)


class ConditionalDecoderLayer(_FFNMixin, nn.Module):
    """Conditional DETR: separate content / position projections; cross-attention on concatenated heads.

    `ca_qpos_proj` exists in layer 0 only (`is_first`), where the object query and key position are also
    added DETR-style to the content query and key; later layers rely on the spatial query alone.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, is_first: bool):
        super().__init__()
        self.nhead = nhead
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = OutProjAttention(d_model, nhead, dropout)
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = OutProjAttention(d_model, nhead, dropout)  # q/k heads 2D/nhead wide, v heads D/nhead
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_mask, pos, query_pos, query_sine_embed, return_attention=False):
        """tgt, query_pos [B, Q, D]; query_sine_embed T(f) * PE(s) [B, Q, D]; memory, pos [B, HW, D];
        memory_mask [B, HW] -> (tgt [B, Q, D], maps | None).

        maps [B, heads, Q, HW]: content = c_q.c_k, spatial = p_q.p_k, combined = softmax of their sum (the real
        attention), all at the real scale 1/sqrt(2D/heads). In layer 0, c_q and c_k include the added positions.
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)  # [B, Q, D]
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)  # [B, Q, D]
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, k, self.sa_v_proj(tgt))))

        c_q = self.ca_qcontent_proj(tgt)  # [B, Q, D]
        c_k = self.ca_kcontent_proj(memory)  # [B, HW, D]
        p_k = self.ca_kpos_proj(pos)  # [B, HW, D]
        v = self.ca_v_proj(memory)  # [B, HW, D]
        if self.ca_qpos_proj is not None:
            c_q = c_q + self.ca_qpos_proj(query_pos)
            c_k = c_k + p_k
        p_q = self.ca_qpos_sine_proj(query_sine_embed)  # [B, Q, D]
        q = concat_per_head(c_q, p_q, self.nhead)  # [B, Q, 2D]
        k = concat_per_head(c_k, p_k, self.nhead)  # [B, HW, 2D]
        ca = self.cross_attn
        p = ca.dropout if self.training else 0.0
        maps = None
        if return_attention:
            scale = head_scale(q.shape[-1] // self.nhead)
            maps = cross_attention_maps(
                content_logits=attention_logits(c_q, c_k, self.nhead, scale),
                spatial_logits=attention_logits(p_q, p_k, self.nhead, scale),
                combined_logits=attention_logits(q, k, self.nhead, scale),
                key_padding_mask=memory_mask,
            )
            out = apply_attention(maps["combined"], v, p)  # [B, Q, D]
        else:
            out = attend(q, k, v, self.nhead, memory_mask, p)  # [B, Q, D]
        tgt = self.norm2(tgt + self.dropout(ca.out_proj(out)))
        return self._ffn(tgt), maps


def _stack_maps(per_layer: list) -> dict | None:
    """list over layers of {name: [B, heads, Q, HW]} -> {name: [L, B, heads, Q, HW]}."""
    if not per_layer or per_layer[0] is None:
        return None
    return {name: torch.stack([m[name] for m in per_layer]) for name in per_layer[0]}


class DETRDecoder(nn.Module):
    """Stack of DETR layers; every layer's output goes through the shared final norm (auxiliary predictions)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            DETRDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, memory, memory_mask, pos, query_pos, return_attention=False):
        """-> hs [L, B, Q, D], None (no reference points), maps {name: [L, B, heads, Q, HW]} | None."""
        tgt = torch.zeros_like(query_pos)  # [B, Q, D] content input starts at zero
        hs, maps = [], []
        for layer in self.layers:
            tgt, m = layer(tgt, memory, memory_mask, pos, query_pos, return_attention)
            hs.append(self.norm(tgt))
            maps.append(m)
        return torch.stack(hs), None, _stack_maps(maps)


class ConditionalDecoder(nn.Module):
    """Stack of Conditional layers with the reference point s and the spatial query transform T (`query_scale`)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=i == 0)
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)  # T(f)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)  # s before sigmoid

    def forward(self, memory, memory_mask, pos, query_pos, return_attention=False):
        """-> hs [L, B, Q, D], ref_points s [B, Q, 2] as (x, y) in [0, 1], maps {name: [L, B, heads, Q, HW]} | None."""
        ref_points = self.ref_point_head(query_pos).sigmoid()  # [B, Q, 2], fixed across layers
        pe_s = sine_embed_points(ref_points, query_pos.shape[-1] // 2)  # [B, Q, D] PE(s)
        tgt = torch.zeros_like(query_pos)  # [B, Q, D]
        hs, maps = [], []
        for i, layer in enumerate(self.layers):
            # T(f) = 1 in layer 0, else an MLP of the previous layer's output *before* the final norm.
            query_sine_embed = pe_s if i == 0 else self.query_scale(tgt) * pe_s  # [B, Q, D]
            tgt, m = layer(tgt, memory, memory_mask, pos, query_pos, query_sine_embed, return_attention)
            hs.append(self.norm(tgt))
            maps.append(m)
        return torch.stack(hs), ref_points, _stack_maps(maps)

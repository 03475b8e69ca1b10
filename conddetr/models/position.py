"""Position embeddings: 2-D sine and learned embeddings of the image grid, and the sine embedding of points.

All three follow the published DETR / Conditional DETR layouts (y part first, then x; sin/cos interleaved).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """sin on even feature indices, cos on odd ones, over the last dim (works for odd feature counts too).

    Equal to the published `stack((a[..., 0::2].sin(), a[..., 1::2].cos()), -1).flatten(-2)` whenever the
    last dim is even; that form crashes when it is odd, which happens at hidden sizes that are 2 mod 4.
    """
    even = torch.arange(angles.shape[-1], device=angles.device) % 2 == 0
    return torch.where(even, angles.sin(), angles.cos())


def _inverse_frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    """temperature ** (2 * (i // 2) / num_feats) for i in [0, num_feats): one frequency per sin/cos pair."""
    i = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine embedding of the unpadded pixel grid (DETR, "Attention is all you need" generalised to 2-D).

    Coordinates are the cumulative count of valid (non-padding) rows/columns, so padding does not shift the
    embedding of real pixels; with `normalize` they are divided by the image's own extent and scaled by 2*pi.
    Output has 2 * num_pos_feats channels: `num_pos_feats` for y, then `num_pos_feats` for x.
    """

    cache_size = 8  # embeddings kept per module, keyed by the mask (CPU masks only: the key reads it)

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True, scale: float = None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def forward(self, feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feature [B, C, h, w] (only its device is used), mask [B, h, w] True = padding -> [B, 2F, h, w].

        The embedding depends on the mask alone, so on the CPU it is cached per mask (evaluation at fixed sizes
        recomputes nothing); a CUDA mask is not cached, its key would wait for the device. Nor is anything cached
        under torch.inference_mode: an inference tensor reused in training cannot be saved for the backward.
        """
        if mask.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return self._embed(mask)
        key = (tuple(mask.shape), mask.contiguous().numpy().tobytes())
        pos = self._cache.get(key)
        if pos is None:
            pos = self._cache[key] = self._embed(mask)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return pos

    def _embed(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)  # [B, h, w] 1..h_valid
        x = not_mask.cumsum(2, dtype=torch.float32)  # [B, h, w] 1..w_valid
        if self.normalize:
            eps = 1e-6  # keeps a fully padded row/column finite
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        dim_t = _inverse_frequencies(self.num_pos_feats, self.temperature, mask.device)  # [F]
        pos_x = _interleave_sin_cos(x[..., None] / dim_t)  # [B, h, w, F]
        pos_y = _interleave_sin_cos(y[..., None] / dim_t)  # [B, h, w, F]
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2F, h, w]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding: one table per axis (`row_embed`, `col_embed`), up to 50x50 feature maps.

    Published layout: x (column) features first, then y (row) features; the padding mask is ignored.
    """

    max_size = 50  # published table size; a 1600-pixel side at stride 32

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, feature: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feature [B, C, h, w], mask [B, h, w] (unused) -> [B, 2F, h, w]."""
        b, _, h, w = feature.shape
        if h > self.max_size or w > self.max_size:
            raise ValueError(
                f"learned position embedding covers feature maps up to {self.max_size}x{self.max_size}, got {h}x{w}; "
                "use position_embedding='sine' for larger images or DC5"
            )
        x_emb = self.col_embed(torch.arange(w, device=feature.device))  # [w, F]
        y_emb = self.row_embed(torch.arange(h, device=feature.device))  # [h, F]
        pos = torch.cat((x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)), dim=-1)  # [h, w, 2F]
        return pos.permute(2, 0, 1)[None].expand(b, -1, -1, -1)  # [B, 2F, h, w]


def build_position_embedding(kind: str, hidden_dim: int) -> nn.Module:
    """`sine` (published 'v2' alias accepted) or `learned` ('v3'); hidden_dim // 2 features per axis."""
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even for a 2-D position embedding, got {hidden_dim}")
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(hidden_dim // 2, normalize=True)
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")


def sine_embed_points(points: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """PE(s) of Conditional DETR: sine embedding of normalised (x, y) points, y part first, then x.

    points [..., 2] in [0, 1] -> [..., 2 * num_feats]. The published code hard-codes num_feats = 128 (hidden 256);
    here it is a parameter (hidden_dim // 2), identical to the published function at 128.
    """
    dim_t = _inverse_frequencies(num_feats, temperature, points.device)  # [F]
    scaled = points.float() * (2 * math.pi)  # [..., 2]
    pos_x = _interleave_sin_cos(scaled[..., 0, None] / dim_t)  # [..., F]
    pos_y = _interleave_sin_cos(scaled[..., 1, None] / dim_t)  # [..., F]
    return torch.cat((pos_y, pos_x), dim=-1)  # [..., 2F]

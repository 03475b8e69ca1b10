"""The detector: backbone -> input_proj -> transformer -> class head and box MLP shared across decoder layers.

Box decoding is the only other variant difference: Conditional DETR predicts (cx, cy) as logit-space offsets
from its reference points, DETR predicts boxes directly through a sigmoid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from conddetr.models.backbone import BackboneWithPosition
from conddetr.models.transformer import MLP, Transformer


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both terms clamped at eps (published Conditional DETR default 1e-5)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class Detector(nn.Module):
    """DETR / Conditional DETR detector with the published state-dict layout.

    Call `model(images [B, 3, H, W], mask [B, H, W] True = padding)`; images of a batch may have any sizes
    (pad them to a common H, W and mark the padding in `mask`; H, W need not be multiples of 32: the feature map
    is ceil(H / stride) x ceil(W / stride) and the mask is downsampled by nearest interpolation). Padded keys get no
    attention and the sine position embedding counts valid pixels only, but convolutions near an image's border
    still see the zero padding, so an image's predictions in a padded batch can differ slightly from the image
    alone, as in the published code. Returns
    {"pred_logits" [B, Q, C], "pred_boxes" [B, Q, 4] (cx, cy, w, h) in [0, 1] relative to the unpadded image,
     "aux_outputs": [{pred_logits, pred_boxes}] for decoder layers 0..L-2 (when aux_loss)}, plus
    "intermediates" (return_intermediates) and "cross_attention" (return_attention), see `forward`.
    """

    def __init__(
        self,
        backbone: BackboneWithPosition,
        transformer: Transformer,
        num_logits: int,
        num_queries: int,
        aux_loss: bool,
        conditional: bool,
    ):
        super().__init__()
        hidden_dim = transformer.d_model
        self.conditional, self.aux_loss, self.num_queries = conditional, aux_loss, num_queries
        # Registration order fixes the published key order: transformer, heads, queries, input_proj, backbone.
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_logits)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        if conditional:
            # Focal-loss prior: every logit starts at p = 0.01; boxes start at the reference points.
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def decode_boxes(self, hs: torch.Tensor, ref_points: torch.Tensor | None) -> torch.Tensor:
        """hs [L, B, Q, D], ref_points [B, Q, 2] | None -> boxes [L, B, Q, 4] cxcywh in [0, 1]."""
        raw = self.bbox_embed(hs)  # [L, B, Q, 4]
        if ref_points is None:
            return raw.sigmoid()
        center = raw[..., :2] + inverse_sigmoid(ref_points)  # [L, B, Q, 2] offsets in logit space
        return torch.cat((center, raw[..., 2:]), dim=-1).sigmoid()

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_intermediates: bool = False,
        return_attention: bool = False,
    ) -> dict:
        """images [B, 3, H, W], mask [B, H, W] (None = no padding).

        return_intermediates adds "intermediates": backbone_feature [B, C, h, w], backbone_mask [B, h, w],
        pos_embed [B, D, h, w], input_proj [B, D, h, w], encoder_memory [B, hw, D] (batch-first), decoder_hs
        [L, B, Q, D] (after the final norm), reference_points [B, Q, 2] (Conditional DETR only).
        return_attention adds "cross_attention": {"spatial", "content", "combined"} [L, B, heads, Q, h, w]
        softmax maps of every decoder layer (see decoder.py for their definition per variant).
        """
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        feature, small_mask, pos = self.backbone(images, mask)  # [B, C, h, w], [B, h, w], [B, D, h, w]
        src = self.input_proj(feature)  # [B, D, h, w]
        out = self.transformer(src, small_mask, self.query_embed.weight, pos, return_attention)
        hs, ref_points = out["hs"], out["ref_points"]  # [L, B, Q, D], [B, Q, 2] | None
        logits = self.class_embed(hs)  # [L, B, Q, C]
        boxes = self.decode_boxes(hs, ref_points)  # [L, B, Q, 4]
        result = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        if return_intermediates:
            result["intermediates"] = {
                "backbone_feature": feature,
                "backbone_mask": small_mask,
                "pos_embed": pos,
                "input_proj": src,
                "encoder_memory": out["memory"],
                "decoder_hs": hs,
            }
            if ref_points is not None:
                result["intermediates"]["reference_points"] = ref_points
        if return_attention:
            result["cross_attention"] = out["cross_attention"]
        return result

"""`build_model`: one `match` on the variant, published argument names and defaults (COCO, ResNet-50)."""

from __future__ import annotations

from conddetr.models.backbone import BackboneWithPosition, ResNetBody
from conddetr.models.decoder import ConditionalDecoder, DETRDecoder
from conddetr.models.detector import Detector
from conddetr.models.position import build_position_embedding
from conddetr.models.transformer import Transformer

VARIANTS = ("conditional", "detr")
DEFAULT_NUM_QUERIES = {"conditional": 300, "detr": 100}


def build_model(
    variant: str,
    *,
    backbone: str = "resnet50",
    dilation: bool = False,
    hidden_dim: int = 256,
    nheads: int = 8,
    enc_layers: int = 6,
    dec_layers: int = 6,
    dim_feedforward: int = 2048,
    num_queries: int | None = None,
    num_classes: int = 91,
    dropout: float = 0.1,
    position_embedding: str = "sine",
    aux_loss: bool = True,
    lr_backbone: float = 1e-5,
    pretrained_backbone: str | None = None,
    backbone_norm: str = "frozen_bn",
    backbone_stage: int = 4,
    fused_backbone: bool = True,
) -> Detector:
    """Build Conditional DETR (`variant="conditional"`) or DETR (`"detr"`) with the published key layout.

    num_classes: Conditional DETR has that many sigmoid logits; DETR has num_classes + 1 softmax logits (the
    last is "no object"); the published COCO value is 91 for both. num_queries None = published 300 / 100.
    lr_backbone == 0 freezes the whole backbone (otherwise the stem and layer1 only). pretrained_backbone is a
    local torchvision ResNet file (never downloaded). backbone_norm "frozen_bn" is published; "batch_norm"
    (trainable; not loadable from released checkpoints) is for backbones trained from scratch. backbone_stage 4 is
    published; 2 or 3 (not published) take the features after layer2 / layer3 (stride 8 / 16) for small images.
    fused_backbone (not published; speed only) runs a frozen-BN trunk with each norm folded into its convolution
    and fused kernels (models/fast_trunk.py; same parameters and state dict, outputs equal to float rounding).
    hidden_dim must be even and divisible by nheads.
    """
    if hidden_dim % 2 or hidden_dim % nheads:
        raise ValueError(
            f"hidden_dim must be even and divisible by nheads, got hidden_dim={hidden_dim}, nheads={nheads}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    match variant:
        case "conditional":
            decoder = ConditionalDecoder(dec_layers, hidden_dim, nheads, dim_feedforward, dropout)
            num_logits = num_classes
        case "detr":
            decoder = DETRDecoder(dec_layers, hidden_dim, nheads, dim_feedforward, dropout)
            num_logits = num_classes + 1
        case _:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    body = ResNetBody(
        backbone, lr_backbone > 0, dilation, pretrained_path=pretrained_backbone, norm=backbone_norm,
        last_stage=backbone_stage, fused=fused_backbone,
    )  # fmt: skip
    joined = BackboneWithPosition(body, build_position_embedding(position_embedding, hidden_dim))
    transformer = Transformer(hidden_dim, nheads, enc_layers, dim_feedforward, dropout, decoder)
    queries = DEFAULT_NUM_QUERIES[variant] if num_queries is None else num_queries
    return Detector(joined, transformer, num_logits, queries, aux_loss, conditional=variant == "conditional")

"""ResNet backbone with frozen batch norm (optionally DC5) joined with the image position embedding.

State-dict layout as published: `backbone.0.body.<torchvision resnet names>` and `backbone.1.<position embedding>`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers (never trained, never updated).

    Detection batches are 1-2 images per GPU, too few for batch statistics. Buffers: weight, bias, running_mean,
    running_var; a `num_batches_tracked` entry in a loaded state dict (torchvision weights) is dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        shift = self.bias - self.running_mean * scale  # [C]
        return x * scale[None, :, None, None] + shift[None, :, None, None]


NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "batch_norm": nn.BatchNorm2d}


class ResNetBody(nn.Module):
    """torchvision ResNet trunk (stem + layer1..4, no pooling/fc) returning only the layer4 map.

    Stride 32, or 16 with `dilation` (DC5: layer4 dilated instead of strided; ResNet-50/101 only).
    `train_backbone=False` (lr_backbone == 0) freezes everything; otherwise the stem and layer1 stay frozen.
    `norm="frozen_bn"` is the published layer; `"batch_norm"` (trainable, running statistics updated) is not
    published: it is for backbones trained from scratch, whose identity-initialised frozen BN barely learns.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        dilation: bool,
        pretrained_path: str | None = None,
        norm: str = "frozen_bn",
    ):
        super().__init__()
        if norm not in NORM_LAYERS:
            raise ValueError(f"backbone norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_CHANNELS)}, got {name!r}")
        if dilation and RESNET_CHANNELS[name] == 512:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), got {name!r}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm]
        )
        if pretrained_path is not None:
            load_torchvision_weights(resnet, pretrained_path)
        trunk = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        self.body = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in trunk))
        self.num_channels = RESNET_CHANNELS[name]
        for pname, p in self.body.named_parameters():
            trainable = train_backbone and pname.startswith(("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], mask [B, H, W] True = padding -> feature [B, C, h, w], mask [B, h, w].

        The mask is downsampled by nearest interpolation (h = ceil(H / stride)); nearest sampling reads pixel
        (0, 0) for feature cell (0, 0), so every image keeps at least one valid cell whatever its size.
        """
        feature = self.body(images)  # [B, C, h, w]
        small_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]  # [B, h, w]
        return feature, small_mask


def load_torchvision_weights(resnet: nn.Module, path: str) -> None:
    """Load a local torchvision ImageNet ResNet file (the fc head is ignored); nothing is downloaded."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a matching torchvision ResNet file; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class BackboneWithPosition(nn.Sequential):
    """[0] = ResNetBody, [1] = position embedding (published `Joiner`, hence the numeric key names)."""

    def __init__(self, body: ResNetBody, position_embedding: nn.Module):
        super().__init__(body, position_embedding)
        self.num_channels = body.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> feature [B, C, h, w], mask [B, h, w], pos [B, D, h, w] (in the feature's dtype)."""
        feature, small_mask = self[0](images, mask)
        pos = self[1](feature, small_mask).to(feature.dtype)  # [B, D, h, w]
        return feature, small_mask, pos

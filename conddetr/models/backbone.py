"""ResNet backbone with frozen batch norm (optionally DC5) joined with the image position embedding.

State-dict layout as published: `backbone.0.body.<torchvision resnet names>` and `backbone.1.<position embedding>`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from conddetr.models.fast_trunk import FoldedWeights, trunk_forward

# Output channels of layer1..layer4 per ResNet: basic blocks (18/34) or bottlenecks (50/101).
STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
RESNET_CHANNELS = {name: channels[-1] for name, channels in STAGE_CHANNELS.items()}  # layer4: the published output


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
    """torchvision ResNet trunk (stem + layer1..4, no pooling/fc) returning only the last stage's map.

    Stride 32, or 16 with `dilation` (DC5: layer4 dilated instead of strided; ResNet-50/101 only).
    `train_backbone=False` (lr_backbone == 0) freezes everything; otherwise the stem and layer1 stay frozen.
    `norm="frozen_bn"` is the published layer; `"batch_norm"` (trainable, running statistics updated) is not
    published: it is for backbones trained from scratch, whose identity-initialised frozen BN barely learns.
    `last_stage` 4 is published; 2 (stride 8) or 3 (stride 16) stop the trunk early (not published): a finer
    feature map for small images, where layer4's stride 32 leaves only a few tokens.
    `fused` (frozen_bn only) runs the trunk through fast_trunk.py: same modules and numbers to float rounding.
    """

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        dilation: bool,
        pretrained_path: str | None = None,
        norm: str = "frozen_bn",
        last_stage: int = 4,
        fused: bool = True,
    ):
        super().__init__()
        if last_stage not in (2, 3, 4):
            raise ValueError(f"backbone last_stage must be 2, 3 or 4 (layer2..layer4), got {last_stage!r}")
        if dilation and last_stage != 4:
            raise ValueError(f"dilation (DC5) dilates layer4, but the trunk stops at layer{last_stage}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"backbone norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"backbone must be one of {sorted(RESNET_CHANNELS)}, got {name!r}")
        if dilation and RESNET_CHANNELS[name] == 512:
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), got {name!r}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm]
        )
        trunk = ("conv1", "bn1", "relu", "maxpool", *(f"layer{i}" for i in range(1, last_stage + 1)))
        self.body = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in trunk))
        if pretrained_path is not None:
            load_torchvision_weights(self.body, pretrained_path)
        # Frozen norms folded into their convolutions, fused kernels (fast_trunk.py); False: the plain modules.
        self.fast = fused and norm == "frozen_bn"
        self._folded = FoldedWeights()
        self.num_channels = STAGE_CHANNELS[name][last_stage - 1]
        self.stride = 2 ** (last_stage + 1) // (2 if dilation else 1)
        for pname, p in self.body.named_parameters():
            trainable = train_backbone and pname.startswith(("layer2", "layer3", "layer4"))
            p.requires_grad_(trainable)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], mask [B, H, W] True = padding -> feature [B, C, h, w], mask [B, h, w].

        The mask is downsampled by nearest interpolation (h = ceil(H / stride)); nearest sampling reads pixel
        (0, 0) for feature cell (0, 0), so every image keeps at least one valid cell whatever its size.
        """
        if self.fast:
            feature = trunk_forward(self.body, images, self._folded)  # [B, C, h, w] channels_last
        else:
            feature = self.body(images)  # [B, C, h, w]
        small_mask = F.interpolate(mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]  # [B, h, w]
        return feature, small_mask


def load_torchvision_weights(trunk: nn.Module, path: str) -> None:
    """Load a local torchvision ResNet file into `trunk` (torchvision names); nothing is downloaded.

    Entries of modules the trunk does not have (the fc head, stages after its last one) are ignored; every trunk
    tensor must come from the file.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a ResNet state dict, got {type(state).__name__}")
    kept = {n for n, _ in trunk.named_children()}
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in kept}
    try:
        missing, unexpected = trunk.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: another ResNet depth or width
        raise ValueError(f"{path}: not a matching torchvision ResNet file: {err}") from err
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

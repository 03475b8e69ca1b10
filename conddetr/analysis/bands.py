"""Per-head decoder cross-attention "bands" (the paper's Figure 1): extraction, an extremity score, and plots.

Maps come from the model's public `return_attention=True` output: {"spatial","content","combined"} [L,B,heads,Q,h,w].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("spatial", "content", "combined")
SIDES = ("left", "right", "top", "bottom")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation the data pipeline applies (DESIGN.md section 3)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def cross_attention(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> tuple[dict, dict]:
    """Run `model` in eval mode with `return_attention=True`; returns (outputs, {kind: [L,B,heads,Q,h,w]})."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(images, mask, return_attention=True)
    finally:
        model.train(was_training)
    attn = outputs.get("cross_attention")
    if not isinstance(attn, dict) or any(k not in attn for k in KINDS):
        raise KeyError(f"model output 'cross_attention' must be a dict with keys {KINDS}, got {type(attn).__name__}")
    for kind in KINDS:
        if attn[kind].dim() != 6:
            raise ValueError(f"cross_attention[{kind!r}] must be [L,B,heads,Q,h,w], got {tuple(attn[kind].shape)}")
    return outputs, attn


def query_scores(pred_logits: torch.Tensor, variant: str) -> torch.Tensor:
    """Best class probability per query [B,Q]: sigmoid for Conditional DETR, softmax without no-object for DETR."""
    match variant:
        case "conditional":
            return pred_logits.sigmoid().amax(-1)
        case "detr":
            return pred_logits.softmax(-1)[..., :-1].amax(-1)
        case _:
            raise ValueError(f"variant must be 'conditional' or 'detr', got {variant!r}")


def layer_boxes(outputs: dict, layer: int) -> torch.Tensor:
    """Predicted boxes [B,Q,4] (cxcywh, normalised) of decoder `layer` (negative counts from the last)."""
    per_layer = [aux["pred_boxes"] for aux in outputs.get("aux_outputs", [])] + [outputs["pred_boxes"]]
    if not -len(per_layer) <= layer < len(per_layer):
        raise IndexError(f"layer {layer} out of range: the model returned boxes for {len(per_layer)} decoder layers")
    return per_layer[layer]


def valid_size(mask: torch.Tensor) -> torch.Tensor:
    """Unpadded (h, w) in pixels per image [B,2] from the padding mask [B,H,W] (True = padding)."""
    valid = ~mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], dim=1)


def region_masks(box: torch.Tensor, h: int, w: int, margin: float = 0.25, valid=(1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Bool [h,w] masks of the box's four extremity bands, its centre and the outside, on an h x w feature grid.

    `box` is cxcywh normalised to the unpadded image, `valid` the unpadded fraction (fh, fw) of the padded grid.
    A band is within `margin` x box size (at least half a cell) of one edge; a cell in two bands (a corner) goes to
    the nearer edge, so the regions partition the grid.
    """
    fh, fw = float(valid[0]), float(valid[1])
    cx, cy, bw, bh = (float(v) for v in box)
    x0, x1, y0, y1 = (cx - bw / 2) * fw, (cx + bw / 2) * fw, (cy - bh / 2) * fh, (cy + bh / 2) * fh
    mx, my = max(margin * bw * fw, 0.5 / w), max(margin * bh * fh, 0.5 / h)
    v = ((torch.arange(h) + 0.5) / h)[:, None].expand(h, w)  # [h, w] cell centres, grid-normalised
    u = ((torch.arange(w) + 0.5) / w)[None, :].expand(h, w)
    in_rows, in_cols = (v >= y0 - my) & (v <= y1 + my), (u >= x0 - mx) & (u <= x1 + mx)
    dist = torch.stack([(u - x0).abs() / mx, (u - x1).abs() / mx, (v - y0).abs() / my, (v - y1).abs() / my])  # [4,h,w]
    member = (dist <= 1) & torch.stack([in_rows, in_rows, in_cols, in_cols])
    dist = dist.masked_fill(~member, float("inf"))
    side = dist.argmin(0)  # [h, w] nearest edge among the bands the cell belongs to
    ring = member.any(0)
    regions = {name: ring & (side == i) for i, name in enumerate(SIDES)}
    regions["centre"] = ~ring & (u > x0) & (u < x1) & (v > y0) & (v < y1)
    regions["outside"] = ~ring & ~regions["centre"]
    return regions


def edge_contrast(
    maps: torch.Tensor, box: torch.Tensor, strip: float = 0.1, valid=(1.0, 1.0), upsample: int = 8
) -> dict[str, torch.Tensor]:
    """Per box side: attention density in a thin strip along that side over the density in the whole box; [...] each.

    maps [..., h, w] are upsampled bilinearly (`upsample` x) so strips need not follow cell edges. A strip is centred on
    the side, spans the side's length, and is `strip` x the box size wide on each side of it (at least half a
    feature cell, so a coarse map still has cells in it); the box region is grown by the same half-width. A flat map
    scores exactly 1 on every side, a band hugging one side scores far above 1 there, a blob at the centre below 1.
    """
    h, w = maps.shape[-2:]
    lead = maps.shape[:-2]
    fine = F.interpolate(maps.reshape(-1, 1, h, w).float(), scale_factor=upsample, mode="bilinear", align_corners=False)
    fine = fine.reshape(*lead, h * upsample, w * upsample)  # [..., H, W]
    fh, fw = float(valid[0]), float(valid[1])
    cx, cy, bw, bh = (float(v) for v in box)
    x0, x1, y0, y1 = (cx - bw / 2) * fw, (cx + bw / 2) * fw, (cy - bh / 2) * fh, (cy + bh / 2) * fh
    mx, my = max(strip * bw * fw, 0.5 / w), max(strip * bh * fh, 0.5 / h)  # strip half-widths, grid-normalised
    big_h, big_w = fine.shape[-2:]
    v = ((torch.arange(big_h) + 0.5) / big_h)[:, None].expand(big_h, big_w)  # [H, W]
    u = ((torch.arange(big_w) + 0.5) / big_w)[None, :].expand(big_h, big_w)
    rows = (v >= y0 - my) & (v <= y1 + my)
    cols = (u >= x0 - mx) & (u <= x1 + mx)
    strips = {
        "left": rows & ((u - x0).abs() <= mx),
        "right": rows & ((u - x1).abs() <= mx),
        "top": cols & ((v - y0).abs() <= my),
        "bottom": cols & ((v - y1).abs() <= my),
    }

    def density(region: torch.Tensor) -> torch.Tensor:
        return (fine * region).sum((-2, -1)) / region.sum().clamp_min(1)

    tiny = torch.finfo(torch.float32).tiny
    inside = density(rows & cols).clamp_min(tiny)
    return {side: density(region) / inside for side, region in strips.items()}


def band_stats(
    maps: torch.Tensor, box: torch.Tensor, margin: float = 0.25, valid=(1.0, 1.0), strip: float = 0.1
) -> dict[str, torch.Tensor]:
    """Where the attention of maps [..., h, w] lies relative to one box; each value has shape [...].

    "band_score" is the largest `edge_contrast` over the four sides (a flat map scores 1; the paper's bands score
    well above it) and "contrast_<side>" the contrast of each side. Mass fractions per region (`region_masks`): the
    four sides, "extremity" (their sum), "centre", "outside"; "edge_share" = extremity / (extremity + centre) and
    "edge_share_flat", what a flat map has of it (close to 1 on coarse grids, which is why it is not the score).
    """
    h, w = maps.shape[-2:]
    tiny = torch.finfo(maps.dtype).tiny
    total = maps.sum((-2, -1)).clamp_min(tiny)  # [...]
    regions = region_masks(box, h, w, margin, valid)
    stats = {name: (maps * region.to(maps.dtype)).sum((-2, -1)) / total for name, region in regions.items()}
    stats["extremity"] = sum(stats[s] for s in SIDES)
    stats["edge_share"] = stats["extremity"] / (stats["extremity"] + stats["centre"]).clamp_min(tiny)
    band_cells = sum(int(regions[s].sum()) for s in SIDES)
    flat = band_cells / max(band_cells + int(regions["centre"].sum()), 1)
    stats["edge_share_flat"] = torch.full_like(stats["edge_share"], flat)
    contrast = edge_contrast(maps, box, strip, valid)
    stats.update({f"contrast_{side}": value.to(maps.dtype) for side, value in contrast.items()})
    stats["band_score"] = torch.stack([contrast[s] for s in SIDES]).amax(0).to(maps.dtype)
    return stats


@dataclass
class QueryAttention:
    """Per-head maps of one query at one decoder layer, with its predicted box and score."""

    maps: dict[str, torch.Tensor]  # kind -> [heads, h, w]
    box: torch.Tensor  # [4] cxcywh, normalised to the unpadded image
    query: int
    score: float
    layer: int
    valid_hw: tuple[int, int]  # unpadded image size, pixels
    valid_frac: tuple[float, float]  # unpadded fraction of the padded image (h, w)
    stats: dict[str, torch.Tensor]  # band_stats of the spatial maps, each [heads]


def query_attention(
    model, images, mask, variant: str, layer: int = -1, image_index: int = 0, query: int | None = None, margin=0.25
) -> QueryAttention:
    """Maps of `query` (default: the highest-scoring one) at decoder `layer` for image `image_index` of the batch."""
    outputs, attn = cross_attention(model, images, mask)
    return attention_of_query(outputs, attn, mask, variant, layer, image_index, query, margin)


def attention_of_query(
    outputs: dict, attn: dict, mask, variant: str, layer: int = -1, image_index: int = 0, query=None, margin=0.25
) -> QueryAttention:
    """`query_attention` from the results of one `cross_attention` call (several queries, one forward pass)."""
    num_layers = attn["spatial"].shape[0]
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"layer {layer} out of range for {num_layers} decoder layers")
    layer = layer % num_layers
    scores = query_scores(outputs["pred_logits"][image_index], variant)  # [Q]
    query = int(scores.argmax()) if query is None else query
    maps = {kind: attn[kind][layer, image_index, :, query].float() for kind in KINDS}  # [heads, h, w]
    box = layer_boxes(outputs, layer)[image_index, query].float()  # [4]
    vh, vw = (int(x) for x in valid_size(mask)[image_index])
    frac = (vh / mask.shape[-2], vw / mask.shape[-1])
    stats = band_stats(maps["spatial"], box, margin, frac)
    return QueryAttention(maps, box, query, float(scores[query]), layer, (vh, vw), frac, stats)


def denormalise(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[3,H,W] normalised -> [H,W,3] in [0,1] for display."""
    out = image.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return out.clamp(0, 1).permute(1, 2, 0)


def plot_bands(image: torch.Tensor, qa: QueryAttention, heads: list[int] | None = None, title: str | None = None):
    """Figure 1 style grid: rows {spatial, content, combined}, one column per head, maps over the unpadded image."""
    from matplotlib.figure import Figure  # object API only: never touches pyplot's global backend
    from matplotlib.patches import Rectangle

    heads = list(range(qa.maps["spatial"].shape[0])) if heads is None else heads
    vh, vw = qa.valid_hw
    rgb = denormalise(image)[:vh, :vw].numpy()  # [vh, vw, 3]
    cx, cy, bw, bh = qa.box.tolist()
    fig = Figure(figsize=(1.8 * len(heads) + 0.6, 1.9 * len(KINDS) + 0.5), layout="constrained")
    axes = fig.subplots(len(KINDS), len(heads), squeeze=False)
    for row, kind in enumerate(KINDS):
        # Maps span the padded image: upsample to it, then crop the padding away.
        up = F.interpolate(qa.maps[kind][None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
        for col, head in enumerate(heads):
            ax = axes[row, col]
            ax.imshow(rgb)
            ax.imshow(up[head, :vh, :vw].cpu().numpy(), cmap="jet", alpha=0.5)
            ax.add_patch(Rectangle(((cx - bw / 2) * vw, (cy - bh / 2) * vh), bw * vw, bh * vh, fill=False, ec="w"))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                contrast = {s: float(qa.stats[f"contrast_{s}"][head]) for s in SIDES}
                side = max(contrast, key=contrast.get)
                ax.set_title(f"head {head}\nband {contrast[side]:.1f} ({side})", fontsize=8)
            if col == 0:
                ax.set_ylabel(kind)
    fig.suptitle(title or f"decoder layer {qa.layer}, query {qa.query} (score {qa.score:.2f})")
    return fig


def load_model_and_val_data(checkpoint, spec=None, overrides=(), seed: int = 0):
    """(model, val dataset, variant, description) for attention plots.

    `checkpoint`: a conddetr run checkpoint (its own config and synthetic data), a released one (`args` inside; the
    data come from `spec`), or a missing path: a randomly initialised model of `spec` (the mechanics only).
    """
    from pathlib import Path

    from conddetr.config import config_from_dict, load_config
    from conddetr.data import build_datasets
    from conddetr.engine.setup import model_kwargs_from_config
    from conddetr.models import build_model
    from conddetr.models.published import load_checkpoint_file, load_published_state_dict, model_kwargs_from_args

    path = Path(checkpoint)
    if not path.is_file():
        cfg = load_config(spec, list(overrides))
        _, val_ds, info = build_datasets(cfg.data, num_classes=cfg.model.num_classes)
        torch.manual_seed(seed)
        num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else info.num_classes
        kwargs = {"variant": cfg.model.variant, **model_kwargs_from_config(cfg, num_classes)}
        return build_model(**kwargs), val_ds, kwargs["variant"], "randomly initialised"
    ckpt = load_checkpoint_file(path)  # weights_only: plain data (argparse.Namespace allowed)
    if "model_kwargs" in ckpt:  # a conddetr run: its own model and data
        kwargs = dict(ckpt["model_kwargs"])
        cfg = config_from_dict(ckpt["config"], list(overrides), source=f"{path} 'config'")
    elif "args" in ckpt:  # a released checkpoint: model from its args, images from `spec`'s data
        kwargs = model_kwargs_from_args(ckpt["args"])
        cfg = load_config(spec, list(overrides))
    else:
        raise KeyError(f"{path}: neither 'model_kwargs' (a conddetr run) nor 'args' (a released checkpoint)")
    _, val_ds, _ = build_datasets(cfg.data)
    model = build_model(**kwargs)
    load_published_state_dict(model, ckpt)
    epochs = f"{ckpt['epoch'] + 1} epochs trained" if "epoch" in ckpt else "epochs unknown"
    return model, val_ds, kwargs["variant"], f"loaded {path} ({epochs})"


@dataclass
class AttentionReport:
    """Figure of one image's most confident query, and band scores of the top query of `images` val images."""

    figure: object  # matplotlib Figure (plot_bands)
    scores: dict[str, torch.Tensor]  # kind -> [images, heads] band_score of that kind's maps
    near_box: torch.Tensor  # [images, heads] spatial attention mass within the box grown by 25 % per side
    variant: str

    @property
    def summary(self) -> str:
        per_head = self.scores["spatial"].median(0).values  # [heads]
        banded = int((per_head >= BANDED).sum())
        med = {kind: float(v.median()) for kind, v in self.scores.items()}
        return (
            f"spatial maps: {banded}/{len(per_head)} heads banded (median band score >= {BANDED}; a flat map scores "
            f"1.00), per head {[round(float(x), 2) for x in per_head]}; {100 * float(self.near_box.median()):.0f} % "
            f"of their mass near the box; band score medians over {self.scores['spatial'].shape[0]} val images: "
            f"spatial {med['spatial']:.2f}, content {med['content']:.2f}, combined {med['combined']:.2f}"
        )


BANDED = 1.5  # a head whose median band score reaches this concentrates on one box side (flat = 1)


def attention_report(checkpoint, images: int = 16, layer: int = -1, spec=None, overrides=()) -> AttentionReport:
    """Band scores of every head for the most confident query of the first `images` val images, and the Figure 1
    plot of the first one (the demo and the notebook print / save these)."""
    from conddetr.data import collate

    model, val_ds, variant, _ = load_model_and_val_data(checkpoint, spec, overrides)
    scores: dict[str, list[torch.Tensor]] = {kind: [] for kind in KINDS}
    near: list[torch.Tensor] = []
    figure = None
    for index in range(min(images, len(val_ds))):
        batch_images, mask, _ = collate([val_ds[index]])
        qa = query_attention(model, batch_images, mask, variant, layer=layer)
        for kind in KINDS:
            scores[kind].append(band_stats(qa.maps[kind], qa.box, valid=qa.valid_frac)["band_score"])
        near.append(1 - qa.stats["outside"])
        if figure is None:
            figure = plot_bands(batch_images[0], qa)
    stacked = {kind: torch.stack(v) for kind, v in scores.items()}
    return AttentionReport(figure, stacked, torch.stack(near), variant)

"""Forward behaviour: any even hidden size, bf16 autocast, mixed/odd image sizes, position embeddings, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conddetr.models import build_model
from conddetr.models.position import PositionEmbeddingSine, build_position_embedding, sine_embed_points

TINY = {
    "backbone": "resnet18",
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 32,
    "num_queries": 6,
    "num_classes": 4,
}


def _tiny(variant, **overrides):
    torch.manual_seed(0)
    return build_model(variant, **{**TINY, "hidden_dim": 32, "nheads": 4, **overrides})


def _batch(sizes=((70, 90), (45, 61))):
    """Images padded to a common size (not multiples of 32) and the padding mask."""
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=gen)
        mask[i, :hi, :wi] = False
    return images, mask


@pytest.mark.parametrize("variant", ["conditional", "detr"])
@pytest.mark.parametrize(("hidden_dim", "nheads"), [(32, 8), (48, 8), (64, 8), (36, 4), (34, 2)])
def test_forward_at_any_even_hidden_size(variant, hidden_dim, nheads):
    # 36 -> 18 and 34 -> 17 sine features per axis: the published code only ran at 256.
    model = _tiny(variant, hidden_dim=hidden_dim, nheads=nheads).eval()
    images, mask = _batch()
    with torch.no_grad():
        out = model(images, mask)
    logits = 4 if variant == "conditional" else 5
    assert out["pred_logits"].shape == (2, 6, logits)
    assert out["pred_boxes"].shape == (2, 6, 4)
    assert len(out["aux_outputs"]) == 1
    assert torch.isfinite(out["pred_logits"]).all()
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


@pytest.mark.parametrize("variant", ["conditional", "detr"])
def test_bf16_autocast_forward(variant):
    # bf16 convolutions are slow on CPUs without AVX512-BF16 (a reference path): keep the images tiny.
    model = _tiny(variant).eval()
    images, mask = _batch(((40, 50), (33, 21)))
    with torch.no_grad():
        reference = model(images, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, mask, return_attention=True)
    # bf16 keeps ~3 significant digits; boxes are in [0, 1].
    assert_close(out["pred_boxes"].float(), reference["pred_boxes"], atol=0.05, rtol=0)
    assert_close(out["cross_attention"]["combined"].sum(dim=(-2, -1)), torch.ones(2, 2, 4, 6), atol=1e-2, rtol=0)


def test_bf16_autocast_backward():
    model = _tiny("conditional").train()
    images, mask = _batch(((40, 50), (33, 21)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
    (out["pred_logits"].float().sigmoid().sum() + out["pred_boxes"].float().sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) == sum(p.requires_grad for p in model.parameters())
    assert all(torch.isfinite(g).all() for g in grads)


def test_mask_none_means_no_padding_and_padding_fills_mask():
    model = _tiny("conditional").eval()
    images = torch.randn(1, 3, 77, 53)
    with torch.no_grad():
        a = model(images, return_intermediates=True)
        b = model(images, torch.zeros(1, 77, 53, dtype=torch.bool))
    assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    assert a["intermediates"]["backbone_mask"].shape == (1, 3, 2)  # ceil(77/32), ceil(53/32)
    images, mask = _batch()
    with torch.no_grad():
        small = model(images, mask, return_intermediates=True)["intermediates"]["backbone_mask"]
    expected = torch.nn.functional.interpolate(mask[None].float(), size=small.shape[-2:])[0].bool()
    assert torch.equal(small, expected)
    assert (~small).flatten(1).any(dim=1).all()  # every image keeps valid cells


def test_sine_embedding_of_valid_pixels_ignores_padding():
    embed = PositionEmbeddingSine(8)
    mask_alone = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask_padded = torch.ones(1, 5, 7, dtype=torch.bool)
    mask_padded[:, :3, :4] = False
    alone = embed(torch.zeros(1, 1, 3, 4), mask_alone)
    padded = embed(torch.zeros(1, 1, 5, 7), mask_padded)
    assert_close(padded[..., :3, :4], alone, atol=1e-6, rtol=0)


def _published_point_embedding(points, num_feats):
    """The published formula (sin/cos stacked then flattened), valid for an even num_feats."""
    dim_t = 10000 ** (2 * (torch.arange(num_feats, dtype=torch.float32) // 2) / num_feats)
    x, y = points[..., 0:1] * 2 * math.pi / dim_t, points[..., 1:2] * 2 * math.pi / dim_t
    pos_x = torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((y[..., 0::2].sin(), y[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos_y, pos_x), dim=-1)


@pytest.mark.parametrize("num_feats", [128, 32, 24])
def test_point_sine_embedding_matches_published_formula(num_feats):
    points = torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(0))
    assert_close(sine_embed_points(points, num_feats), _published_point_embedding(points, num_feats))


def test_point_sine_embedding_odd_feature_count_extends_the_even_one():
    points = torch.rand(3, 2, generator=torch.Generator().manual_seed(0))
    odd, even = sine_embed_points(points, 17), _published_point_embedding(points, 18)
    dim_t = 10000 ** (2 * (torch.arange(17) // 2) / 17)
    assert odd.shape == (3, 34)
    assert_close(odd[:, :17:2], (points[:, 1:2] * 2 * math.pi / dim_t[0::2]).sin())  # y part, sin terms
    assert even.shape == (3, 36)


def test_learned_position_embedding_and_its_size_limit():
    model = _tiny("detr", position_embedding="learned").eval()
    assert {k for k in model.state_dict() if k.startswith("backbone.1.")} == {
        "backbone.1.row_embed.weight",
        "backbone.1.col_embed.weight",
    }
    images, mask = _batch()
    with torch.no_grad():
        pos = model(images, mask, return_intermediates=True)["intermediates"]["pos_embed"]  # [B, D, h, w]
    table = model.backbone[1]
    assert_close(pos[0, :16, 1, 2], table.col_embed.weight[2])  # x first, then y (published layout)
    assert_close(pos[0, 16:, 1, 2], table.row_embed.weight[1])
    with pytest.raises(ValueError, match="up to 50x50"):
        build_position_embedding("learned", 32)(torch.zeros(1, 1, 51, 3), torch.zeros(1, 51, 3, dtype=torch.bool))


def test_published_init_conditional_boxes_start_at_reference_points():
    model = _tiny("conditional").eval()
    assert_close(model.class_embed.bias, torch.full((4,), -math.log(99.0)))
    images, mask = _batch()
    with torch.no_grad():
        out = model(images, mask, return_intermediates=True)
    ref = out["intermediates"]["reference_points"]  # [B, Q, 2]
    assert_close(out["pred_boxes"][..., :2], ref, atol=1e-6, rtol=1e-5)  # zero offsets in logit space
    assert_close(out["pred_boxes"][..., 2:], torch.full((2, 6, 2), 0.5))
    detr = _tiny("detr")
    assert detr.bbox_embed.layers[-1].weight.abs().sum() > 0  # DETR keeps the default init


def test_train_step_reaches_every_trainable_parameter():
    model = _tiny("conditional", dropout=0.1).train()
    images, mask = _batch()
    out = model(images, mask)
    loss = out["pred_logits"].sigmoid().sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sigmoid().sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    loss.backward()
    no_grad = {
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    }
    # Exactly the expected dead ends at init: layer 0's self-attention weights multiply the all-zero content
    # input, and the box MLP's hidden layers sit behind its zero-initialised last layer.
    assert no_grad == {
        "transformer.decoder.layers.0.sa_qcontent_proj.weight",
        "transformer.decoder.layers.0.sa_kcontent_proj.weight",
        "transformer.decoder.layers.0.sa_v_proj.weight",
        "bbox_embed.layers.0.weight",
        "bbox_embed.layers.0.bias",
        "bbox_embed.layers.1.weight",
        "bbox_embed.layers.1.bias",
    }

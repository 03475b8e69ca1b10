"""Attention kernels agree; the per-head cross-attention maps are well formed and are the attention actually used."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conddetr.attention import attend, split_heads
from conddetr.models import build_model

KERNELS = ("matmul", "sdpa", "sdpa_padded")


@pytest.mark.parametrize(("d_qk", "d_v"), [(64, 32), (32, 32)])
def test_kernels_give_equal_outputs_and_gradients(d_qk, d_v):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, d, generator=gen) for n, d in ((5, d_qk), (11, d_qk), (11, d_v)))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    results = {}
    for kernel in KERNELS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, num_heads=4, key_padding_mask=mask, kernel=kernel)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results[kernel] = (out.detach(), *(t.grad for t in leaves))
    for kernel in KERNELS[1:]:
        for ours, ref in zip(results[kernel], results["matmul"], strict=True):
            assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    # Padded keys get no weight: changing their values changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[1, 7:], v2[1, 7:] = 100.0, -100.0
    assert_close(attend(q, k2, v2, 4, mask), results["matmul"][0], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module", params=["conditional", "detr"])
def model_and_batch(request):
    torch.manual_seed(0)
    model = build_model(
        request.param,
        backbone="resnet18",
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=2,
        dim_feedforward=32,
        num_queries=7,
        num_classes=5,
        dropout=0.0,
    ).eval()
    images = torch.randn(2, 3, 96, 130)
    mask = torch.zeros(2, 96, 130, dtype=torch.bool)
    mask[1, 64:, :] = True  # second image 64x100, padded at the bottom and right
    mask[1, :, 100:] = True
    return request.param, model, images, mask


def _capture_cross_attention_inputs(model):
    """Forward hooks on each decoder layer's public cross-attention `out_proj`: its input is the attention output."""
    captured, handles = [], []
    for layer in model.transformer.decoder.layers:
        attn = layer.cross_attn if hasattr(layer, "cross_attn") else layer.multihead_attn
        handles.append(attn.out_proj.register_forward_hook(lambda mod, args, out: captured.append(args[0])))
    return captured, handles


def test_maps_shapes_normalised_and_zero_on_padding(model_and_batch):
    variant, model, images, mask = model_and_batch
    with torch.no_grad():
        out = model(images, mask, return_intermediates=True, return_attention=True)
    maps = out["cross_attention"]
    h, w = out["intermediates"]["backbone_mask"].shape[-2:]
    assert set(maps) == {"spatial", "content", "combined"}
    for m in maps.values():
        assert m.shape == (2, 2, 4, 7, h, w)  # [L, B, heads, Q, h, w]
        assert_close(m.sum(dim=(-2, -1)), torch.ones(2, 2, 4, 7))
        padded = out["intermediates"]["backbone_mask"][None, :, None, None].expand_as(m)
        assert torch.all(m[padded] == 0)


def test_combined_map_is_the_attention_used(model_and_batch):
    variant, model, images, mask = model_and_batch
    captured, handles = _capture_cross_attention_inputs(model)
    try:
        with torch.no_grad():
            plain = model(images, mask, return_intermediates=True)  # fast kernel path
            captured.clear()
            with_maps = model(images, mask, return_intermediates=True, return_attention=True)
    finally:
        for handle in handles:
            handle.remove()
    # Asking for maps must not change the predictions.
    assert_close(with_maps["pred_logits"], plain["pred_logits"], atol=1e-5, rtol=1e-5)
    assert_close(with_maps["pred_boxes"], plain["pred_boxes"], atol=1e-5, rtol=1e-5)
    memory = with_maps["intermediates"]["encoder_memory"]  # [B, HW, D]
    for i, layer in enumerate(model.transformer.decoder.layers):
        v = layer.ca_v_proj(memory) if variant == "conditional" else layer.multihead_attn.project(memory, 2)
        combined = with_maps["cross_attention"]["combined"][i].flatten(-2)  # [B, heads, Q, HW]
        recomputed = (combined @ split_heads(v, 4)).transpose(1, 2).flatten(2)  # [B, Q, D]
        assert_close(recomputed, captured[i], atol=1e-5, rtol=1e-5)


def test_conditional_combined_is_product_of_content_and_spatial(model_and_batch):
    """softmax(c + p) is proportional to softmax(c) * softmax(p): the paper's content/spatial decomposition."""
    variant, model, images, mask = model_and_batch
    with torch.no_grad():
        maps = model(images, mask, return_attention=True)["cross_attention"]
    product = maps["content"] * maps["spatial"]
    normalised = product / product.sum(dim=(-2, -1), keepdim=True)
    if variant == "conditional":
        assert_close(normalised, maps["combined"], atol=1e-5, rtol=1e-4)
    else:  # DETR's combined logits also hold content x position cross terms
        assert (normalised - maps["combined"]).abs().max() > 1e-3

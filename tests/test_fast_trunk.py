"""Fused backbone (models/fast_trunk.py): same outputs and gradients as the plain modules, same state dict, frozen
stages from cached folded weights, the cache refreshed when weights change; the cached sine embedding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from conddetr.models import build_model
from conddetr.models.backbone import FrozenBatchNorm2d, ResNetBody
from conddetr.models.position import PositionEmbeddingSine


def _body(name="resnet18", train=True, seed=0, **kwargs) -> ResNetBody:
    torch.manual_seed(seed)
    body = ResNetBody(name, train, **{"dilation": False, **kwargs})
    for m in body.modules():  # non-trivial frozen statistics, so folding really changes the weights
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return body


def _run(body, images, mask, dtype=torch.float32):
    """Feature and the gradients of a fixed weighting of it, in `dtype` (float64: the reference)."""
    body = copy.deepcopy(body).to(dtype)
    feature, small_mask = body(images.to(dtype), mask)
    (feature * torch.linspace(-1, 1, feature.numel(), dtype=dtype).view_as(feature)).sum().backward()
    grads = {n: p.grad for n, p in body.named_parameters() if p.grad is not None}
    return feature.detach(), small_mask, grads


def _max_rel(a: dict, ref: dict) -> float:
    return max(((a[n].double() - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)


def _pair(name, **kwargs):
    fused = _body(name, **kwargs)
    plain = copy.deepcopy(fused)
    plain.fast = False
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 32, 64, dtype=torch.bool)
    mask[1, :, 48:] = True
    return fused, plain, images, mask


@pytest.mark.parametrize("name,kwargs", [("resnet18", {"last_stage": 3}), ("resnet50", {"last_stage": 2})])
def test_fused_trunk_matches_plain_outputs_and_gradients(name, kwargs):
    fused, plain, images, mask = _pair(name, **kwargs)
    assert fused.fast
    out_f, mask_f, grads_f = _run(fused, images, mask)
    out_p, mask_p, grads_p = _run(plain, images, mask)
    _, _, grads_64 = _run(plain, images, mask, torch.float64)
    scale = out_p.abs().max()
    assert_close(out_f / scale, out_p / scale, atol=1e-5, rtol=0)
    assert torch.equal(mask_f, mask_p)
    assert set(grads_f) == set(grads_p) == set(grads_64)
    assert all(n.startswith(("body.layer2", "body.layer3", "body.layer4")) for n in grads_f)
    # Float32 gradients of a deep ReLU net move by ~1e-3 of their scale whatever the kernel order; the fused
    # ones must be as close to the float64 truth as the plain ones.
    assert _max_rel(grads_f, grads_64) <= 1.5 * _max_rel(grads_p, grads_64) + 1e-6


def test_fused_trunk_matches_plain_dc5_bottlenecks():
    fused, plain, images, mask = _pair("resnet50", dilation=True)
    with torch.no_grad():
        out_f, out_p = fused(images, mask)[0], plain(images, mask)[0]
    scale = out_p.abs().max()
    assert_close(out_f / scale, out_p / scale, atol=1e-5, rtol=0)


def test_fused_trunk_keeps_the_state_dict_and_follows_loaded_weights():
    fused, plain = build_model("conditional", backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1,
                               dec_layers=1, dim_feedforward=32, num_queries=5, num_classes=3), None  # fmt: skip
    torch.manual_seed(0)
    plain = build_model("conditional", backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                        dim_feedforward=32, num_queries=5, num_classes=3, fused_backbone=False)  # fmt: skip
    assert fused.backbone[0].fast and not plain.backbone[0].fast
    assert list(fused.state_dict()) == list(plain.state_dict())
    images = torch.randn(1, 3, 64, 64)
    fused.eval()
    plain.eval()
    for seed in (1, 2):  # the second load must refresh the cached folded weights of the frozen stages
        other = _body(seed=seed)
        state = {f"backbone.0.{k}": v for k, v in other.state_dict().items()}
        fused.load_state_dict(state, strict=False)
        plain.load_state_dict(state, strict=False)
        with torch.no_grad():
            expected = plain.backbone(images, torch.zeros(1, 64, 64, dtype=torch.bool))[0]
            got = fused.backbone(images, torch.zeros(1, 64, 64, dtype=torch.bool))[0]
        assert_close(got / expected.abs().max(), expected / expected.abs().max(), atol=1e-5, rtol=0)


def test_frozen_stages_run_from_cached_folded_weights():
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    trainable = _body(train=True)
    trainable(images, mask)[0].sum().backward()
    convs = {id(m): n for n, m in trainable.named_modules() if isinstance(m, torch.nn.Conv2d)}
    cached = {convs[i] for i in trainable._folded._entries}
    assert cached == {n for n in convs.values() if n.startswith(("body.conv1", "body.layer1"))}
    frozen = _body(train=False)  # lr_backbone = 0: every stage frozen, no autograd anywhere in the trunk
    feature, _ = frozen(images, mask)
    assert not feature.requires_grad and len(frozen._folded._entries) == len(convs)


def test_fused_trunk_under_bf16_autocast():
    fused = _body(train=True)
    plain = copy.deepcopy(fused)
    plain.fast = False
    images, mask = torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fused(images, mask)[0], plain(images, mask)[0]
    assert got.dtype == torch.bfloat16  # the plain trunk's frozen norms return float32, the fused convs bf16
    assert_close(got.float(), expected.float(), atol=0.05 * expected.float().abs().max().item(), rtol=0)


def test_sine_embedding_is_cached_per_mask():
    embed = PositionEmbeddingSine(16)
    feature = torch.zeros(2, 4, 6, 8)
    masks = [torch.zeros(2, 6, 8, dtype=torch.bool) for _ in range(3)]
    masks[1][1, :, 5:] = True
    masks[2][0, 4:, :] = True
    first = [embed(feature, m) for m in masks]
    assert embed(feature, masks[1].clone()) is first[1]  # equal masks hit the cache
    for m, pos in zip(masks, first, strict=True):
        assert_close(pos, embed._embed(m), atol=0, rtol=0)
    for i in range(embed.cache_size + 2):  # bounded
        m = torch.zeros(2, 6, 8, dtype=torch.bool)
        m[0, :, 7 - i % 8 :] = True
        m[1, 5 - i % 6 :, :] = True
        embed(feature, m)
    assert len(embed._cache) <= embed.cache_size


def test_training_convolutions_save_the_parameter_not_a_folded_copy():
    body = _body("resnet50", train=True, last_stage=2)
    images, mask = torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
    params = {p.data_ptr() for p in body.parameters()}
    weight_shapes = {tuple(m.weight.shape) for m in body.modules() if isinstance(m, torch.nn.Conv2d)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        feature, _ = body(images, mask)
    weights = [t for t in saved if tuple(t.shape) in weight_shapes]
    assert weights and all(t.data_ptr() in params for t in weights)
    feature.sum().backward()  # and the gradients still reach the parameters
    assert all(p.grad is not None for n, p in body.named_parameters() if n.startswith("body.layer2"))


def test_training_drops_the_folded_copies_an_evaluation_cached():
    body = _body(train=True)
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        body(images, mask)  # evaluation: every stage frozen, all cached
    convs = {id(m): n for n, m in body.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(body._folded._entries) == len(convs)
    body(images, mask)[0].sum().backward()
    assert {convs[i] for i in body._folded._entries} == {
        n for n in convs.values() if n.startswith(("body.conv1", "body.layer1"))
    }


def test_training_after_an_inference_mode_evaluation():
    """Nothing made under torch.inference_mode is cached for later training (the sine embedding cache)."""
    model = build_model("conditional", backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                        dim_feedforward=32, num_queries=5, num_classes=3)  # fmt: skip
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    model.eval()
    with torch.inference_mode():
        expected = model(images, mask)["pred_logits"]
    model.train()
    model(images, mask)["pred_logits"].sum().backward()  # raised: inference tensors cannot be saved for backward
    model.eval()
    with torch.no_grad():
        assert_close(model(images, mask)["pred_logits"], expected, rtol=0, atol=0)

"""Parity with the published DETR / Conditional DETR: outputs, intermediates, post-processing, losses, gradients.

Weights come from tests/fixtures/weights.py in the published key layout and go through the released-checkpoint
path (a `{"model": sd}` file read by `load_published_state_dict`).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conddetr.models import build_criterion, build_model, build_postprocessor
from conddetr.models.published import load_published_state_dict

PARITY = {
    "parity_conddetr_small": "conditional",
    "parity_conddetr_small_h256": "conditional",
    "parity_detr_small": "detr",
}


@pytest.fixture(scope="module", params=list(PARITY))
def parity(request, load_fixture, make_state_dict, tmp_path_factory):
    """(variant, fixture, model with the fixture's weights loaded from a released-style checkpoint file)."""
    name, variant = request.param, PARITY[request.param]
    fx = load_fixture(name)
    model = build_model(variant, lr_backbone=fx["extra_settings"]["lr_backbone"], **fx["settings"])
    path = tmp_path_factory.mktemp(name) / "released.pth"
    torch.save({"model": make_state_dict(fx["state_dict_keys"], fx["weight_seed"])}, path)
    load_published_state_dict(model, path)
    return variant, fx, model


def _eval_forward(model, fx):
    model.eval()
    with torch.no_grad():
        return model(fx["samples_tensor"], fx["samples_mask"], return_intermediates=True)


def test_eval_outputs_and_intermediates(parity):
    variant, fx, model = parity
    out = _eval_forward(model, fx)
    ref = fx["outputs_eval"]
    assert_close(out["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=0)
    assert_close(out["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=0)
    assert len(out["aux_outputs"]) == len(ref["aux_outputs"]) == fx["settings"]["dec_layers"] - 1
    for ours, theirs in zip(out["aux_outputs"], ref["aux_outputs"], strict=True):
        assert_close(ours["pred_logits"], theirs["pred_logits"], atol=1e-5, rtol=0)
        assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-5, rtol=0)

    inter, ref_inter = out["intermediates"], fx["intermediates_eval"]
    assert set(inter) == set(ref_inter)
    assert ("reference_points" in inter) == (variant == "conditional")
    # Backbone activations reach |x| ~ 17; conv kernels (oneDNN or not, thread count) round differently by
    # ~1e-6 of that scale, so these two are compared at 1e-5 of the tensor's largest magnitude.
    for key in ("backbone_feature", "input_proj"):
        scale = ref_inter[key].abs().max()
        assert_close(inter[key] / scale, ref_inter[key] / scale, atol=1e-5, rtol=0)
    assert torch.equal(inter["backbone_mask"], ref_inter["backbone_mask"])
    assert_close(inter["pos_embed"], ref_inter["pos_embed"], atol=1e-5, rtol=0)
    # Ours is batch-first [B, HW, D]; the published memory is [HW, B, D].
    assert_close(inter["encoder_memory"], ref_inter["encoder_memory"].transpose(0, 1), atol=1e-5, rtol=0)
    assert_close(inter["decoder_hs"], ref_inter["decoder_hs"], atol=1e-5, rtol=0)
    if variant == "conditional":
        assert_close(inter["reference_points"], ref_inter["reference_points"], atol=1e-5, rtol=0)


def test_postprocess_matches_published(parity):
    variant, fx, model = parity
    out = _eval_forward(model, fx)
    results = build_postprocessor(variant)(out, fx["postprocess_target_sizes"])
    assert len(results) == len(fx["postprocess_results"])
    for ours, theirs in zip(results, fx["postprocess_results"], strict=True):
        assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
        assert torch.equal(ours["labels"], theirs["labels"])
        assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=1e-5)  # pixels, images up to 640


def _criterion(variant, fx):
    extra = fx["extra_settings"]
    return build_criterion(
        variant,
        num_classes=fx["settings"]["num_classes"],
        set_cost_class=extra["set_cost_class"],
        set_cost_bbox=extra["set_cost_bbox"],
        set_cost_giou=extra["set_cost_giou"],
        cls_loss_coef=extra.get("cls_loss_coef", 1.0),
        bbox_loss_coef=extra["bbox_loss_coef"],
        giou_loss_coef=extra["giou_loss_coef"],
        focal_alpha=extra.get("focal_alpha", 0.25),
        eos_coef=extra.get("eos_coef", 0.1),
        aux_loss=fx["settings"]["aux_loss"],
        dec_layers=fx["settings"]["dec_layers"],
    )


def test_train_losses_and_gradient_norms(parity):
    variant, fx, model = parity
    criterion = _criterion(variant, fx)
    model.train()  # dropout is 0 in the fixtures, so train mode is deterministic
    model.zero_grad(set_to_none=True)
    outputs = model(fx["samples_tensor"], fx["samples_mask"])
    loss_dict = criterion(outputs, fx["targets"])
    assert set(loss_dict) == set(fx["loss_dict"])
    keys = sorted(fx["loss_dict"])
    assert_close(
        torch.stack([loss_dict[k].detach() for k in keys]),
        torch.stack([fx["loss_dict"][k] for k in keys]),
        atol=1e-5,
        rtol=1e-5,
    )

    assert criterion.weight_dict == fx["weight_dict"]
    total = sum(loss_dict[k] * w for k, w in criterion.weight_dict.items())
    assert_close(total.detach(), fx["loss_total_weighted"], atol=1e-5, rtol=1e-5)
    total.backward()
    ours = {n: p.grad.norm() for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours) == set(fx["grad_norms"])
    names = sorted(ours)
    # Gradient norms reach ~20: compare with a relative tolerance as well.
    assert_close(
        torch.stack([ours[n] for n in names]),
        torch.tensor([float(fx["grad_norms"][n]) for n in names]),
        atol=1e-5,
        rtol=1e-5,
    )
    model.zero_grad(set_to_none=True)

"""Released-checkpoint handling: safe loading of training checkpoints, mismatch diagnoses, export, published args."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch.testing import assert_close

from conddetr.models import build_model
from conddetr.models.published import (
    export_published_state_dict,
    load_checkpoint_file,
    load_published_state_dict,
    model_kwargs_from_args,
)

SMALL = {
    "backbone": "resnet18",
    "hidden_dim": 32,
    "nheads": 4,
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 32,
    "num_queries": 7,
    "num_classes": 5,
    "dropout": 0.0,
}


def _small(variant="conditional", **overrides):
    torch.manual_seed(0)
    return build_model(variant, **{**SMALL, **overrides})


def _published_args(**overrides) -> argparse.Namespace:
    """A Conditional DETR main.py-style args namespace (subset, published names)."""
    args = {
        "lr": 1e-4,
        "lr_backbone": 1e-5,
        "backbone": "resnet18",
        "dilation": False,
        "position_embedding": "sine",
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 32,
        "hidden_dim": 32,
        "dropout": 0.0,
        "nheads": 4,
        "num_queries": 7,
        "pre_norm": False,
        "masks": False,
        "aux_loss": True,
        "focal_alpha": 0.25,
        "cls_loss_coef": 2,
        "dataset_file": "coco",
        "num_classes": 5,
        "output_dir": "out",
        "seed": 42,
    }
    return argparse.Namespace(**{**args, **overrides})


def test_training_checkpoint_with_namespace_loads_safely(tmp_path):
    model = _small()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(torch.randn(1, 3, 64, 64))["pred_logits"].sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    path = tmp_path / "checkpoint0049.pth"
    torch.save(
        {
            "model": export_published_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 49,
            "args": _published_args(),
        },
        path,
    )

    ckpt = load_checkpoint_file(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["epoch"] == 49
    rebuilt = build_model(**model_kwargs_from_args(ckpt["args"]))
    load_published_state_dict(rebuilt, path)
    for (k, ours), (k2, theirs) in zip(rebuilt.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2
        assert torch.equal(ours, theirs)
    images = torch.randn(2, 3, 64, 80)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert_close(rebuilt(images)["pred_boxes"], model(images)["pred_boxes"], rtol=0, atol=0)


def test_bare_state_dict_file_is_accepted(tmp_path):
    model = _small("detr")
    path = tmp_path / "bare.pth"
    torch.save(export_published_state_dict(model), path)
    other = _small("detr")
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    assert load_published_state_dict(other, path) == {"missing": [], "unexpected": [], "mismatched": []}
    assert_close(other.class_embed.weight, model.class_embed.weight, rtol=0, atol=0)


class _NotAllowed:
    pass


def test_unsafe_pickle_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _NotAllowed()}, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*weights_only"):
        load_checkpoint_file(path)


def _meta(variant, **kwargs):
    with torch.device("meta"):
        return build_model(variant, **kwargs)


@pytest.mark.parametrize(
    ("source", "target", "cause"),
    [
        (("conditional", {"num_classes": 91}), ("conditional", {"num_classes": 20}), r"wrong class count.*91 logits"),
        (("detr", {}), ("conditional", {}), r"a DETR checkpoint \(multihead_attn keys\).*Conditional DETR model"),
        (("conditional", {}), ("detr", {}), r"a Conditional DETR checkpoint \(sa_qcontent_proj keys\).*DETR model"),
        (("conditional", {"backbone": "resnet18"}), ("conditional", {"backbone": "resnet50"}), r"wrong backbone"),
        (("conditional", {"num_queries": 100}), ("conditional", {}), r"wrong num_queries"),
        (("conditional", {"dec_layers": 3}), ("conditional", {}), r"wrong dec_layers: checkpoint has 3, model 6"),
    ],
)
def test_mismatched_checkpoint_raises_with_likely_cause(source, target, cause):
    checkpoint = {"model": export_published_state_dict(_meta(source[0], **source[1]))}
    with pytest.raises(ValueError, match=r"(?s)does not match the model.*likely cause: " + cause):
        load_published_state_dict(_meta(target[0], **target[1]), checkpoint)


def test_non_strict_load_skips_mismatched_class_head():
    source, target = _small(num_classes=5), _small(num_classes=3)
    head_before = target.class_embed.weight.detach().clone()
    report = load_published_state_dict(target, export_published_state_dict(source), strict=False)
    assert report == {"missing": [], "unexpected": [], "mismatched": ["class_embed.weight", "class_embed.bias"]}
    assert_close(target.class_embed.weight, head_before, rtol=0, atol=0)
    assert_close(target.query_embed.weight, source.query_embed.weight, rtol=0, atol=0)


def test_model_kwargs_from_published_args():
    kwargs = model_kwargs_from_args(_published_args(num_classes=None, position_embedding="v3"))
    assert kwargs == {
        "variant": "conditional",
        "backbone": "resnet18",
        "dilation": False,
        "hidden_dim": 32,
        "nheads": 4,
        "enc_layers": 1,
        "dec_layers": 2,
        "dim_feedforward": 32,
        "num_queries": 7,
        "dropout": 0.0,
        "position_embedding": "learned",
        "aux_loss": True,
        "lr_backbone": 1e-5,
        "num_classes": 91,
    }
    detr_args = vars(_published_args(eos_coef=0.1))
    del detr_args["focal_alpha"]
    assert model_kwargs_from_args(detr_args)["variant"] == "detr"
    with pytest.raises(ValueError, match="pre_norm"):
        model_kwargs_from_args(_published_args(pre_norm=True))
    with pytest.raises(ValueError, match="dataset_file 'voc'"):
        model_kwargs_from_args(_published_args(num_classes=None, dataset_file="voc"))

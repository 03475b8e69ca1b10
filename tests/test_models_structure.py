"""Model structure: published parameter counts, state-dict layouts, backbone freezing, DC5 stride, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conddetr.models import build_model
from conddetr.models.published import export_published_state_dict

FIXTURES_DIR = Path(__file__).parent / "fixtures"

PARAM_COUNTS = json.loads((FIXTURES_DIR / "param_counts.json").read_text())
MODELS = [name for name in PARAM_COUNTS if not name.startswith("_")]


def _variant(name: str) -> str:
    return "detr" if name.startswith("detr") else "conditional"


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_match_published(name):
    expected = PARAM_COUNTS[name]
    with torch.device("meta"):  # shapes only: full-size models build in a fraction of a second
        model = build_model(_variant(name), **expected["settings"])
    params = list(model.parameters())
    counts = {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "num_parameter_tensors": len(params),
        "num_buffer_tensors": len(list(model.buffers())),
        "num_state_dict_keys": len(model.state_dict()),
    }
    assert counts == {k: expected[k] for k in counts}
    assert model.class_embed.out_features == expected["num_logits"]


@pytest.mark.parametrize(
    ("keys_file", "variant", "settings"),
    [
        ("conddetr_r50_keys.json", "conditional", {}),
        ("conddetr_r50_keys.json", "conditional", {"dilation": True}),  # DC5 has the same layout
        ("conddetr_r101_keys.json", "conditional", {"backbone": "resnet101"}),
        ("conddetr_r18_keys.json", "conditional", {"backbone": "resnet18"}),
        ("detr_r50_keys.json", "detr", {}),
    ],
)
def test_exported_state_dict_has_published_keys_in_order(keys_file, variant, settings):
    expected = [(k, list(shape)) for k, shape in json.loads((FIXTURES_DIR / keys_file).read_text())]
    with torch.device("meta"):
        model = build_model(variant, **settings)
    exported = export_published_state_dict(model)
    # Compared as ordered lists: same keys, same shapes, same order as the published state_dict().
    assert [(k, list(v.shape)) for k, v in exported.items()] == expected


def test_backbone_freezing_follows_lr_backbone():
    model = build_model(
        "conditional", backbone="resnet18", hidden_dim=32, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=5
    )
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {
        n for n, _ in model.backbone.named_parameters() if n.startswith(("0.body.conv1", "0.body.layer1"))
    }
    assert all(n.startswith(("0.body.layer2", "0.body.layer3", "0.body.layer4")) for n in trainable)
    assert all(p.requires_grad for p in model.transformer.parameters())

    all_frozen = build_model(
        "conditional",
        backbone="resnet18",
        hidden_dim=32,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=32,
        num_queries=5,
        lr_backbone=0.0,
    )
    assert not any(p.requires_grad for p in all_frozen.backbone.parameters())
    # Batch norm statistics are buffers without num_batches_tracked, as published.
    bn_keys = [k for k in all_frozen.state_dict() if k.startswith("backbone.0.body.bn1.")]
    assert sorted(bn_keys) == sorted(
        f"backbone.0.body.bn1.{b}" for b in ("weight", "bias", "running_mean", "running_var")
    )


def test_dc5_halves_the_backbone_stride():
    images = torch.zeros(1, 3, 64, 96)
    mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    for dilation, expected in ((False, (2, 3)), (True, (4, 6))):
        with torch.device("meta"):
            model = build_model("conditional", backbone="resnet50", dilation=dilation)
        feature, small_mask, _ = model.backbone(images.to("meta"), mask.to("meta"))
        assert tuple(feature.shape[-2:]) == expected
        assert tuple(small_mask.shape[-2:]) == expected


def test_frozen_batchnorm_drops_num_batches_tracked():
    from conddetr.models.backbone import FrozenBatchNorm2d

    bn = FrozenBatchNorm2d(3)
    w, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -0.5, 0.0])
    state = {
        "weight": w,
        "bias": b,
        "running_mean": torch.ones(3),
        "running_var": torch.full((3,), 4.0),
        "num_batches_tracked": torch.tensor(7),
    }
    bn.load_state_dict(state)  # torchvision files carry num_batches_tracked; it must be accepted and dropped
    assert "num_batches_tracked" not in bn.state_dict()
    x = torch.full((1, 3, 1, 1), 3.0)
    expected = ((3.0 - 1.0) / (4.0 + 1e-5) ** 0.5 * w + b)[None, :, None, None]
    torch.testing.assert_close(bn(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "deformable"}, "variant must be one of"),
        ({"variant": "conditional", "backbone": "resnet152"}, "backbone must be one of"),
        ({"variant": "conditional", "backbone": "resnet18", "dilation": True}, "dilation"),
        ({"variant": "conditional", "hidden_dim": 33, "nheads": 3}, "hidden_dim must be even"),
        ({"variant": "detr", "hidden_dim": 64, "nheads": 6}, "divisible by nheads"),
        ({"variant": "conditional", "position_embedding": "rope"}, "position_embedding"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def test_pretrained_backbone_loads_from_a_local_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)  # BatchNorm2d: has num_batches_tracked, plus fc.*
    with torch.no_grad():
        for bn in (m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(
        "conditional",
        backbone="resnet18",
        hidden_dim=32,
        nheads=4,
        enc_layers=1,
        dec_layers=1,
        dim_feedforward=32,
        num_queries=3,
        pretrained_backbone=str(path),
    )
    body = model.backbone[0].body.state_dict()
    expected = {k: v for k, v in reference.state_dict().items() if k in body}
    assert set(body) == set(expected)  # every trunk tensor came from the file
    for key, value in body.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)

    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth: not a matching torchvision ResNet file"):
        build_model("conditional", backbone="resnet18", pretrained_backbone=str(tmp_path / "partial.pth"))


def test_backbone_norm_batch_norm_trains_its_statistics_and_frozen_stays_published():
    kwargs = dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32)
    frozen = build_model("conditional", num_queries=3, **kwargs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    torch.manual_seed(0)
    trainable = build_model("conditional", num_queries=3, backbone_norm="batch_norm", **kwargs).train()
    bn = trainable.backbone[0].body.layer2[0].bn1
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.weight.requires_grad
    before = bn.running_mean.clone()
    trainable(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    assert not torch.equal(bn.running_mean, before)  # statistics follow the data in train mode
    with pytest.raises(ValueError, match="backbone norm must be one of"):
        build_model("conditional", backbone_norm="group_norm", **kwargs)


@pytest.mark.parametrize(
    ("backbone", "stage", "channels", "stride"),
    [("resnet18", 2, 128, 8), ("resnet18", 3, 256, 16), ("resnet50", 3, 1024, 16)],
)
def test_backbone_stage_stops_the_trunk_early_for_a_finer_map(backbone, stage, channels, stride):
    kwargs = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=3)
    model = build_model("conditional", backbone=backbone, backbone_stage=stage, **kwargs)
    body = model.backbone[0]
    assert [n for n, _ in body.body.named_children()][-1] == f"layer{stage}"
    assert (body.num_channels, body.stride) == (channels, stride)
    assert tuple(model.input_proj.weight.shape) == (32, channels, 1, 1)
    out = model(torch.randn(1, 3, 64, 96), None, return_intermediates=True)
    assert tuple(out["intermediates"]["backbone_feature"].shape) == (1, channels, 64 // stride, 96 // stride)
    with pytest.raises(ValueError, match="dilation"):
        build_model("conditional", backbone="resnet50", dilation=True, backbone_stage=stage, **kwargs)


def test_truncated_backbone_loads_a_full_or_a_truncated_torchvision_file(tmp_path):
    import torchvision

    torch.manual_seed(5)
    full = torchvision.models.resnet18(weights=None)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    truncated = {k: v for k, v in full.state_dict().items() if not k.startswith(("layer3", "layer4", "fc"))}
    torch.save(truncated, tmp_path / "stage2.pth")
    kwargs = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=32, num_queries=3)
    for name in ("full.pth", "stage2.pth"):
        model = build_model("conditional", backbone="resnet18", backbone_stage=2,
                            pretrained_backbone=str(tmp_path / name), **kwargs)  # fmt: skip
        for key, value in model.backbone[0].body.state_dict().items():
            torch.testing.assert_close(value, full.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"stage2\.pth: not a matching torchvision ResNet file"):
        truncated_file = str(tmp_path / "stage2.pth")
        build_model("conditional", backbone="resnet18", backbone_stage=3, pretrained_backbone=truncated_file, **kwargs)

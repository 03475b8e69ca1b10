"""Backbone pretraining on synthetic images: dense targets, the cached torchvision-format file, its use by runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conddetr.config import ConfigError, load_config
from conddetr.data.synthetic import SHAPES, Difficulty, render_image, render_scene
from conddetr.engine.setup import backbone_weights, pretrain_settings_from_config
from conddetr.models import build_model
from conddetr.pretrain import (
    BACKGROUND,
    PretrainSettings,
    backbone_file,
    ensure_pretrained_backbone,
    render_pretrain_set,
)

REPO = Path(__file__).resolve().parents[1]
TINY = PretrainSettings(last_stage=2, image_size=64, num_images=8, max_objects=3, steps=3, batch_size=4)


def test_render_scene_owner_map_matches_the_objects():
    image, objects, owner = render_scene(np.random.default_rng(7), 96, Difficulty(max_objects=5, min_object_size=16))
    again, same_objects = render_image(np.random.default_rng(7), 96, Difficulty(max_objects=5, min_object_size=16))
    np.testing.assert_array_equal(image, again)  # render_image is render_scene without the owner map
    assert objects == same_objects
    for k, (_, (x, y, w, h)) in enumerate(objects):
        ys, xs = np.nonzero(owner == k)
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)


def test_pretrain_targets_are_the_objects_classes_and_boxes():
    data = render_pretrain_set(TINY, workers=1)
    assert data["images"].shape == (8, 3, 64, 64) and data["images"].dtype == torch.uint8
    labels, boxes = data["labels"], data["boxes"].float()
    assert set(labels.unique().tolist()) <= set(range(len(SHAPES))) | {BACKGROUND}
    assert (labels == BACKGROUND).any() and (labels != BACKGROUND).any()
    fg = labels != BACKGROUND  # [N, S, S]
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    inside = (boxes[:, 0] <= xs) & (xs < boxes[:, 2]) & (boxes[:, 1] <= ys) & (ys < boxes[:, 3])
    assert inside[fg].all()  # every object pixel lies in the box it is labelled with
    # Its own stream: no pretraining image is a detection image of the same seed (split 0 train, 1 val).
    detection_first = render_image(np.random.default_rng([TINY.seed, 0, 0]), 64, TINY.difficulty)[0]
    assert not np.array_equal(data["images"][0].permute(1, 2, 0).numpy(), detection_first)


def test_pretrained_file_is_cached_reproducible_and_loads_into_the_detector(tmp_path):
    path = ensure_pretrained_backbone(tmp_path, TINY, show_progress=False)
    assert path == backbone_file(tmp_path, TINY) and path.with_suffix(".json").is_file()
    state = torch.load(path, weights_only=True)
    assert sorted({k.split(".")[0] for k in state}) == ["bn1", "conv1", "layer1", "layer2"]
    stamp = path.stat().st_mtime_ns
    assert ensure_pretrained_backbone(tmp_path, TINY, show_progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # cached: not pretrained again
    ensure_pretrained_backbone(tmp_path, TINY, show_progress=False, force=True)
    again = torch.load(path, weights_only=True)
    for key, value in state.items():  # same settings, same weights
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    other = backbone_file(tmp_path, PretrainSettings(**{**TINY.__dict__, "steps": 4}))
    assert other != path  # every setting is part of the key

    model = build_model("conditional", backbone="resnet18", backbone_stage=2, hidden_dim=32, nheads=4, enc_layers=1,
                        dec_layers=1, dim_feedforward=32, num_queries=3, pretrained_backbone=str(path))  # fmt: skip
    body = model.backbone[0].body.state_dict()  # frozen BN: the file's running statistics become its buffers
    for key, value in body.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_config_pretrain_section_chooses_the_backbone_file(tmp_path):
    overrides = ["model.backbone=resnet18", "model.backbone_stage=2", "pretrain.enabled=true",
                 f"pretrain.cache_dir={tmp_path}", "pretrain.image_size=64", "pretrain.num_images=8",
                 "pretrain.max_objects=3", "pretrain.steps=3", "pretrain.batch_size=4"]  # fmt: skip
    cfg = load_config(None, overrides)
    assert pretrain_settings_from_config(cfg) == TINY
    assert backbone_weights(cfg) == str(backbone_file(tmp_path, TINY))
    assert backbone_weights(load_config(None, [])) is None  # published default: no file
    with pytest.raises(ConfigError, match="pretrain.enabled=true .* model.pretrained_backbone"):
        load_config(None, [*overrides, "model.pretrained_backbone=/x.pth"])
    with pytest.raises(ConfigError, match="pretrain.steps=0"):
        load_config(None, ["pretrain.steps=0"])


def test_pretrain_backbone_command(tmp_path, capsys):
    from conddetr.__main__ import main

    spec = str(REPO / "experiments" / "smoke_synthetic.yaml")
    overrides = ["model.backbone_stage=2", "pretrain.enabled=true", f"pretrain.cache_dir={tmp_path}",
                 "pretrain.image_size=64", "pretrain.num_images=8", "pretrain.steps=1",
                 "pretrain.batch_size=2"]  # fmt: skip
    assert main(["pretrain-backbone", spec, *overrides]) == 0
    made = list(tmp_path.glob("*.pth"))
    assert len(made) == 1 and f"pretrained backbone {made[0]}" in capsys.readouterr().out
    assert main(["pretrain-backbone", spec, *overrides]) == 0
    assert f"pretrained backbone (cached) {made[0]}" in capsys.readouterr().out
    assert main(["pretrain-backbone", spec]) == 2
    assert "pretrain.enabled is false" in capsys.readouterr().out

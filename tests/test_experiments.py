"""Every shipped spec and sweep validates and carries the published hyper-parameters of its table row."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conddetr.config import Config, load_config, load_sweep, run_name_for

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# spec -> (variant, backbone, dilation, epochs, lr drop, queries, images per GPU, published COCO val AP)
PUBLISHED = {
    "conddetr_r50": ("conditional", "resnet50", False, 50, 40, 300, 2, "41.0"),
    "conddetr_r101": ("conditional", "resnet101", False, 50, 40, 300, 2, "42.8"),
    "conddetr_dc5_r50": ("conditional", "resnet50", True, 50, 40, 300, 1, "43.7"),
    "conddetr_dc5_r101": ("conditional", "resnet101", True, 50, 40, 300, 1, "45.0"),
    "detr_r50": ("detr", "resnet50", False, 50, 40, 100, 2, "34.8"),
    "detr_r101": ("detr", "resnet101", False, 50, 40, 100, 2, "36.9"),
    "detr_r50_500ep": ("detr", "resnet50", False, 500, 400, 100, 2, "42.0"),
    "detr_r101_500ep": ("detr", "resnet101", False, 500, 400, 100, 2, "43.5"),
    "detr_dc5_r50_500ep": ("detr", "resnet50", True, 500, 400, 100, 1, "43.3"),
    "detr_dc5_r101_500ep": ("detr", "resnet101", True, 500, 400, 100, 1, "44.9"),
}
SYNTHETIC = ("demo_synthetic", "demo_synthetic_detr", "smoke_synthetic")
# Keys a spec may repeat from what it inherits, because the comment beside them says what they mean there.
DOCUMENTED_REPEATS = {
    ("detr_r50", "model.num_classes"),
    ("detr_r50", "loss.eos_coef"),
    ("demo_synthetic", "data.synthetic.image_size"),
}


def spec_path(name: str) -> Path:
    return EXPERIMENTS / f"{name}.yaml"


def test_the_spec_set_is_complete():
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == sorted([*PUBLISHED, *SYNTHETIC])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_rows(name):
    cfg = load_config(spec_path(name), ["data.root=/datasets/coco"])
    variant, backbone, dilation, epochs, drop, queries, per_gpu, ap = PUBLISHED[name]
    m, o = cfg.model, cfg.optim
    assert (m.variant, m.backbone, m.dilation, m.num_queries) == (variant, backbone, dilation, queries)
    assert (o.epochs, o.lr_drop_epoch, o.lr, o.lr_backbone, o.weight_decay, o.clip_max_norm) == (
        epochs, drop, 1e-4, 1e-5, 1e-4, 0.1
    )  # fmt: skip
    assert (cfg.data.dataset, m.num_classes, cfg.name) == ("coco", 91, name)
    # Options the papers do not have stay out of the published rows.
    assert (m.backbone_stage, m.backbone_norm, m.pretrained_backbone, cfg.pretrain.enabled) == (
        4,
        "frozen_bn",
        None,
        False,
    )
    assert (cfg.data.random_crop, m.dropout) == (True, 0.1)
    assert cfg.data.batch_size * cfg.launch.gpus_per_node * cfg.launch.nodes * o.accum_steps == 8 * per_gpu
    costs = (1.0, 1.0, 0.1) if variant == "detr" else (2.0, 2.0, 0.1)
    assert (cfg.loss.set_cost_class, cfg.loss.cls_loss_coef, cfg.loss.eos_coef) == costs
    assert (cfg.loss.set_cost_bbox, cfg.loss.set_cost_giou, cfg.loss.bbox_loss_coef, cfg.loss.giou_loss_coef) == (
        5.0, 2.0, 5.0, 2.0
    )  # fmt: skip
    assert re.search(rf"AP {re.escape(ap)}\b", spec_path(name).read_text()), "the comment must cite the published AP"


@pytest.mark.parametrize("name", sorted([*PUBLISHED, *SYNTHETIC]))
def test_specs_list_only_what_differs(name):
    """Each key a spec sets must change the value it would inherit (schema or base spec)."""
    raw = OmegaConf.to_container(OmegaConf.load(spec_path(name)))
    base = raw.pop("base", None)
    inherited = (
        load_config(spec_path(name).parent / base, ["data.root=/coco"]) if base else OmegaConf.structured(Config)
    )

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    for key, value in leaves(raw):
        if (name, key) not in DOCUMENTED_REPEATS:
            assert OmegaConf.select(inherited, key) != value, f"{name}.yaml repeats {key}={value!r}"


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_scales_suit_the_image_size(name):
    cfg = load_config(spec_path(name))
    d, size = cfg.data, cfg.data.synthetic.image_size
    assert d.dataset == "synthetic" and cfg.model.backbone == "resnet18"
    assert size / 2 <= min(d.train_scales) and max(d.train_scales) <= size
    assert d.val_scale == size and d.max_size >= size
    if d.random_crop:
        assert max(d.crop_resize_scales) <= size and d.crop_min_size <= d.crop_max_size <= min(d.crop_resize_scales)


def test_demo_and_smoke_settings():
    demo, detr = load_config(spec_path("demo_synthetic")), load_config(spec_path("demo_synthetic_detr"))
    assert demo.tracking.wandb_mode == "offline" and demo.model.variant == "conditional"
    assert demo.tracking.group == detr.tracking.group == "demo"  # side by side in W&B
    m = demo.model
    assert (m.backbone_stage, m.backbone_norm, demo.pretrain.enabled) == (2, "frozen_bn", True)
    assert demo.optim.lr_backbone == demo.optim.lr / 10  # the published ratio on the synthetic-pretrained backbone
    assert detr.model.variant == "detr" and (detr.loss.set_cost_class, detr.loss.cls_loss_coef) == (1.0, 1.0)
    sections = ("model", "data", "optim", "pretrain")
    differs = {k for k in sections if OmegaConf.select(demo, k) != OmegaConf.select(detr, k)}
    assert differs == {"model"}  # the DETR peer: same backbone file, data and schedule
    assert {**demo.model, "variant": "detr"} == dict(detr.model)  # ... and the same width, layers and queries
    smoke = load_config(spec_path("smoke_synthetic"))
    m, s = smoke.model, smoke.data.synthetic
    assert (m.hidden_dim, m.enc_layers, m.dec_layers, m.num_queries) == (32, 1, 1, 10)
    assert (s.num_train, s.num_val, s.image_size, smoke.optim.epochs) == (16, 8, 64, 2)


def test_shipped_sweeps_expand():
    base, runs = load_sweep(EXPERIMENTS / "sweeps" / "smoke_lr.yaml")
    assert Path(base).resolve() == spec_path("smoke_synthetic")
    assert runs == [["optim.lr=0.0001"], ["optim.lr=0.0002"]]
    assert [run_name_for(r) for r in runs] == ["lr0.0001", "lr0.0002"]
    base, runs = load_sweep(EXPERIMENTS / "sweeps" / "conddetr_vs_detr.yaml")
    assert Path(base).resolve() == spec_path("demo_synthetic")
    variants = [load_config(base, r).model.variant for r in runs]
    assert variants == ["conditional", "detr"]


def test_readme_lists_every_spec_and_sweep():
    readme = (EXPERIMENTS / "README.md").read_text()
    for path in [*EXPERIMENTS.glob("*.yaml"), *EXPERIMENTS.glob("sweeps/*.yaml")]:
        assert path.name in readme, f"experiments/README.md does not mention {path.name}"

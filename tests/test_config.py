"""Config loading: layering, errors that name key + source + closest key, save/restore, sweep expansion."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from conddetr.config import (
    CHOICES,
    CONFIG_NAME,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    load_sweep,
    load_sweep_runs,
    run_name_for,
    save_config,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_structured_schema():
    cfg = load_config()
    assert isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is Config
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(Config))
    cfg.run_dir = "/tmp/x"  # writable ...
    with pytest.raises(Exception, match="lrr"):
        cfg.optim.lrr = 1.0  # ... but still closed to unknown keys


def test_layering_schema_then_yaml_then_command_line(tmp_path):
    spec = write(tmp_path / "exp1.yaml", "optim:\n  lr: 3.0e-4\n  epochs: 5\nmodel:\n  num_queries: 7\n")
    cfg = load_config(spec, ["optim.lr=5e-4", "data.train_scales=[64,72]"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.model.num_queries) == (5e-4, 5, 7)
    assert list(cfg.data.train_scales) == [64, 72]
    assert cfg.optim.lr_backbone == 1e-5  # untouched default
    assert cfg.name == "exp1"  # defaults to the spec's stem
    assert load_config(spec, ["name=other"]).name == "other"


@pytest.mark.parametrize(
    ("yaml_text", "key", "suggestion"),
    [
        ("optim:\n  lrr: 1.0\n", "optim.lrr", "optim.lr"),
        ("modle:\n  variant: detr\n", "modle", "model"),
        ("optim:\n  lr_backbon: 0.0\n", "optim.lr_backbon", "optim.lr_backbone"),
        ("batch_size: 4\n", "batch_size", "data.batch_size"),
    ],
)
def test_misspelled_key_in_yaml(tmp_path, yaml_text, key, suggestion):
    spec = write(tmp_path / "bad.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(spec)
    message = str(info.value)
    assert f"unknown key '{key}'" in message
    assert str(spec) in message
    assert f"did you mean '{suggestion}'" in message


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("optim.lrr=1", "'optim.lr'"),
        ("model.lr=1", "'optim.lr'"),
        ("seeed=1", "'data.synthetic.seed' or 'optim.seed' or 'pretrain.seed'"),
    ],
)
def test_misspelled_key_on_command_line(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"unknown key '{override.split('=')[0]}'" in message
    assert f"command line override '{override}'" in message
    assert f"did you mean {suggestion}?" in message


def test_wrong_type_names_key_and_source(tmp_path):
    spec = write(tmp_path / "types.yaml", "optim:\n  epochs: 2.5\n")
    with pytest.raises(ConfigError, match=rf"'optim.epochs' in {spec}.*Integer"):
        load_config(spec)
    with pytest.raises(ConfigError, match=r"'optim.lr' in command line override 'optim.lr=fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'model.aux_loss' in command line override"):
        load_config(None, ["model.aux_loss=maybe"])
    with pytest.raises(ConfigError, match=rf"'model' in {spec.parent / 'section.yaml'} must be a section"):
        load_config(write(tmp_path / "section.yaml", "model: 3\n"))
    with pytest.raises(ConfigError, match=r"'model.backbone' in command line override .* is a single value"):
        load_config(None, ["model.backbone.depth=50"])


def test_missing_required_value_names_key_and_file(tmp_path):
    spec = write(tmp_path / "req.yaml", "data:\n  root: ???\n")
    with pytest.raises(ConfigError, match=rf"required value 'data.root' is missing: {spec} leaves it '\?\?\?'"):
        load_config(spec)
    assert load_config(spec, ["data.root=/coco"]).data.root == "/coco"


def test_coco_needs_root_or_explicit_paths(tmp_path):
    spec = write(tmp_path / "coco.yaml", "data:\n  dataset: coco\n")
    with pytest.raises(ConfigError, match=rf"'data.root' is missing: data.dataset=coco \({spec}\)"):
        load_config(spec)
    assert load_config(spec, ["data.root=/datasets/coco"]).data.dataset == "coco"
    paths = ["data.val_images=/v", "data.val_annotations=/v.json"]
    with pytest.raises(ConfigError, match="data.train_images, data.train_annotations"):
        load_config(spec, paths)
    load_config(spec, [*paths, "eval.eval_only=true"])  # evaluation needs only the val split
    load_config(spec, [*paths, "data.train_images=/t", "data.train_annotations=/t.json"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_enum_value(tmp_path, key):
    good = CHOICES[key][0]
    bad = good[:-1] + "X" + good[-1]  # a typo one letter from the first valid value
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{leaf}: {bad}\n"
    spec = write(tmp_path / "enum.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(spec)
    message = str(info.value)
    assert f"{key}='{bad}' in {spec} is not one of: {', '.join(CHOICES[key])}" in message
    assert f"did you mean '{good}'?" in message


def test_device_accepts_an_indexed_gpu():
    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["data.batch_size=0"], r"data.batch_size=0 in command line override 'data.batch_size=0' must be >= 1"),
        (["model.dropout=1.5"], r"model.dropout=1.5 .* must be in \[0, 1\)"),
        (["model.hidden_dim=100"], r"model.hidden_dim=100 \(command line .*\) must be divisible by model.nheads=8"),
        (["data.crop_min_size=450"], r"data.crop_min_size=450 .* must fit in the smallest data.crop_resize_scales=400"),
        (["data.val_scale=2000"], r"data.val_scale=2000 .* exceeds data.max_size=1333"),
        (["data.train_scales=[]"], r"data.train_scales=\[\] .* must be a non-empty list"),
        (["model.backbone_stage=1"], r"model.backbone_stage=1 .* must be 2, 3 or 4"),
        (["model.dilation=true", "model.backbone_stage=3"], r"model.dilation=true .* model.backbone_stage=3"),
    ],
)
def test_range_and_consistency_checks(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_interpolations_resolve_or_name_the_source(tmp_path):
    spec = write(tmp_path / "interp.yaml", "name: ${model.backbone}_q${model.num_queries}\n")
    assert load_config(spec).name == "resnet50_q300"
    with pytest.raises(ConfigError, match=r"cannot resolve 'name' in command line override 'name=\$\{model.bb\}'"):
        load_config(spec, ["name=${model.bb}"])


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="'optim.lr' is not of the form key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="adding or deleting keys is not allowed"):
        load_config(None, ["+optim.momentum=0.9"])
    with pytest.raises(ConfigError, match=rf"file not found: {tmp_path / 'nope.yaml'}"):
        load_config(tmp_path / "nope.yaml")
    broken = write(tmp_path / "broken.yaml", "optim: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"cannot parse YAML in {broken}"):
        load_config(broken)
    listing = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match=rf"{listing} must hold a mapping"):
        load_config(listing)


def test_base_chain_resolves_relative_to_the_file(tmp_path):
    write(tmp_path / "common" / "root.yaml", "optim:\n  epochs: 9\n  lr: 1.0e-3\nname: root\n")
    write(tmp_path / "common" / "mid.yaml", "base: root.yaml\noptim:\n  lr: 2.0e-3\n")
    leaf = write(tmp_path / "leaf.yaml", "base: common/mid.yaml\nmodel:\n  num_queries: 11\n")
    cfg = load_config(leaf)
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.model.num_queries, cfg.name) == (9, 2e-3, 11, "root")
    bad = write(tmp_path / "badbase.yaml", "base: common/mid.yaml\noptim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=rf"unknown key 'optim.lrr' in {bad}"):
        load_config(bad)
    write(tmp_path / "common" / "root.yaml", "base: ../leaf.yaml\n")
    with pytest.raises(ConfigError, match="'base' chain loops back"):
        load_config(leaf)
    orphan = write(tmp_path / "orphan.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match=rf"file not found: {tmp_path / 'missing.yaml'}"):
        load_config(orphan)


def test_error_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "b.yaml", "model:\n  variant: conditionl\n")
    child = write(tmp_path / "c.yaml", "base: b.yaml\noptim:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"model.variant='conditionl' in {base} is not one of"):
        load_config(child)


def test_save_and_restore_round_trip(tmp_path):
    spec = write(tmp_path / "exp.yaml", "optim:\n  lr: 3.0e-4\ntracking:\n  tags: [a, b]\n")
    cfg = load_config(spec, ["launch.extra_sbatch.reservation=res1", "eval.checkpoint=/w.pth"])
    saved = save_config(cfg, tmp_path)
    assert saved == tmp_path / CONFIG_NAME
    assert OmegaConf.to_container(load_config(saved)) == OmegaConf.to_container(cfg)

    torch.save({"config": config_to_dict(cfg)}, tmp_path / "ckpt.pth")
    plain = torch.load(tmp_path / "ckpt.pth", weights_only=True)["config"]
    restored = config_from_dict(plain)
    assert OmegaConf.get_type(restored) is Config
    assert OmegaConf.to_container(restored) == OmegaConf.to_container(cfg)
    assert config_from_dict(plain, ["data.root=/elsewhere"]).data.root == "/elsewhere"
    plain["optim"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match="unknown key 'optim.lrr' in saved config; did you mean 'optim.lr'"):
        config_from_dict(plain)


def test_sweep_grid_times_runs_in_deterministic_order(tmp_path):
    write(tmp_path / "spec.yaml", "optim:\n  epochs: 2\n")
    sweep = write(
        tmp_path / "sweeps" / "s.yaml",
        """\
        base: ../spec.yaml
        grid:
          optim.lr: [1.0e-4, 2.0e-4]
          data.batch_size: [1, 2]
        runs:
          - model.variant: conditional
          - model: {variant: detr, num_queries: 5}
        """,
    )
    base, runs = load_sweep(sweep)
    assert base == str(tmp_path / "spec.yaml")
    expected = []
    for run in (["model.variant=conditional"], ["model.variant=detr", "model.num_queries=5"]):
        for lr in ("0.0001", "0.0002"):
            for bs in ("1", "2"):
                expected.append([f"optim.lr={lr}", f"data.batch_size={bs}", *run])
    assert runs == expected
    assert load_sweep(sweep) == (base, runs)
    names = [run_name_for(r) for r in runs]
    assert names[0] == "lr0.0001_batch_size1_variant-conditional"
    assert names[-1] == "lr0.0002_batch_size2_variant-detr_num_queries5"
    assert len(set(names)) == len(names)


def test_sweep_common_overrides_apply_to_every_run_but_not_to_names(tmp_path):
    write(tmp_path / "spec.yaml", "optim:\n  epochs: 2\n")
    text = """\
        base: spec.yaml
        common:
          tracking: {group: study}
          launch.cpus_per_task: 1
        grid:
          optim.seed: [1, 2]
        runs:
          - {}
          - model.variant: detr
        """
    sweep = write(tmp_path / "s.yaml", text)
    base, named = load_sweep_runs(sweep)
    assert [name for name, _ in named] == ["optim.seed1", "optim.seed2", "optim.seed1_variant-detr",
                                           "optim.seed2_variant-detr"]  # fmt: skip
    shared = ["tracking.group=study", "launch.cpus_per_task=1"]
    assert [o for _, o in named] == [[*shared, "optim.seed=1"], [*shared, "optim.seed=2"],
                                     [*shared, "optim.seed=1", "model.variant=detr"],
                                     [*shared, "optim.seed=2", "model.variant=detr"]]  # fmt: skip
    assert load_sweep(sweep) == (base, [o for _, o in named])
    clash = write(tmp_path / "clash.yaml", text.replace("launch.cpus_per_task: 1", "optim.seed: 3"))
    with pytest.raises(ConfigError, match=r"'common' sets optim.seed, which 'grid' or 'runs' also set"):
        load_sweep(clash)
    bad = write(tmp_path / "bad.yaml", "base: spec.yaml\ncommon: [1]\nruns:\n  - {}\n")
    with pytest.raises(ConfigError, match="'common' in sweep .* must be a mapping"):
        load_sweep(bad)


def test_sweep_values_survive_the_override_grammar(tmp_path):
    write(tmp_path / "spec.yaml", "{}\n")
    sweep = write(
        tmp_path / "s.yaml",
        """\
        base: spec.yaml
        runs:
          - {data.root: "/data/my coco", tracking.tags: [a, "b c"], eval.checkpoint: null, model.aux_loss: false}
          - {data.root: "true", tracking.entity: "1", data.train_scales: [64, 72]}
        """,
    )
    _, runs = load_sweep(sweep)
    first = load_config(tmp_path / "spec.yaml", runs[0])
    assert (first.data.root, list(first.tracking.tags)) == ("/data/my coco", ["a", "b c"])
    assert (first.eval.checkpoint, first.model.aux_loss) == (None, False)
    second = load_config(tmp_path / "spec.yaml", runs[1])
    assert (second.data.root, second.tracking.entity, list(second.data.train_scales)) == ("true", "1", [64, 72])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("base: spec.yaml\ngird:\n  optim.lr: [1]\n", "unknown key 'gird' in sweep .*did you mean 'grid'"),
        ("grid:\n  optim.lr: [1]\n", "needs 'base'"),
        ("base: spec.yaml\n", "defines no runs"),
        ("base: spec.yaml\ngrid:\n  optim.lr: 1\n", "non-empty list"),
        ("base: spec.yaml\ngrid:\n  optim.lrr: [1]\n", r"run \['optim.lrr=1'\].*unknown key 'optim.lrr'"),
        ("base: spec.yaml\ngrid:\n  optim.lr: [1]\nruns:\n  - {optim.lr: 2}\n", "which 'grid' also sweeps"),
        ("base: spec.yaml\ngrid:\n  optim.lr: [0.0001, 1.0e-4]\n", "share the name 'lr0.0001'"),
    ],
)
def test_sweep_errors_name_the_sweep_file(tmp_path, text, pattern):
    write(tmp_path / "spec.yaml", "{}\n")
    sweep = write(tmp_path / "bad_sweep.yaml", text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_sweep(sweep)
    assert str(sweep) in str(info.value)


def test_run_names_are_readable_and_safe():
    assert run_name_for(["optim.lr=0.0002"]) == "lr0.0002"
    assert run_name_for([]) == "base"
    assert run_name_for(["optim.seed=1", "data.synthetic.seed=2"]) == "optim.seed1_synthetic.seed2"
    assert run_name_for(["data.root='/a b/c'", "optim.lr=-1.0"]) == "root-a-b-c_lr-1.0"
    long = run_name_for([f"tracking.tags=[{','.join(['tag'] * 60)}]"])
    assert len(long) <= 120 and long != run_name_for([f"tracking.tags=[{','.join(['tag'] * 61)}]"])

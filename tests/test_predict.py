"""`python -m conddetr predict` on a trained smoke run and on released-style checkpoints; W&B prediction media."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.testing import assert_close
from torchvision import tv_tensors

from conddetr.__main__ import main
from conddetr.config import load_config
from conddetr.data import build_datasets
from conddetr.engine import run
from conddetr.predict.draw import upscale_factor

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "experiments" / "smoke_synthetic.yaml"
LOG_IMAGES = 3


def _isolated_wandb_env(tmp: Path) -> dict[str, str]:
    env = {k: str(tmp / "wandb_home") for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    return {**env, "WANDB_SILENT": "true", "HOME": str(tmp / "home"), "WANDB_BASE_URL": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke spec trained for 2 epochs (an evaluation after each) with W&B offline, images and per-class AP."""
    tmp = tmp_path_factory.mktemp("predict")
    overrides = [
        f"run_dir={tmp / 'run'}",
        f"data.synthetic.cache_dir={tmp / 'cache'}",
        "data.synthetic.num_train=8",  # 2 steps per epoch: this is about the evaluations, not the training
        "optim.lr_backbone=0",
        "tracking.wandb_mode=offline",
        f"tracking.log_images={LOG_IMAGES}",
        "eval.per_category_ap=true",
    ]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _isolated_wandb_env(tmp).items():
            mp.setenv(key, value)
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.delenv("WANDB_MODE", raising=False)
        cfg = load_config(SPEC, overrides)
        run(cfg)
    _, val_ds, info = build_datasets(cfg.data)
    return tmp, tmp / "run", val_ds, info


@pytest.fixture(scope="module")
def folder_run(trained):
    """`predict` as a subprocess on a folder of 3 images, the last one truncated."""
    tmp, run_dir, val_ds, _ = trained
    folder, out = tmp / "three", tmp / "three_out"
    folder.mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        shutil.copy(val_ds.images_dir / name, folder / name)
    data = (val_ds.images_dir / "000003.jpg").read_bytes()
    (folder / "000003.jpg").write_bytes(data[: len(data) // 2])
    env = {**os.environ, **_isolated_wandb_env(tmp), "CONDDETR_NO_TQDM": "1"}
    cmd = [
        sys.executable,
        "-m",
        "conddetr",
        "predict",
        str(run_dir),
        str(folder),
        "--out",
        str(out),
        "--threshold",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return folder, out, proc


def test_predict_draws_boxes_skips_the_truncated_image_and_writes_coco_results(folder_run):
    folder, out, proc = folder_run
    assert proc.returncode == 0, proc.stderr
    assert f"skipping: cannot read image {folder / '000003.jpg'}" in proc.stderr
    assert "2 images, 1 unreadable skipped" in proc.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["000001.png", "000002.png"]
    coco = COCO(str(out / "images.json"))
    detections = coco.loadRes(str(out / "detections.json"))
    assert sorted(detections.getImgIds()) == [1, 2] and len(detections.anns) > 0
    for image_id in (1, 2):
        info = coco.imgs[image_id]
        original = Image.open(info["file_name"]).convert("RGB")
        factor = upscale_factor(*original.size)
        drawn = np.asarray(Image.open(out / info["drawn"]).convert("RGB")).astype(int)
        before = np.asarray(original.resize(drawn.shape[1::-1], Image.Resampling.NEAREST)).astype(int)
        assert drawn.shape == before.shape and drawn.shape[0] == original.height * factor
        changed = (drawn != before).any(-1)  # [H, W]
        anns = detections.imgToAnns[image_id]
        assert len(anns) > 0
        for ann in anns:
            x, y, w, h = (round(v * factor) for v in ann["bbox"])
            x1, y1 = min(x + w, drawn.shape[1] - 1), min(y + h, drawn.shape[0] - 1)
            outline = np.concatenate([changed[y, x:x1], changed[y1, x:x1], changed[y:y1, x], changed[y:y1, x1]])
            assert outline.mean() > 0.9, f"box {ann['bbox']} of image {image_id} is not drawn"


def test_predict_on_coco_annotations_equals_the_runs_own_evaluation(trained, tmp_path):
    """Same images, same batching as the engine's val loader: the detections are those of results/val_epoch002."""
    _, run_dir, val_ds, _ = trained
    checkpoint = run_dir / "checkpoint.pth"
    argv = ["predict", str(checkpoint), str(val_ds.annotation_file), str(val_ds.images_dir), "--out", str(tmp_path)]
    assert main([*argv, "--threshold", "0", "--batch-size", "4"]) == 0
    ours = json.loads((tmp_path / "detections.json").read_text())
    engine = json.loads((run_dir / "results" / "val_epoch002.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in ours] == [(d["image_id"], d["category_id"]) for d in engine]
    assert_close(torch.tensor([d["score"] for d in ours]), torch.tensor([d["score"] for d in engine]))
    boxes = [torch.tensor([d["bbox"] for d in x]) for x in (ours, engine)]
    assert_close(*boxes, rtol=0, atol=6e-4)  # ours: 3 decimals
    names = {c["id"]: c["name"] for c in json.loads((tmp_path / "images.json").read_text())["categories"]}
    assert names == {c["id"]: c["name"] for c in val_ds.coco.dataset["categories"]}


def test_attention_figures_for_the_top_detections(trained, tmp_path):
    _, run_dir, val_ds, _ = trained
    image = str(val_ds.images_dir / "000004.jpg")
    argv = ["predict", str(run_dir), image, "--out", str(tmp_path), "--threshold", "0", "--attention"]
    assert main([*argv, "--attention-top", "2", "--attention-layer", "0"]) == 0
    figures = sorted(p.name for p in (tmp_path / "attention").iterdir())
    assert figures == ["000004_top1.png", "000004_top2.png"]
    assert all((tmp_path / "attention" / f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_bad_inputs_fail_naming_the_file(trained, tmp_path, capsys):
    _, run_dir, val_ds, _ = trained
    image = str(val_ds.images_dir / "000001.jpg")
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("just text")
    resnet = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, resnet)
    deformable = tmp_path / "deformable.pth"
    torch.save({"model": {}, "args": argparse.Namespace(num_feature_levels=4, backbone="resnet50")}, deformable)
    cases = {
        not_a_checkpoint: "is not a checkpoint: not a torch.save file",
        Path(image): "is not a checkpoint",
        resnet: "is not a detector checkpoint: no 'model' state dict",
        deformable: "checkpoint of another model",
        tmp_path / "missing.pth": "does not exist",
        tmp_path: "holds no checkpoint.pth",
    }
    for checkpoint, message in cases.items():
        assert main(["predict", str(checkpoint), image, "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert str(checkpoint) in err, err
        assert message in err, err
    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    state["model_kwargs"]["num_queries"] += 1  # weights of another architecture than the one described
    torch.save(state, tmp_path / "other.pth")
    assert main(["predict", str(tmp_path / "other.pth"), image, "--out", str(tmp_path / "out")]) == 1
    assert "does not hold the model its settings describe" in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(tmp_path / "nope.jpg")]) == 1
    assert f"input {tmp_path / 'nope.jpg'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(run_dir), image, "--threshold", "1.5"])
    assert exit_info.value.code == 2 and "--threshold: must be in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "variant"), [("parity_conddetr_small", "conditional"), ("parity_detr_small", "detr")])
def test_released_style_checkpoint_end_to_end(name, variant, load_fixture, make_state_dict, tmp_path):
    """A `{"model", "args"}` file in the parity fixtures' layout: COCO names, the published 800/1333 resize."""
    from conddetr.data.transforms import build_val_transforms
    from conddetr.models import build_model, build_postprocessor

    fx = load_fixture(name)
    state = make_state_dict(fx["state_dict_keys"], fx["weight_seed"])
    settings = {k: v for k, v in fx["settings"].items() if k != "num_classes"}  # published args carry none
    extra = {"focal_alpha": 0.25} if variant == "conditional" else {"eos_coef": 0.1}
    args = argparse.Namespace(**settings, **extra, lr_backbone=1e-5, dataset_file="coco", masks=False, pre_norm=False)
    torch.save({"model": state, "args": args, "epoch": 49}, tmp_path / "released.pth")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(48, 64)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "released.pth"), *map(str, paths), "--out", str(out), "--threshold", "0"]
    assert main([*argv, "--max-size", "160"]) == 0  # the published resize (short side 800), capped small here
    assert sorted(p.name for p in out.glob("*.png")) == ["img0.png"]
    found = json.loads((out / "detections.json").read_text())
    categories = json.loads((out / "images.json").read_text())["categories"]
    assert len(categories) == 80 and {"id": 1, "name": "person"} in categories
    assert {"id": 90, "name": "toothbrush"} in categories

    model = build_model(variant, **fx["settings"]).eval()
    model.load_state_dict(state)
    post, transform = build_postprocessor(variant), build_val_transforms(800, 160)
    for image_id, path in enumerate(paths, start=1):
        image = tv_tensors.Image(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
        with torch.no_grad():
            (result,) = post(model(transform(image)[None]), torch.tensor([image.shape[1:]]))
        order = result["scores"].argsort(descending=True, stable=True)
        keep = [i for i in order.tolist() if int(result["labels"][i]) in {c["id"] for c in categories}]
        got = [d for d in found if d["image_id"] == image_id]
        assert [d["category_id"] for d in got] == result["labels"][keep].tolist()
        assert_close(torch.tensor([d["score"] for d in got]), result["scores"][keep])
        xywh = torch.tensor([d["bbox"] for d in got])
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        assert_close(xyxy, result["boxes"][keep], rtol=0, atol=1.1e-3)  # JSON: 3 decimals


def _media_rows(run_dir: Path, key: str) -> list[dict]:
    from conddetr.tracking import read_wandb_history

    return [row for row in read_wandb_history(run_dir, include_media=True) if key in row]


def _media_file(run_dir: Path, relative: str) -> Path:
    (found,) = {p.resolve() for p in run_dir.glob(f"wandb/*/files/{relative}")}
    return found


def test_offline_wandb_run_holds_val_images_with_boxes_at_each_evaluation(trained):
    from conddetr.tracking import read_metrics, read_wandb_history

    _, run_dir, val_ds, info = trained
    rows = _media_rows(run_dir, "val/predictions")
    assert [row["epoch"] for row in rows] == [1, 2]  # one per evaluation
    class_labels = {str(k): v for k, v in info.category_names.items()}
    for row in rows:
        media = row["val/predictions"]
        assert media["_type"] == "images/separated" and media["count"] == LOG_IMAGES
        assert media["captions"] == ["image id 1 (000001.jpg)", "image id 5 (000005.jpg)", "image id 8 (000008.jpg)"]
        for index, (png, boxes) in enumerate(zip(media["filenames"], media["all_boxes"], strict=True)):
            assert Image.open(_media_file(run_dir, png)).size == (64, 64)
            record = val_ds.records[[0, 4, 7][index]]
            truth = json.loads(_media_file(run_dir, boxes["ground_truth"]["path"]).read_text())
            predicted = json.loads(_media_file(run_dir, boxes["predictions"]["path"]).read_text())
            assert truth["class_labels"] == predicted["class_labels"] == class_labels
            got = [[b["position"][k] for k in ("minX", "minY", "maxX", "maxY")] for b in truth["box_data"]]
            assert_close(torch.tensor(got), torch.tensor(record.boxes))
            assert [b["class_id"] for b in truth["box_data"]] == record.labels.tolist()
            assert len(predicted["box_data"]) == 30 and all("score" in b["scores"] for b in predicted["box_data"])
            assert all(b["domain"] == "pixel" and b["box_caption"] for b in predicted["box_data"])
    metrics = read_metrics(run_dir)
    for row in _media_rows(run_dir, "val/AP_per_category_table"):
        table = json.loads(_media_file(run_dir, row["val/AP_per_category_table"]["path"]).read_text())
        (logged,) = [m for m in metrics if m["epoch"] == row["epoch"] and "val/AP" in m]
        assert {name: ap for name, ap in table["data"]} == {
            k.removeprefix("val/AP_per_category/"): v for k, v in logged.items() if k.startswith("val/AP_per_category/")
        }
    assert len(_media_rows(run_dir, "val/AP_per_category_table")) == 2
    assert read_wandb_history(run_dir) == metrics  # media rows stay out of the metric history


def test_val_media_leaves_the_training_random_stream_alone(trained):
    from conddetr.engine.media import media_indices, val_media
    from conddetr.models import build_postprocessor
    from conddetr.predict.loading import load_predictor

    _, run_dir, val_ds, info = trained
    model = load_predictor(run_dir, device=torch.device("cpu")).model.train()
    state = torch.get_rng_state()
    items = val_media(
        model, build_postprocessor("conditional"), val_ds, [0, 5], info.category_names, torch.device("cpu")
    )
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert [item["image"].shape for item in items] == [(64, 64, 3)] * 2
    assert media_indices(8, 3) == [0, 4, 7] and media_indices(2, 8) == [0, 1] and media_indices(8, 0) == []


@pytest.mark.parametrize("box", [(0, 0, 10, 10), (50, 0, 64, 5), (-5, 30, 70, 64), (60, 60, 64, 64)])
def test_labels_stay_inside_the_image(box):
    from conddetr.predict.draw import Drawn, draw_detections, label_origin

    x, y = label_origin((40, 12), box, (64, 64))
    assert 0 <= x <= 64 - 40 and 0 <= y <= 64 - 12
    if box[1] >= 12:
        assert y == box[1] - 12  # room above the box: the label sits on top of it
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    drawn = np.asarray(draw_detections(image, [Drawn(box, "label 0.99", 3)]))
    assert drawn.shape == (384, 384, 3) and (drawn != 128).any()

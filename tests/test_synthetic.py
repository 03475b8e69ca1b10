"""Synthetic dataset: deterministic, cached by its parameters, written atomically, and covering COCO's size buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conddetr.data import synthetic
from conddetr.data.coco import CocoDetection, read_annotation_file
from conddetr.data.synthetic import CATEGORY_IDS, Difficulty, ensure_synthetic_dataset, synthetic_paths

PARAMS = {"seed": 5, "image_size": 128, "num_train": 40, "num_val": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"), **PARAMS)


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    again = ensure_synthetic_dataset(tmp_path, **PARAMS)
    for split in ("train", "val"):
        images, annotations = synthetic_paths(root, split)
        images_again, annotations_again = synthetic_paths(again, split)
        assert annotations.read_text() == annotations_again.read_text()
        for path in sorted(images.iterdir()):
            assert path.read_bytes() == (images_again / path.name).read_bytes(), path.name
    other = ensure_synthetic_dataset(tmp_path, **{**PARAMS, "seed": 6})
    assert other != again
    assert synthetic_paths(other, "val")[1].read_text() != synthetic_paths(again, "val")[1].read_text()


def test_cached_dataset_is_reused(root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generated again although the cache holds this parameter set")

    monkeypatch.setattr(synthetic, "generate_split", fail)
    assert ensure_synthetic_dataset(root.parent, **PARAMS) == root


def test_crash_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    real = synthetic.generate_split

    def crash_on_val(out_dir, annotation_file, seed, split, *args):
        if split == 1:
            raise KeyboardInterrupt  # e.g. a job killed half way
        return real(out_dir, annotation_file, seed, split, *args)

    monkeypatch.setattr(synthetic, "generate_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, **PARAMS)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor a temp folder is left behind
    monkeypatch.setattr(synthetic, "generate_split", real)
    root = ensure_synthetic_dataset(tmp_path, **PARAMS)
    assert len(read_annotation_file(synthetic_paths(root, "val")[1])["images"]) == PARAMS["num_val"]


def test_content_matches_the_spec(root):
    images_dir, annotation_file = synthetic_paths(root, "train")
    data = json.loads(annotation_file.read_text())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)
    assert len(data["images"]) == PARAMS["num_train"]
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=PARAMS["num_train"] + 1)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 10
    boxes = np.array([a["bbox"] for a in data["annotations"]])  # [N, 4] xywh
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 128).all() and (boxes[:, 2:] >= 1).all()
    areas = np.array([a["area"] for a in data["annotations"]])
    # COCO's absolute buckets (32^2, 96^2 pixels) all occur at 128 px.
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    assert len({a["category_id"] for a in data["annotations"]}) == len(CATEGORY_IDS)
    image = Image.open(images_dir / data["images"][0]["file_name"])
    assert image.size == (128, 128) and image.mode == "RGB"


def test_render_image_objects_inside_the_image():
    rng = np.random.default_rng(0)
    pixels, objects = synthetic.render_image(rng, 96)
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8 and 1 <= len(objects) <= 10
    for shape, (x, y, w, h) in objects:
        assert 0 <= shape < len(synthetic.SHAPES) and w >= 1 and h >= 1
        assert x + w <= 96 and y + h <= 96


def test_read_through_the_coco_path(root):
    images_dir, annotation_file = synthetic_paths(root, "val")
    ds = CocoDetection(images_dir, annotation_file)
    image, target = ds[0]
    assert image.shape == (3, 128, 128)
    assert set(target["labels"].tolist()) <= set(CATEGORY_IDS)


def test_too_small_images_rejected(tmp_path):
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        ensure_synthetic_dataset(tmp_path, seed=0, image_size=16, num_train=1, num_val=1)


def test_worker_processes_give_identical_output(tmp_path):
    for workers in (1, 2):
        synthetic.generate_split(tmp_path / f"w{workers}", tmp_path / f"w{workers}.json", 1, 0, 12, 64, workers)
    assert (tmp_path / "w1.json").read_text() == (tmp_path / "w2.json").read_text()
    for path in sorted((tmp_path / "w1").iterdir()):
        assert path.read_bytes() == (tmp_path / "w2" / path.name).read_bytes()


def test_difficulty_knobs_bound_object_count_and_size():
    for seed in range(20):
        _, objects = synthetic.render_image(
            np.random.default_rng(seed), 96, Difficulty(max_objects=1, min_object_size=60)
        )
        assert len(objects) == 1
        ((_, (_, _, w, h)),) = objects
        # A triangle's visible extent spans at least 3/4 of its bounding square (a circle's radius 1.5 times).
        assert max(w, h) >= 0.75 * 60
    default = synthetic.render_image(np.random.default_rng(3), 96)
    explicit = synthetic.render_image(np.random.default_rng(3), 96, Difficulty(10, 14, False, 0.5))
    np.testing.assert_array_equal(default[0], explicit[0])
    assert default[1] == explicit[1]


def _overlap(a, b) -> float:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return max(0.0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0.0, min(ay + ah, by + bh) - max(ay, by))


def test_class_colours_and_min_visible_knobs():
    palette = synthetic.COLOURS
    for seed in range(10):
        rng = np.random.default_rng(seed)
        pixels, objects, owner = synthetic.render_scene(rng, 96, Difficulty(6, 16, class_colours=True, min_visible=1.0))
        for k, (shape, _) in enumerate(objects):
            # Each shape wears its own palette colour (plus jitter and noise): the mean is near it.
            mean = pixels[owner == k].reshape(-1, 3).mean(0)
            assert np.abs(mean - palette[shape]).max() < 35, (seed, k, mean, palette[shape])

    # Crowded scenes: forbidding any occlusion rejects more placements than allowing half, so fewer objects fit.
    def count(min_visible: float) -> int:
        rng = np.random.default_rng(0)
        return sum(
            len(synthetic.render_image(rng, 96, Difficulty(10, 30, min_visible=min_visible))[1]) for _ in range(10)
        )

    assert count(1.0) < count(0.5)
    with pytest.raises(ValueError, match="min_visible must be in"):
        Difficulty(min_visible=1.5).check(96)


def test_difficulty_knobs_change_the_cache_key_and_are_checked(tmp_path):
    base = {k: PARAMS[k] for k in ("seed", "image_size", "num_train", "num_val")}
    default = synthetic.synthetic_root(tmp_path, **base)
    assert default == synthetic.synthetic_root(tmp_path, **base, difficulty=Difficulty())
    changed = [Difficulty(max_objects=2), Difficulty(min_object_size=32), Difficulty(class_colours=True),
               Difficulty(min_visible=1.0)]  # fmt: skip
    roots = {synthetic.synthetic_root(tmp_path, **base, difficulty=d) for d in changed}
    assert len(roots) == len(changed) and default not in roots
    with pytest.raises(ValueError, match="max_objects must be at least 1"):
        ensure_synthetic_dataset(tmp_path, **base, difficulty=Difficulty(max_objects=0))
    with pytest.raises(ValueError, match="min_object_size must be in"):
        ensure_synthetic_dataset(tmp_path, **base, difficulty=Difficulty(min_object_size=200))

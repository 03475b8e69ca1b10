"""Deterministic synthetic COCO-format dataset: coloured shapes on textured, noisy backgrounds.

Generated once per (seed, image size, counts) into a cache folder, atomically (temp folder, then rename), and read
back through the same COCO code path as real data.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when drawing changes, so old caches are not reused
SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
# Category ids with gaps, like COCO's, so the two label mappings genuinely differ.
CATEGORY_IDS = (1, 2, 3, 5, 6, 8)
COLOURS = np.array(
    [[220, 40, 40], [40, 190, 60], [50, 80, 225], [235, 210, 40], [200, 50, 200], [40, 200, 215], [245, 140, 30]],
    dtype=np.float32,
)
# COCO area buckets are absolute (32^2, 96^2 pixels): box sides drawn per bucket. Large needs images >= ~101 px.
SIZE_BUCKETS = ((0.2, 14, 31), (0.6, 32, 95), (0.2, 96, None))  # (probability, min side, max side or None = image)
MIN_VISIBLE = 0.5  # default: an object may lose at most half of its pixels to later (occluding) objects
MAX_OBJECTS = 10  # default upper bound of objects per image
MIN_SIDE = SIZE_BUCKETS[0][1]  # default smallest object side: the small bucket's lower end


@dataclass(frozen=True)
class Difficulty:
    """The scene knobs; the defaults are COCO-like (10 objects of every size, occlusion, random colours)."""

    max_objects: int = MAX_OBJECTS  # objects per image drawn uniformly in 1..max_objects
    min_object_size: int = MIN_SIDE  # smallest bounding-square side, pixels
    class_colours: bool = False  # each shape its own colour: classification easy, localisation stays the task
    min_visible: float = MIN_VISIBLE  # share of an object later ones must leave visible; 1.0: no overlap at all

    def check(self, image_size: int) -> None:
        if self.max_objects < 1:
            raise ValueError(f"data.synthetic.max_objects must be at least 1, got {self.max_objects}")
        if not 1 <= self.min_object_size <= int(image_size * 0.95):
            raise ValueError(
                f"data.synthetic.min_object_size must be in [1, {int(image_size * 0.95)}] for {image_size}-px "
                f"images, got {self.min_object_size}"
            )
        if not 0 <= self.min_visible <= 1:
            raise ValueError(f"data.synthetic.min_visible must be in [0, 1], got {self.min_visible}")

    def cache_suffix(self) -> str:
        """Only changed knobs enter cache keys, so default datasets keep their folders."""
        suffix = ""
        if self.max_objects != MAX_OBJECTS:
            suffix += f"_max{self.max_objects}obj"
        if self.min_object_size != MIN_SIDE:
            suffix += f"_min{self.min_object_size}px"
        if self.class_colours:
            suffix += "_classcolours"
        if self.min_visible != MIN_VISIBLE:
            suffix += f"_visible{self.min_visible:g}"
        return suffix


def _polygon(rng: np.random.Generator, shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]]:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    match shape:
        case "triangle":
            angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
            radii = np.full(3, r)
        case "star":
            angles = rng.uniform(0, 2 * np.pi) + np.arange(10) * np.pi / 5
            radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        case _:
            raise ValueError(shape)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True))


def _shape_mask(rng: np.random.Generator, shape: str, size: int, x0: int, y0: int, s: int) -> np.ndarray:
    """Boolean `[size, size]` mask of one shape whose bounding square is (x0, y0, s)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + s - 1, y0 + s - 1
    match shape:
        case "circle":
            draw.ellipse([x0, y0, x1, y1], fill=255)
        case "square":
            draw.rectangle([x0, y0, x1, y1], fill=255)
        case "ring":
            draw.ellipse([x0, y0, x1, y1], outline=255, width=max(2, round(s * 0.18)))
        case "cross":
            t = max(2, round(s * 0.3))  # bar thickness
            a = x0 + (s - t) // 2
            b = y0 + (s - t) // 2
            draw.rectangle([a, y0, a + t - 1, y1], fill=255)
            draw.rectangle([x0, b, x1, b + t - 1], fill=255)
        case "triangle" | "star":
            draw.polygon(_polygon(rng, shape, x0, y0, s - 1), fill=255)
    return np.asarray(canvas) > 0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted tinted colour, a gradient and two sinusoidal textures: float32 `[size, size, 3]` (noise comes later)."""
    t = np.arange(size, dtype=np.float32) / size  # [S] pixel coordinate in [0, 1)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(np.cos(theta)) * t[None, :] + np.float32(np.sin(theta)) * t[:, None]  # [H, W]
    texture = np.zeros((size, size), dtype=np.float32)  # [H, W] luminance texture
    for _ in range(2):
        freq, phi, amp = rng.uniform(2, 14), rng.uniform(0, 2 * np.pi), rng.uniform(6, 22)
        direction = rng.uniform(0, 2 * np.pi)
        # sin(a x + b y + phi) from 1-D factors: two outer products instead of a full-image sine.
        a = np.float32(2 * np.pi * freq * np.cos(direction)) * t
        b = np.float32(2 * np.pi * freq * np.sin(direction)) * t + np.float32(phi)
        texture += np.float32(amp) * (np.sin(a)[None, :] * np.cos(b)[:, None] + np.cos(a)[None, :] * np.sin(b)[:, None])
    base = (rng.uniform(80, 170) + rng.uniform(-25, 25, 3)).astype(np.float32)  # [3]
    tint = rng.uniform(-40, 40, 3).astype(np.float32)  # [3] colour change along the gradient
    return base + texture[..., None] + ramp[..., None] * tint


def _draw_side(rng: np.random.Generator, size: int, min_side: int) -> int:
    buckets = [(p, max(lo, min_side), min(hi or size, int(size * 0.95))) for p, lo, hi in SIZE_BUCKETS]
    buckets = [(p, lo, hi) for p, lo, hi in buckets if hi >= lo]  # large disappears on small images
    if not buckets:
        raise ValueError(f"data.synthetic.min_object_size={min_side} leaves no object size on {size}-px images")
    probs = np.array([b[0] for b in buckets])
    _, lo, hi = buckets[rng.choice(len(buckets), p=probs / probs.sum())]
    return int(rng.integers(lo, hi + 1))


def _touching(owner: np.ndarray, x0: int, y0: int, s: int) -> list[int]:
    """Indices of the objects within 2 pixels of the bounding square (x0, y0, s)."""
    near = owner[max(y0 - 2, 0) : y0 + s + 2, max(x0 - 2, 0) : x0 + s + 2]
    return np.unique(near[near >= 0]).tolist()


def render_image(
    rng: np.random.Generator, size: int, difficulty: Difficulty = Difficulty()
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image (uint8 `[size, size, 3]`) and its objects as (shape index, visible-extent xywh box).

    With `difficulty.class_colours`, touching objects of one shape are never placed (they would merge into one blob).
    """
    image, objects, _ = render_scene(rng, size, difficulty)
    return image, objects


def render_scene(
    rng: np.random.Generator, size: int, difficulty: Difficulty = Difficulty()
) -> tuple[np.ndarray, list[tuple[int, list[float]]], np.ndarray]:
    """`render_image` plus the owner map: int16 `[size, size]`, the index of the object each pixel shows, -1 for
    background (dense labels for backbone pretraining)."""
    d = difficulty
    image = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object each pixel shows (later objects on top)
    full_area: list[int] = []
    shapes: list[int] = []
    squares: list[tuple[int, int, int]] = []  # (x0, y0, side) of each placed object
    colours: list[int] = []  # palette index of each placed object
    for _ in range(int(rng.integers(1, d.max_objects + 1))):
        shape = int(rng.integers(len(SHAPES)))
        visible = np.bincount(owner.ravel() + 1, minlength=len(shapes) + 1)[1:]  # pixels each object shows
        for _attempt in range(20):  # rejection: leave min_visible of every earlier object visible
            s = _draw_side(rng, size, d.min_object_size)
            x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, 2))
            mask = _shape_mask(rng, SHAPES[shape], size, x0, y0, s)
            covered = np.bincount(owner[mask] + 1, minlength=len(shapes) + 1)[1:]  # pixels taken from each object
            if np.all(visible - covered >= d.min_visible * np.array(full_area, dtype=np.int64)):
                if not d.class_colours or shape not in {colours[k] for k in _touching(owner, x0, y0, s)}:
                    break
        else:
            continue
        if d.class_colours:
            colours.append(shape)
        else:
            # A colour none of the touching objects has, so overlapping objects never merge into one blob.
            taken = {colours[k] for k in _touching(owner, x0, y0, s)}
            free = [c for c in range(len(COLOURS)) if c not in taken] or list(range(len(COLOURS)))
            colours.append(free[int(rng.integers(len(free)))])
        image[mask] = COLOURS[colours[-1]] + rng.uniform(-20, 20, 3)
        owner[mask] = len(shapes)
        full_area.append(int(mask.sum()))
        shapes.append(shape)
        squares.append((x0, y0, s))
    # Luminance noise over everything (objects included), one draw per pixel shared by the three channels.
    image += (rng.standard_normal((size, size), dtype=np.float32) * np.float32(rng.uniform(4, 12)))[..., None]
    objects = []
    for k, (shape, (sx, sy, s)) in enumerate(zip(shapes, squares, strict=True)):
        ys, xs = np.nonzero(owner[sy : sy + s, sx : sx + s] == k)  # the object lies inside its bounding square
        xs, ys = xs + sx, ys + sy
        # Visible extent (modal box, as COCO annotates), in pixel-edge coordinates.
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        objects.append((shape, [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    return np.clip(image, 0, 255).astype(np.uint8), objects, owner


def _write_image(job: tuple) -> tuple[str, list[tuple[int, list[float]]]]:
    out_dir, seed, split, index, size, difficulty = job
    rng = np.random.default_rng([seed, split, index])  # per-image stream: independent of order and process
    pixels, objects = render_image(rng, size, difficulty)
    file_name = f"{index + 1:06d}.jpg"
    Image.fromarray(pixels).save(out_dir / file_name, quality=90)
    return file_name, objects


def generate_split(
    out_dir: Path,
    annotation_file: Path,
    seed: int,
    split: int,
    num_images: int,
    size: int,
    workers: int = 1,
    difficulty: Difficulty = Difficulty(),
) -> None:
    """Write `num_images` JPEGs to `out_dir` and their COCO instances file; the output does not depend on workers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir, seed, split, i, size, difficulty) for i in range(num_images)]
    if workers > 1 and "fork" in mp.get_all_start_methods():
        # fork: the children only run numpy/PIL, and skip re-importing torch that spawn would pay for.
        with mp.get_context("fork").Pool(workers) as pool:
            rendered = pool.map(_write_image, jobs, chunksize=16)
    else:
        rendered = [_write_image(job) for job in jobs]
    images, annotations = [], []
    for image_id, (file_name, objects) in enumerate(rendered, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for shape, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[shape],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],  # box area: COCO's small/medium/large buckets apply to it
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(CATEGORY_IDS, SHAPES, strict=True)
    ]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(payload))


def synthetic_root(
    cache_dir: str | Path,
    *,
    seed: int,
    image_size: int,
    num_train: int,
    num_val: int,
    difficulty: Difficulty = Difficulty(),
) -> Path:
    key = f"v{GENERATOR_VERSION}_seed{seed}_{image_size}px_{num_train}train_{num_val}val"
    return Path(cache_dir) / (key + difficulty.cache_suffix())


def synthetic_paths(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of split "train" or "val" inside a generated dataset."""
    return root / split, root / "annotations" / f"instances_{split}.json"


def ensure_synthetic_dataset(
    cache_dir: str | Path,
    *,
    seed: int,
    image_size: int,
    num_train: int,
    num_val: int,
    difficulty: Difficulty = Difficulty(),
) -> Path:
    """Root of the generated dataset, generating it first if this parameter set has never been generated."""
    if image_size < 32:
        raise ValueError(f"data.synthetic.image_size must be at least 32 pixels, got {image_size}")
    difficulty.check(image_size)
    root = synthetic_root(
        cache_dir, seed=seed, image_size=image_size, num_train=num_train, num_val=num_val, difficulty=difficulty
    )
    if root.is_dir():  # only ever created by the rename below, so it is complete
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            images_dir, annotation_file = synthetic_paths(tmp, split)
            workers = min(os.cpu_count() or 1, 8) if count >= 256 else 1
            generate_split(images_dir, annotation_file, seed, split_index, count, image_size, workers, difficulty)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():
                raise
            shutil.rmtree(tmp)  # another process finished the same dataset first; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("generated synthetic dataset %s in %.1f s", root, time.perf_counter() - start)
    return root

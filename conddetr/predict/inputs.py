"""What `predict` reads: image files, folders of images, or a COCO annotation file followed by its image folder.

Plain images get ids after the largest COCO id given; unreadable files are reported per image (`UnreadableImage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from conddetr.predict.loading import PredictError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class UnreadableImage(ValueError):
    """One input image could not be decoded; `predict` reports it and goes on with the others."""


@dataclass
class InputImage:
    path: Path
    image_id: int
    size: tuple[int, int] | None = None  # (width, height) from a COCO annotation file, checked when read
    annotation_file: Path | None = None


def _coco_images(annotations: Path, folder: Path) -> list[InputImage]:
    from conddetr.data.coco import DatasetError, read_annotation_file

    if not folder.is_dir():
        raise PredictError(f"COCO annotation file {annotations} must be followed by its image folder, got {folder}")
    try:
        data = read_annotation_file(annotations)
    except DatasetError as err:
        raise PredictError(str(err)) from None
    return [
        InputImage(folder / im["file_name"], int(im["id"]), (int(im["width"]), int(im["height"])), annotations)
        for im in data["images"]
    ]


def collect_inputs(items: list[str]) -> list[InputImage]:
    """Expand INPUT arguments in order; a missing path or an empty folder is an error naming it."""
    entries: list[InputImage | Path] = []  # annotated images, or plain files still without an id
    i = 0
    while i < len(items):
        path = Path(items[i])
        if not path.exists():
            raise PredictError(f"input {path} does not exist")
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise PredictError(f"input folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            entries += files
        elif path.suffix.lower() == ".json":
            if i + 1 >= len(items):
                raise PredictError(f"COCO annotation file {path} must be followed by its image folder")
            seen = {e.image_id: e.annotation_file for e in entries if isinstance(e, InputImage)}
            for image in _coco_images(path, Path(items[i + 1])):
                if image.image_id in seen:
                    raise PredictError(f"image id {image.image_id} appears in both {seen[image.image_id]} and {path}")
                entries.append(image)
            i += 1
        else:
            entries.append(path)
        i += 1
    next_id = max((e.image_id for e in entries if isinstance(e, InputImage)), default=0) + 1
    result, seen_files = [], set()
    for entry in entries:
        if isinstance(entry, Path):
            if entry.resolve() in seen_files:
                continue  # the same file named twice: predicted once
            seen_files.add(entry.resolve())
            entry, next_id = InputImage(entry, next_id), next_id + 1
        result.append(entry)
    return result


def read_image(item: InputImage) -> Image.Image:
    """RGB image, fully decoded (a truncated file fails here, not later); raises UnreadableImage naming the file."""
    try:
        with Image.open(item.path) as pil:
            # Plain photos are shown upright (EXIF); annotated ones stay as stored, the frame their boxes use.
            pil = pil.convert("RGB") if item.annotation_file else ImageOps.exif_transpose(pil).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"cannot read image {item.path}: {err}") from None
    if item.size is not None and pil.size != item.size:
        raise UnreadableImage(
            f"image {item.path} is {pil.width}x{pil.height} on disk but {item.size[0]}x{item.size[1]} in "
            f"{item.annotation_file} (image id {item.image_id})"
        )
    return pil

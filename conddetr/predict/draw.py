"""Draw detections on an image: one readable colour per class, a dark rim on every box, labels kept inside the image.

Images with a short side under `MIN_DRAW_SIDE` pixels are enlarged by an integer factor (nearest neighbour, so the
pixels stay the model's) before drawing, or no label would be legible on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

MIN_DRAW_SIDE = 384
# Strong, mutually distinct colours (pale ones left out: they vanish on bright backgrounds).
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128),
    (255, 105, 180),
)  # fmt: skip
RIM = (0, 0, 0)


@dataclass
class Drawn:
    """One box to draw: xyxy in the original image's pixels, its label text and the key its colour comes from."""

    box: Sequence[float]
    text: str
    colour_key: int


def colour(key: int) -> tuple[int, int, int]:
    return PALETTE[int(key) % len(PALETTE)]


def text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `rgb` (relative luminance, ITU-R BT.709 weights)."""
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def upscale_factor(width: int, height: int) -> int:
    return max(1, math.ceil(MIN_DRAW_SIDE / max(1, min(width, height))))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def label_origin(text_wh: tuple[int, int], box: Sequence[float], image_wh: tuple[int, int]) -> tuple[int, int]:
    """Top-left of a label: just above the box, or inside its top edge when there is no room; always in the image."""
    (tw, th), (width, height) = text_wh, image_wh
    x0, y0 = box[0], box[1]
    y = y0 - th if y0 - th >= 0 else y0
    x = min(max(0, x0), max(0, width - tw))
    y = min(max(0, y), max(0, height - th))
    return int(round(x)), int(round(y))


def draw_detections(image: Image.Image, detections: Sequence[Drawn]) -> Image.Image:
    """A new RGB image (enlarged when small) with the detections drawn in order: pass the best one last, on top."""
    factor = upscale_factor(*image.size)
    canvas = image.convert("RGB")
    if factor > 1:
        canvas = canvas.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    width, height = canvas.size
    short = min(width, height)
    line = max(2, round(short / 200))
    font = _font(max(11, round(short / 32)))
    pad = max(1, line // 2)
    draw = ImageDraw.Draw(canvas)
    for det in detections:
        x0, y0, x1, y1 = (float(v) * factor for v in det.box)
        x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))
        y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
        rgb = colour(det.colour_key)
        # A dark rim outside and inside the coloured line keeps boxes visible on any background.
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=RIM, width=line + 2)
        draw.rectangle((x0, y0, x1, y1), outline=rgb, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), det.text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        lx, ly = label_origin((tw, th), (x0, y0, x1, y1), (width, height))
        draw.rectangle((lx, ly, lx + tw - 1, ly + th - 1), fill=rgb)
        draw.text((lx + pad - left, ly + pad - top), det.text, fill=text_colour(rgb), font=font)
    return canvas

"""The inspection command: printed counts and histograms, a PNG of annotated images, clear errors."""

from __future__ import annotations

import json

from PIL import Image

from conddetr.data.inspect import main
from conddetr.data.synthetic import ensure_synthetic_dataset, synthetic_paths


def test_inspect_prints_counts_and_writes_png(tmp_path, capsys):
    root = ensure_synthetic_dataset(tmp_path / "cache", seed=2, image_size=96, num_train=1, num_val=6)
    images, annotations = synthetic_paths(root, "val")
    data = json.loads(annotations.read_text())
    out = tmp_path / "examples.png"
    assert (
        main(["--images", str(images), "--annotations", str(annotations), "--out", str(out), "--num-images", "2"]) == 0
    )
    printed = capsys.readouterr().out
    assert "images: 6 (0 without annotations)" in printed
    assert f"annotations: {len(data['annotations'])} (0 crowd, 0 degenerate dropped)" in printed
    for category in data["categories"]:
        count = sum(a["category_id"] == category["id"] for a in data["annotations"])
        assert f"{category['id']:>4} {category['name']:<16} {count:>7}" in printed
    assert "small" in printed and "medium" in printed and "large" in printed
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 300  # two panels side by side


def test_inspect_reports_bad_input(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{")
    assert main(["--images", str(tmp_path), "--annotations", str(tmp_path / "broken.json")]) == 1
    assert "broken.json is malformed JSON" in capsys.readouterr().err

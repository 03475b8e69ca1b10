"""Post-processing: published detections on the parity fixtures, top-k semantics, DETR's no-object column."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conddetr.models.postprocess import build_postprocessor

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = [
    ("parity_conddetr_small", "conditional"),
    ("parity_conddetr_small_h256", "conditional"),
    ("parity_detr_small", "detr"),
]


@pytest.mark.parametrize("name,variant", PARITY)
def test_postprocess_matches_published(name, variant):
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    results = build_postprocessor(variant)(fx["outputs_eval"], fx["postprocess_target_sizes"])
    expected = fx["postprocess_results"]
    assert len(results) == len(expected)
    for got, exp in zip(results, expected, strict=True):
        assert sorted(got) == sorted(exp)
        assert_close(got["scores"], exp["scores"], rtol=0, atol=1e-5)
        assert got["labels"].dtype == torch.int64
        assert_close(got["labels"], exp["labels"], rtol=0, atol=0)
        assert_close(got["boxes"], exp["boxes"], rtol=1e-5, atol=1e-3)  # pixels


def test_conditional_topk_over_queries_and_classes():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 2, 3] = 2.0  # same query again with class 3
    logits[0, 0, 0] = 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    post = build_postprocessor("conditional", num_select=3)
    (result,) = post({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert_close(result["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert_close(result["labels"], torch.tensor([1, 3, 0]))
    box_q2 = torch.tensor([0.0, 0.0, 100.0, 100.0])  # (h, w) = (100, 200): x scaled by 200, y by 100
    box_q0 = torch.tensor([80.0, 30.0, 120.0, 70.0])
    assert_close(result["boxes"], torch.stack([box_q2, box_q2, box_q0]))
    # More candidates requested than queries x classes: all 12 are kept, none invented.
    (everything,) = build_postprocessor("conditional", num_select=100)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )
    assert everything["scores"].shape == (12,) and everything["boxes"].shape == (12, 4)


def test_detr_drops_the_no_object_column():
    logits = torch.tensor([[[0.0, 1.0, 5.0], [2.0, 0.0, 0.0]]])  # query 0 is most likely "no object"
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]]])
    (result,) = build_postprocessor("detr")({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))
    prob = logits.softmax(-1)[0]
    assert_close(result["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    assert_close(result["labels"], torch.tensor([1, 0]))
    assert_close(result["boxes"], torch.tensor([[0.0, 0.0, 20.0, 10.0], [5.0, 2.5, 15.0, 7.5]]))


def test_bf16_outputs_and_bad_sizes():
    gen = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, 3, generator=gen), "pred_boxes": torch.rand(2, 5, 4, generator=gen)}
    sizes = torch.tensor([[30, 40], [50, 60]])
    post = build_postprocessor("conditional", num_select=4)
    results = post({k: v.bfloat16() for k, v in outputs.items()}, sizes)
    expected = post({k: v.bfloat16().float() for k, v in outputs.items()}, sizes)
    assert all(r["scores"].dtype == torch.float32 for r in results)
    assert_close(results, expected)
    with pytest.raises(ValueError, match=r"target_sizes must be \[B, 2\]"):
        post(outputs, sizes[:1])
    with pytest.raises(ValueError, match="variant"):
        build_postprocessor("deformable")

"""Hungarian matcher: published assignments on the parity fixtures, optimality vs brute force, empty images, bf16."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch.testing import assert_close

from conddetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from conddetr.models.matcher import HungarianMatcher, focal_class_cost, giou_cost, softmax_class_cost

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = [("parity_conddetr_small", "focal"), ("parity_conddetr_small_h256", "focal"), ("parity_detr_small", "softmax")]


def _fixture_matcher(name: str, class_cost: str) -> tuple[dict, HungarianMatcher]:
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    extra = fx["extra_settings"]
    matcher = HungarianMatcher(
        class_cost, extra["set_cost_class"], extra["set_cost_bbox"], extra["set_cost_giou"], focal_alpha=0.25
    )
    return fx, matcher


def _assert_indices_equal(got, expected) -> None:
    assert len(got) == len(expected)
    for (rows, cols), (exp_rows, exp_cols) in zip(got, expected, strict=True):
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
        torch.testing.assert_close(rows, exp_rows, rtol=0, atol=0)
        torch.testing.assert_close(cols, exp_cols, rtol=0, atol=0)


@pytest.mark.parametrize("name,class_cost", PARITY)
def test_matcher_reproduces_published_indices(name, class_cost):
    fx, matcher = _fixture_matcher(name, class_cost)
    outputs = fx["outputs_train"]
    _assert_indices_equal(matcher(outputs, fx["targets"]), fx["matcher_indices_last"])
    assert len(outputs["aux_outputs"]) == len(fx["matcher_indices_aux"])
    for aux, expected in zip(outputs["aux_outputs"], fx["matcher_indices_aux"], strict=True):
        _assert_indices_equal(matcher(aux, fx["targets"]), expected)


def _random_case(gen: torch.Generator, batch: int, num_queries: int, num_classes: int, counts: list[int]):
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen) * 2,
        "pred_boxes": torch.rand(batch, num_queries, 4, generator=gen) * 0.6 + 0.2,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=gen),
            "boxes": torch.rand(n, 4, generator=gen) * 0.6 + 0.2,
        }
        for n in counts
    ]
    return outputs, targets


def _reference_cost(logits, boxes, labels, tgt_boxes, class_cost, weights) -> torch.Tensor:
    """Cost `[Q, N]` written out per pair in float64, with torchvision's GIoU as the box overlap."""
    w_class, w_bbox, w_giou = weights
    giou = torchvision.ops.generalized_box_iou(
        box_cxcywh_to_xyxy(boxes.double()), box_cxcywh_to_xyxy(tgt_boxes.double())
    )
    cost = torch.zeros(len(boxes), len(labels), dtype=torch.float64)
    for q in range(len(boxes)):
        for n in range(len(labels)):
            if class_cost == "focal":
                p = torch.sigmoid(logits[q, labels[n]].double()).item()
                pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
                neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
                c_class = pos - neg
            else:
                c_class = -torch.softmax(logits[q].double(), -1)[labels[n]].item()
            c_l1 = (boxes[q].double() - tgt_boxes[n].double()).abs().sum().item()
            cost[q, n] = w_class * c_class + w_bbox * c_l1 - w_giou * giou[q, n].item()
    return cost


def _brute_force_min(cost: torch.Tensor) -> float:
    num_queries, num_targets = cost.shape
    if num_targets <= num_queries:
        perms = itertools.permutations(range(num_queries), num_targets)
        return min(sum(cost[q, n].item() for n, q in enumerate(p)) for p in perms)
    perms = itertools.permutations(range(num_targets), num_queries)
    return min(sum(cost[q, n].item() for q, n in enumerate(p)) for p in perms)


@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_matcher_cost_and_optimality_vs_brute_force(class_cost):
    gen = torch.Generator().manual_seed(0 if class_cost == "focal" else 1)
    weights = (2.0, 5.0, 2.0)
    matcher = HungarianMatcher(class_cost, *weights)
    for _ in range(40):
        num_queries = int(torch.randint(1, 7, (1,), generator=gen))
        counts = [int(torch.randint(0, 5, (1,), generator=gen)) for _ in range(2)]
        outputs, targets = _random_case(gen, 2, num_queries, 5, counts)
        costs = matcher.cost_matrices(outputs, targets)
        indices = matcher(outputs, targets)
        for b, (cost, (rows, cols), tgt) in enumerate(zip(costs, indices, targets, strict=True)):
            expected_cost = _reference_cost(
                outputs["pred_logits"][b], outputs["pred_boxes"][b], tgt["labels"], tgt["boxes"], class_cost, weights
            )
            assert_close(cost.double(), expected_cost, rtol=1e-5, atol=1e-5)
            k = min(num_queries, len(tgt["labels"]))
            assert len(rows) == len(cols) == k
            assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
            assert rows.tolist() == sorted(rows.tolist())
            if k:
                assert math.isclose(cost[rows, cols].sum().item(), _brute_force_min(cost), abs_tol=1e-4)


def test_matcher_images_without_boxes():
    gen = torch.Generator().manual_seed(2)
    for class_cost in ("focal", "softmax"):
        matcher = HungarianMatcher(class_cost, 2.0, 5.0, 2.0)
        for counts in ([0, 0, 0], [0, 3, 0]):
            outputs, targets = _random_case(gen, 3, 5, 4, counts)
            indices = matcher(outputs, targets)
            for (rows, cols), n in zip(indices, counts, strict=True):
                assert rows.dtype == torch.int64 and cols.dtype == torch.int64
                assert rows.shape == cols.shape == (n,)


def test_matcher_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_case(gen, 2, 6, 5, [3, 2])
    bf16 = {k: v.bfloat16() for k, v in outputs.items()}
    upcast = {k: v.float() for k, v in bf16.items()}
    matcher = HungarianMatcher("focal", 2.0, 5.0, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        costs = matcher.cost_matrices(bf16, targets)
        indices = matcher(bf16, targets)
    for cost, expected in zip(costs, matcher.cost_matrices(upcast, targets), strict=True):
        assert cost.dtype == torch.float32
        assert_close(cost, expected)
    _assert_indices_equal(indices, matcher(upcast, targets))


def test_matcher_rejects_bad_input():
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher("sigmoid")
    gen = torch.Generator().manual_seed(4)
    outputs, targets = _random_case(gen, 2, 4, 3, [1, 1])
    outputs["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1 is not finite"):
        HungarianMatcher("focal")(outputs, targets)
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        HungarianMatcher("focal")(outputs, targets[:1])


def _scipy_indices(logits, boxes, labels, tgt_boxes, class_cost, weights):
    """One image alone, in the published layout (class cost over all classes, then the target columns)."""
    w_class, w_bbox, w_giou = weights
    if class_cost == "focal":
        prob = logits.sigmoid()
        cost_class = (0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log() - 0.75 * prob**2 * -(1 - prob + 1e-8).log())[
            :, labels
        ]
    else:
        cost_class = -logits.softmax(-1)[:, labels]
    giou = torchvision.ops.generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
    cost = w_bbox * torch.cdist(boxes, tgt_boxes, p=1) + w_class * cost_class - w_giou * giou
    rows, cols = linear_sum_assignment(cost.numpy())
    return cost, torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def test_batched_matching_equals_scipy_per_image_on_50_random_cases():
    gen = torch.Generator().manual_seed(5)
    weights = (2.0, 5.0, 2.0)
    for case in range(50):
        class_cost = ("focal", "softmax")[case % 2]
        batch, num_queries = (
            int(torch.randint(1, 6, (1,), generator=gen)),
            int(torch.randint(1, 60, (1,), generator=gen)),
        )
        counts = [int(torch.randint(0, 15, (1,), generator=gen)) for _ in range(batch)]
        classes = 9 if class_cost == "focal" else 10  # softmax: 9 classes + no-object
        outputs, targets = _random_case(gen, batch, num_queries, classes, counts)
        for t in targets:
            t["labels"] = t["labels"].clamp(max=8)
        matcher = HungarianMatcher(class_cost, *weights)
        got, costs = matcher(outputs, targets), matcher.cost_matrices(outputs, targets)
        for b, t in enumerate(targets):
            cost, rows, cols = _scipy_indices(
                outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"], t["boxes"], class_cost, weights
            )
            assert_close(costs[b], cost, rtol=0, atol=1e-5)
            _assert_indices_equal([got[b]], [(rows, cols)])


def test_in_place_costs_equal_the_plain_formulas_bit_for_bit():
    """The matcher's in-place cost pieces are the plain (out-of-place) formulas, same operations, same bits."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 40, 12, generator=gen) * 3
    labels = torch.randint(0, 12, (3, 9), generator=gen)
    boxes = torch.rand(3, 40, 4, generator=gen) * 0.6 + 0.2
    tgt = torch.rand(3, 9, 4, generator=gen) * 0.6 + 0.2
    tgt[0, 0, 2:] = 0  # a zero-size box: the clamps matter
    prob = logits.gather(-1, labels[:, None, :].expand(-1, 40, -1)).sigmoid()
    focal = 0.25 * (1 - prob) ** 2.0 * -(prob + 1e-8).log() - 0.75 * prob**2.0 * -(1 - prob + 1e-8).log()
    assert torch.equal(focal_class_cost(logits, labels, 0.25), focal)
    softmax = -logits.softmax(-1).gather(-1, labels[:, None, :].expand(-1, 40, -1))
    assert torch.equal(softmax_class_cost(logits, labels), softmax)
    expected = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))
    assert torch.equal(giou_cost(boxes, tgt), expected)

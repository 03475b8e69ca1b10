"""Set criterion and box ops: published losses on the parity fixtures, empty and degenerate inputs, bf16 autocast,
and the num_boxes all-reduce across a 2-process gloo group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from conddetr.models import box_ops
from conddetr.models.criterion import build_criterion

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = [
    ("parity_conddetr_small", "conditional"),
    ("parity_conddetr_small_h256", "conditional"),
    ("parity_detr_small", "detr"),
]


def _criterion(variant: str, num_classes: int, dec_layers: int = 3, **overrides):
    kwargs = dict(
        num_classes=num_classes,
        set_cost_class=2.0 if variant == "conditional" else 1.0,
        set_cost_bbox=5.0,
        set_cost_giou=2.0,
        cls_loss_coef=2.0 if variant == "conditional" else 1.0,
        bbox_loss_coef=5.0,
        giou_loss_coef=2.0,
        focal_alpha=0.25,
        eos_coef=0.1,
        aux_loss=True,
        dec_layers=dec_layers,
    )
    kwargs.update(overrides)
    return build_criterion(variant, **kwargs)


def _fixture_criterion(name: str, variant: str):
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    extra, settings = fx["extra_settings"], fx["settings"]
    keys = ("set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef", "giou_loss_coef")
    overrides = {k: extra[k] for k in keys}
    # The published DETR hard-codes a class loss weight of 1 (no cls_loss_coef argument).
    overrides["cls_loss_coef"] = extra.get("cls_loss_coef", 1.0)
    overrides.update({k: extra[k] for k in ("focal_alpha", "eos_coef") if k in extra})
    crit = _criterion(variant, settings["num_classes"], settings["dec_layers"], **overrides)
    return fx, crit


@pytest.mark.parametrize("name,variant", PARITY)
def test_criterion_matches_published_losses(name, variant):
    fx, crit = _fixture_criterion(name, variant)
    losses, indices = crit(fx["outputs_train"], fx["targets"], return_indices=True)
    assert sorted(losses) == sorted(fx["loss_dict"])
    assert_close({k: losses[k] for k in fx["loss_dict"]}, fx["loss_dict"], rtol=1e-5, atol=1e-5)
    assert crit.weight_dict == fx["weight_dict"]
    assert_close(crit.weighted_total(losses), fx["loss_total_weighted"], rtol=1e-5, atol=1e-5)
    expected = {"last": fx["matcher_indices_last"], "aux": fx["matcher_indices_aux"]}
    flat = lambda idx: [t for image in idx for t in image]  # noqa: E731
    assert_close(flat(indices["last"]), flat(expected["last"]), rtol=0, atol=0)
    assert_close([flat(i) for i in indices["aux"]], [flat(i) for i in expected["aux"]], rtol=0, atol=0)
    if variant == "detr":
        assert_close(crit.empty_weight, torch.tensor([1.0] * 91 + [0.1]))


def _outputs(gen, batch, num_queries, num_logits, aux_layers=2, dtype=torch.float32):
    def layer():
        return {
            "pred_logits": (torch.randn(batch, num_queries, num_logits, generator=gen)).to(dtype).requires_grad_(),
            "pred_boxes": (torch.rand(batch, num_queries, 4, generator=gen) * 0.5 + 0.25).to(dtype).requires_grad_(),
        }

    return {**layer(), "aux_outputs": [layer() for _ in range(aux_layers)]}


def _targets(gen, counts, num_classes):
    return [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=gen),
            "boxes": torch.rand(n, 4, generator=gen) * 0.4 + 0.3,
        }
        for n in counts
    ]


def _leaves(outputs):
    layers = [outputs, *outputs["aux_outputs"]]
    return [layer[k] for layer in layers for k in ("pred_logits", "pred_boxes")]


@pytest.mark.parametrize("variant", ["conditional", "detr"])
def test_all_empty_batch_is_finite_with_finite_gradients(variant):
    gen = torch.Generator().manual_seed(0)
    crit = _criterion(variant, num_classes=7)
    outputs = _outputs(gen, 2, 5, 7 if variant == "conditional" else 8)
    losses = crit(outputs, _targets(gen, [0, 0], 7))
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert_close(losses["loss_bbox"], torch.tensor(0.0))
    assert_close(losses["class_error"], torch.tensor(100.0))
    crit.weighted_total(losses).backward()
    for leaf in _leaves(outputs):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # The class loss still pushes every query towards "no object".
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_zero_size_boxes_give_no_nan():
    gen = torch.Generator().manual_seed(1)
    crit = _criterion("conditional", num_classes=5)
    outputs = _outputs(gen, 1, 4, 5)
    with torch.no_grad():
        outputs["pred_boxes"][0, :, 2:] = 0  # every predicted box has zero size
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.0, 0.2]])}]
    losses = crit(outputs, targets)
    assert all(torch.isfinite(v).all() for v in losses.values())
    crit.weighted_total(losses).backward()
    assert all(torch.isfinite(leaf.grad).all() for leaf in _leaves(outputs))


@pytest.mark.parametrize("variant", ["conditional", "detr"])
def test_bf16_autocast_computes_losses_in_float32(variant):
    gen = torch.Generator().manual_seed(2)
    crit = _criterion(variant, num_classes=6)
    num_logits = 6 if variant == "conditional" else 7
    outputs = _outputs(gen, 2, 8, num_logits, dtype=torch.bfloat16)
    targets = _targets(gen, [3, 1], 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(outputs, targets)
    upcast = {
        "pred_logits": outputs["pred_logits"].detach().float(),
        "pred_boxes": outputs["pred_boxes"].detach().float(),
        "aux_outputs": [{k: v.detach().float() for k, v in aux.items()} for aux in outputs["aux_outputs"]],
    }
    expected = crit(upcast, targets)
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert_close(losses, expected)
    crit.weighted_total(losses).backward()
    for leaf in _leaves(outputs):
        assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()


def test_focal_loss_and_class_error_on_a_known_assignment():
    import torchvision  # here, not at the top: keeps the spawned workers of the all-reduce test quick to start

    # One query per target, placed exactly on its box: the matching is forced, so the losses are known.
    crit = _criterion("conditional", num_classes=4, dec_layers=1, aux_loss=False)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    logits = torch.full((1, 2, 4), -5.0)
    logits[0, 0, 1] = 5.0  # query 0 predicts the right class (1); query 1 predicts class 0, target is 3
    logits[0, 1, 0] = 5.0
    targets = [{"labels": torch.tensor([1, 3]), "boxes": boxes}]
    losses = crit({"pred_logits": logits, "pred_boxes": boxes[None]}, targets)
    onehot = torch.zeros(1, 2, 4)
    onehot[0, 0, 1] = onehot[0, 1, 3] = 1
    expected_ce = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2, reduction="sum") / 2
    assert_close(losses["loss_ce"], expected_ce)
    assert_close(losses["class_error"], torch.tensor(50.0))
    assert_close(losses["loss_bbox"], torch.tensor(0.0))
    assert_close(losses["loss_giou"], torch.tensor(0.0))


def test_bad_targets_name_the_fault():
    crit = _criterion("conditional", num_classes=5)
    outputs = _outputs(torch.Generator().manual_seed(3), 2, 4, 5)
    good = {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4)}
    with pytest.raises(ValueError, match=r"targets\[1\] has no 'boxes'"):
        crit(outputs, [good, {"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match=r"targets\[0\]: 'boxes' must be \[N, 4\]"):
        crit(outputs, [{"labels": torch.tensor([1]), "boxes": torch.rand(1, 3)}, good])
    with pytest.raises(ValueError, match=r"labels' must lie in \[0, 5\), got values in \[1, 5\]"):
        crit(outputs, [good, {"labels": torch.tensor([5]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must be an integer tensor"):
        crit(outputs, [good, {"labels": torch.tensor([]), "boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="expects 6"):
        _criterion("detr", num_classes=5)(outputs, [good, good])
    with pytest.raises(KeyError, match="loss_ce_1"):
        crit.weighted_total(crit({k: v for k, v in outputs.items() if k != "aux_outputs"}, [good, good]))


def test_box_ops_agree_with_torchvision_and_survive_zero_size_boxes():
    import torchvision

    gen = torch.Generator().manual_seed(4)
    cxcywh = torch.rand(6, 4, generator=gen) * 0.5 + 0.1
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    assert_close(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh)
    assert_close(xyxy, torchvision.ops.box_convert(cxcywh, "cxcywh", "xyxy"))
    other = box_ops.box_cxcywh_to_xyxy(torch.rand(5, 4, generator=gen) * 0.5 + 0.1)
    assert_close(box_ops.box_iou(xyxy, other)[0], torchvision.ops.box_iou(xyxy, other))
    assert_close(box_ops.generalized_box_iou(xyxy, other), torchvision.ops.generalized_box_iou(xyxy, other))
    assert_close(
        box_ops.elementwise_generalized_box_iou(xyxy[:5], other),
        box_ops.generalized_box_iou(xyxy[:5], other).diagonal(),
    )

    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]], requires_grad=True)  # zero-size box
    giou = box_ops.generalized_box_iou(point, torch.cat([point.detach(), xyxy[:1]]))
    assert torch.isfinite(giou).all()
    giou.sum().backward()
    assert torch.isfinite(point.grad).all()


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool (as DataLoader workers do)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        outputs, targets = _dist_batch()
        crit = _criterion("conditional", num_classes=5)
        # Rank 0 holds image 0 (3 boxes), rank 1 holds image 1 (1 box).
        local = {
            "pred_logits": outputs["pred_logits"][rank : rank + 1],
            "pred_boxes": outputs["pred_boxes"][rank : rank + 1],
            "aux_outputs": [{k: v[rank : rank + 1] for k, v in aux.items()} for aux in outputs["aux_outputs"]],
        }
        losses = crit(local, targets[rank : rank + 1])
        torch.save({k: v.detach() for k, v in losses.items()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _dist_batch():
    gen = torch.Generator().manual_seed(5)
    outputs = _outputs(gen, 2, 6, 5)
    outputs = {
        "pred_logits": outputs["pred_logits"].detach(),
        "pred_boxes": outputs["pred_boxes"].detach(),
        "aux_outputs": [{k: v.detach() for k, v in aux.items()} for aux in outputs["aux_outputs"]],
    }
    return outputs, _targets(gen, [3, 1], 5)


def test_num_boxes_is_all_reduced_across_ranks(tmp_path):
    # fork, not spawn: spawned children re-import torch and the model package, 3 s idle and 30 s on a busy CI box.
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_dist_worker, args=args, nprocs=2, join=True, start_method="fork")
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    outputs, targets = _dist_batch()
    crit = _criterion("conditional", num_classes=5)
    whole = crit(outputs, targets)  # one process, whole batch: normalised by all 4 boxes
    summed = ("loss_ce", "loss_bbox", "loss_giou")
    # DDP averages gradients over ranks, so the rank-mean of the losses must equal the whole-batch loss.
    for suffix in ("", "_0", "_1"):
        mean = {k: (per_rank[0][k + suffix] + per_rank[1][k + suffix]) / 2 for k in summed}
        assert_close(mean, {k: whole[k + suffix] for k in summed})
    # Each rank divides by the global mean count 2, not by its own count (3 and 1).
    for rank in range(2):
        alone = crit(
            {k: v[rank : rank + 1] for k, v in outputs.items() if k != "aux_outputs"}, targets[rank : rank + 1]
        )
        own_count = len(targets[rank]["labels"])
        assert_close(per_rank[rank]["loss_bbox"], alone["loss_bbox"] * own_count / 2)

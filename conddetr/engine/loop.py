"""One training epoch (accumulation, autocast, clipping, non-finite guard) and one evaluation pass.

The loop knows no logging backend: it hands metric dicts to a `log_fn(metrics, step=, epoch=)` callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from conddetr.engine.distributed import all_reduce_mean, all_reduce_sum, world_size
from conddetr.engine.optim import accumulation_weights, box_normalised_terms, grad_global_norm

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term (or the gradient norm) became NaN/inf: training stops before the optimizer step, so the
    weights are never touched by it and the last checkpoint stays intact."""

    def __init__(self, step: int, epoch: int, terms: dict[str, float]):
        self.step, self.epoch, self.terms = step, epoch, terms
        bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        super().__init__(
            f"non-finite loss at optimizer step {step} (epoch {epoch + 1}): non-finite terms {sorted(bad)}; "
            f"all terms: {shown}"
        )


class TrainingInterrupted(RuntimeError):
    """A stop was requested: the loop saved a checkpoint after a whole optimizer step and stopped there."""


@dataclass
class StepConfig:
    variant: str
    accum_steps: int = 1
    clip_max_norm: float = 0.0
    amp_dtype: torch.dtype | None = None
    log_every_steps: int = 10


def progress_enabled(is_main: bool) -> tuple[bool, str]:
    """tqdm only on rank 0 at a terminal; the reason is logged so a silent run is explained."""
    if not is_main:
        return False, "not rank 0"
    if os.environ.get("CONDDETR_NO_TQDM"):
        return False, "CONDDETR_NO_TQDM is set"
    if not sys.stderr.isatty():
        return False, "stderr is not a terminal"
    return True, "stderr is a terminal"


def to_device(images: torch.Tensor, mask: torch.Tensor, targets: list[dict], device: torch.device):
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def _base_name(key: str) -> str:
    return re.sub(r"_\d+$", "", key)  # loss_bbox_3 (aux layer 3) -> loss_bbox


def _grouped(loader: Iterable, size: int, count: int):
    """Consecutive micro-batches in groups of `size`; the last incomplete group is dropped (as drop_last)."""
    it = iter(loader)
    for _ in range(count):
        yield [next(it) for _ in range(size)]


def forward_backward(
    model: nn.Module,
    criterion: nn.Module,
    micro_batches: list,
    *,
    device: torch.device,
    cfg: StepConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Accumulate the gradients of one optimizer step over its micro-batches (see optim.accumulation_weights).

    Returns the term names ("loss" = weighted total, then the criterion's keys) and this rank's values, each
    summed over micro-batches with the accumulation weights, i.e. the big-batch values on this rank.
    """
    counts = torch.tensor([float(sum(len(t["boxes"]) for t in mb[2])) for mb in micro_batches])  # [accum]
    box_w, mean_w = accumulation_weights(all_reduce_sum(counts).tolist(), world_size())
    box_terms = box_normalised_terms(cfg.variant)
    weight_dict = criterion.weight_dict
    step_terms, keys = None, []
    for m, (images, mask, targets) in enumerate(micro_batches):
        images, mask, targets = to_device(images, mask, targets, device)
        last = m == len(micro_batches) - 1
        # DDP all-reduces gradients only on the last micro-batch of an optimizer step.
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=cfg.amp_dtype or torch.float32, enabled=cfg.amp_dtype is not None):
                outputs = model(images, mask)
            loss_dict = criterion(outputs, targets)
            keys = sorted(loss_dict)
            scale = {k: box_w[m] if _base_name(k) in box_terms else mean_w for k in keys}
            total = sum(loss_dict[k] * weight_dict[k] * scale[k] for k in keys if k in weight_dict)
            (scaler.scale(total) if scaler is not None else total).backward()
        terms = torch.stack([total.detach().float()] + [loss_dict[k].detach().float() * scale[k] for k in keys])
        step_terms = terms if step_terms is None else step_terms + terms
    return ["loss"] + keys, step_terms


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    device: torch.device,
    epoch: int,
    global_step: int,
    steps_per_epoch: int,
    cfg: StepConfig,
    scaler: torch.amp.GradScaler | None,
    log_fn: Callable[..., None],
    stop_requested: Callable[[], bool] = lambda: False,
    show_progress: bool = False,
    images_per_step: int = 1,
    position: dict | None = None,
    save_fn: Callable[[dict], None] | None = None,
    save_every_steps: int = 0,
) -> tuple[dict[str, float], int]:
    """Run the epoch's optimizer steps; returns (epoch means of the logged terms, new global step).

    `position` (a mid-epoch checkpoint's, see `epoch_position`) continues an epoch after its first
    `steps_done` steps: the loader must already skip their batches, and the log window and epoch sums come back
    so every later metric line is the one the uninterrupted run logs. At a step boundary `save_fn(position)` is
    called every `save_every_steps` global steps (not on the epoch's last step: the epoch-end checkpoint follows)
    and when a stop was requested; a stop then raises TrainingInterrupted.
    """
    model.train()
    criterion.train()
    params = [p for p in model.parameters() if p.requires_grad]
    done = int(position["steps_done"]) if position else 0
    names: list[str] = list(position["names"]) if position else []
    window: list[torch.Tensor] = list(position["window"]) if position else []
    epoch_sum: torch.Tensor | None = position["epoch_sum"] if position else None
    bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}", disable=not show_progress,
               dynamic_ncols=True)  # fmt: skip
    start = time.perf_counter()
    for i, micro_batches in enumerate(_grouped(loader, cfg.accum_steps, steps_per_epoch - done)):
        names, step_terms = forward_backward(model, criterion, micro_batches, device=device, cfg=cfg, scaler=scaler)
        # step_terms [1 + K]: weighted total, then the criterion's K terms
        # One collective per step carries the terms and the stop flag, so every rank takes the same decisions.
        reduced = all_reduce_mean(torch.cat([step_terms.cpu(), torch.tensor([float(stop_requested())])]))
        step_terms, stop = reduced[:-1], bool(reduced[-1] > 0)
        if not torch.isfinite(step_terms).all():
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(global_step + 1, epoch, dict(zip(names, step_terms.tolist(), strict=True)))
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        if cfg.clip_max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_max_norm)
        else:
            grad_norm = grad_global_norm(params)
        if scaler is None and not torch.isfinite(grad_norm):
            # Finite loss, non-finite gradients (fp16's GradScaler skips such steps itself): never apply them.
            optimizer.zero_grad(set_to_none=True)
            terms = dict(zip(names + ["grad_norm"], step_terms.tolist() + [grad_norm.item()], strict=True))
            raise NonFiniteLossError(global_step + 1, epoch, terms)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        row = torch.cat([step_terms, grad_norm.detach().float().cpu().reshape(1)])
        window.append(row)
        epoch_sum = row if epoch_sum is None else epoch_sum + row
        if global_step % cfg.log_every_steps == 0:
            metrics = _named(names, torch.stack(window).mean(0), "train/")
            metrics.update(_lrs(optimizer))
            log_fn(metrics, step=global_step, epoch=global_step / steps_per_epoch)
            window.clear()
        rate = (i + 1) * images_per_step / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{step_terms[0].item():.4f}", img_s=f"{rate:.1f}")
        bar.update(1)
        in_epoch = done + i + 1
        periodic = save_every_steps > 0 and global_step % save_every_steps == 0 and in_epoch < steps_per_epoch
        if save_fn is not None and (stop or periodic):
            save_fn(epoch_position(epoch, in_epoch, global_step, names, window, epoch_sum))
        if stop:
            bar.close()
            raise TrainingInterrupted(f"stopped by signal after optimizer step {global_step} (epoch {epoch + 1})")
    bar.close()
    if epoch_sum is None:
        raise RuntimeError("the training loader produced no complete optimizer step")
    return _named(names, epoch_sum / steps_per_epoch, ""), global_step


def epoch_position(epoch: int, steps_done: int, global_step: int, names: list[str], window: list, epoch_sum) -> dict:
    """Where an epoch stands at a step boundary, as plain data: what a mid-epoch checkpoint needs to continue it.

    `window` holds the rows not yet logged (log_every_steps), `epoch_sum` the sum of all rows of the epoch so far
    ([1 + K + 1] each: weighted total, the K criterion terms, grad norm).
    """
    rows = torch.stack(window) if window else torch.zeros(0, len(names) + 1)  # [W, 1 + K + 1]
    return {"epoch": epoch, "steps_done": steps_done, "global_step": global_step, "names": list(names),
            "window": rows.clone(), "epoch_sum": epoch_sum.clone()}  # fmt: skip


def _named(names: list[str], values: torch.Tensor, prefix: str) -> dict[str, float]:
    out = dict(zip(names + ["grad_norm"], values.tolist(), strict=True))
    return {prefix + k: v for k, v in out.items()}


def _lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    out = {}
    for g in optimizer.param_groups:
        out["train/lr_backbone" if g.get("name") == "backbone" else "train/lr"] = float(g["lr"])
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: Callable,
    loader: Iterable,
    evaluator,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    show_progress: bool = False,
):
    """Predict every val image and feed the evaluator (results keyed by image id, boxes in original pixels)."""
    model.eval()
    for images, mask, targets in tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True):
        images, mask, targets = to_device(images, mask, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(images, mask)
        outputs = {k: v.float() for k, v in outputs.items() if k in ("pred_logits", "pred_boxes")}
        orig_sizes = torch.stack([t["orig_size"] for t in targets])  # [B, 2] (h, w)
        results = postprocessor(outputs, orig_sizes)
        evaluator.update(
            {int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results, strict=True)}
        )
    evaluator.synchronize()
    return evaluator

"""`run(cfg)`: one experiment end to end (train with auto-resume, or evaluate a checkpoint) in its run folder.

Run folder: config.yaml, train.log, metrics.jsonl + wandb/ (tracking), checkpoint.pth, checkpoint_prev.pth,
checkpoint_epochNNN.pth, results/val_epochNNN.json (COCO detections), eval_only.json (eval-only mode).
checkpoint.pth is written at epoch ends, every `checkpoint_every_steps` steps and on a stop signal (preempt.py);
a mid-epoch one carries its `position` in the epoch, and resume continues exactly there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from conddetr.config import run_dir_of
from conddetr.engine import checkpoint as ckpt_io
from conddetr.engine.checkpoint import load_start_weights
from conddetr.engine.distributed import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    destroy_process_group,
    init_process_group,
    read_dist_env,
    resolve_device,
)
from conddetr.engine.loop import StepConfig, evaluate, forward_backward, progress_enabled, train_one_epoch
from conddetr.engine.media import log_val_media
from conddetr.engine.optim import build_lr_scheduler, build_optimizer
from conddetr.engine.precision import autocast_dtype, maybe_compile, set_tf32
from conddetr.engine.preempt import watch as watch_stop_requests
from conddetr.engine.setup import Components, build_components, wrap_ddp

log = logging.getLogger(__name__)


def run(cfg) -> dict:
    """Train (resuming from the run folder when it holds a checkpoint) or, with eval.eval_only, evaluate."""
    env = read_dist_env()
    device = resolve_device(cfg.device, env)
    _set_threads()
    set_tf32(cfg.perf.tf32, device)
    init_process_group(env, device)
    try:
        return _run(cfg, env, device)
    finally:
        destroy_process_group()


def debug_first_step(cfg, out: str | Path | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first optimizer step, for checking the distributed and accumulation maths.

    The global batch is images [0, batch_size * world_size * accum_steps) of the *validation* set (deterministic
    transforms, so augmentation randomness cannot differ between layouts); rank r, micro-batch m takes the slice
    starting at (m * world_size + r) * batch_size. Returns the rank-mean weighted loss and the (DDP-averaged)
    gradients by parameter name; rank 0 also writes them to `out` (torch.save, plain data).
    """
    from conddetr.data.batching import collate

    env = read_dist_env()
    device = resolve_device(cfg.device, env)
    _set_threads()
    set_tf32(cfg.perf.tf32, device)
    init_process_group(env, device)
    try:
        seed_everything(cfg.optim.seed + env.rank)
        c = build_components(cfg, env, device)
        model = wrap_ddp(c.model, cfg, device) if env.distributed else c.model
        bs, accum = cfg.data.batch_size, cfg.optim.accum_steps
        if len(c.val_ds) < bs * env.world_size * accum:
            raise ValueError(f"debug_first_step needs {bs * env.world_size * accum} val images, have {len(c.val_ds)}")
        micro = []
        for m in range(accum):
            first = (m * env.world_size + env.rank) * bs
            micro.append(collate([c.val_ds[i] for i in range(first, first + bs)]))
        model.train()
        c.criterion.train()
        step_cfg = StepConfig(cfg.model.variant, accum, cfg.optim.clip_max_norm, autocast_dtype(cfg.optim.amp, device))
        names, terms = forward_backward(model, c.criterion, micro, device=device, cfg=step_cfg)
        terms = all_reduce_mean(terms.cpu())
        grads = {n: p.grad.detach().cpu().clone() for n, p in c.model.named_parameters() if p.grad is not None}
        if out is not None and env.is_main:
            payload = {"loss": terms[0].item(), "terms": dict(zip(names, terms.tolist(), strict=True)), "grads": grads}
            ckpt_io.atomic_save({**payload, "world_size": env.world_size}, Path(out))
        return terms[0].item(), grads
    finally:
        destroy_process_group()


def _set_threads() -> None:
    # Bit-identical CPU runs need the same intra-op thread count everywhere (reductions split by thread).
    if os.environ.get("CONDDETR_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["CONDDETR_NUM_THREADS"]))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _run(cfg, env: DistEnv, device: torch.device) -> dict:
    run_dir = run_dir_of(cfg)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temps(run_dir)
    barrier()
    with _log_to_file(run_dir / "train.log" if env.is_main else None):
        return _run_logged(cfg, env, device, run_dir)


def _run_logged(cfg, env: DistEnv, device: torch.device, run_dir: Path) -> dict:
    from conddetr.config import config_to_dict, save_config

    log.info("rank %d of %d (%s) on %s; conddetr from %s", env.rank, env.world_size, env.source, device,
             Path(__file__).parents[1])  # fmt: skip
    seed_everything(cfg.optim.seed + env.rank)
    c = build_components(cfg, env, device)
    if cfg.eval.eval_only:
        return _eval_only(cfg, env, device, run_dir, c)
    resumed = ckpt_io.load_latest_checkpoint(run_dir)
    check_same_resume_point(all_gather_objects(_resume_point(resumed)))
    if env.is_main:
        if resumed is not None:
            _warn_config_changes(resumed[0]["config"], config_to_dict(cfg))
        save_config(cfg, run_dir / "config.yaml")
    return _train(cfg, env, device, run_dir, c, resumed)


def _train(cfg, env: DistEnv, device: torch.device, run_dir: Path, c: Components, resumed) -> dict:
    from conddetr.config import config_to_dict
    from conddetr.data.batching import set_epoch
    from conddetr.tracking import Tracker, truncate_metrics_after

    o = cfg.optim
    optimizer = build_optimizer(c.model, lr=o.lr, lr_backbone=o.lr_backbone, weight_decay=o.weight_decay)
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=o.lr_drop_epoch)
    scaler = torch.amp.GradScaler(device.type) if o.amp == "fp16" else None
    start_epoch, global_step, wandb_id, rng, position = 0, 0, None, None, None
    if resumed is not None:
        state, path = resumed
        load_start_weights(c.model, state, source=str(path), fine_tune=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        start_epoch, global_step = int(state["epoch"]) + 1, int(state["global_step"])
        wandb_id, rng, position = state.get("wandb_run_id"), state["rng"], state.get("position")
        done = int(position["steps_done"]) if position else 0
        log.info("resuming %s at epoch %d step %d (global step %d; W&B run %s)", path, start_epoch + 1, done,
                 global_step, wandb_id)  # fmt: skip
        if position:
            _check_layout(state.get("data") or {}, env.world_size, cfg)
        if cfg.eval.checkpoint:
            log.info("eval.checkpoint=%s not loaded: the run folder's own checkpoint wins", cfg.eval.checkpoint)
    elif cfg.eval.checkpoint:
        # Start from other weights (fine-tuning): model only, optimiser and schedule start fresh.
        load_start_weights(c.model, cfg.eval.checkpoint, source=cfg.eval.checkpoint, fine_tune=cfg.eval.fine_tune)
    model = c.model
    if env.distributed:
        model = wrap_ddp(c.model, cfg, device)
    model = maybe_compile(model, cfg.perf.compile)
    if env.is_main:
        # Lines logged after the checkpoint we resume from (or all, on a fresh start) belong to lost work.
        truncate_metrics_after(run_dir, global_step)
    t = cfg.tracking
    tracker = Tracker(
        run_dir,
        mode=t.wandb_mode,
        project=t.project,
        entity=t.entity,
        group=t.group or cfg.name,
        name=run_dir.name,
        tags=list(t.tags),
        config=config_to_dict(cfg),
        resume_id=wandb_id,
        rank=env.rank,
    )
    if rng is not None:
        _restore_rng(rng, env, device, cfg.optim.seed + env.rank + start_epoch)
    step_cfg = StepConfig(
        cfg.model.variant, o.accum_steps, o.clip_max_norm, autocast_dtype(o.amp, device), t.log_every_steps
    )
    show, why = progress_enabled(env.is_main)
    log.info("progress bars %s (%s)", "on" if show else "off", why)
    images_per_step = cfg.data.batch_size * env.world_size * o.accum_steps
    metrics: dict = {}

    def save(epoch: int, global_step: int, position: dict | None) -> None:
        """Collective (RNG states of every rank); `position` None: `epoch` is complete, else its place in it."""
        payload = {
            "model": c.export_state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            # last completed epoch, 0-based (published convention); a mid-epoch checkpoint: the one before
            "epoch": epoch if position is None else epoch - 1,
            "global_step": global_step,
            "position": position,
            "rng": all_gather_objects(ckpt_io.capture_rng_state(device)),  # one entry per rank
            "data": {
                "sampler_seed": cfg.optim.seed,
                "next_epoch": epoch + 1 if position is None else epoch,
                "world_size": env.world_size,
                "images_per_step": images_per_step,
            },
            "config": config_to_dict(cfg),
            "wandb_run_id": tracker.run_id,
            "label_to_category": {int(k): int(v) for k, v in c.info.label_to_category.items()},
            "category_names": {int(c.info.label_to_category[k]): str(v) for k, v in c.info.category_names.items()},
            "model_kwargs": c.model_kwargs,
        }
        if env.is_main:
            # Periodic copies only of epoch ends: a mid-epoch save must not overwrite checkpoint_epochNNN.pth.
            every = cfg.checkpoint_every_epochs if position is None else 0
            ckpt_io.save_checkpoint(run_dir, payload, every_epochs=every)
            if position is not None:
                log.info("saved mid-epoch checkpoint: epoch %d step %d of %d (global step %d)", epoch + 1,
                         position["steps_done"], len(c.train_loader) // o.accum_steps, global_step)  # fmt: skip
        barrier()

    with watch_stop_requests() as stop:
        try:
            for epoch in range(start_epoch, o.epochs):
                skip = int(position["steps_done"]) if position and epoch == start_epoch else 0
                # order and augmentation: functions of (seed, epoch, rank) only; a mid-epoch resume skips the steps done
                set_epoch(c.train_loader, epoch, skip_batches=skip * o.accum_steps)
                steps = len(c.train_loader) // o.accum_steps
                if steps == 0:
                    raise ValueError(
                        f"{len(c.train_ds)} training images give no complete optimizer step with data.batch_size="
                        f"{cfg.data.batch_size} x {env.world_size} processes x optim.accum_steps={o.accum_steps}"
                    )
                with stop.training():
                    means, global_step = train_one_epoch(
                        model, c.criterion, optimizer, c.train_loader, device=device, epoch=epoch,
                        global_step=global_step, steps_per_epoch=steps, cfg=step_cfg, scaler=scaler,
                        log_fn=tracker.log, stop_requested=stop.is_set, show_progress=show,
                        images_per_step=images_per_step, position=position if skip else None,
                        save_fn=lambda pos, e=epoch: save(e, int(pos["global_step"]), pos),
                        save_every_steps=cfg.checkpoint_every_steps,
                    )  # fmt: skip
                scheduler.step()
                metrics = {f"train_epoch/{k}": v for k, v in means.items()}
                every, stats = cfg.eval.every_epochs, None
                if every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == o.epochs):
                    stats = _evaluate(cfg, env, device, c, run_dir / "results" / f"val_epoch{epoch + 1:03d}.json")
                    metrics.update({f"val/{k}": v for k, v in stats.items()})
                tracker.log(metrics, step=global_step, epoch=float(epoch + 1))
                if stats is not None:  # pictures of this evaluation, through the tracker (W&B only)
                    log_val_media(tracker, c, t.log_images, stats, step=global_step, epoch=float(epoch + 1),
                                  device=device, amp_dtype=step_cfg.amp_dtype)  # fmt: skip
                log.info("epoch %d/%d done (step %d): %s", epoch + 1, o.epochs, global_step, _fmt(metrics))
                save(epoch, global_step, None)
        finally:
            tracker.finish()  # before a submitit hand-over requeues and exits the process
    if start_epoch >= o.epochs and env.is_main:  # a finished run started again (e.g. a late requeue): report it
        from conddetr.tracking import read_metrics

        log.info("run already complete (%d epochs): nothing to train", o.epochs)
        rows = [r for r in read_metrics(run_dir) if "train_epoch/loss" in r]
        metrics = {k: v for k, v in rows[-1].items() if k not in ("step", "epoch")} if rows else {}
    return metrics


def _evaluate(cfg, env: DistEnv, device: torch.device, c: Components, results_path: Path) -> dict:
    from conddetr.engine.evaluator import CocoEvaluator

    evaluator = CocoEvaluator(c.val_ds.coco, c.info.label_to_category)
    show, _ = progress_enabled(env.is_main)
    if c.eval_model is None:  # compiled once per run, not per evaluation
        c.eval_model = maybe_compile(c.model, cfg.perf.compile)
    evaluate(c.eval_model, c.postprocessor, c.val_loader, evaluator, device=device,
             amp_dtype=autocast_dtype(cfg.optim.amp, device), show_progress=show)  # fmt: skip
    stats = {k: float(v) for k, v in evaluator.summarize().items()}
    if cfg.eval.per_category_ap:
        from conddetr.engine.evaluator import format_per_category_table

        per_category = evaluator.per_category_ap()
        log.info("per-category AP:\n%s", format_per_category_table(per_category))
        stats.update({f"AP_per_category/{name}": float(ap) for name, ap in per_category.items()})
    if env.is_main:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        evaluator.write_results(results_path)
    return stats


def _eval_only(cfg, env: DistEnv, device: torch.device, run_dir: Path, c: Components) -> dict:
    """Evaluate eval.checkpoint (ours or a released one), defaulting to the run folder's latest checkpoint."""
    path = cfg.eval.checkpoint or str(run_dir / ckpt_io.CHECKPOINT_NAME)
    if not Path(path).is_file():
        raise FileNotFoundError(f"eval.eval_only=true: checkpoint {path} does not exist (set eval.checkpoint=PATH)")
    from conddetr.data import dc5_eval_batch_warning

    ckpt = load_start_weights(c.model, path, source=path, fine_tune=cfg.eval.fine_tune)
    # Released checkpoints carry `args`, ours the config: DC5 loses AP when evaluated at another per-GPU batch.
    args = ckpt.get("args")
    train_batch = args.get("batch_size") if isinstance(args, dict) else getattr(args, "batch_size", None)
    train_batch = train_batch or (ckpt.get("config") or {}).get("data", {}).get("batch_size")
    if train_batch:
        dc5_eval_batch_warning(cfg.model.dilation, int(train_batch), cfg.data.batch_size)
    stats = _evaluate(cfg, env, device, c, run_dir / "results" / "eval_only.json")
    out = {f"val/{k}": v for k, v in stats.items()}
    if env.is_main:
        ckpt_io_path = run_dir / "eval_only.json"
        ckpt_io_path.write_text(json.dumps({"checkpoint": str(path), **out}, indent=2) + "\n")
        log.info("eval-only %s: %s", path, _fmt(out))
    return out


def _resume_point(resumed) -> tuple[str, int] | None:
    return None if resumed is None else (resumed[1].name, int(resumed[0]["global_step"]))


def check_same_resume_point(per_rank: list) -> None:
    """Every rank must resume from the same checkpoint, or the first collective mismatches and the job hangs.

    Ranks read the run folder independently; on a file system that shows nodes different versions (NFS attribute
    caching, a checkpoint written as the job stopped) they can disagree. Raised on every rank alike.
    """
    if len(set(per_rank)) > 1:
        views = "; ".join(f"rank {r}: " + (f"{p[0]} at global step {p[1]}" if p else "none") for r, p in
                          enumerate(per_rank))  # fmt: skip
        raise RuntimeError(
            f"the ranks see different checkpoints in the run folder ({views}): it must be on a file system that "
            "every node sees alike; start the job again once the files agree"
        )


def _restore_rng(per_rank: list, env: DistEnv, device: torch.device, fallback_seed: int) -> None:
    if len(per_rank) == env.world_size:
        ckpt_io.restore_rng_state(per_rank[env.rank], device)
        return
    # A different world size cannot continue the old streams; reseed so the run stays reproducible.
    log.warning("checkpoint has RNG states of %d ranks, this job has %d: reseeding", len(per_rank), env.world_size)
    seed_everything(fallback_seed)


def _check_layout(data: dict, world_size: int, cfg) -> None:
    """A mid-epoch position counts optimizer steps of one data layout; another layout continues, not exactly."""
    per_step = cfg.data.batch_size * world_size * cfg.optim.accum_steps
    old = (data.get("world_size"), data.get("images_per_step"))
    if old != (world_size, per_step):
        log.warning(
            "mid-epoch checkpoint was written with %s processes x %s images per step, this job has %d x %d: the "
            "epoch continues after the same number of steps, but its remaining batches differ from that run's",
            *old,
            world_size,
            per_step,
        )


def _warn_config_changes(old: dict, new: dict) -> None:
    from conddetr.config import flatten_keys

    old, new = flatten_keys(old), flatten_keys(new)
    changed = {k: (v, new.get(k)) for k, v in old.items() if new.get(k) != v}
    if changed:
        log.warning(
            "resuming with a changed config: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        )


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "loss" in k or k.endswith(("/AP", "/AP50")))


@contextlib.contextmanager
def _log_to_file(path: Path | None):
    """Copy the `conddetr` loggers' INFO records to the run folder's train.log while the run lasts (rank 0)."""
    if path is None:
        yield
        return
    root = logging.getLogger("conddetr")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()

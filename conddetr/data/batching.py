"""Padding collate, reproducible data loaders (single process or DistributedSampler) and the DC5 batch warning.

Training order and augmentation are functions of (seed, epoch, rank): call `set_epoch(loader, epoch, skip)` before
each epoch, so a resumed run (from an epoch end or mid-epoch) sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Pad images to the largest height and width in the batch; mask is True on padding."""
    images, targets = zip(*batch, strict=True)
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))  # [B, 3, Hmax, Wmax]
    mask = torch.ones((len(images), height, width), dtype=torch.bool)  # [B, Hmax, Wmax]
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return padded, mask, list(targets)


def _seed_worker(worker_id: int) -> None:
    # torch already seeds each worker with base_seed + worker_id; give Python and numpy the same stream.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Augmentation seed of the `position`-th sample of a rank's epoch (worker loaders)."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


class ResumableSampler(DistributedSampler):
    """The epoch's shuffled shard (DistributedSampler order), started `start` samples in (set by `set_epoch`).

    With `per_sample_seeds` it yields (index, seed) pairs for `SeededSamples`: worker processes draw augmentation
    from their own RNG streams, which depend on the batches each worker handled before, so skipping batches would
    change them; a seed per (seed, epoch, rank, position) makes every sample's augmentation independent of that.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, per_sample_seeds: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.per_sample_seeds = per_sample_seeds
        self.start = 0

    def __iter__(self):
        order = list(super().__iter__())
        for position in range(self.start, len(order)):
            if self.per_sample_seeds:
                yield order[position], sample_seed(self.seed, self.epoch, self.rank, position)
            else:
                yield order[position]


class SeededSamples(Dataset):
    """Dataset view taking (index, seed) keys: seeds torch, numpy and Python in the worker, then loads the sample."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        return self.dataset[index]


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("build_loaders(distributed=True) needs torch.distributed to be initialised first")
    return dist.get_rank(), dist.get_world_size()


def build_loaders(
    train_ds: Dataset, val_ds: Dataset, batch_size: int, num_workers: int, distributed: bool, seed: int
) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled, last incomplete batch dropped, as published) and validation loader.

    `seed` is the run's base seed, the same on every rank: the shuffle must agree across ranks, while augmentation
    streams differ per rank. Without `distributed` a one-replica DistributedSampler gives the same per-epoch
    reshuffling.
    """
    rank, world = _rank_and_world(distributed)
    # With workers each sample gets its own augmentation seed; without, augmentation draws from the process's
    # global RNG, which a checkpoint captures at the step boundary, so skipping batches reproduces the rest as well.
    train_sampler = ResumableSampler(
        train_ds, num_replicas=world, rank=rank, seed=seed, per_sample_seeds=num_workers > 0
    )
    if len(train_sampler) < batch_size:
        raise ValueError(
            f"training set has {len(train_ds)} images, {len(train_sampler)} per process: fewer than one batch of "
            f"{batch_size} (data.batch_size)"
        )
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    common = {"num_workers": num_workers, "collate_fn": collate, "worker_init_fn": _seed_worker}
    train_loader = DataLoader(
        SeededSamples(train_ds) if num_workers > 0 else train_ds,
        batch_size=batch_size,
        sampler=train_sampler,
        drop_last=True,
        generator=generator,
        **common,
    )
    # Validation: every image once per rank (the DistributedSampler pads with repeats; the evaluator de-duplicates).
    if distributed:
        val_sampler = DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False)
    else:
        val_sampler = SequentialSampler(val_ds)
    val_loader = DataLoader(val_ds, batch_size=batch_size, sampler=val_sampler, drop_last=False, **common)
    train_loader.base_seed = seed  # remembered for set_epoch  # type: ignore[attr-defined]
    train_loader.rank = rank  # type: ignore[attr-defined]
    return train_loader, val_loader


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make the epoch's order and augmentation depend only on (seed, epoch, rank); call before iterating.

    `skip_batches` leaves out the epoch's first batches (a mid-epoch resume): the rest are the same batches the
    whole epoch yields after them. With `num_workers=0` augmentation draws from the process's global torch RNG,
    which the engine seeds (and restores on resume).
    """
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.sampler, ResumableSampler):
        loader.sampler.start = skip_batches * (loader.batch_size or 1)
    elif skip_batches:
        raise ValueError(f"set_epoch(skip_batches={skip_batches}) needs a loader built by build_loaders")
    base_seed = getattr(loader, "base_seed", None)
    if loader.generator is not None and base_seed is not None:
        # The workers' seeds are drawn from this generator when iteration starts.
        loader.generator.manual_seed(base_seed + 1_000_003 * epoch + getattr(loader, "rank", 0))


def dc5_eval_batch_warning(dilation: bool, train_batch: int, eval_batch: int) -> bool:
    """Warn (and return True) when a DC5 model is evaluated with another per-GPU batch than it was trained with.

    Published DC5 models train at 1 image per GPU; padding in larger evaluation batches changes the dilated
    features and costs AP (a known quirk of both papers' code).
    """
    if dilation and train_batch != eval_batch:
        warnings.warn(
            f"DC5 model trained with {train_batch} image(s) per GPU is evaluated with {eval_batch} per GPU: "
            "expect lower AP (padding changes the dilated features); evaluate with the training batch size",
            UserWarning,
            stacklevel=2,
        )
        return True
    return False

"""Batching: padding collate, reproducible (resumable) loader order and augmentation, and the DC5 warning."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from torch.utils.data import Dataset

from conddetr.data import build_loaders, collate, dc5_eval_batch_warning, set_epoch


class _Sized(Dataset):
    """Image i is [3, 4 + i % 3, 5 + i % 2] filled with i, plus a random number drawn in the worker (augmentation)."""

    def __init__(self, n: int = 12):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image = torch.full((3, 4 + i % 3, 5 + i % 2), float(i))
        return image, {"image_id": torch.tensor(i), "aug": torch.rand(())}


def test_collate_pads_and_masks():
    batch = [(torch.ones(3, 2, 4), {"id": 0}), (torch.full((3, 3, 2), 2.0), {"id": 1})]
    images, mask, targets = collate(batch)
    expected = torch.zeros(2, 3, 3, 4)
    expected[0, :, :2, :4] = 1
    expected[1, :, :3, :2] = 2
    torch.testing.assert_close(images, expected)
    expected_mask = torch.ones(2, 3, 4, dtype=torch.bool)
    expected_mask[0, :2, :4] = False
    expected_mask[1, :3, :2] = False
    torch.testing.assert_close(mask, expected_mask)
    assert targets == [{"id": 0}, {"id": 1}]


def _epoch(loader, epoch: int) -> list[tuple[list[int], list[float]]]:
    set_epoch(loader, epoch)
    return [([int(t["image_id"]) for t in targets], [float(t["aug"]) for t in targets]) for _, _, targets in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_is_a_function_of_seed_and_epoch(num_workers):
    train, val = build_loaders(_Sized(), _Sized(5), batch_size=4, num_workers=num_workers, distributed=False, seed=7)
    first = _epoch(train, 0)
    second = _epoch(train, 1)
    ids = [i for batch, _ in first for i in batch]
    assert sorted(ids) == list(range(12)) and ids != list(range(12))
    assert [b for b, _ in first] != [b for b, _ in second]
    # A fresh loader (a resumed run) at epoch 1 sees epoch 1's batches again, without replaying epoch 0.
    resumed, _ = build_loaders(_Sized(), _Sized(5), batch_size=4, num_workers=num_workers, distributed=False, seed=7)
    resumed_second = _epoch(resumed, 1)
    assert [b for b, _ in resumed_second] == [b for b, _ in second]
    if num_workers:  # with workers, augmentation randomness is reproduced as well
        assert resumed_second == second
    assert [int(t["image_id"]) for _, _, ts in val for t in ts] == list(range(5))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipping_batches_reproduces_the_rest_of_the_epoch(num_workers):
    """A mid-epoch resume: a fresh loader skipping the first k batches yields the epoch's batches k.. exactly."""
    n, batch = 20, 2  # 10 batches: 2 workers handle them alternately, so a skip of 3 moves every batch's worker
    torch.manual_seed(0)
    train, _ = build_loaders(_Sized(n), _Sized(5), batch_size=batch, num_workers=num_workers, distributed=False, seed=7)
    set_epoch(train, 1)
    it, skip, whole, rng_at_skip = iter(train), 3, [], None
    for k in range(n // batch):
        if k == skip:
            rng_at_skip = torch.get_rng_state()  # what a checkpoint at this step boundary captures
        whole.append(next(it))
    resumed, _ = build_loaders(_Sized(n), _Sized(5), batch_size=batch, num_workers=num_workers, distributed=False,
                               seed=7)  # fmt: skip
    torch.set_rng_state(rng_at_skip)  # without workers, augmentation draws from the (restored) global RNG
    set_epoch(resumed, 1, skip_batches=skip)
    rest = list(resumed)
    assert len(rest) == len(whole) - skip
    for (images, mask, targets), (want_images, want_mask, want_targets) in zip(rest, whole[skip:], strict=True):
        torch.testing.assert_close(images, want_images, rtol=0, atol=0)
        torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
        assert [(int(t["image_id"]), float(t["aug"])) for t in targets] == [
            (int(t["image_id"]), float(t["aug"])) for t in want_targets
        ]
    set_epoch(resumed, 1)  # the next set_epoch without a skip gives the whole epoch again
    assert len(list(resumed)) == len(whole)


def test_last_incomplete_batch_dropped_and_too_small_set_rejected():
    train, _ = build_loaders(_Sized(10), _Sized(3), batch_size=4, num_workers=0, distributed=False, seed=0)
    assert len(train) == 2
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loaders(_Sized(3), _Sized(3), batch_size=4, num_workers=0, distributed=False, seed=0)
    with pytest.raises(RuntimeError, match="initialised"):
        build_loaders(_Sized(), _Sized(), batch_size=2, num_workers=0, distributed=True, seed=0)


def test_dc5_eval_batch_warning():
    with pytest.warns(UserWarning, match="DC5 model trained with 1 image"):
        assert dc5_eval_batch_warning(True, 1, 2)
    assert not dc5_eval_batch_warning(True, 1, 1)
    assert not dc5_eval_batch_warning(False, 1, 4)


def _rank_batches(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        train, val = build_loaders(_Sized(), _Sized(5), batch_size=2, num_workers=0, distributed=True, seed=3)
        set_epoch(train, 0)
        out[rank] = (
            [int(t["image_id"]) for _, _, ts in train for t in ts],
            [int(t["image_id"]) for _, _, ts in val for t in ts],
        )
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_get_disjoint_shards():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp.Manager().dict()
    tmp.start_processes(_rank_batches, args=(port, out), nprocs=2, start_method="fork")
    (train0, val0), (train1, val1) = out[0], out[1]
    # One shuffle shared by both ranks (same sampler seed): the shards partition the training set.
    assert sorted(train0 + train1) == list(range(12)) and len(train0) == len(train1) == 6
    # Validation: every image on some rank; the sampler pads 5 images to 3 + 3 with one repeat.
    assert sorted(set(val0 + val1)) == list(range(5)) and len(val0) == len(val1) == 3

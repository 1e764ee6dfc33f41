"""Batches for training through torch's DataLoader: epochs of one permutation each, split across
processes, resumable to the exact batch.

    loader = make_loader(dataset, 64, seed=cfg.seed, rank=rank, world_size=world_size, workers=4)
    while step < steps:                         # `step`: batches consumed so far, 0 or from a checkpoint
        loader.batch_sampler.set_position(*loader_position(step, len(loader)))
        for batch in loader:                    # the rest of that epoch
            x, labels = unpack_batch(batch, device)
            ...
            step += 1
            if step == steps:
                break

Resuming needs nothing but the number of batches the training loop consumed: epoch `e` is always
the permutation drawn from `seed * 1_000_003 + e`, so `set_position(e, b)` replays the same batches
from batch b on. Worker processes prefetch ahead of the loop; that does not matter, since the
position is taken from the caller's count, never from the sampler. (Without set_position, each
pass over the loader continues with the next epoch once one is finished; an epoch left early is
replayed from where that pass began.) On-the-fly datasets draw each batch from its indices
(`toys.py`), so they resume exactly too.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from fewstep.data.base import DataError, Dataset, check_count


def identity_collate(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The batch as `Dataset.__getitems__` made it (already stacked). Module level: pickles to workers."""
    return batch


def loader_position(batches_consumed: int, batches_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch within it) after `batches_consumed` batches of a run."""
    check_count(batches_per_epoch, "batches_per_epoch")
    if isinstance(batches_consumed, bool) or not isinstance(batches_consumed, int) or batches_consumed < 0:
        raise DataError(f"batches_consumed must be a non-negative integer, got {batches_consumed!r}")
    return divmod(batches_consumed, batches_per_epoch)


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Lists of indices: each epoch a fresh permutation, this process's share of it, cut into batches.

    Epoch `e` permutes with `torch.Generator().manual_seed(seed * 1_000_003 + e)` (the global RNG is
    never used). As torch's DistributedSampler, the permutation is truncated (drop_last) or padded with
    its own first indices to a multiple of `world_size`, and rank r takes `perm[r::world_size]`.
    `__iter__` yields the current epoch's batches from `start_batch` on, then (once they are all taken)
    moves the position to the start of the next epoch; `set_position(epoch, batch)` places it anywhere.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = True):
        check_count(num_examples, "num_examples")
        check_count(batch_size, "batch_size")
        check_count(world_size, "world_size")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise DataError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"seed must be an integer, got {seed!r}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        rounded = num_examples // world_size if drop_last else math.ceil(num_examples / world_size)
        self.per_process = rounded  # examples this process sees per epoch
        if drop_last and rounded < batch_size:
            raise DataError(f"{num_examples} examples over {world_size} process(es) give {rounded} per process, "
                            f"fewer than one batch of {batch_size}; lower the batch size")
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.per_process // self.batch_size
        return math.ceil(self.per_process / self.batch_size)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Make the next `__iter__` start at batch `batch` of epoch `epoch` (batch == len: the next epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"epoch must be a non-negative integer, got {epoch!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch <= len(self):
            raise DataError(f"batch must be an integer in [0, {len(self)}], got {batch!r}")
        self.epoch, self.start_batch = (epoch + 1, 0) if batch == len(self) else (epoch, batch)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This process's indices of epoch `epoch`, in order (int64)."""
        n, ws = self.num_examples, self.world_size
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            perm = torch.arange(n)
        total = self.per_process * ws
        if total > n:  # pad with the permutation's own start, repeated if it is shorter than the gap
            perm = perm.repeat(math.ceil(total / n))
        return perm[:total][self.rank::ws]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.epoch, self.start_batch
        indices = self.epoch_indices(epoch)
        for b in range(start, len(self)):
            yield indices[b * self.batch_size:(b + 1) * self.batch_size].tolist()
        # Only a finished epoch moves the position on: DataLoader calls iter() twice per pass and
        # runs only the second iterator, and an epoch left early is what set_position is for.
        self.epoch, self.start_batch = epoch + 1, 0


def make_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                workers: int = 0, shuffle: bool = True, drop_last: bool = True,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of `dataset.__getitems__` batches (`(x,)` or `(x, labels)`; see `unpack_batch`)
    in the order of an `EpochBatchSampler`, exposed as `loader.batch_sampler`; `len(loader)` is the
    number of batches per epoch. `workers` > 0 reads in that many processes (not kept between
    epochs). Resuming: see the module docstring.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be a non-negative integer, got {workers!r}")
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                shuffle=shuffle, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=identity_collate, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=False,
        # each iterator draws the workers' base seed from this generator: the global RNG stays untouched
        generator=torch.Generator().manual_seed(seed))


class XFlip(Dataset):
    """EDM's `--xflip`: twice the examples; example i >= N is example i - N mirrored left-right.
    A fixed function of the index, so batches stay resumable."""

    def __init__(self, dataset: Dataset):
        if dataset.kind != "image":
            raise DataError(f"XFlip mirrors images; {dataset.name!r} holds {dataset.kind}s {dataset.shape}")
        self.dataset = dataset
        self.name, self.kind, self.shape = dataset.name, dataset.kind, dataset.shape
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names
        self.offset, self.scale = dataset.offset, dataset.scale

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        n = len(self.dataset)
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= 2 * n):
            raise IndexError(f"XFlip index out of range [0, {2 * n}): {int(idx.min())}..{int(idx.max())}")
        flip = idx >= n
        x, *labels = self.dataset.__getitems__(torch.where(flip, idx - n, idx).tolist())
        x = torch.where(flip.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)
        return (x, *labels)

"""A batch iterator over tensors that already live on the training device.

For a dataset as small as MNIST (about 190 MB as normalised ``float32``) the fastest "data
loader" is no loader at all: keep the whole split on the device and take each batch as an
index-gather ``inputs[idx]`` from a permutation generated on that device. There are no worker
processes, no per-sample Python and no host-to-device copies.

:class:`DeviceTensorLoader` does exactly that and behaves like a ``DataLoader`` where Lightning
looks: it is iterable, has ``len()`` (the number of batches, so progress bars and
``val_check_interval`` work), reshuffles every epoch with seed ``seed + epoch`` (so a run, or a
resumed run, reproduces the same order for the same epoch), and shards the epoch across
distributed ranks the way ``torch.utils.data.DistributedSampler`` does, because Lightning only
injects a ``DistributedSampler`` into real ``DataLoader`` objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["DeviceTensorLoader"]


class DeviceTensorLoader:
    """Yield ``(inputs[idx], targets[idx])`` batches for chunks of a per-epoch sample order.

    Args:
        inputs: tensor of shape ``(N, *feature_shape)``, e.g. ``(N, 784)`` float32.
        targets: tensor of shape ``(N, ...)`` on the same device, e.g. ``(N,)`` int64.
        batch_size: examples per batch (the last batch of an epoch may be smaller unless
            ``drop_last``).
        shuffle: draw a fresh permutation every epoch (on the tensors' device, from a generator
            seeded with ``seed + epoch``); otherwise iterate in stored order.
        drop_last: drop this rank's last batch of an epoch when it has fewer than
            ``batch_size`` examples.
        seed: base seed of the per-epoch permutations.
        epoch_fn: returns the current epoch (e.g. ``lambda: trainer.current_epoch``); read once
            per ``iter()``. Without it the loader counts its own ``iter()`` calls, starting at 0
            (see :meth:`set_epoch`).
        rank: this process's index among ``world_size`` data-parallel ranks.
        world_size: number of data-parallel ranks. Every rank builds the same epoch order (same
            seed) and takes the strided shard ``order[rank::world_size]``.
        pad_shards: when ``N`` is not divisible by ``world_size``, repeat examples from the start
            of the epoch order so that every rank gets ``ceil(N / world_size)`` examples and the
            same number of batches (what ``DistributedSampler`` does; needed for training, where
            ranks synchronise every step). Without padding the shards are disjoint but uneven.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = True,
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets must have the same number of examples, got "
                f"{inputs.shape[0]} and {targets.shape[0]}"
            )
        if inputs.device != targets.device:
            raise ValueError(
                f"inputs and targets must be on the same device, got {inputs.device} and "
                f"{targets.device}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch_fn = epoch_fn
        self.rank = rank
        self.world_size = world_size
        self.pad_shards = pad_shards
        self._next_epoch = 0

    @property
    def device(self) -> torch.device:
        """The device the data, the permutations and the batches live on."""
        return self.inputs.device

    @property
    def num_examples(self) -> int:
        """Examples this rank sees per epoch (including padding repeats, if any)."""
        total = self.inputs.shape[0]
        if self.world_size == 1:
            return total
        if self.pad_shards:
            return math.ceil(total / self.world_size)
        return len(range(self.rank, total, self.world_size))

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` use ``epoch`` (only used when no ``epoch_fn`` was given)."""
        self._next_epoch = epoch

    def epoch_order(self, epoch: int) -> Tensor:
        """This rank's example indices for ``epoch``, shape ``(num_examples,)`` int64 on device.

        Deterministic given ``(seed, epoch, rank, world_size)`` and the device type (CPU and
        CUDA generators produce different permutations from the same seed).
        """
        total = self.inputs.shape[0]
        if self.shuffle:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(total, generator=generator, device=self.device)
        else:
            order = torch.arange(total, device=self.device)
        if self.world_size == 1:
            return order
        if self.pad_shards and total > 0:
            padded_total = self.num_examples * self.world_size
            repeats = math.ceil(padded_total / total)
            order = order.repeat(repeats)[:padded_total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._batches()

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: the epoch is read at the first next(), not at iter(). Lightning calls
        # iter() before it restores the epoch counter of a resumed run; reading it lazily
        # gives the resumed epoch its own seed + epoch order.
        if self.epoch_fn is not None:
            epoch = self.epoch_fn()
        else:
            epoch = self._next_epoch
            self._next_epoch += 1
        num_batches = len(self)
        if not self.shuffle and self.world_size == 1:
            # In-order single-process iteration: contiguous slices are views, no gather needed.
            for start in range(0, num_batches * self.batch_size, self.batch_size):
                stop = start + self.batch_size
                yield self.inputs[start:stop], self.targets[start:stop]
            return
        order = self.epoch_order(epoch)
        for start in range(0, num_batches * self.batch_size, self.batch_size):
            rows = order[start : start + self.batch_size]  # (B,)
            # index_select copies whole rows: 3x faster than advanced indexing on the CPU
            yield self.inputs.index_select(0, rows), self.targets.index_select(0, rows)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_examples={self.num_examples}, "
            f"batch_size={self.batch_size}, batches={len(self)}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, device={self.device}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )

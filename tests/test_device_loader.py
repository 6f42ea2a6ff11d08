"""DeviceTensorLoader: batches sliced on the device, sharded over ranks like DistributedSampler."""

from __future__ import annotations

import pytest
import torch
from mnist_helpers import collect

from manualbp.data.device_loader import DeviceTensorLoader


@pytest.mark.parametrize(("num_examples", "world_size"), [(55_000, 2), (11, 2), (10, 3), (2, 3)])
def test_distributed_shards_are_disjoint_and_cover_the_epoch(num_examples, world_size):
    targets = torch.arange(num_examples)
    inputs = targets.to(torch.float32).unsqueeze(1)
    shards = [
        DeviceTensorLoader(
            inputs, targets, 4, shuffle=True, seed=7, rank=rank, world_size=world_size
        )
        for rank in range(world_size)
    ]
    seen = [torch.cat(collect(shard)[1]) for shard in shards]
    per_rank = -(-num_examples // world_size)
    assert {len(shard) for shard in shards} == {-(-per_rank // 4)}
    assert all(len(rank_seen) == per_rank for rank_seen in seen)
    everything = torch.cat(seen)
    assert torch.equal(everything.unique(), targets)  # the union covers the epoch
    # Ranks are disjoint except for the padding that evens out the shards.
    assert len(everything) - len(everything.unique()) == per_rank * world_size - num_examples
    # Every rank shards the same permutation.
    permutation = DeviceTensorLoader(inputs, targets, 4, shuffle=True, seed=7).epoch_order(0)
    interleaved = torch.stack(seen, dim=1).reshape(-1)[:num_examples]
    assert torch.equal(interleaved, permutation)


def test_unpadded_shards_are_disjoint():
    targets = torch.arange(11)
    shards = [
        DeviceTensorLoader(
            targets.unsqueeze(1),
            targets,
            4,
            shuffle=False,
            rank=rank,
            world_size=2,
            pad_shards=False,
        )
        for rank in range(2)
    ]
    seen = [torch.cat(collect(shard)[1]) for shard in shards]
    assert [len(rank_seen) for rank_seen in seen] == [6, 5]
    assert torch.equal(torch.cat(seen).sort().values, targets)

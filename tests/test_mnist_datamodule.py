"""MNISTDataModule: splits, normalisation, batches, order, epochs, bad arguments."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from mnist_helpers import collect
from torch import Tensor, nn

from manualbp.data.device_loader import DeviceTensorLoader
from manualbp.data.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    EpochSeededRandomSampler,
    MNISTDataModule,
)
from manualbp.data.provision import (
    MNISTUnavailableError,
    mnist_raw_dir,
)


@pytest.fixture(scope="module")
def datamodule(mnist_root) -> MNISTDataModule:
    """Default-argument (device-resident) DataModule, set up for all stages, no trainer."""
    module = MNISTDataModule(data_dir=str(mnist_root))
    module.setup()
    return module


@pytest.fixture(scope="module")
def dataloader_datamodule(mnist_root) -> MNISTDataModule:
    """The same DataModule in ``DataLoader`` mode."""
    module = MNISTDataModule(data_dir=str(mnist_root), device_resident=False)
    module.setup()
    return module


def test_split_sizes_and_disjointness(datamodule):
    assert len(datamodule.split_tensors("train")[0]) == 55_000
    assert len(datamodule.split_tensors("val")[0]) == 5_000
    assert len(datamodule.split_tensors("test")[0]) == 10_000
    both = torch.cat([datamodule.train_indices, datamodule.val_indices])
    assert torch.equal(both.sort().values, torch.arange(60_000))
    assert (datamodule.num_classes, datamodule.input_size, datamodule.dims) == (10, 784, (784,))


def test_split_is_determined_by_the_seed(mnist_root, datamodule):
    same_seed = MNISTDataModule(data_dir=str(mnist_root), seed=0)
    same_seed.setup("fit")
    other_seed = MNISTDataModule(data_dir=str(mnist_root), seed=1, val_size=5_000)
    other_seed.setup("fit")
    assert torch.equal(same_seed.val_indices, datamodule.val_indices)
    assert torch.equal(same_seed.split_tensors("train")[0], datamodule.split_tensors("train")[0])
    assert not torch.equal(other_seed.val_indices, datamodule.val_indices)


def test_normalisation_matches_the_raw_pixels(mnist_root, datamodule):
    raw = np.fromfile(mnist_raw_dir(mnist_root) / "train-images-idx3-ubyte", np.uint8, offset=16)
    raw_train = torch.from_numpy(raw.reshape(60_000, 784))[datamodule.train_indices]
    expected = (raw_train.to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    inputs, labels = datamodule.split_tensors("train")
    assert inputs.dtype == torch.float32
    assert (inputs - expected).abs().max().item() <= 1e-6
    assert abs(inputs.mean().item()) < 0.01
    assert abs(inputs.std().item() - 1.0) < 0.01
    raw_labels = np.fromfile(
        mnist_raw_dir(mnist_root) / "train-labels-idx1-ubyte", np.uint8, offset=8
    ).astype(np.int64)
    assert torch.equal(labels, torch.from_numpy(raw_labels)[datamodule.train_indices])


@pytest.mark.parametrize("mode", ["device_resident", "dataloader"])
def test_batches_have_the_documented_shapes_and_dtypes(datamodule, dataloader_datamodule, mode):
    module = datamodule if mode == "device_resident" else dataloader_datamodule
    for loader in (
        module.train_dataloader(),
        module.val_dataloader(),
        module.test_dataloader(),
        module.predict_dataloader(),
    ):
        inputs, targets = next(iter(loader))
        assert inputs.shape == (64, 784)
        assert inputs.dtype == torch.float32
        assert targets.shape == (64,)
        assert targets.dtype == torch.int64


def test_device_resident_epoch_covers_every_training_example_once(datamodule):
    inputs, labels = datamodule.split_tensors("train")
    loader = datamodule.train_dataloader()
    assert isinstance(loader, DeviceTensorLoader)

    orders = []
    for epoch in range(2):
        order = loader.epoch_order(epoch)
        assert torch.equal(order.sort().values, torch.arange(55_000))  # each example once
        batch_sizes = []
        for start, (batch_inputs, batch_targets) in zip(range(0, 55_000, 64), loader, strict=True):
            batch_order = order[start : start + 64]
            assert torch.equal(batch_inputs, inputs[batch_order])
            assert torch.equal(batch_targets, labels[batch_order])
            batch_sizes.append(len(batch_targets))
        assert len(batch_sizes) == len(loader) == 860  # ceil(55000 / 64)
        assert batch_sizes == [64] * 859 + [55_000 - 859 * 64]
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "expected_batches", "last_batch_size"),
    [
        (64, False, 860, 24),
        (512, False, 108, 216),
        (512, True, 107, 512),
        (55_000, False, 1, 55_000),
    ],
)
def test_loader_length_counts_the_last_partial_batch(
    datamodule, batch_size, drop_last, expected_batches, last_batch_size
):
    inputs, labels = datamodule.split_tensors("train")
    loader = DeviceTensorLoader(inputs, labels, batch_size, shuffle=True, drop_last=drop_last)
    _, batch_targets = collect(loader)
    assert len(loader) == len(batch_targets) == expected_batches
    assert len(batch_targets[-1]) == last_batch_size


def test_dataloader_mode_serves_the_same_examples(datamodule, dataloader_datamodule):
    for split in ("train", "val", "test"):
        for resident, loaded in zip(
            datamodule.split_tensors(split), dataloader_datamodule.split_tensors(split), strict=True
        ):
            assert torch.equal(resident, loaded)
    train_inputs, train_labels = datamodule.split_tensors("train")
    batch_inputs, batch_targets = collect(dataloader_datamodule.train_dataloader())
    assert len(batch_targets) == len(dataloader_datamodule.train_dataloader()) == 860
    # Same examples, shuffled: compare as multisets via sorted per-example pixel sums.
    served = torch.cat(batch_inputs)
    torch.testing.assert_close(served.sum(1).sort().values, train_inputs.sum(1).sort().values)
    assert torch.equal(torch.cat(batch_targets).bincount(), train_labels.bincount())


@pytest.mark.parametrize("mode", ["device_resident", "dataloader"])
def test_evaluation_loaders_iterate_in_order(datamodule, dataloader_datamodule, mode):
    module = datamodule if mode == "device_resident" else dataloader_datamodule
    for split, loader in [
        ("val", module.val_dataloader()),
        ("test", module.test_dataloader()),
        ("test", module.predict_dataloader()),
    ]:
        batch_inputs, batch_targets = collect(loader)
        inputs, labels = module.split_tensors(split)
        assert torch.equal(torch.cat(batch_inputs), inputs)
        assert torch.equal(torch.cat(batch_targets), labels)


def test_datamodule_takes_rank_world_size_and_epoch_from_the_trainer(datamodule, monkeypatch):
    inputs, labels = datamodule.split_tensors("train")
    shards = []
    for rank in range(2):
        trainer = SimpleNamespace(
            global_rank=rank,
            world_size=2,
            current_epoch=3,
            strategy=SimpleNamespace(root_device=torch.device("cpu")),
        )
        monkeypatch.setattr(datamodule, "trainer", trainer)
        loader = datamodule.train_dataloader()
        assert (loader.rank, loader.world_size, loader.seed) == (rank, 2, 0)
        batch_inputs, batch_targets = collect(loader)
        collect(loader)  # the epoch comes from the trainer, so iterating again repeats it
        assert len(batch_targets) == len(loader) == 430  # ceil(27500 / 64)
        order = loader.epoch_order(3)
        assert torch.equal(torch.cat(batch_inputs), inputs[order])
        assert torch.equal(torch.cat(batch_targets), labels[order])
        shards.append(order)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(55_000))


class _RecordingClassifier(L.LightningModule):
    """A linear classifier that records the labels of the first batch of every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)
        self.first_batch_labels: dict[int, Tensor] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        if batch_idx == 0:
            self.first_batch_labels[self.current_epoch] = labels.clone()
        return nn.functional.cross_entropy(self.linear(inputs), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.log("val_loss", nn.functional.cross_entropy(self.linear(inputs), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_sees_the_seeded_epoch_order(mnist_root, quiet_trainer):
    module = MNISTDataModule(data_dir=str(mnist_root), batch_size=32)
    model = _RecordingClassifier()
    trainer = quiet_trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer.fit(model, datamodule=module)
    _, labels = module.split_tensors("train")
    loader = module.train_dataloader()
    assert sorted(model.first_batch_labels) == [0, 1, 2]
    for epoch, seen in model.first_batch_labels.items():
        assert torch.equal(seen, labels[loader.epoch_order(epoch)[:32]])
    assert not torch.equal(model.first_batch_labels[0], model.first_batch_labels[1])


def test_setup_refuses_missing_files(tmp_path):
    with pytest.raises(MNISTUnavailableError, match=r"fetch_data\.py"):
        MNISTDataModule(data_dir=str(tmp_path)).setup("test")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 2.5}, "batch_size must be a positive int"),
        ({"batch_size": True}, "batch_size must be a positive int"),
        ({"eval_batch_size": -1}, "eval_batch_size must be a positive int"),
        ({"val_size": 60_000}, r"val_size must be an int in \[0, 60000\)"),
        ({"val_size": -1}, r"val_size must be an int in \[0, 60000\)"),
        ({"num_workers": -1}, "num_workers must be a non-negative int"),
        ({"device_resident": "yes"}, "device_resident must be a bool"),
        ({"seed": 1.0}, "seed must be an int"),
        ({"dataset": "cifar10"}, "dataset must be 'mnist'"),
        ({"data_dir": 3}, "data_dir must be a path string or None"),
    ],
)
def test_bad_datamodule_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        MNISTDataModule(**arguments)


def test_workers_with_device_resident_data_warn():
    with pytest.warns(UserWarning, match="num_workers=2 is ignored with device_resident=True"):
        MNISTDataModule(num_workers=2)


def test_dataloader_order_depends_only_on_seed_and_epoch() -> None:
    """DataLoader mode reshuffles per epoch from ``seed + epoch``, so resume is exact too."""

    data = list(range(100))
    first, again = EpochSeededRandomSampler(data, seed=3), EpochSeededRandomSampler(data, seed=3)
    first.set_epoch(1)
    again.set_epoch(1)  # e.g. a run resumed at epoch 1
    assert list(first) == list(again)
    assert sorted(first) == data
    first.set_epoch(2)
    assert list(first) != list(again)

"""MNIST served to Lightning: the verified idx files as normalised tensors, and the DataModule.

:class:`MNISTDataModule` serves the files :func:`~manualbp.data.provision.ensure_mnist`
provisioned as normalised ``float32`` tensors of shape ``(N, 784)`` (or images
``(N, 1, 28, 28)`` with ``flatten=False``), either through
ordinary ``DataLoader`` objects or, by default, as a
:class:`~manualbp.data.device_loader.DeviceTensorLoader` over tensors that live on the training
device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from manualbp.data.device_loader import DeviceTensorLoader
from manualbp.data.idx import decode_idx
from manualbp.data.provision import (
    OFFICIAL_MD5,
    MNISTUnavailableError,
    default_data_dir,
    ensure_mnist,
    mnist_raw_dir,
)

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "EpochSeededRandomSampler",
    "MNISTDataModule",
    "read_verified_idx",
]

_logger = logging.getLogger(__name__)

MNIST_MEAN = 0.1307
"""Mean of the MNIST training pixels scaled to [0, 1]."""

MNIST_STD = 0.3081
"""Standard deviation of the MNIST training pixels scaled to [0, 1]."""

MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_verified_idx(path: str | os.PathLike[str], expected_md5: str) -> Tensor:
    """Read an unsigned-byte idx file, checking the MD5 of exactly the bytes that get parsed.

    Returns:
        ``uint8`` tensor with the file's dimensions, e.g. ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        MNISTUnavailableError: the file is missing or its MD5 differs from ``expected_md5``.
        ValueError: the header is not a valid unsigned-byte idx header for the file's size
            (see :func:`~manualbp.data.idx.decode_idx`).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        buffer = bytearray(size)
        with open(path, "rb") as file:
            file.readinto(buffer)
    except FileNotFoundError as exc:
        raise MNISTUnavailableError(
            f"{path} is missing; run `python scripts/fetch_data.py --root <root>` or "
            f"MNISTDataModule.prepare_data() first"
        ) from exc
    actual_md5 = hashlib.md5(buffer, usedforsecurity=False).hexdigest()
    if actual_md5 != expected_md5:
        raise MNISTUnavailableError(
            f"{path} has md5 {actual_md5}, expected {expected_md5}: refusing to use it; run "
            f"`python scripts/fetch_data.py --root <root>` or prepare_data() to replace it"
        )
    return decode_idx(buffer, str(path))


def _load_split(raw_dir: Path, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """Verified split as ``(images, labels)``: ``(N, 784)`` normalised float32, ``(N,)`` int64."""
    images_name, labels_name = _SPLIT_FILES[split]
    images = read_verified_idx(raw_dir / images_name, OFFICIAL_MD5[images_name])
    labels = read_verified_idx(raw_dir / labels_name, OFFICIAL_MD5[labels_name])
    inputs = images.reshape(images.shape[0], -1).to(torch.float32)
    inputs.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return inputs, labels.to(torch.int64)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class MNISTDataModule(L.LightningDataModule):
    """MNIST as normalised ``float32`` inputs ``(B, 784)`` (``flatten=False``: images
    ``(B, 1, 28, 28)``, for convolutional networks) and int64 labels ``(B,)``.

    ``prepare_data`` provisions and verifies the raw files (:func:`ensure_mnist`); ``setup``
    reads them (verifying the MD5 again, of the very bytes it parses), scales pixels to [0, 1],
    normalises with mean 0.1307 / std 0.3081 and splits the 60,000 official training images into
    ``60000 - val_size`` for training and ``val_size`` for validation with a permutation from
    ``torch.Generator().manual_seed(seed)``. The 10,000 official test images are the test and
    predict sets.

    Args:
        data_dir: data root holding ``MNIST/raw``; default :func:`default_data_dir`.
        batch_size: training batch size.
        val_size: examples held out of the training set for validation, in [0, 60000).
        num_workers: ``DataLoader`` worker processes (only with ``device_resident=False``).
        device_resident: keep all tensors on the trainer's device and serve batches with a
            :class:`~manualbp.data.device_loader.DeviceTensorLoader` (reshuffled each epoch with seed
            ``seed + epoch``, sharded over distributed ranks); otherwise use ``DataLoader``
            objects over CPU ``TensorDataset`` objects (Lightning adds a ``DistributedSampler``
            under DDP).
        seed: seed of the train/validation split and of the training order.
        eval_batch_size: batch size of the validation/test/predict loaders; default
            ``batch_size``.
        dataset: which dataset to serve; only ``"mnist"`` is supported.
        flatten: serve each image as 784 features (default), or as ``(1, 28, 28)``.
    """

    num_classes: int = 10
    """Number of target classes."""
    input_size: int = 784
    """Features per example (28 x 28 pixels, flattened)."""
    dims: tuple[int, ...] = (784,)
    """Shape of one input example as yielded: ``(784,)``, or ``(1, 28, 28)`` unflattened."""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        val_size: int = 5000,
        num_workers: int = 0,
        device_resident: bool = True,
        seed: int = 0,
        eval_batch_size: int | None = None,
        dataset: Literal["mnist"] = "mnist",
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if dataset != "mnist":
            raise ValueError(f"dataset must be 'mnist' (the only one supported), got {dataset!r}")
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path string or None, got {data_dir!r}")
        _check_positive_int("batch_size", batch_size)
        if eval_batch_size is not None:
            _check_positive_int("eval_batch_size", eval_batch_size)
        if (
            isinstance(val_size, bool)
            or not isinstance(val_size, int)
            or not 0 <= val_size < MNIST_TRAIN_SIZE
        ):
            raise ValueError(
                f"val_size must be an int in [0, {MNIST_TRAIN_SIZE}), got {val_size!r}"
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        if not isinstance(device_resident, bool):
            raise ValueError(f"device_resident must be a bool, got {device_resident!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(flatten, bool):
            raise ValueError(f"flatten must be a bool, got {flatten!r}")
        if device_resident and num_workers > 0:
            warnings.warn(
                f"num_workers={num_workers} is ignored with device_resident=True "
                "(batches are sliced on the device, there are no loader workers)",
                stacklevel=2,
            )
        self.save_hyperparameters(logger=False)  # TwinModule logs them, prefixed
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.device_resident = device_resident
        self.seed = seed
        self.flatten = flatten
        self.dims = (784,) if flatten else (1, 28, 28)
        self.train_indices: Tensor | None = None
        """Indices into the official training set used for training, sorted, ``(60000 - val,)``."""
        self.val_indices: Tensor | None = None
        """Indices into the official training set used for validation, sorted, ``(val_size,)``."""
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Provision and verify the raw files (downloads at most once, on one process)."""
        ensure_mnist(self.data_dir, log=_logger.info)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits needed for ``stage`` onto the target device (idempotent)."""
        device = self._target_device()
        raw_dir = mnist_raw_dir(self.data_dir)
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            inputs, labels = _load_split(raw_dir, "train")
            inputs = inputs.view(-1, *self.dims)
            generator = torch.Generator().manual_seed(self.seed)
            permutation = torch.randperm(MNIST_TRAIN_SIZE, generator=generator)
            self.val_indices = permutation[: self.val_size].sort().values
            self.train_indices = permutation[self.val_size :].sort().values
            self._splits["train"] = (inputs[self.train_indices], labels[self.train_indices])
            self._splits["val"] = (inputs[self.val_indices], labels[self.val_indices])
        if stage in (None, "test", "predict") and "test" not in self._splits:
            inputs, labels = _load_split(raw_dir, "test")
            self._splits["test"] = (inputs.view(-1, *self.dims), labels)
        for split, (inputs, labels) in self._splits.items():
            if inputs.device != device:
                self._splits[split] = (inputs.to(device), labels.to(device))

    def train_dataloader(self) -> DeviceTensorLoader | DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DeviceTensorLoader | DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DeviceTensorLoader | DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DeviceTensorLoader | DataLoader:
        """The test set, in order; device-resident shards are not padded (no duplicates)."""
        return self._loader("test", self.eval_batch_size, shuffle=False, pad_shards=False)

    # -- helpers -----------------------------------------------------------------------------

    def split_tensors(self, split: Literal["train", "val", "test"]) -> tuple[Tensor, Tensor]:
        """The loaded ``(inputs, labels)`` of ``split``: ``(N, 784)`` (or ``(N, 1, 28, 28)``)
        float32, ``(N,)`` int64."""
        if split not in self._splits:
            stage = "test" if split == "test" else "fit"
            raise RuntimeError(f"the {split!r} split is not loaded; call setup({stage!r}) first")
        return self._splits[split]

    def _target_device(self) -> torch.device:
        if self.device_resident and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _loader(
        self,
        split: Literal["train", "val", "test"],
        batch_size: int,
        *,
        shuffle: bool,
        pad_shards: bool = True,
    ) -> DeviceTensorLoader | DataLoader:
        inputs, labels = self.split_tensors(split)
        if self.device_resident:
            trainer = self.trainer
            return DeviceTensorLoader(
                inputs,
                labels,
                batch_size,
                shuffle=shuffle,
                seed=self.seed,
                epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
                rank=trainer.global_rank if trainer is not None else 0,
                world_size=trainer.world_size if trainer is not None else 1,
                pad_shards=pad_shards,
            )
        if self.trainer is not None:
            pin_memory = self.trainer.strategy.root_device.type == "cuda"
        else:
            pin_memory = torch.cuda.is_available()
        dataset = TensorDataset(inputs, labels)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.num_workers > 0,
        )


class EpochSeededRandomSampler(RandomSampler):
    """A random order that depends only on ``seed + epoch``, like the device-resident loader.

    Lightning calls ``set_epoch`` on the sampler at the start of every epoch, so a run resumed
    from a checkpoint sees the same order as an uninterrupted one. A ``RandomSampler`` still,
    so under DDP Lightning swaps in a shuffling ``DistributedSampler``.
    """

    def __init__(self, data_source, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()

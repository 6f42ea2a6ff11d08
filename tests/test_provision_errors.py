"""MNIST provisioning when the data directory is in the way, and after killed runs.

Unusable data directories (a directory where a file belongs, a ``raw/`` that cannot be written,
any :class:`OSError` while preparing, staging or moving files) end in one
:class:`MNISTUnavailableError` naming the path and what to do, found before anything is
downloaded where that is possible. Staging directories left by killed runs are removed by the
next run on the same host; a live run's are left alone.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mnist_helpers import (
    REPO_ROOT,
    FailingSource,
    RestoreFromCopySource,
    copy_mnist,
    flip_one_byte,
    quiet,
    run_python,
)

import manualbp.data.provision
from manualbp.data.provision import (
    OFFICIAL_MD5,
    MNISTUnavailableError,
    ensure_mnist,
    fetch_main,
    file_md5,
    mnist_raw_dir,
)

# --- The data directory is in the way ---------------------------------------------------------


def test_directory_in_place_of_a_file_is_reported_before_downloading(tmp_path, mnist_root):
    target = "train-images-idx3-ubyte"
    raw_dir = copy_mnist(mnist_root, tmp_path, [name for name in OFFICIAL_MD5 if name != target])
    (raw_dir / target).mkdir()
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[restore], log=quiet)
    message = str(raised.value)
    assert f"{raw_dir / target} is a directory, but the MNIST file {target} belongs" in message
    assert "Remove or rename it" in message
    assert restore.calls == 0  # the user learns at once, not after a download
    assert [path.name for path in (tmp_path / "MNIST").iterdir()] == ["raw"]


def test_fetch_data_reports_a_directory_in_place_of_a_file(tmp_path, monkeypatch, capsys):
    target = mnist_raw_dir(tmp_path) / "t10k-labels-idx1-ubyte"
    target.mkdir(parents=True)
    never_needed = FailingSource("never needed", "must not be called")
    monkeypatch.setattr(manualbp.data.provision, "default_sources", lambda: (never_needed,))
    assert fetch_main(["--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: MNIST is not available: ")
    assert f"{target} is a directory" in error
    assert never_needed.calls == 0


def test_raw_dir_that_is_a_file_is_reported(tmp_path):
    (tmp_path / "MNIST").mkdir()
    (tmp_path / "MNIST" / "raw").write_bytes(b"not a directory")
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[], log=quiet)
    message = str(raised.value)
    assert f"cannot create {tmp_path / 'MNIST' / 'raw'} (FileExistsError: " in message
    assert "or use another data root (--root, data_dir or $MANUALBP_DATA_DIR)" in message


def _deny_write_access(monkeypatch, denied: Path) -> None:
    """Make ``os.access`` report ``denied`` as not writable (what a read-only mount reports)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == denied and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_unwritable_raw_dir_is_reported_before_downloading(tmp_path, mnist_root, monkeypatch):
    raw_dir = copy_mnist(mnist_root, tmp_path, ["train-labels-idx1-ubyte"])
    _deny_write_access(monkeypatch, raw_dir)
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[restore], log=quiet)
    message = str(raised.value)
    assert f"cannot write to {raw_dir} (not writable for this user)" in message
    assert f"Make {raw_dir} writable for this user, or use another data root" in message
    assert restore.calls == 0


def test_unwritable_dir_with_verified_files_is_fine(tmp_path, mnist_root, monkeypatch):
    raw_dir = copy_mnist(mnist_root, tmp_path)
    _deny_write_access(monkeypatch, raw_dir)
    _deny_write_access(monkeypatch, raw_dir.parent)
    report = ensure_mnist(tmp_path, sources=[FailingSource("unused", "unused")], log=quiet)
    assert set(report.sources.values()) == {"present"}


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes despite permissions"
)
def test_read_only_raw_dir_is_reported_before_downloading(tmp_path, mnist_root):
    raw_dir = copy_mnist(mnist_root, tmp_path, ["train-labels-idx1-ubyte"])
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    raw_dir.chmod(0o555)
    try:
        with pytest.raises(
            MNISTUnavailableError, match=f"cannot write to {re.escape(str(raw_dir))}"
        ):
            ensure_mnist(tmp_path, sources=[restore], log=quiet)
    finally:
        raw_dir.chmod(0o755)
    assert restore.calls == 0


def test_permission_error_while_moving_files_is_reported(tmp_path, mnist_root, monkeypatch):
    raw_dir = mnist_raw_dir(tmp_path)
    real_replace = os.replace

    def replace(source, destination, *args, **kwargs):
        if Path(destination).parent == raw_dir:
            raise PermissionError(errno.EACCES, "Permission denied", str(destination))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[restore], log=quiet)
    message = str(raised.value)
    first = raw_dir / next(iter(OFFICIAL_MD5))
    assert f"cannot move the verified file to {first} (PermissionError: Permission denied)" in (
        message
    )
    assert f"Make {raw_dir} writable for this user" in message
    assert [path.name for path in (tmp_path / "MNIST").iterdir()] == ["raw"]  # staging removed


def test_os_error_while_staging_is_reported(tmp_path, mnist_root, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[restore], log=quiet)
    assert (
        f"cannot create a staging directory in {tmp_path / 'MNIST'} "
        f"(OSError: No space left on device)"
    ) in str(raised.value)
    assert restore.calls == 0


def test_unreadable_present_file_is_reported(tmp_path, mnist_root, monkeypatch):
    raw_dir = copy_mnist(mnist_root, tmp_path)
    unreadable = raw_dir / "t10k-images-idx3-ubyte"

    def md5(path):
        if Path(path) == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return file_md5(path)

    monkeypatch.setattr(manualbp.data.provision, "file_md5", md5)
    with pytest.raises(MNISTUnavailableError) as raised:
        ensure_mnist(tmp_path, sources=[], log=quiet)
    message = str(raised.value)
    assert f"cannot read {unreadable} (PermissionError: Permission denied)" in message
    assert f"Make {unreadable} readable for this user, or remove it" in message


# --- Staging directories of killed runs -------------------------------------------------------

_KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from manualbp.data.provision import ensure_mnist

class KilledMidDownload:
    name = "killed mid-download"
    def fetch(self, dest_dir):
        (Path(dest_dir) / "wheel-x").mkdir()
        (Path(dest_dir) / "wheel-x" / "big.whl").write_bytes(bytes(1 << 20))
        os.kill(os.getpid(), signal.SIGKILL)

ensure_mnist(sys.argv[1], sources=[KilledMidDownload()], log=lambda message: None)
"""

_STAGING_NAME = re.compile(r"\.staging-(\d+)-([0-9a-f]{8})-[a-z0-9_]+")


def _staging_dirs(root: Path) -> list[Path]:
    return sorted(path for path in (root / "MNIST").iterdir() if path.name != "raw")


def test_staging_dir_of_a_killed_run_is_removed_by_the_next_run(tmp_path, mnist_root):
    killed = run_python(_KILLED_RUN, str(tmp_path))
    assert killed.returncode == -9, killed.stderr
    [stale] = _staging_dirs(tmp_path)  # the killed run left its staging directory (and wheel)
    match = _STAGING_NAME.fullmatch(stale.name)
    assert match, stale.name
    assert int(match[1]) != os.getpid()

    # A directory of this (live) process, and one of a dead process on another host: kept.
    live = stale.with_name(f".staging-{os.getpid()}-{match[2]}-live1234")
    other_host = stale.with_name(f".staging-{match[1]}-{'0' * 8}-other123")
    for kept in (live, other_host):
        kept.mkdir()
        (kept / "partial").write_bytes(b"in use")

    copy_mnist(mnist_root, tmp_path)
    messages: list[str] = []
    report = ensure_mnist(tmp_path, sources=[], log=messages.append)
    assert set(report.sources.values()) == {"present"}
    assert not stale.exists()
    assert messages == [
        f"MNIST: removed the stale staging directory {stale} "
        f"(left by process {match[1]}, which is gone)"
    ]
    assert _staging_dirs(tmp_path) == sorted([live, other_host])
    assert (live / "partial").read_bytes() == b"in use"


def test_legacy_staging_dirs_are_removed_once_abandoned(tmp_path, mnist_root):
    copy_mnist(mnist_root, tmp_path)
    abandoned = tmp_path / "MNIST" / ".staging-k2x_9q0a"
    recent = tmp_path / "MNIST" / ".staging-3hf8zz1b"
    for directory in (abandoned, recent):
        (directory / "wheel-abc").mkdir(parents=True)
    two_hours_ago = time.time() - 2 * 3600
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    ensure_mnist(tmp_path, sources=[], log=quiet)
    assert _staging_dirs(tmp_path) == [recent]


_LIVE_RUN = """
import sys
from pathlib import Path
from manualbp.data.provision import MNISTUnavailableError, ensure_mnist

class WaitsForStdin:
    name = "slow mirror"
    def fetch(self, dest_dir):
        (Path(dest_dir) / "started").write_bytes(b"")
        sys.stdin.read()  # until the test closes it
        raise ConnectionError("closed")

try:
    ensure_mnist(sys.argv[1], sources=[WaitsForStdin()], log=lambda message: None)
except MNISTUnavailableError:
    print("unavailable")
"""


def test_staging_dir_of_a_live_concurrent_run_is_left_alone(tmp_path, mnist_root):
    other_root = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    with subprocess.Popen(
        [sys.executable, "-c", _LIVE_RUN, str(other_root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as concurrent:
        try:
            deadline = time.monotonic() + 120
            while not list((other_root / "MNIST").glob(".staging-*/**/started")):
                assert concurrent.poll() is None, "the concurrent run ended early"
                assert time.monotonic() < deadline, "the concurrent run never started fetching"
                time.sleep(0.05)
            [staging] = _staging_dirs(other_root)

            # This run verifies the same root while the other one is still fetching.
            raw_dir = copy_mnist(mnist_root, other_root)
            flip_one_byte(raw_dir / "t10k-labels-idx1-ubyte")
            restore = RestoreFromCopySource(mnist_raw_dir(mnist_root))
            ensure_mnist(other_root, sources=[restore], log=quiet)
            assert staging in _staging_dirs(other_root)
            assert list(staging.glob("**/started"))
        finally:
            output, _ = concurrent.communicate(timeout=120)
    assert output.strip() == "unavailable"
    assert not staging.exists()  # the other run cleaned up after itself
    assert _staging_dirs(other_root) == []

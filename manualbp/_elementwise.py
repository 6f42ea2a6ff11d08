"""Elementwise backward rules in one pass, where torch ops would take a slower or bigger route.

``torch.where(y <= 0, 0, g)`` is ReLU's rule and the Function's formula. Run as torch ops it
holds a boolean mask beside the gradient (on CUDA: more peak memory than torch's fused kernel)
and, on the CPU, its comparison and select are several times slower than arithmetic. Two
faster routes give the same bits:

* on CUDA, the formula as one elementwise kernel, compiled at first use by
  ``torch.cuda.jiterator`` (:func:`relu_grad_cuda`, and tanh's :func:`tanh_grad_cuda`, whose
  fused multiply-add rounds as torch's kernel does);
* on the CPU, the select as bit operations (:func:`relu_grad_bits`): ``g``'s bits AND a mask
  of all ones where ``y > 0`` and all zeros where ``y = ±0``, which passes ``g`` unchanged
  (``-0``, ``inf`` and ``NaN`` included) and writes ``+0`` elsewhere.

Both are invisible to autograd and to ``torch.func``/``torch.compile``, so they run only on
plain tensors in a backward that is not itself differentiated, transformed or traced
(:func:`cuda_kernel_applies`, :func:`bit_ops_apply`); elsewhere the Function runs the formula
in torch ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

__all__ = [
    "FULL_PRECISION",
    "bit_ops_apply",
    "cuda_kernel_applies",
    "relu_grad_bits",
    "relu_grad_cuda",
    "tanh_grad_cuda",
]

FULL_PRECISION = (torch.float32, torch.float64)
"""The dtypes a CUDA kernel here computes in directly (torch rounds half dtypes differently)."""

_SAME_SIZE_INTEGER = {  # float dtype: (integer dtype of its width, that integer's max, width - 1)
    torch.float64: (torch.int64, 2**63 - 1, 63),
    torch.float32: (torch.int32, 2**31 - 1, 31),
    torch.float16: (torch.int16, 2**15 - 1, 15),
    torch.bfloat16: (torch.int16, 2**15 - 1, 15),
}


@functools.cache
def _compiled(code: str) -> Callable[..., torch.Tensor]:
    return torch.cuda.jiterator._create_jit_fn(code)


def relu_grad_cuda(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dL/dx = y <= 0 ? 0 : g`` for ``grad_output (*)`` and ReLU's output ``y (*)``."""
    kernel = _compiled(
        "template <typename T> T relu_grad(T g, T y) { return y <= T(0) ? T(0) : g; }"
    )
    return kernel(grad_output, y)  # (*)


def tanh_grad_cuda(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dL/dx = g · (1 - y²)`` for ``grad_output (*)`` and tanh's output ``y (*)``, rounded
    as torch's CUDA kernel rounds it (``1 - y²`` as one fused multiply-add)."""
    kernel = _compiled("template <typename T> T tanh_grad(T g, T y) { return g * (T(1) - y * y); }")
    return kernel(grad_output, y)  # (*)


def relu_grad_bits(grad_output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``dL/dx = y <= 0 ? 0 : g`` for ``grad_output (*)`` and ReLU's output ``y (*)`` (``y``
    is ``+x``, ``±0`` or ``NaN``), with integer operations on the floats' bits."""
    integer, largest, sign_bit = _SAME_SIZE_INTEGER[y.dtype]
    magnitude = y.view(integer) & largest  # (*)  |y|'s bits: 0 iff y = ±0
    mask = magnitude.neg_().bitwise_right_shift_(sign_bit)  # (*)  all ones iff |y| > 0 or NaN
    return (grad_output.view(integer) & mask).view(grad_output.dtype)  # (*)


def _plain_backward(tensors: tuple[torch.Tensor, ...], backend: torch._C.DispatchKey) -> bool:
    """Dense ``backend`` tensors of one dtype (no subclass, no batched tensor of the legacy
    ``vmap`` that ``gradcheck`` uses), in a backward not differentiated, transformed or traced."""
    dtype = tensors[0].dtype
    return (
        all(
            type(t) is torch.Tensor and t.dtype == dtype and torch._C._dispatch_keys(t).has(backend)
            for t in tensors
        )
        and not torch.is_grad_enabled()
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
    )


def cuda_kernel_applies(
    *tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None
) -> bool:
    """Whether a CUDA kernel of this module can run on ``tensors`` (of ``dtypes`` if given)."""
    first = tensors[0]
    return (
        first.is_cuda
        and (dtypes is None or first.dtype in dtypes)
        and torch.version.hip is None
        and _plain_backward(tensors, torch._C.DispatchKey.CUDA)
    )


def bit_ops_apply(*tensors: torch.Tensor) -> bool:
    """Whether :func:`relu_grad_bits` can run on ``tensors``: floating CPU tensors."""
    first = tensors[0]
    return (
        first.is_cpu
        and first.dtype in _SAME_SIZE_INTEGER
        and _plain_backward(tensors, torch._C.DispatchKey.CPU)
    )

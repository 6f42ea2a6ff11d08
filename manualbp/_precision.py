"""Precision helpers: how the handwritten formulas reach torch's rounding and dtypes.

* :func:`opmath` — torch's kernels compute float16/bfloat16 in float32 and round once;
* :func:`mm_in_layout` — the order of a matmul that torch's own backward picks for a given
  memory layout (the same product, rounded differently in the other order);
* :func:`remember_autocast_state` / :func:`replay_autocast_state` — what
  ``torch.amp.custom_fwd`` / ``custom_bwd`` do, for Functions in the ``setup_context`` style on
  any device: a backward run outside the ``torch.autocast`` region computes in the precision
  the forward saw;
* :func:`upcast_like_autocast_fp32_ops` — autocast's float32 policy for the losses.
"""

from __future__ import annotations

import contextlib

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The half-precision dtypes, which torch's CPU kernels compute in float32 ("opmath")."""


def opmath(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32, others unchanged: the "opmath" type torch's kernels compute in.

    Torch rounds to the storage dtype once, at the end; a formula evaluated on ``opmath``
    tensors and cast back does the same.
    """
    return tensor.float() if tensor.dtype in HALF_DTYPES else tensor


def is_column_major(tensor: torch.Tensor) -> bool:
    """True for a 2-D tensor stored column by column, e.g. the transpose of a contiguous one."""
    return tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.stride(1) == tensor.shape[0]


def is_row_major(tensor: torch.Tensor) -> bool:
    """True for a 2-D tensor stored row by row (contiguous)."""
    return tensor.dim() == 2 and tensor.stride(1) == 1 and tensor.stride(0) == tensor.shape[1]


def mm_in_layout(a: torch.Tensor, b: torch.Tensor, column_major: bool) -> torch.Tensor:
    """The product ``a (m, k) @ b (k, n)`` → ``(m, n)``, computed as ``(bᵀ aᵀ)ᵀ`` when
    ``column_major``.

    Both orders are the same product in exact arithmetic; BLAS sums them in different orders.
    Torch's matmul backward computes the gradient of a column-major operand the transposed
    way, so that it comes out column-major like the operand; choosing as torch chose gives its
    rounding bit for bit and its memory layout.
    """
    if column_major:
        return b.t().mm(a.t()).t()
    return a.mm(b)


_AUTOCAST_AVAILABLE: dict[str, bool] = {}  # device type -> whether torch.autocast exists for it
_NO_AUTOCAST = contextlib.nullcontext()


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (False for devices without
    autocast, such as ``meta``)."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = torch.amp.is_autocast_available(device_type)
        _AUTOCAST_AVAILABLE[device_type] = available
    return available and torch.is_autocast_enabled(device_type)


def remember_autocast_state(ctx, tensor: torch.Tensor) -> None:
    """Store on ``ctx`` whether autocast is on for ``tensor``'s device, and its dtype."""
    device_type = tensor.device.type
    ctx.autocast_enabled = autocast_enabled(device_type)
    if ctx.autocast_enabled:
        ctx.autocast_device_type = device_type
        ctx.autocast_dtype = torch.get_autocast_dtype(device_type)


def replay_autocast_state(ctx) -> contextlib.AbstractContextManager:
    """A context manager that re-enters the autocast state stored by the forward."""
    if not ctx.autocast_enabled:
        return _NO_AUTOCAST
    return torch.autocast(ctx.autocast_device_type, dtype=ctx.autocast_dtype)


def upcast_like_autocast_fp32_ops(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast fp16/bf16 tensors to float32 when autocast is on, as autocast does for loss ops.

    ``torch.autocast`` runs ``cross_entropy`` and ``mse_loss`` in float32 on CPU and CUDA
    ("fp32 policy"); the handwritten losses follow the same policy so that their output
    dtype matches the builtin ones. The cast is an ordinary autograd op, so the gradient
    flows back in the caller's dtype.
    """
    if not autocast_enabled(tensors[0].device.type):
        return tensors
    return tuple(t.float() if t.dtype in HALF_DTYPES else t for t in tensors)

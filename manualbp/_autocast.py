"""Device-generic stand-ins for ``torch.amp.custom_fwd`` / ``custom_bwd``.

``torch.amp.custom_fwd`` is bound to one device type and expects ``ctx`` as the first
argument of ``forward``; the Functions here use the ``forward`` + ``setup_context`` style
(needed for ``torch.func`` support) and run on CPU and CUDA alike. These two helpers do the
same job: remember the autocast state seen by the forward and replay it in the backward, so
that a backward called outside the ``torch.autocast`` region computes in the same precision
as the builtin op's backward would.
"""

from __future__ import annotations

import contextlib

import torch

_LOWER_PRECISION = (torch.float16, torch.bfloat16)


def remember_autocast_state(ctx, tensor: torch.Tensor) -> None:
    """Store on ``ctx`` whether autocast is on for ``tensor``'s device, and its dtype."""
    device_type = tensor.device.type
    ctx.autocast_enabled = torch.is_autocast_enabled(device_type)
    if ctx.autocast_enabled:
        ctx.autocast_device_type = device_type
        ctx.autocast_dtype = torch.get_autocast_dtype(device_type)


def replay_autocast_state(ctx) -> contextlib.AbstractContextManager:
    """A context manager that re-enters the autocast state stored by the forward."""
    if not ctx.autocast_enabled:
        return contextlib.nullcontext()
    return torch.autocast(ctx.autocast_device_type, dtype=ctx.autocast_dtype)


def upcast_like_autocast_fp32_ops(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast fp16/bf16 tensors to float32 when autocast is on, as autocast does for loss ops.

    ``torch.autocast`` runs ``cross_entropy`` and ``mse_loss`` in float32 on CPU and CUDA
    ("fp32 policy"); the handwritten losses follow the same policy so that their output
    dtype matches the builtin ones. The cast is an ordinary autograd op, so the gradient
    flows back in the caller's dtype.
    """
    if not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    return tuple(t.float() if t.dtype in _LOWER_PRECISION else t for t in tensors)

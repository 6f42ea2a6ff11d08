"""Handwritten backward passes as ``torch.autograd.Function`` subclasses, and their aliases.

Each Function reads top to bottom as its forward, what ``setup_context`` saves, and its
``backward``: the gradient formula, one line per quantity, with its shape. Derivations are in
``docs/derivations.md``. The lowercase aliases (``linear``, ``sigmoid``, ...) at the end have
the signatures of their ``torch.nn.functional`` namesakes and check their inputs.

Shapes: ``N`` rows, ``C`` classes, ``in``/``out`` features, ``*`` any leading dimensions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd import Function

from manualbp._function import apply
from manualbp._precision import (
    is_column_major,
    is_row_major,
    mm_in_layout,
    opmath,
    remember_autocast_state,
    replay_autocast_state,
    upcast_like_autocast_fp32_ops,
)
from manualbp._validation import (
    check_cross_entropy_args,
    check_linear_args,
    check_mse_args,
    check_real,
    check_tensor,
)


class LinearFunction(Function):
    """``y = x Wᵀ + b`` over any leading dimensions.

    With ``G = dL/dy`` and ``X = x`` flattened to rows: ``dX = G W``, ``dW = Gᵀ X``,
    ``db = Σ_rows G``. Inputs: ``input (*, in)``, ``weight (out, in)``, ``bias (out,)`` or
    ``None``. Output: ``(*, out)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias):
        return F.linear(input, weight, bias)  # torch's own forward kernel: bit-identical

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _ = inputs
        needs_input, needs_weight, _ = ctx.needs_input_grad
        # x only for dW, W only for dX: a frozen layer saves nothing extra.
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        # The matmul order torch's backward picks for these layouts (see mm_in_layout).
        ctx.grad_input_column_major = is_column_major(input)
        ctx.grad_weight_column_major = not is_row_major(weight)
        remember_autocast_state(ctx, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        with replay_autocast_state(ctx):
            G = _as_rows(grad_output)  # (N, out)
            if ctx.needs_input_grad[0]:
                dX = mm_in_layout(G, weight, ctx.grad_input_column_major)  # (N, in)
                grad_input = _unflatten_rows(dX, grad_output)  # (*, in)
            if ctx.needs_input_grad[1]:
                X = _as_rows(input)  # (N, in)
                grad_weight = mm_in_layout(G.t(), X, ctx.grad_weight_column_major)  # (out, in)
            if ctx.needs_input_grad[2]:
                grad_bias = G.sum(0)  # (out,)
        return grad_input, grad_weight, grad_bias


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``(*, k)`` → ``(N, k)`` with ``N = prod(*)`` (1 for a 1-D tensor); a 2-D tensor is
    returned as it is."""
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def _unflatten_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` → ``(*, k)`` with the leading dimensions of ``like (*, m)``."""
    return rows if like.dim() == 2 else rows.reshape(*like.shape[:-1], rows.shape[-1])


class SigmoidFunction(Function):
    """``y = 1 / (1 + e^{-x})``;  ``dL/dx = g · (1 - y) · y``, from the saved output alone.

    Input and output: any shape ``(*)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        g, y32 = opmath(grad_output), opmath(y)  # (*), (*)
        return (g * (1 - y32) * y32).to(grad_output.dtype)  # (*)  torch's evaluation order


class TanhFunction(Function):
    """``y = tanh(x)``;  ``dL/dx = g · (1 - y²)``, from the saved output alone.

    Input and output: any shape ``(*)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        return torch.tanh(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        g, y32 = opmath(grad_output), opmath(y)  # (*), (*)
        one_minus_y2 = torch.addcmul(torch.ones_like(y32), y32, y32, value=-1)  # (*) one fma
        return (g * one_minus_y2).to(grad_output.dtype)  # (*)


class ReLUFunction(Function):
    """``y = max(x, 0)``;  ``dL/dx = g · [y > 0]`` (0 at y = 0, as in torch).

    Saves its output, which the next layer saves anyway as its input: the mask costs no
    memory. Input and output: any shape ``(*)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input):
        return torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        if grad_output.device.type != "cpu":
            return torch.where(y <= 0, 0.0, grad_output)  # (*)  torch's rule: 0 where y <= 0
        # The same rule on the CPU, where a float mask multiplies several times faster than a
        # boolean one selects: [y > 0] = sign(y), with a NaN y counted as passing g, as torch
        # does; 0 + g·mask in one fused op gives +0 (not g·0 = -0) where y = 0.
        mask = torch.sign(torch.nan_to_num(y, nan=1.0))  # (*)  1 where y > 0 or NaN, else 0
        return torch.addcmul(grad_output.new_zeros(()), grad_output, mask)  # (*)


class CrossEntropyFunction(Function):
    """Softmax cross-entropy ``ℓ_i = -log softmax(x)_{i, t_i}`` with a fused backward
    ``dL/dx = (softmax(x) - onehot(t)) · s_i``.

    ``s_i`` is row i's share of ``dL/dℓ`` (``g / #valid`` for mean), 0 for ignored rows.
    Inputs: ``input (N, C)`` logits, ``target (N,)`` int64, ``reduction``, ``ignore_index``
    (``None`` when no target is ignored: no masks). Outputs: the loss (``()`` or ``(N,)`` for
    ``none``) and the log-probabilities ``(N, C)``, returned rather than kept so that double
    backward through them is exact. Use :func:`cross_entropy` for the loss alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, reduction, ignore_index):
        # torch's log_softmax (stable log-sum-exp) and nll_loss kernels: bit-identical to
        # F.cross_entropy, and nll_loss rejects out-of-range targets itself.
        log_probs = torch.log_softmax(input, dim=1)  # (N, C)
        skip = -100 if ignore_index is None else ignore_index
        loss = F.nll_loss(log_probs, target, reduction=reduction, ignore_index=skip)
        return loss, log_probs  # () or (N,), (N, C)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, target, reduction, ignore_index = inputs
        _, log_probs = output
        ctx.save_for_backward(log_probs, target)
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)  # callers drop log_probs: no zeros for its gradient

    @staticmethod
    def backward(ctx, grad_loss, grad_log_probs):
        log_probs, target = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        softmax = opmath(log_probs).exp()  # (N, C)
        grad_input = None
        if grad_loss is not None:
            s, t = _row_scale(target, opmath(grad_loss), ctx.reduction, ctx.ignore_index)
            # (softmax - onehot(t)) · s, formed as softmax·s - s at column t: torch's rounding.
            grad_input = (softmax * s).scatter_add_(1, t, -s)  # (N, C)
        if grad_log_probs is not None:  # double backward: the log-softmax Jacobian
            v = opmath(grad_log_probs)  # (N, C)
            dlogp = v - softmax * v.sum(dim=1, keepdim=True)  # (N, C)
            grad_input = dlogp if grad_input is None else grad_input + dlogp  # (N, C)
        if grad_input is not None:
            grad_input = grad_input.to(log_probs.dtype)
        return grad_input, None, None, None


def _row_scale(
    target: torch.Tensor, grad_loss: torch.Tensor, reduction: str, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's share ``s (N, 1)`` of ``grad_loss`` (``()``, or ``(N,)`` for ``none``) and
    its target column ``t (N, 1)``: ``s = g / #valid`` for mean, ``g`` for sum, ``g_i`` for
    none; ``s = 0`` (and ``t = 0``) where the target is ignored."""
    rows = target.shape[0]
    if ignore_index is None:
        if reduction == "none":
            return grad_loss.unsqueeze(1), target.unsqueeze(1)  # (N, 1), (N, 1)
        share = grad_loss / rows if reduction == "mean" else grad_loss  # ()
        return share.expand(rows, 1), target.unsqueeze(1)  # (N, 1), (N, 1)
    valid = target != ignore_index  # (N,)
    share = grad_loss / valid.sum() if reduction == "mean" else grad_loss  # () or (N,)
    s = torch.where(valid, share, 0).unsqueeze(1)  # (N, 1)
    return s, torch.where(valid, target, 0).unsqueeze(1)  # (N, 1), (N, 1)


class MSELossFunction(Function):
    """Mean squared error ``ℓ = reduce((x - y)²)``;  ``dL/dx = k · (x - y) · g``,
    ``dL/dy = -dL/dx``, with ``k = 2 / numel`` for mean and ``2`` for sum or none.

    Inputs: ``input (*)``, ``target (*)`` of the same shape, ``reduction``.
    Output: ``()``, or ``(*)`` for ``none``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, reduction):
        diff = input - target  # (*)
        squared = diff * diff  # (*)
        if reduction == "none":
            return squared
        return squared.sum() if reduction == "sum" else squared.mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_output):
        input, target = ctx.saved_tensors
        needs_input, needs_target, _ = ctx.needs_input_grad
        if not (needs_input or needs_target):
            return None, None, None
        k = 2.0 / max(input.numel(), 1) if ctx.reduction == "mean" else 2.0
        if input.dtype in (torch.float16, torch.bfloat16):
            k = float(torch.tensor(k, dtype=input.dtype))  # torch's kernel rounds k too
        grad_input = k * (input - target) * grad_output  # (*)  torch's evaluation order
        grad_target = -grad_input if needs_target else None  # (*)
        return (grad_input if needs_input else None), grad_target, None


# --- the aliases: torch.nn.functional's signatures, checked inputs ---------------------------


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``input (*, in) @ weight (out, in)ᵀ + bias (out,)`` → ``(*, out)``, handwritten backward."""
    check_linear_args(input, weight, bias)
    return apply(LinearFunction, input, weight, bias)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """Logistic sigmoid of ``input (*)`` → ``(*)``, handwritten backward."""
    check_tensor(input, "input", "sigmoid")
    check_real(input, "input", "sigmoid")
    return apply(SigmoidFunction, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """Hyperbolic tangent of ``input (*)`` → ``(*)``, handwritten backward."""
    check_tensor(input, "input", "tanh")
    check_real(input, "input", "tanh")
    return apply(TanhFunction, input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(input, 0)`` of ``input (*)`` → ``(*)``, handwritten backward.

    ``inplace=True`` is refused: an in-place ReLU would overwrite the tensor the previous
    layer saved for its own backward.
    """
    check_tensor(input, "input", "relu")
    check_real(input, "input", "relu")
    if inplace:
        raise ValueError("relu: inplace=True is not supported; expected inplace=False")
    return apply(ReLUFunction, input)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of ``input (N, C)`` logits against ``target (N,)`` int64 classes.

    Returns ``()`` for ``mean``/``sum``, ``(N,)`` for ``none``. Under ``torch.autocast`` the
    loss is computed in float32, as torch's own ``cross_entropy`` is.
    """
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        target = target.long()  # torch accepts Byte class indices too
    may_ignore = check_cross_entropy_args(input, target, reduction, ignore_index)
    (input,) = upcast_like_autocast_fp32_ops(input)
    # None tells the Function that no target is ignored, so it can skip the masks.
    loss, _ = apply(
        CrossEntropyFunction, input, target, reduction, ignore_index if may_ignore else None
    )
    return loss


def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error between ``input (*)`` and ``target (*)`` of the same shape.

    Returns ``()`` for ``mean``/``sum``, ``(*)`` for ``none``. Mixed dtypes are promoted as
    in torch; under ``torch.autocast`` the loss is computed in float32.
    """
    check_mse_args(input, target, reduction)
    input, target = upcast_like_autocast_fp32_ops(input, target)
    if input.dtype != target.dtype:
        common = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(common), target.to(common)
    return apply(MSELossFunction, input, target, reduction)


__all__ = [
    "CrossEntropyFunction",
    "LinearFunction",
    "MSELossFunction",
    "ReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "cross_entropy",
    "linear",
    "mse_loss",
    "relu",
    "sigmoid",
    "tanh",
]

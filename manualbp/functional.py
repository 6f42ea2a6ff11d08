"""Handwritten backward passes as ``torch.autograd.Function`` subclasses, and their aliases.

Each Function reads top to bottom as its forward, what ``setup_context`` saves, and its
``backward``: the gradient formula, one line per quantity, with its shape. Derivations are in
``docs/derivations.md``. The lowercase aliases (``linear``, ``sigmoid``, ...) at the end have
the signatures of their ``torch.nn.functional`` namesakes and check their inputs.

Shapes: ``N`` rows, ``C`` classes, ``in``/``out`` features, ``*`` any leading dimensions.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function

from manualbp import _elementwise as elementwise
from manualbp._function import apply
from manualbp._precision import (
    HALF_DTYPES,
    autocast_enabled,
    is_column_major,
    is_row_major,
    mm_in_layout,
    opmath,
    remember_autocast_state,
    replay_autocast_state,
    upcast_like_autocast_fp32_ops,
)
from manualbp._validation import (
    check_batch_norm_args,
    check_conv2d_args,
    check_cross_entropy_args,
    check_dropout_args,
    check_linear_args,
    check_mse_args,
    check_real_tensor,
    is_tracing,
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
        ctx.grad_input_column_major = needs_input and is_column_major(input)
        ctx.grad_weight_column_major = needs_weight and not is_row_major(weight)
        remember_autocast_state(ctx, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        with replay_autocast_state(ctx):
            G = _as_rows(grad_output)  # (N, out)
            if needs_input:
                dX = mm_in_layout(G, weight, ctx.grad_input_column_major)  # (N, in)
                grad_input = _unflatten_rows(dX, grad_output)  # (*, in)
            if needs_weight:
                X = _as_rows(input)  # (N, in)
                grad_weight = mm_in_layout(G.t(), X, ctx.grad_weight_column_major)  # (out, in)
            if needs_bias:
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
    """``y = 1 / (1 + e^{-x})``;  ``dL/dx = g · (1 - y) · y``, from the saved ``y``; any ``(*)``."""

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
        if grad_output.is_cuda and y.dtype in HALF_DTYPES:  # torch's CUDA kernel rounds
            return grad_output * (1 - y) * y  # (*)  every step to the half dtype
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
        if elementwise.cuda_kernel_applies(grad_output, y, dtypes=elementwise.FULL_PRECISION):
            return elementwise.tanh_grad_cuda(grad_output, y)  # (*)  g · (1 - y²), one fma
        if grad_output.is_cuda and y.dtype in HALF_DTYPES:  # torch's CUDA kernel rounds
            return grad_output * (1 - y * y)  # (*)  every step to the half dtype
        g, y32 = opmath(grad_output), opmath(y)  # (*), (*)
        one_minus_y2 = torch.addcmul(torch.ones_like(y32), y32, y32, value=-1)  # (*) one fma
        return (g * one_minus_y2).to(grad_output.dtype)  # (*)


class ReLUFunction(Function):
    """``y = max(x, 0)``;  ``dL/dx = g · [y > 0]`` (0 at y = 0, as in torch).

    Saves its output, which the next layer saves anyway as its input: the mask costs no
    memory. With ``inplace`` the output overwrites ``input`` (``torch.relu_``, marked dirty):
    autograd then refuses, as torch does, a backward through an earlier op that saved
    ``input``. Inputs: ``input (*)``, ``inplace``. Output: ``(*)``, ``input`` itself in place.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, inplace):
        return torch.relu_(input) if inplace else torch.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, inplace = inputs
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        if elementwise.cuda_kernel_applies(grad_output, y):  # one kernel, no mask in memory
            return elementwise.relu_grad_cuda(grad_output, y), None  # (*)  y <= 0 ? 0 : g
        if elementwise.bit_ops_apply(grad_output, y):  # the same select as bit operations
            return elementwise.relu_grad_bits(grad_output, y), None  # (*)  g's bits & [y > 0]
        # A select, not a product with a mask: g passes bit for bit (-0, inf and NaN included)
        # and the blocked entries are +0 whatever g holds, as in torch; a NaN y passes g.
        return torch.where(y <= 0, 0.0, grad_output), None  # (*)


class CrossEntropyFunction(Function):
    """Softmax cross-entropy against class indices, ``ℓ_i = -w_{t_i} log softmax(x_i)_{t_i}``,
    with a fused backward ``dL/dx_i = (softmax(x_i) - onehot(t_i)) · s_i``.

    ``s_i`` is entry i's share of ``dL/dℓ``: ``w_{t_i} · g / Σ_valid w_t`` for mean (``w = 1``
    without class weights), ``w_{t_i} · g`` for sum, ``w_{t_i} · g_i`` for none; 0 where the
    target is ignored. Label smoothing ``ε`` adds ``(ε/C) · Σ_c -w_c log softmax(x_i)_c`` to
    ``(1 - ε) ℓ_i``; its gradient goes through the log-softmax Jacobian (docs/derivations.md).

    Inputs: ``input`` logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; ``target``
    int64 classes ``()``, ``(N,)`` or ``(N, d1, ..., dk)``; ``weight (C,)`` or ``None``;
    ``reduction``; ``ignore_index`` (``None`` when no target is ignored: no masks);
    ``label_smoothing`` (0 for none). Outputs: the loss (``()``, or the target's shape for
    ``none``) and the log-probabilities (the input's shape), returned rather than kept so
    that double backward through them is exact. Use :func:`cross_entropy` for the loss alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction, ignore_index, label_smoothing):
        # torch's log_softmax and nll_loss kernels, and the smoothing term composed as torch
        # composes it: bit-identical to F.cross_entropy; nll_loss rejects bad targets itself.
        class_dim = 1 if input.dim() > 1 else 0
        log_probs = torch.log_softmax(input, dim=class_dim)  # like input
        skip = -100 if ignore_index is None else ignore_index
        loss = F.nll_loss(log_probs, target, weight, ignore_index=skip, reduction=reduction)
        if label_smoothing > 0:
            smooth = _smoothing_loss(log_probs, target, weight, reduction, ignore_index)
            num_classes = log_probs.shape[class_dim]
            loss = (1 - label_smoothing) * loss + smooth * (label_smoothing / num_classes)
        return loss, log_probs  # () or like target, like input

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, target, weight, reduction, ignore_index, label_smoothing = inputs
        _, log_probs = output
        ctx.save_for_backward(log_probs, target, weight)
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.set_materialize_grads(False)  # callers drop log_probs: no zeros for its gradient

    @staticmethod
    def backward(ctx, grad_loss, grad_log_probs):
        log_probs, target, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        class_dim = 1 if log_probs.dim() > 1 else 0
        grad_input = None
        if grad_loss is not None and ctx.label_smoothing > 0:
            v = _smoothed_log_prob_grad(  # like input
                target, weight, opmath(grad_loss), ctx, log_probs.shape, class_dim
            )
            grad_input = _log_softmax_vjp(v, log_probs, class_dim)  # like input
        elif grad_loss is not None:
            softmax = opmath(log_probs).exp()  # like input
            s, t = _row_scale(
                target, opmath(grad_loss), ctx.reduction, ctx.ignore_index, weight, class_dim
            )
            # (softmax - onehot(t)) · s, formed as softmax·s - s at column t: torch's rounding.
            grad_input = (softmax * s).scatter_add_(class_dim, t, -s)  # like input
        if grad_log_probs is not None:  # double backward: the log-softmax Jacobian
            dlogp = _log_softmax_vjp(grad_log_probs, log_probs, class_dim)  # like input
            grad_input = dlogp if grad_input is None else grad_input + dlogp  # like input
        if grad_input is not None and grad_input.dtype != log_probs.dtype:
            grad_input = grad_input.to(log_probs.dtype)
        return grad_input, None, None, None, None, None


def _row_scale(
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    reduction: str,
    ignore_index: int | None,
    weight: torch.Tensor | None,
    class_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's share ``s`` of ``grad_loss`` (``()``, or the target's shape for ``none``)
    and its target class ``t``, both of the target's shape with a class dimension of size 1
    at ``class_dim`` (``(N, 1)`` for ``(N,)`` targets): ``s = w_t · g / Σ_valid w_t`` for mean
    (``w = 1`` without weights), ``w_t · g`` for sum, ``w_t · g_i`` for none; ``s = 0`` (and
    ``t = 0``) where the target is ignored."""
    if ignore_index is None and weight is None:  # the common case: no masks, no gathers
        t = target.unsqueeze(class_dim)  # (N, 1)
        if reduction == "none":
            return grad_loss.unsqueeze(class_dim), t  # (N, 1), (N, 1)
        share = grad_loss / target.numel() if reduction == "mean" else grad_loss  # ()
        return share.expand(t.shape), t  # (N, 1), (N, 1)
    valid = None if ignore_index is None else target != ignore_index  # like target
    if valid is not None:
        target = torch.where(valid, target, 0)  # like target, ignored entries at class 0
    if weight is None:
        count = target.numel() if valid is None else valid.sum()  # ()
        s = grad_loss / count if reduction == "mean" else grad_loss  # () or like target
    else:
        w_t = opmath(weight).gather(0, target.flatten()).view(target.shape)  # like target
        if reduction == "mean":
            total = w_t.sum() if valid is None else torch.where(valid, w_t, 0).sum()  # ()
            grad_loss = grad_loss / total  # ()
        s = w_t * grad_loss  # like target  torch's order: w_t · (g / Σw)
    if valid is not None:
        s = torch.where(valid, s, 0)  # like target
    return s.unsqueeze(class_dim), target.unsqueeze(class_dim)


def _smoothing_loss(
    log_probs: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
    ignore_index: int | None,
) -> torch.Tensor:
    """torch's smoothing term ``-Σ_c w_c log p_c`` of each entry (0 where ignored), reduced:
    the mean divides by the sum of the targets' weights, as the nll term's does. Evaluated as
    torch's ``cross_entropy_loss_label_smoothing`` does, for a bit-identical forward."""
    class_dim = 1 if log_probs.dim() > 1 else 0
    if weight is None:
        smooth = -log_probs.sum(class_dim)  # like target
    else:
        smooth = -(log_probs * _class_view(weight, log_probs)).sum(class_dim)  # like target
    ignored = None if ignore_index is None else target == ignore_index  # like target
    if ignored is not None:
        smooth.masked_fill_(ignored, 0.0)
    if reduction == "none":
        return smooth
    if reduction == "sum":
        return smooth.sum()
    if weight is None:
        count = target.numel() if ignored is None else (~ignored).sum()  # ()
        return smooth.sum() / count
    if ignored is None:
        return smooth.sum() / weight.gather(0, target.flatten()).sum()
    if not is_tracing(target, weight):  # torch's own expression
        return smooth.sum() / weight.gather(0, target.masked_select(~ignored)).sum()
    # torch's expression for tensor subclasses (and so ours under vmap and compile), where
    # masked_select's data-dependent shape is impossible: the same sum with zeros
    taken = weight.gather(0, target.masked_fill(ignored, 0).flatten())  # (numel,)
    return smooth.sum() / taken.masked_fill_(ignored.flatten(), 0).sum()


def _smoothed_log_prob_grad(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad_loss: torch.Tensor,
    ctx,
    shape: torch.Size,
    class_dim: int,
) -> torch.Tensor:
    """``v = dL/d log p`` of ``(1 - ε) · nll + (ε/C) · smooth``: ``-(1 - ε) s`` at each target
    class (``s`` of :func:`_row_scale` for ``(1 - ε) g``) plus ``-r · w_c`` in every class, with
    ``r`` the smoothing term's share of ``(ε/C) g`` (0 where ignored). Shape ``shape``."""
    epsilon, num_classes = ctx.label_smoothing, shape[class_dim]
    s, t = _row_scale(  # like target with class dim 1
        target, grad_loss * (1 - epsilon), ctx.reduction, ctx.ignore_index, weight, class_dim
    )
    r = grad_loss * (epsilon / num_classes)  # () or like target
    valid = None if ctx.ignore_index is None else target != ctx.ignore_index  # like target
    if ctx.reduction == "mean":
        r = r / _valid_weight_sum(target, weight, valid)  # ()
    if valid is not None:
        r = torch.where(valid, r, 0)  # like target
    r = r.expand(target.shape).unsqueeze(class_dim)  # like target with class dim 1
    # -r · w_c in every class (-r without weights), a new tensor of the input's shape
    v = r.new_zeros(shape) - r if weight is None else -r * _class_view(opmath(weight), r)
    return v.scatter_add_(class_dim, t, -s)  # like input


def _valid_weight_sum(
    target: torch.Tensor, weight: torch.Tensor | None, valid: torch.Tensor | None
) -> torch.Tensor | int:
    """``Σ_valid w_t``, the mean's denominator (the count of valid entries without weights)."""
    if weight is None:
        return target.numel() if valid is None else valid.sum()
    if valid is None:
        return opmath(weight).gather(0, target.flatten()).sum()
    w_t = opmath(weight).gather(0, torch.where(valid, target, 0).flatten())  # (numel,)
    return torch.where(valid.flatten(), w_t, 0).sum()


def _class_view(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weight (C,)`` shaped to broadcast along the class dimension of ``like``:
    ``(1, C, 1, ..., 1)``, or ``(C,)`` for 1-D ``like``."""
    if like.dim() <= 1:
        return weight
    return weight.view(1, -1, *([1] * (like.dim() - 2)))


def _log_softmax_vjp(v: torch.Tensor, log_probs: torch.Tensor, class_dim: int) -> torch.Tensor:
    """``dL/dx`` from ``v = dL/d log softmax(x)``: ``v - softmax(x) · Σ_c v``, computed in
    opmath as torch's log-softmax backward kernel does. Shape: like ``log_probs``."""
    softmax = opmath(log_probs).exp()  # like input
    v = opmath(v.to(log_probs.dtype))  # like input  torch rounds v to the input dtype first
    return v - softmax * v.sum(class_dim, keepdim=True)  # like input


class SoftCrossEntropyFunction(Function):
    """Softmax cross-entropy against class probabilities ``t``:
    ``ℓ = -Σ_c w_c q_c log softmax(x)_c`` with ``q = (1 - ε) t + ε / C``.

    With ``s = dL/dℓ`` per entry (``g / M`` for mean over the ``M = numel / C`` entries,
    weights or not; ``g`` for sum; ``g_i`` for none): ``dL/dx = s · (softmax(x) · Σ_c w_c q_c
    - w ⊙ q)``, ``dL/dt = -(1 - ε) · s · w ⊙ log softmax(x)``, ``dL/dw_c = -Σ s · q_c log
    softmax(x)_c``. Inputs: ``input`` and ``target`` of one shape, ``(C,)``, ``(N, C)`` or
    ``(N, C, d1, ..., dk)``; ``weight (C,)`` or ``None``; ``reduction``; ``label_smoothing``.
    Outputs: the loss (``()``, or the input's shape without the class dimension for
    ``none``) and the log-probabilities (the input's shape), as in
    :class:`CrossEntropyFunction`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction, label_smoothing):
        # torch's cross_entropy_loss_prob_target, op for op: a bit-identical forward.
        class_dim = 1 if input.dim() > 1 else 0
        log_probs = torch.log_softmax(input, dim=class_dim)  # like input
        q = _smoothed_target(target, label_smoothing, log_probs.shape[class_dim])  # like input
        terms = log_probs * q  # like input
        if weight is not None:
            terms = terms * _class_view(weight, terms)  # like input
        if reduction == "none":
            return -terms.sum(class_dim), log_probs
        loss = -terms.sum()  # ()
        if reduction == "mean":
            loss = loss.fill_(math.nan) if input.numel() == 0 else loss / _entries(input)
        return loss, log_probs

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, target, weight, reduction, label_smoothing = inputs
        _, log_probs = output
        ctx.save_for_backward(log_probs, target, weight)
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_log_probs):
        log_probs, target, weight = ctx.saved_tensors
        needs_input, needs_target, needs_weight = ctx.needs_input_grad[:3]
        grad_input = grad_target = grad_weight = None
        class_dim = 1 if log_probs.dim() > 1 else 0
        epsilon, num_classes = ctx.label_smoothing, log_probs.shape[class_dim]
        if grad_loss is not None:
            if ctx.reduction == "none":
                dterms = -grad_loss.unsqueeze(class_dim)  # like input with class dim 1
            elif ctx.reduction == "sum":
                dterms = -grad_loss  # ()
            else:
                dterms = -(grad_loss / _entries(log_probs))  # ()
            q = _smoothed_target(target, epsilon, num_classes)  # like input
            w = None if weight is None else _class_view(weight, log_probs)  # (1, C, 1, ...)
            product_dtype = torch.promote_types(log_probs.dtype, q.dtype)  # of log p · q
            # dL/d(log p · q), rounded to that product's dtype as autograd rounds it
            dproduct = dterms if w is None else (dterms * w).to(product_dtype)
            if needs_input:
                grad_input = _log_softmax_vjp(dproduct * q, log_probs, class_dim)  # like input
            if needs_target:
                grad_target = dproduct * log_probs  # like input
                if epsilon > 0:
                    grad_target = grad_target * (1 - epsilon)  # like input
            if needs_weight:
                dweight = dterms * (log_probs * q)  # like input
                other_dims = [d for d in range(log_probs.dim()) if d != class_dim]
                grad_weight = dweight.sum(other_dims) if other_dims else dweight  # (C,)
        if grad_log_probs is not None and needs_input:  # double backward
            dlogp = _log_softmax_vjp(grad_log_probs, log_probs, class_dim)  # like input
            grad_input = dlogp if grad_input is None else grad_input + dlogp  # like input
        if grad_input is not None:
            grad_input = grad_input.to(log_probs.dtype)
        return grad_input, grad_target, grad_weight, None, None


def _smoothed_target(target: torch.Tensor, label_smoothing: float, num_classes: int):
    """``q = (1 - ε) t + ε / C`` (``t`` itself without smoothing), as torch forms it."""
    if label_smoothing > 0:
        return target * (1 - label_smoothing) + label_smoothing / num_classes
    return target


def _entries(input: torch.Tensor) -> int:
    """``M = numel / C``: the entries a mean over class probabilities divides by."""
    num_classes = input.shape[1 if input.dim() > 1 else 0]
    return input.numel() // num_classes if num_classes else 0


class MSELossFunction(Function):
    """Mean squared error ``ℓ = reduce((x - y)²)``;  ``dL/dx = k · (x - y) · g``,
    ``dL/dy = -dL/dx``, with ``k = 2 / numel`` for mean and ``2`` for sum or none.

    Inputs: ``input (*)``, ``target`` of a shape that broadcasts with it (each gradient is
    summed back to its own shape, as torch's broadcast does), ``reduction``.
    Output: ``()``, or the broadcast shape for ``none``.
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
        shape = _broadcast_shape(input, target)
        k = 2.0 / max(math.prod(shape), 1) if ctx.reduction == "mean" else 2.0
        if input.dtype in (torch.float16, torch.bfloat16):
            k = float(torch.tensor(k, dtype=input.dtype))  # torch's kernel rounds k too
        grad = k * (input - target) * grad_output  # (*)  torch's evaluation order
        grad_input = _sum_to(grad, input) if needs_input else None  # like input
        grad_target = _sum_to(-grad, target) if needs_target else None  # like target
        return grad_input, grad_target, None


class WeightedMSELossFunction(Function):
    """Weighted squared error ``ℓ = reduce(w · (x - y)²)``, where the mean divides by
    ``Σ w`` (torch 2.14's ``mse_loss(..., weight=w)``).

    With ``s = g / Σw`` for mean, ``g`` (or ``g_i``) otherwise: ``dL/dx = s · w · 2(x - y)``,
    ``dL/dy = -dL/dx``, ``dL/dw = s · (x - y)² - [mean] g · ℓ / Σw``. Inputs: ``input (*)``,
    ``target`` that broadcasts with it, ``weight`` of the input's shape, ``reduction``.
    Output: ``()``, or the broadcast shape for ``none``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, reduction):
        # torch's composition, op for op: a bit-identical forward.
        weighted = torch.pow(input - target, 2) * weight  # (*)
        if reduction == "none":
            return weighted
        total = torch.sum(weighted)  # ()
        return total / torch.sum(weight) if reduction == "mean" else total

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        mean_weight_grad = reduction == "mean" and ctx.needs_input_grad[2]
        ctx.save_for_backward(input, target, weight, output if mean_weight_grad else None)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx, grad_output):
        input, target, weight, loss = ctx.saved_tensors
        needs_input, needs_target, needs_weight, _ = ctx.needs_input_grad
        grad_input = grad_target = grad_weight = None
        s = grad_output / torch.sum(weight) if ctx.reduction == "mean" else grad_output  # ()/(*)
        diff = input - target  # (*)
        if needs_input or needs_target:
            grad = s * weight * (2 * diff)  # (*)  torch's order: (s · w) · 2(x - y)
            grad_input = _sum_to(grad, input) if needs_input else None  # like input
            grad_target = _sum_to(-grad, target) if needs_target else None  # like target
        if needs_weight:
            grad_weight = _sum_to(s * torch.pow(diff, 2), weight)  # like weight
            if ctx.reduction == "mean":  # Σw in the denominator
                grad_weight = grad_weight + -grad_output * (loss / torch.sum(weight))
        return grad_input, grad_target, grad_weight, None


def _broadcast_shape(a: torch.Tensor, b: torch.Tensor) -> torch.Size:
    return a.shape if a.shape == b.shape else torch.broadcast_shapes(a.shape, b.shape)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` of the broadcast shape summed back to the shape of ``like``, the operand that
    was broadcast (a no-op when their shapes agree)."""
    return grad if grad.shape == like.shape else grad.sum_to_size(like.shape)


# --- beyond the MLP: convolution, pooling, normalization, dropout, softmax --------------------
# Shapes: ``N`` batch, ``C`` channels, ``H × W`` an input plane, ``Ho × Wo`` an output plane,
# ``kH × kW`` a kernel, ``G`` groups; ``D`` the normalized features of a layer norm.


class Conv2dFunction(Function):
    """2-D cross-correlation ``y[n, o] = Σ_c x[n, c] ⋆ W[o, c] + b[o]`` (torch's ``conv2d``).

    With ``g = dL/dy``: ``dx`` is the transposed convolution of ``g`` with ``W`` (each output
    sends its gradient back to the inputs of its window, weighted as in the forward); ``dW``
    is the convolution of ``x`` with ``g`` as the kernel (batch and channels swapped, stride
    and dilation trading places); ``db = Σ_{n,h,w} g``. Inputs: ``input (N, C_in, H, W)``,
    ``weight (C_out, C_in/G, kH, kW)``, ``bias (C_out,)`` or ``None``, ``stride``, ``padding``
    (an int pair or ``"same"``), ``dilation`` (int pairs), ``groups``. Output
    ``(N, C_out, Ho, Wo)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)  # torch's kernel

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _, stride, padding, dilation, groups = inputs
        needs_input, needs_weight = ctx.needs_input_grad[:2]
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        ctx.input_shape = input.shape
        ctx.kernel = tuple(weight.shape[2:])
        ctx.stride, ctx.dilation, ctx.groups = _pair(stride), _pair(dilation), groups
        ctx.pads = _conv2d_pads(padding, ctx.kernel, ctx.dilation)
        remember_autocast_state(ctx, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        with replay_autocast_state(ctx):
            if ctx.needs_input_grad[0]:
                grad_input = _conv2d_input_grad(grad_output, weight, ctx)  # (N, C_in, H, W)
            if ctx.needs_input_grad[1]:
                grad_weight = _conv2d_weight_grad(input, grad_output, ctx)  # (C_out, C_in/G, ..)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum((0, 2, 3))  # (C_out,)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _pair(value: int | Sequence[int] | None, default: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """An int or a 1- or 2-element sequence as ``(height, width)``, as torch's kernels read
    their size arguments; ``None`` or ``()`` is ``default``."""
    if value is None or (isinstance(value, Sequence) and len(value) == 0):
        return default
    if isinstance(value, Sequence):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _conv2d_pads(
    padding: int | Sequence[int] | str, kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zeros around the input plane; ``"same"`` pads
    ``d·(k - 1)`` per dimension, the odd one at the bottom/right, as torch does."""
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        return total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    height, width = (0, 0) if padding == "valid" else _pair(padding)
    return height, height, width, width


def _conv2d_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, ctx) -> torch.Tensor:
    """``dx (N, C_in, H, W)`` from ``g (N, C_out, Ho, Wo)`` and ``W (C_out, C_in/G, kH, kW)``:
    every ``g[n, o, p, q] · W[o, c, a, b]`` lands on ``dx[n, c, p·s + a·d - pad, ...]``, the
    transposed convolution. ``output_padding`` gives back the rows and columns the last window
    never reached; with the odd "same" padding the extra one is cut off instead."""
    height, width = ctx.input_shape[-2:]
    top, bottom, left, right = ctx.pads
    (kh, kw), (sh, sw), (dh, dw) = ctx.kernel, ctx.stride, ctx.dilation
    out_h, out_w = grad_output.shape[-2:]
    # (H + pads - d(k-1) - 1) - (Ho-1)s: the rows after the last window, then the padding skew
    extra_h = height + top + bottom - dh * (kh - 1) - 1 - (out_h - 1) * sh + top - bottom
    extra_w = width + left + right - dw * (kw - 1) - 1 - (out_w - 1) * sw + left - right
    output_padding = (max(extra_h, 0), max(extra_w, 0))
    grad_input = F.conv_transpose2d(
        grad_output, weight, None, ctx.stride, (top, left), output_padding, ctx.groups, ctx.dilation
    )  # (N, C_in, >= H, >= W)
    if extra_h < 0 or extra_w < 0:  # narrow, not [...]: a no-op slice is an alias vmap lacks
        grad_input = grad_input.narrow(-2, 0, height).narrow(-1, 0, width)  # (N, C_in, H, W)
    return grad_input


def _conv2d_weight_grad(input: torch.Tensor, grad_output: torch.Tensor, ctx) -> torch.Tensor:
    """``dW (C_out, C_in/G, kH, kW)``: ``dW[o, c, i, j] = Σ_{n,p,q} g[n, o, p, q] ·
    x_pad[n, c, p·s + i·d, q·s + j·d]``, a convolution of the input (batch as channels, one
    group per conv group) with ``g`` as the kernel, stride ``d`` and dilation ``s``."""
    n, c_in, height, width = input.shape
    c_out, out_h, out_w = grad_output.shape[1:]
    groups = ctx.groups
    top, bottom, left, right = ctx.pads
    x = input.reshape(n, groups, c_in // groups, height, width)  # (N, G, C_in/G, H, W)
    x = x.permute(2, 1, 0, 3, 4).reshape(c_in // groups, groups * n, height, width)
    g = grad_output.reshape(n, groups, c_out // groups, out_h, out_w)  # (N, G, C_out/G, Ho, Wo)
    g = g.permute(1, 2, 0, 3, 4).reshape(c_out, n, out_h, out_w)  # (C_out, N, Ho, Wo)
    padding: tuple[int, int] = (top, left)
    if top != bottom or left != right:  # "same" with an even kernel: pad the odd row/column
        x = F.pad(x, (left, right, top, bottom))  # (C_in/G, G·N, H + pads, W + pads)
        padding = (0, 0)
    grad_weight = F.conv2d(x, g, None, ctx.dilation, padding, ctx.stride, groups)
    kh, kw = ctx.kernel  # the windows may reach a row or column past the kernel: cut it
    grad_weight = grad_weight.narrow(2, 0, kh).narrow(3, 0, kw)  # (C_in/G, C_out, kH, kW)
    return grad_weight.transpose(0, 1)  # (C_out, C_in/G, kH, kW)


class MaxPool2dFunction(Function):
    """``y[n, c, p, q] = max`` of the window ``(p, q)`` of ``x[n, c]`` (torch's ``max_pool2d``).

    ``dL/dx`` routes each ``g[n, c, p, q]`` to the position of its window's maximum, summing
    where windows overlap: ``dx = scatter_add(0, argmax, g)`` per plane. Saves only the argmax
    positions. Inputs: ``input (N, C, H, W)`` or ``(C, H, W)``, then ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``ceil_mode`` as torch takes them. Outputs: ``y``
    and the argmax positions ``(N, C, Ho, Wo)`` int64, flat in the ``H × W`` plane.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return F.max_pool2d(
            input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True
        )  # torch's kernel: (*, C, Ho, Wo) values and flat positions

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices = output
        ctx.save_for_backward(indices)
        ctx.input_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad_output, grad_indices):
        (indices,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        *planes, height, width = ctx.input_shape
        g = opmath(grad_output).reshape(*planes, -1)  # (*, C, Ho·Wo)
        positions = indices.reshape(*planes, -1)  # (*, C, Ho·Wo)
        zeros = g.new_zeros((*planes, height * width))  # (*, C, H·W)
        grad_input = zeros.scatter_add(-1, positions, g)  # (*, C, H·W)
        grad_input = grad_input.view(ctx.input_shape).to(grad_output.dtype)  # (*, C, H, W)
        return grad_input, None, None, None, None, None


class AvgPool2dFunction(Function):
    """``y[n, c, p, q] = Σ_window x[n, c] / D[p, q]`` (torch's ``avg_pool2d``).

    ``D`` is the window's divisor: its size within the padded input
    (``count_include_pad=True``), its count of real inputs (``False``), or
    ``divisor_override``. ``dL/dx`` spreads ``g / D`` evenly back over each window: a
    transposed convolution of ``g / D`` with a kernel of ones, one plane at a time.
    Inputs: ``input (N, C, H, W)`` or ``(C, H, W)``, then ``kernel_size``, ``stride``,
    ``padding``, ``ceil_mode``, ``count_include_pad``, ``divisor_override`` as torch takes
    them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor):
        return F.avg_pool2d(
            input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor
        )  # torch's kernel: (*, C, Ho, Wo)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel, stride, padding, _, ctx.count_include_pad, ctx.divisor = inputs
        ctx.kernel = _pair(kernel)
        ctx.stride, ctx.padding = _pair(stride, default=ctx.kernel), _pair(padding)
        ctx.input_shape = input.shape

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        g = opmath(grad_output)  # (*, C, Ho, Wo)
        share = g / _avg_pool2d_divisors(ctx, g)  # (*, C, Ho, Wo): each input's share
        planes = share.reshape(-1, 1, *share.shape[-2:])  # (N·C, 1, Ho, Wo)
        ones = share.new_ones(1, 1, *ctx.kernel)  # (1, 1, kH, kW)
        with _autocast_off(share):  # a sum of shares: no lower-precision matmul here
            spread = F.conv_transpose2d(planes, ones, None, ctx.stride)  # (N·C, 1, H', W')
        # spread covers the padded plane from its top-left corner; keep the real input
        grad_input = _crop_or_pad(spread, ctx.padding, ctx.input_shape[-2:])  # (N·C, 1, H, W)
        grad_input = grad_input.reshape(ctx.input_shape).to(grad_output.dtype)  # (*, C, H, W)
        return grad_input, None, None, None, None, None, None


def _avg_pool2d_divisors(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """``D (Ho, Wo)`` in ``grad_output``'s dtype: each window's divisor, as torch's kernel
    counts it (per dimension: window end clipped to the padded input, then to the input
    unless padding counts)."""
    out_h, out_w = grad_output.shape[-2:]
    if ctx.divisor is not None:
        return grad_output.new_full((out_h, out_w), ctx.divisor)
    counts = []
    for size, out, k, s, p in zip(
        ctx.input_shape[-2:], (out_h, out_w), ctx.kernel, ctx.stride, ctx.padding, strict=True
    ):
        start = torch.arange(out, device=grad_output.device) * s - p  # (out,)
        end = (start + k).clamp(max=size + p)  # (out,)
        if not ctx.count_include_pad:
            start, end = start.clamp(min=0), end.clamp(max=size)
        counts.append((end - start).clamp(min=1))  # a window wholly in padding receives nothing
    return (counts[0][:, None] * counts[1][None, :]).to(grad_output.dtype)  # (Ho, Wo)


def _crop_or_pad(plane: torch.Tensor, start: tuple[int, int], size: Sequence[int]) -> torch.Tensor:
    """``plane[..., start : start + size]`` in the last two dimensions ``(*, H', W')`` →
    ``(*, *size)``, zeros past its end."""
    (top, left), (height, width) = start, size
    kept_h, kept_w = min(height, plane.shape[-2] - top), min(width, plane.shape[-1] - left)
    cropped = plane.narrow(-2, top, kept_h).narrow(-1, left, kept_w)  # narrow: see conv2d
    missing_h, missing_w = height - kept_h, width - kept_w
    if missing_h or missing_w:
        cropped = F.pad(cropped, (0, missing_w, 0, missing_h))
    return cropped


def _autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """A region where autocast leaves ``tensor``'s device alone (nothing to do when it is off)."""
    device_type = tensor.device.type
    if not autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class BatchNormFunction(Function):
    """Batch normalization over every dimension but the channels ``C`` (torch's ``batch_norm``).

    Training: ``x̂ = (x - μ) σ⁻¹`` with the batch's mean ``μ`` and ``σ⁻¹ = (var + eps)^-½``
    per channel, ``y = γ x̂ + β``; with ``M`` values per channel, ``dβ = Σ g``,
    ``dγ = Σ g x̂``, ``dx = γ σ⁻¹ (g - dβ/M - x̂ dγ/M)``. Evaluation: the running statistics
    are constants, ``dx = γ σ⁻¹ g``. Inputs: ``input (N, C, *)``, ``weight``/``bias`` ``(C,)``
    or ``None``, ``running_mean``/``running_var`` ``(C,)`` or ``None`` (updated in place by
    the forward when training, as torch's), ``training``, ``momentum``, ``eps``. Outputs:
    ``y (N, C, *)`` and the batch's ``μ`` and ``σ⁻¹ (C,)`` (empty in evaluation), returned
    rather than kept so that double backward through them is exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, training, momentum, eps):
        return torch.native_batch_norm(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )  # torch's kernel: y, μ, σ⁻¹; running statistics updated in place when training

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, training, _, eps = inputs
        _, mean, invstd = output
        # Training normalizes with the batch's μ and σ⁻¹, evaluation with the running ones.
        statistics = (mean, invstd) if training else (running_mean, running_var)
        ctx.save_for_backward(input, weight, *statistics)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
        ctx.set_materialize_grads(False)  # callers drop μ and σ⁻¹: no zeros for them

    @staticmethod
    def backward(ctx, grad_output, grad_mean, grad_invstd):
        input, weight, mean, spread = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_output is None:
            grad_output = torch.zeros_like(input)
        x, g = opmath(input), opmath(grad_output)  # (N, C, *)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels
        per_channel = [1, -1] + [1] * (x.dim() - 2)  # (C,) → (1, C, 1, ...)
        count = max(x.numel() // x.shape[1], 1)  # M values per channel
        # σ⁻¹ (C,): saved by the forward, or from the running variance in evaluation
        invstd = spread if ctx.training else (opmath(spread) + ctx.eps).rsqrt()
        x_mu = x - mean.view(per_channel)  # (N, C, *)
        scale = invstd if weight is None else invstd * weight  # (C,)  γ σ⁻¹
        sum_g = g.sum(dims)  # (C,)  dβ
        dot = (g * x_mu).sum(dims)  # (C,)  Σ g (x - μ) = dγ / σ⁻¹
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            if ctx.training:
                k = (dot * invstd * invstd / count).view(per_channel)  # (1, C, 1..)
                mean_g = (sum_g / count).view(per_channel)  # (1, C, 1..)
                grad_x = (g - mean_g - x_mu * k) * scale.view(per_channel)  # (N, C, *)
                if grad_mean is not None or grad_invstd is not None:  # double backward
                    grad_x = grad_x + _statistics_grad(x_mu, invstd, grad_mean, grad_invstd, dims)
            else:
                grad_x = g * scale.view(per_channel)  # (N, C, *)
            grad_input = grad_x.to(input.dtype)
        if needs_weight:
            grad_weight = (dot * invstd).to(weight.dtype)  # (C,)  Σ g x̂
        if needs_bias:
            grad_bias = sum_g.to(ctx.bias_dtype)  # (C,)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _statistics_grad(
    x_mu: torch.Tensor,
    invstd: torch.Tensor,
    grad_mean: torch.Tensor | None,
    grad_invstd: torch.Tensor | None,
    dims: list[int],
) -> torch.Tensor:
    """``dx (*)`` from the gradients of the returned statistics ``μ = Σx/M`` and
    ``σ⁻¹ = (Σ(x - μ)²/M + eps)^-½`` over ``dims`` (``M`` values each):
    ``dμ/dx = 1/M``, ``dσ⁻¹/dx = -σ⁻³ (x - μ)/M``. ``x_mu = x - μ`` is ``(*)``; the
    statistics and their gradients have the other dimensions' sizes."""
    count = max(math.prod([x_mu.shape[d] for d in dims]), 1)  # a list: dynamo traces no genexpr
    shape = [1 if d in dims else size for d, size in enumerate(x_mu.shape)]
    grad = torch.zeros_like(x_mu)  # (*)
    if grad_mean is not None:
        grad = grad + opmath(grad_mean).reshape(shape) / count  # (*)
    if grad_invstd is not None:
        cube = opmath(invstd).reshape(shape).pow(3)  # σ⁻³
        grad = grad - opmath(grad_invstd).reshape(shape) * cube * x_mu / count  # (*)
    return grad


class LayerNormFunction(Function):
    """Layer normalization over the last dimensions ``D = normalized_shape`` (torch's
    ``layer_norm``): ``x̂ = (x - μ) σ⁻¹`` per row, ``y = γ x̂ + β``.

    With ``dx̂ = g γ`` and means over ``D``: ``dx = σ⁻¹ (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂))``,
    ``dγ = Σ_rows g x̂``, ``dβ = Σ_rows g``. Inputs: ``input (*, *D)``, ``normalized_shape``,
    ``weight``/``bias`` ``(*D)`` or ``None``, ``eps``. Outputs: ``y (*, *D)`` and the rows'
    ``μ`` and ``σ⁻¹ (*, 1, ..)``, returned so that double backward through them is exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, normalized_shape, weight, bias, eps):
        return torch.native_layer_norm(input, normalized_shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, normalized_shape, weight, bias, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.normalized_dims = len(normalized_shape)
        ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_mean, grad_rstd):
        input, weight, mean, rstd = ctx.saved_tensors
        needs_input, _, needs_weight, needs_bias, _ = ctx.needs_input_grad
        if grad_output is None:
            grad_output = torch.zeros_like(input)
        x, g = opmath(input), opmath(grad_output)  # (*, *D)
        features = list(range(x.dim() - ctx.normalized_dims, x.dim()))  # the D dimensions
        rows = list(range(x.dim() - ctx.normalized_dims))  # the * dimensions
        x_mu = x - mean  # (*, *D)
        x_hat = x_mu * rstd  # (*, *D)
        grad_input = grad_weight = grad_bias = None
        if needs_input:
            dx_hat = g if weight is None else g * weight  # (*, *D)
            mean_dx_hat = dx_hat.mean(features, keepdim=True)  # (*, 1..)
            mean_dx_hat_x_hat = (dx_hat * x_hat).mean(features, keepdim=True)  # (*, 1..)
            grad_x = (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat) * rstd  # (*, *D)
            if grad_mean is not None or grad_rstd is not None:  # double backward
                grad_x = grad_x + _statistics_grad(x_mu, rstd, grad_mean, grad_rstd, features)
            grad_input = grad_x.to(input.dtype)
        if needs_weight:
            grad_weight = _sum_rows(g * x_hat, rows).to(weight.dtype)  # (*D)
        if needs_bias:
            grad_bias = _sum_rows(g, rows).to(ctx.bias_dtype)  # (*D)
        return grad_input, None, grad_weight, grad_bias, None


def _sum_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``tensor (*, *D)`` summed over its row dimensions ``*`` → ``(*D)``; with no row
    dimensions, ``tensor`` itself (``sum(dim=[])`` would sum everything)."""
    return tensor.sum(rows) if rows else tensor


class DropoutFunction(Function):
    """Dropout ``y = x · m / (1 - p)``, ``m ~ Bernoulli(1 - p)`` drawn as torch's own
    ``dropout`` draws it, so that the same random state drops the same units.

    ``dL/dx = g · m / (1 - p)``, from the saved mask alone (one byte per element, where torch
    keeps the scaled mask in the input's dtype). Inputs: ``input (*)``, ``p`` in ``(0, 1]``,
    ``inplace`` (the output overwrites ``input``, marked dirty, as ``torch.dropout_``).
    Outputs: ``y (*)`` and the mask ``m (*)`` bool.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, p, inplace):
        if p == 1:  # torch multiplies by zero (NaN stays NaN) and draws nothing
            zero = input.new_zeros(())
            mask = torch.zeros_like(input, dtype=torch.bool)  # (*)
            return (input.mul_(zero) if inplace else input * zero), mask
        if inplace or input.device.type == "cpu":  # torch's unfused dropout
            noise = torch.empty_like(input).bernoulli_(1 - p)  # (*) 1 keeps, 0 drops
            mask = noise.bool()  # (*)
            noise.div_(1 - p)  # (*) 0 or 1/(1 - p)
            return (input.mul_(noise) if inplace else input * noise), mask  # (*), (*)
        return torch.native_dropout(input, p, True)  # torch's fused kernel (CUDA): y, mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, p, inplace = inputs
        _, mask = output
        if inplace:
            ctx.mark_dirty(input)
        ctx.save_for_backward(mask)
        ctx.p = p
        ctx.fused = not inplace and input.device.type != "cpu"

    @staticmethod
    def backward(ctx, grad_output, grad_mask):
        (mask,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if ctx.p == 1:
            return grad_output * grad_output.new_zeros(()), None, None  # (*)
        # 1/(1 - p): in float for the fused kernel's backward; else rounded in the input's
        # dtype, as torch rounded it into the mask it multiplied by
        scale = 1 / (1 - ctx.p) if ctx.fused else grad_output.new_ones(()).div_(1 - ctx.p)
        return grad_output * mask * scale, None, None  # (*)


class LogSoftmaxFunction(Function):
    """``y = x - log Σ_dim e^x`` (torch's stable ``log_softmax``);
    ``dL/dx = g - e^y · Σ_dim g``, from the saved output alone. Input and output ``(*)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, dim):
        return torch.log_softmax(input, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad_input = _log_softmax_vjp(grad_output, y, ctx.dim)  # (*)  g - softmax · Σ g
        return grad_input.to(grad_output.dtype), None


class SoftmaxFunction(Function):
    """``y = e^x / Σ_dim e^x`` (torch's ``softmax``);  ``dL/dx = y · (g - Σ_dim g y)``, from the
    saved output alone. Input and output ``(*)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, dim):
        return torch.softmax(input, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        g, y32 = opmath(grad_output), opmath(y)  # (*), (*)
        grad_input = y32 * (g - (g * y32).sum(ctx.dim, keepdim=True))  # (*)
        return grad_input.to(grad_output.dtype), None


# --- the aliases: torch.nn.functional's signatures, checked inputs ---------------------------


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``input (*, in) @ weight (out, in)ᵀ + bias (out,)`` → ``(*, out)``, handwritten backward."""
    check_linear_args(input, weight, bias)
    return apply(LinearFunction, input, weight, bias)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """Logistic sigmoid of ``input (*)`` → ``(*)``, handwritten backward."""
    check_real_tensor(input, "input", "sigmoid")
    return apply(SigmoidFunction, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """Hyperbolic tangent of ``input (*)`` → ``(*)``, handwritten backward."""
    check_real_tensor(input, "input", "tanh")
    return apply(TanhFunction, input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(input, 0)`` of ``input (*)`` → ``(*)``, handwritten backward.

    ``inplace=True`` overwrites ``input`` and returns it, as ``torch.relu_`` does (torch's
    errors included: a leaf that requires grad is refused, and a backward through an earlier
    op that saved ``input`` fails on its version counter).
    """
    check_real_tensor(input, "input", "relu")
    if inplace and is_tracing():
        # torch.compile and torch.func cannot trace a Function that marks its input dirty:
        # there the same Function runs out of place and is copied back into input.
        return input.copy_(apply(ReLUFunction, input, False))
    return apply(ReLUFunction, input, bool(inplace))


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits against class indices or class probabilities, with
    ``torch.nn.functional.cross_entropy``'s arguments and handwritten backward passes.

    ``input``: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits. ``target``: int64 class
    indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of the input's
    shape. ``weight (C,)``: class weights (a weighted mean divides by the targets' weights).
    ``size_average``/``reduce``: deprecated, mapped to ``reduction`` as torch maps them.
    ``label_smoothing`` in [0, 1]. Returns ``()``, or the input's shape without the class
    dimension for ``reduction="none"``. Under ``torch.autocast`` the loss is computed in
    float32, as torch's own ``cross_entropy`` is.
    """
    byte_classes = isinstance(target, torch.Tensor) and target.dtype == torch.uint8
    if byte_classes and isinstance(input, torch.Tensor) and input.dim() <= 2:
        target = target.long()  # torch accepts Byte class indices for (C,) and (N, C) input
    reduction, probabilities, may_ignore = check_cross_entropy_args(
        input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    )
    if probabilities:
        if weight is None:
            input, target = upcast_like_autocast_fp32_ops(input, target)
        else:
            input, target, weight = upcast_like_autocast_fp32_ops(input, target, weight)
        args = (input, target, weight, reduction, label_smoothing)
        loss, _ = apply(SoftCrossEntropyFunction, *args)
        return loss
    if weight is None:
        (input,) = upcast_like_autocast_fp32_ops(input)
    else:
        input, weight = upcast_like_autocast_fp32_ops(input, weight)
    # None tells the Function that no target is ignored, so it can skip the masks.
    skip = ignore_index if may_ignore else None
    loss, _ = apply(CrossEntropyFunction, input, target, weight, reduction, skip, label_smoothing)
    return loss


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between ``input (*)`` and ``target``, with
    ``torch.nn.functional.mse_loss``'s arguments (torch 2.14) and a handwritten backward.

    A ``target`` of another shape is broadcast, with torch's warning. ``weight`` (the input's
    shape) weighs each squared error; its mean divides by ``Σ weight``. ``size_average``/
    ``reduce``: deprecated, mapped to ``reduction`` as torch maps them. Returns ``()``, or the
    broadcast shape for ``none``. Mixed dtypes are promoted as in torch; under
    ``torch.autocast`` the unweighted loss is computed in float32, as torch's is.
    """
    reduction = check_mse_args(input, target, size_average, reduce, reduction, weight)
    if weight is None:
        upcast = upcast_like_autocast_fp32_ops(input, target)
        if upcast[0] is not input and input.shape != target.shape:
            # torch broadcasts before autocast's float32 cast, so the gradient of a broadcast
            # operand is summed in its own dtype: broadcast first, as torch does
            upcast = upcast_like_autocast_fp32_ops(*torch.broadcast_tensors(input, target))
        input, target = upcast
    if input.dtype != target.dtype:
        common = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(common), target.to(common)
    if weight is not None:
        return apply(WeightedMSELossFunction, input, target, weight, reduction)
    return apply(MSELossFunction, input, target, reduction)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution of ``input (N, C_in, H, W)`` (or unbatched ``(C_in, H, W)``) with
    ``weight (C_out, C_in/groups, kH, kW)`` and ``bias (C_out,)`` → ``(N, C_out, Ho, Wo)``,
    handwritten backward. ``padding``: an int, a pair, ``"valid"`` or ``"same"``."""
    check_conv2d_args(input, weight, bias)
    if input.dim() == 3:  # unbatched, as torch takes it: a batch of one
        output = conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups)
        return output.squeeze(0)
    return apply(Conv2dFunction, input, weight, bias, stride, padding, dilation, groups)


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Maximum over each window of ``input (N, C, H, W)`` or ``(C, H, W)`` → ``(*, C, Ho, Wo)``
    (and the argmax positions, flat in each plane, with ``return_indices``), handwritten
    backward. ``stride`` defaults to ``kernel_size``."""
    check_real_tensor(input, "input", "max_pool2d")
    output, indices = apply(
        MaxPool2dFunction, input, kernel_size, stride, padding, dilation, ceil_mode
    )
    return (output, indices) if return_indices else output


def avg_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    """Mean over each window of ``input (N, C, H, W)`` or ``(C, H, W)`` → ``(*, C, Ho, Wo)``,
    handwritten backward. ``stride`` defaults to ``kernel_size``."""
    check_real_tensor(input, "input", "avg_pool2d")
    return apply(
        AvgPool2dFunction,
        input,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        divisor_override,
    )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalization of ``input (N, C, *)`` per channel → ``(N, C, *)``, handwritten
    backward. Training normalizes with the batch's statistics and updates ``running_mean``
    and ``running_var (C,)`` in place (``momentum``), as torch does; evaluation uses them."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, eps)
    if input.numel() == 0:  # torch's answer for an empty batch: a copy, first channel's γ, β
        output = input.clone()
        output = output if weight is None else output * weight[0]
        return output if bias is None else output + bias[0]
    output, _, _ = apply(
        BatchNormFunction, input, weight, bias, running_mean, running_var, training, momentum, eps
    )
    return output


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalization of ``input (*, *normalized_shape)`` over its last
    ``len(normalized_shape)`` dimensions → same shape, handwritten backward; ``weight`` and
    ``bias`` have shape ``normalized_shape``."""
    check_real_tensor(input, "input", "layer_norm")
    output, _, _ = apply(LayerNormFunction, input, normalized_shape, weight, bias, eps)
    return output


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Zero each entry of ``input (*)`` with probability ``p`` and scale the others by
    ``1/(1 - p)`` → ``(*)``, handwritten backward. The mask is drawn exactly as torch's
    ``dropout`` draws it: the same random state drops the same units. Without ``training``
    (or with ``p = 0``) the input itself is returned, as torch returns it; ``inplace=True``
    overwrites ``input`` and returns it, as ``torch.dropout_`` does.
    """
    check_dropout_args(input, p)
    if not training or p == 0 or input.numel() == 0:
        return input
    if inplace and is_tracing():
        # torch.compile and torch.func cannot trace a Function that marks its input dirty:
        # there the same Function runs out of place and is copied back into input.
        return input.copy_(apply(DropoutFunction, input, p, False)[0])
    output, _ = apply(DropoutFunction, input, p, bool(inplace))
    return output


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``input - logsumexp(input, dim)`` of ``input (*)`` → ``(*)``, handwritten backward;
    ``dtype`` casts the input first, as torch does."""
    check_real_tensor(input, "input", "log_softmax")
    if dim is None:
        dim = _implicit_softmax_dim("log_softmax", input.dim(), _stacklevel)
    input = input if dtype is None else input.to(dtype)
    return apply(LogSoftmaxFunction, input, dim)


def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``exp(input) / Σ_dim exp(input)`` of ``input (*)`` → ``(*)``, handwritten backward;
    ``dtype`` casts the input first, as torch does."""
    check_real_tensor(input, "input", "softmax")
    if dim is None:
        dim = _implicit_softmax_dim("softmax", input.dim(), _stacklevel)
    input = input if dtype is None else input.to(dtype)
    return apply(SoftmaxFunction, input, dim)


def _implicit_softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's legacy choice when ``dim`` is not given (deprecated, with torch's warning)."""
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


__all__ = [
    "AvgPool2dFunction",
    "BatchNormFunction",
    "Conv2dFunction",
    "CrossEntropyFunction",
    "DropoutFunction",
    "LayerNormFunction",
    "LinearFunction",
    "LogSoftmaxFunction",
    "MSELossFunction",
    "MaxPool2dFunction",
    "ReLUFunction",
    "SigmoidFunction",
    "SoftCrossEntropyFunction",
    "SoftmaxFunction",
    "TanhFunction",
    "WeightedMSELossFunction",
    "avg_pool2d",
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "dropout",
    "layer_norm",
    "linear",
    "log_softmax",
    "max_pool2d",
    "mse_loss",
    "relu",
    "sigmoid",
    "softmax",
    "tanh",
]

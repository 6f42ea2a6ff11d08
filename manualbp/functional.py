"""Handwritten backward passes as ``torch.autograd.Function`` subclasses.

Every Function follows PyTorch's "Extending torch.autograd" note: ``forward`` +
``setup_context``, tensors saved with ``ctx.save_for_backward`` only, ``ctx.needs_input_grad``
checked before each gradient, exactly one gradient (or ``None``) per forward input. Backward
formulas are written in differentiable torch ops, so double backward works, and
``generate_vmap_rule = True`` makes ``torch.func.vmap``/``grad`` and batched gradcheck work.

The lowercase aliases (``linear``, ``sigmoid``, ...) have the signatures of their
``torch.nn.functional`` namesakes, validate their inputs with clear errors, and follow
``torch.autocast``'s dtype rules. Derivations: ``docs/derivations.md``.

Shape legend used in comments: ``N`` batch rows, ``C`` classes, ``in``/``out`` features,
``*`` any leading batch dimensions.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.autograd import Function

from manualbp._autocast import (
    remember_autocast_state,
    replay_autocast_state,
    upcast_like_autocast_fp32_ops,
)
from manualbp._validation import (
    check_cross_entropy_args,
    check_linear_args,
    check_mse_args,
    check_tensor,
)

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


class _HandwrittenFunction(Function):
    """Base of the Functions here: a fast eager twin of each, and a cached signature.

    The ``forward`` + ``setup_context`` style is what ``torch.func`` transforms need, but
    its ``apply`` costs about 50 µs more per call on the CPU than the classic
    ``forward(ctx, ...)`` style (measured with torch 2.14: 72-94 µs against 30 µs for a
    64x200 linear layer whose kernel takes 22 µs) — more than the kernels of a small layer.
    So every subclass also gets ``cls.eager``: a classic-style Function built from the very
    same ``forward``, ``setup_context`` and ``backward`` (no formula is written twice). The
    lowercase aliases call ``eager`` unless a ``torch.func`` transform or ``torch.compile``
    is active, where they call the class itself. Both give identical results.

    The class itself still caches ``forward``'s signature: ``apply`` binds its arguments
    with ``inspect.signature(forward)`` on every call, and a precomputed ``__signature__``
    takes about 15 µs off that.
    """

    eager: type[Function]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:  # an intermediate base such as _OutputSavingFunction
            return
        forward = cls.__dict__["forward"]
        function = forward.__func__ if isinstance(forward, staticmethod) else forward
        function.__signature__ = inspect.signature(function)
        cls.eager = _classic_style_twin(cls)


def _classic_style_twin(cls: type[Function]) -> type[Function]:
    """A ``forward(ctx, *inputs)`` Function running ``cls``'s forward and setup_context."""

    def forward(ctx, *inputs):
        output = cls.forward(*inputs)
        cls.setup_context(ctx, inputs, output)
        return output

    def backward(ctx, *grad_outputs):
        return cls.backward(ctx, *grad_outputs)  # looked up per call: patches apply to both

    namespace = {
        "__doc__": f"{cls.__name__} in the classic forward(ctx, ...) style (faster apply).",
        "__module__": cls.__module__,
        "__qualname__": f"{cls.__qualname__}.eager",
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    }
    # Same name, so autograd graphs show the same node: ``LinearFunctionBackward``.
    return type(cls.__name__, (Function,), namespace)


def _apply(function: type[_HandwrittenFunction], *inputs):
    """``function.apply`` under ``torch.compile`` or ``torch.func``, else its eager twin."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*inputs)
    return function.eager.apply(*inputs)


class LinearFunction(_HandwrittenFunction):
    """Affine map ``y = x Wᵀ + b`` over any leading batch dimensions.

    Gradients, with ``g = dL/dy`` flattened to ``(N, out)`` and ``x`` to ``(N, in)``:
    ``dL/dx = g W``, ``dL/dW = gᵀ x``, ``dL/db = Σ_rows g``.

    Inputs: ``input (*, in)``, ``weight (out, in)``, ``bias (out,)`` or ``None``.
    Output: ``(*, out)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias):
        # Same ATen kernel as torch's forward, so the two forwards agree bit for bit and
        # every difference measured downstream comes from the backward.
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, _ = inputs
        needs_input, needs_weight, _ = ctx.needs_input_grad
        # x is only needed for dL/dW and W only for dL/dx: a frozen layer saves nothing extra.
        ctx.save_for_backward(input if needs_weight else None, weight if needs_input else None)
        # Layouts decide which of two equal matmul forms torch's backward picks; we pick the
        # same, so results agree to the bit and gradients come out laid out like their tensor.
        ctx.input_is_column_major = _is_column_major(input)
        ctx.weight_is_row_major = _is_row_major(weight)
        remember_autocast_state(ctx, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        with replay_autocast_state(ctx):
            grad_output_2d = _as_2d(grad_output)  # (N, out)
            if ctx.needs_input_grad[0]:
                if ctx.input_is_column_major:
                    grad_input_2d = weight.t().mm(grad_output_2d.t()).t()  # (N, in)
                else:
                    grad_input_2d = grad_output_2d.mm(weight)  # (N, in)
                grad_input = (
                    grad_input_2d
                    if grad_output.dim() == 2
                    else grad_input_2d.reshape(*grad_output.shape[:-1], weight.shape[1])
                )  # (*, in)
            if ctx.needs_input_grad[1]:
                input_2d = _as_2d(input)  # (N, in)
                if ctx.weight_is_row_major:
                    grad_weight = grad_output_2d.t().mm(input_2d)  # (out, in)
                else:
                    grad_weight = input_2d.t().mm(grad_output_2d).t()  # (out, in)
            if ctx.needs_input_grad[2]:
                grad_bias = grad_output_2d.sum(0)  # (out,)
        return grad_input, grad_weight, grad_bias


def _as_2d(tensor: torch.Tensor) -> torch.Tensor:
    """``(*, k)`` → ``(N, k)``; a 2-D tensor is returned as is (no view op)."""
    return tensor if tensor.dim() == 2 else tensor.reshape(-1, tensor.shape[-1])


def _is_column_major(tensor: torch.Tensor) -> bool:
    """True for a 2-D tensor stored column by column, e.g. the transpose of a contiguous one."""
    return tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.stride(1) == tensor.shape[0]


def _is_row_major(tensor: torch.Tensor) -> bool:
    """True for a 2-D tensor stored row by row (contiguous); then its transpose is column-major."""
    return tensor.stride(1) == 1 and tensor.stride(0) == tensor.shape[1]


def _opmath(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32, others unchanged: torch's kernels compute in this "opmath"
    type and round once at the end. (One exception, torch's CPU sigmoid backward for float16,
    rounds after each multiply; ours rounds once and is the more accurate, within 1 ulp.)"""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


class _OutputSavingFunction(_HandwrittenFunction):
    """Base of the elementwise activations whose derivative is a function of the output
    alone: ``setup_context`` saves ``y`` and nothing else."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)


class SigmoidFunction(_OutputSavingFunction):
    """``y = 1 / (1 + e^{-x})``;  ``dL/dx = g · (1 - y) · y``, from the saved output alone.

    Input and output: any shape ``(*)``.
    """

    @staticmethod
    def forward(input):
        return torch.sigmoid(input)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        g, y = _opmath(grad_output), _opmath(output)  # (*), (*)
        # Evaluated as (g · (1 - y)) · y, the order of torch's own kernel: bit-identical
        # (float16 on CPU aside, see _opmath).
        return (g * (1 - y) * y).to(grad_output.dtype)  # (*)


class TanhFunction(_OutputSavingFunction):
    """``y = tanh(x)``;  ``dL/dx = g · (1 - y²)``, from the saved output alone.

    Input and output: any shape ``(*)``.
    """

    @staticmethod
    def forward(input):
        return torch.tanh(input)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        g, y = _opmath(grad_output), _opmath(output)  # (*), (*)
        # 1 - y² as one fused multiply-add, like torch's tanh_backward kernel: bit-identical.
        one_minus_square = torch.addcmul(torch.ones_like(y), y, y, value=-1)  # (*)
        return (g * one_minus_square).to(grad_output.dtype)  # (*)


class ReLUFunction(_OutputSavingFunction):
    """``y = max(x, 0)``;  ``dL/dx = g · [y > 0]`` (0 at y = 0, as in torch).

    Saves its output, which the next layer saves anyway as its input, so the mask costs no
    memory. Input and output: any shape ``(*)``.
    """

    @staticmethod
    def forward(input):
        return torch.relu(input)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        if grad_output.device.type != "cpu":
            # 0 where y <= 0, else g: torch's own rule, bit for bit (NaN y passes g, a -0
            # gradient stays -0), in two kernels.
            return torch.where(output <= 0, 0.0, grad_output)  # (*)
        # On the CPU a float mask multiplies several times faster than a boolean one selects
        # (measured at 64x200 and 512x200 on 2 threads): sign(y) is [y > 0] as numbers, and
        # 0 + g·mask in one fused op makes masked entries +0 rather than g·0 = -0. Equal to
        # the rule above except that a NaN y gives a NaN gradient.
        mask = torch.sign(output)  # (*) 1 where y > 0, 0 where y == 0
        return torch.addcmul(grad_output.new_zeros(()), grad_output, mask)  # (*)


class CrossEntropyFunction(_HandwrittenFunction):
    """Softmax cross-entropy with a handwritten, fused backward.

    Forward: ``ℓ_i = -log softmax(x)_{i,t_i}``, reduced by ``mean`` over non-ignored rows,
    ``sum`` or ``none``, computed by torch's ``log_softmax`` and ``nll_loss`` kernels (stable
    log-sum-exp; two kernels, where spelling it out took a dozen). Backward, fused:
    ``dL/dx = (softmax(x) - onehot(t)) · s_i`` with ``s_i`` the row's share of ``dL/dℓ``
    (``g / #valid`` for mean) and ``0`` for ignored rows.

    Inputs: ``input (N, C)`` logits, ``target (N,)`` int64 classes, ``reduction``,
    ``ignore_index`` (``None`` when the caller knows no target is ignored: no masks).
    Outputs: the loss (``()`` or ``(N,)`` for ``none``) and the
    log-probabilities ``(N, C)``. The second output is what backward needs; returning it
    (rather than keeping a private copy) keeps it on the autograd graph, so double backward
    through the saved tensor is exact. Use :func:`cross_entropy` for the loss alone.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, reduction, ignore_index):
        # torch's own log_softmax and nll_loss kernels: one pass each, the forward bit-identical
        # to F.cross_entropy (so every difference measured downstream comes from the backward),
        # and nll_loss rejects out-of-range targets (IndexError on CPU, a device assert on CUDA).
        log_probs = torch.log_softmax(input, dim=1)  # (N, C)
        skip = -100 if ignore_index is None else ignore_index  # None: no target equals it
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
        softmax = _opmath(log_probs).exp()  # (N, C)
        grad_input = None
        if grad_loss is not None:
            grad_input = _cross_entropy_grad(
                softmax, target, _opmath(grad_loss), ctx.reduction, ctx.ignore_index
            )
        if grad_log_probs is not None:
            # Reached by double backward (or by a caller using log_probs): the log-softmax
            # Jacobian, dlogp/dx · v = v - softmax · Σ_c v_c.
            v = _opmath(grad_log_probs)  # (N, C)
            grad_via_log_probs = v - softmax * v.sum(dim=1, keepdim=True)  # (N, C)
            grad_input = (
                grad_via_log_probs if grad_input is None else grad_input + grad_via_log_probs
            )
        if grad_input is not None:
            grad_input = grad_input.to(log_probs.dtype)
        return grad_input, None, None, None


def _cross_entropy_grad(
    softmax: torch.Tensor,
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    reduction: str,
    ignore_index: int | None,
) -> torch.Tensor:
    """``(softmax - onehot(target)) · s`` for ``softmax (N, C)``, ``target (N,)``, ``grad_loss``
    ``()`` (``(N,)`` for ``none``); ``s`` is each row's share of ``grad_loss``, 0 if ignored.

    Formed as ``softmax·s - s`` at the target column: the rounding of torch's own
    log_softmax + nll_loss backward, so the two agree bit for bit given the same softmax.
    """
    rows = target.shape[0]
    if ignore_index is None:
        if reduction == "none":
            row_scale = grad_loss.unsqueeze(1)  # (N, 1)
        else:
            share = grad_loss / rows if reduction == "mean" else grad_loss  # ()
            row_scale = share.expand(rows, 1)  # (N, 1)
        index = target.unsqueeze(1)  # (N, 1)
    else:
        valid = target != ignore_index  # (N,)
        if reduction == "none":
            share = grad_loss  # (N,)
        else:
            share = grad_loss / valid.sum() if reduction == "mean" else grad_loss  # ()
        row_scale = torch.where(valid, share, 0).unsqueeze(1)  # (N, 1)
        index = torch.where(valid, target, 0).unsqueeze(1)  # (N, 1)
    grad_input = softmax * row_scale  # (N, C)
    # In place on a fresh tensor: mul saved its inputs, not this output, so this is safe
    # under double backward too, and it spares a copy of (N, C).
    return grad_input.scatter_add_(1, index, row_scale.neg())  # (N, C)


class MSELossFunction(_HandwrittenFunction):
    """Mean squared error ``ℓ = reduce((x - y)²)``.

    Gradients: ``dL/dx = k · (x - y) · g`` with ``k = 2 / numel`` for mean and ``2`` for
    sum or none; ``dL/dy = -dL/dx``.

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
        if reduction == "sum":
            return squared.sum()
        return squared.mean()

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
        norm = 2.0 / input.numel() if ctx.reduction == "mean" else 2.0
        if input.dtype in (torch.float16, torch.bfloat16):
            norm = float(torch.tensor(norm, dtype=input.dtype))  # torch's kernel rounds k too
        # (k · (x - y)) · g, the evaluation order of torch's mse_backward kernel.
        grad_input = norm * (input - target) * grad_output  # (*)
        grad_target = -grad_input if needs_target else None  # (*)
        return (grad_input if needs_input else None), grad_target, None


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``input (*, in) @ weight (out, in)ᵀ + bias (out,)`` → ``(*, out)``, handwritten backward."""
    check_linear_args(input, weight, bias)
    return _apply(LinearFunction, input, weight, bias)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """Logistic sigmoid of ``input (*)`` → ``(*)``, handwritten backward."""
    check_tensor(input, "input", "sigmoid")
    return _apply(SigmoidFunction, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """Hyperbolic tangent of ``input (*)`` → ``(*)``, handwritten backward."""
    check_tensor(input, "input", "tanh")
    return _apply(TanhFunction, input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(input, 0)`` of ``input (*)`` → ``(*)``, handwritten backward.

    ``inplace=True`` is refused: an in-place ReLU would overwrite the tensor the previous
    layer saved for its own backward.
    """
    check_tensor(input, "input", "relu")
    if inplace:
        raise ValueError("relu: inplace=True is not supported; expected inplace=False")
    return _apply(ReLUFunction, input)


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
    loss, _ = _apply(
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
    return _apply(MSELossFunction, input, target, reduction)

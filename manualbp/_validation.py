"""Input checks shared by the functional API: clear messages, torch's own error types.

Each check names the argument, what was expected and what arrived. The error type is the
one ``torch.nn.functional`` raises for the same mistake (RuntimeError for shape or dtype
mismatches in linear algebra, ValueError for batch-size and reduction mistakes, IndexError
for out-of-range class indices), so code that catches torch's errors catches ours.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn._reduction import legacy_get_string

from manualbp._precision import autocast_enabled

REDUCTIONS = ("mean", "sum", "none")
# torch still accepts the old name of "mean", with a deprecation warning
_DEPRECATED_MEAN = "elementwise_mean"


def check_tensor(value: object, name: str, function: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(value).__name__}")


def check_real(tensor: torch.Tensor, name: str, function: str) -> None:
    """Complex tensors are refused: the handwritten formulas are for real numbers (a complex
    gradient needs conjugates they do not take)."""
    if tensor.is_complex():
        raise RuntimeError(
            f"{function}: {name} has dtype {tensor.dtype}; complex tensors are not supported, "
            f"expected a real dtype"
        )


def check_real_tensor(value: object, name: str, function: str) -> None:
    """``value`` is a tensor of a real dtype (:func:`check_tensor`, then :func:`check_real`)."""
    if isinstance(value, torch.Tensor) and not value.is_complex():
        return
    check_tensor(value, name, function)
    check_real(value, name, function)


def check_floating(tensor: torch.Tensor, name: str, function: str) -> None:
    if not tensor.is_floating_point():
        raise RuntimeError(
            f"{function}: {name} must be a floating-point tensor, got dtype {tensor.dtype}"
        )


def check_reduction(reduction: object, function: str) -> None:
    """``reduction`` is one torch accepts: one of :data:`REDUCTIONS`, or ``"elementwise_mean"``."""
    if reduction not in REDUCTIONS and reduction != _DEPRECATED_MEAN:
        raise ValueError(f"{function}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def resolve_reduction(
    reduction: object, size_average: object, reduce: object, function: str
) -> str:
    """The reduction torch's loss functions apply: when the legacy ``size_average`` or
    ``reduce`` is given it overrides ``reduction``, mapped (with its deprecation warning) by
    torch's own ``torch.nn._reduction.legacy_get_string``; ``"elementwise_mean"`` is
    ``"mean"`` with torch's warning; anything else must be one of :data:`REDUCTIONS`."""
    if size_average is not None or reduce is not None:
        return legacy_get_string(size_average, reduce)
    check_reduction(reduction, function)
    if reduction == _DEPRECATED_MEAN:
        warnings.warn(  # at the caller of the loss function that called this
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            stacklevel=4,
        )
        return "mean"
    return reduction


def check_linear_args(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if (  # the common case at the cost of one expression; anything else is explained below
        isinstance(input, torch.Tensor)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and input.dim() > 0
        and input.shape[-1] == weight.shape[1]
        and input.dtype == weight.dtype
        and not weight.is_complex()
        and (bias is None or (isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1]))
        and (bias is None or not bias.is_complex())
    ):
        return
    check_tensor(input, "input", "linear")
    check_tensor(weight, "weight", "linear")
    check_real(input, "input", "linear")
    check_real(weight, "weight", "linear")
    if weight.dim() != 2:
        raise RuntimeError(
            f"linear: weight must be 2-D (out_features, in_features), "
            f"got shape {tuple(weight.shape)}"
        )
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear: input of shape {tuple(input.shape)} does not match weight of shape "
            f"{tuple(weight.shape)}: expected input shape (*, {weight.shape[1]})"
        )
    if input.dtype != weight.dtype and not autocast_enabled(input.device.type):
        raise RuntimeError(
            f"linear: input dtype {input.dtype} differs from weight dtype {weight.dtype}; "
            f"expected both the same (or run under torch.autocast)"
        )
    if bias is not None:
        check_tensor(bias, "bias", "linear")
        check_real(bias, "bias", "linear")
        if tuple(bias.shape) != (weight.shape[0],):
            raise RuntimeError(
                f"linear: bias must have shape ({weight.shape[0]},) to match weight of shape "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )


def check_cross_entropy_args(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    size_average: bool | None,
    ignore_index: int,
    reduce: bool | None,
    reduction: str,
    label_smoothing: float,
) -> tuple[str, bool, bool]:
    """Raise on bad arguments of ``cross_entropy`` (its parameters, in its order), with
    torch's error types.

    Returns ``(reduction, probabilities, may_ignore)``: the reduction to apply
    (:func:`resolve_reduction`); whether ``target`` holds class probabilities (it has the
    input's shape, as torch decides) rather than class indices; and, for class indices,
    whether some target may equal ``ignore_index`` (see :func:`check_class_range`).
    """
    if (  # the common case, (N, C) logits and (N,) classes, at the cost of one expression
        size_average is None
        and reduce is None
        and weight is None
        and type(label_smoothing) in (float, int)
        and label_smoothing == 0
        and reduction in REDUCTIONS
        and type(ignore_index) is int
        and isinstance(input, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and input.dim() == 2
        and target.dim() == 1
        and input.shape[0] == target.shape[0]
        and target.dtype == torch.int64
        and input.is_floating_point()
    ):
        return reduction, False, check_class_range(target, input.shape[1], ignore_index)
    reduction = resolve_reduction(reduction, size_average, reduce, "cross_entropy")
    check_tensor(input, "input", "cross_entropy")
    check_tensor(target, "target", "cross_entropy")
    check_floating(input, "input", "cross_entropy")
    if input.dim() == 0:
        raise ValueError(
            "cross_entropy: input must have a class dimension, (C,), (N, C) or "
            "(N, C, d1, ..., dk) logits, got shape ()"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(
            f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}"
        )
    if not isinstance(label_smoothing, (float, int)) or isinstance(label_smoothing, bool):
        raise TypeError(
            f"cross_entropy: label_smoothing must be a float, got {type(label_smoothing).__name__}"
        )
    if label_smoothing > 1.0:
        raise RuntimeError(
            f"cross_entropy: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}"
        )
    num_classes = input.shape[1 if input.dim() > 1 else 0]
    if weight is not None:
        check_tensor(weight, "weight", "cross_entropy")
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise RuntimeError(
                f"cross_entropy: weight must hold one weight per class, shape ({num_classes},), "
                f"got shape {tuple(weight.shape)}"
            )
    if input.shape == target.shape:  # class probabilities, as torch decides
        _check_probability_target(target, ignore_index)
        return reduction, True, False
    _check_class_target(input, target, num_classes)
    if weight is not None:
        _check_class_weight(input, weight)
    return reduction, False, check_class_range(target, num_classes, ignore_index)


def _check_probability_target(target: torch.Tensor, ignore_index: int) -> None:
    if not target.is_floating_point():
        raise RuntimeError(
            f"cross_entropy: a target of the input's shape {tuple(target.shape)} holds class "
            f"probabilities and must be floating-point, got dtype {target.dtype} (class "
            f"indices have no class dimension)"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"cross_entropy: ignore_index={ignore_index} is not supported for class-probability "
            f"targets; expected a negative ignore_index (the default -100)"
        )


def _check_class_target(input: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    """Class indices: int64, and the input's shape without its class dimension."""
    expected = "()" if input.dim() == 1 else str((input.shape[0], *input.shape[2:]))
    if target.dtype != torch.int64:
        raise RuntimeError(
            f"cross_entropy: target must hold int64 class indices of shape {expected}, got dtype "
            f"{target.dtype} (class-probability targets must have the input's shape "
            f"{tuple(input.shape)})"
        )
    if input.dim() == 1:
        if target.dim() != 0:
            raise RuntimeError(
                f"cross_entropy: for unbatched input of shape ({num_classes},) target must be a "
                f"0-d class index, got shape {tuple(target.shape)}"
            )
        return
    if target.dim() == 0:
        raise RuntimeError(
            f"cross_entropy: target must be class indices of shape {expected}, got a 0-d tensor"
        )
    if target.shape[0] != input.shape[0]:
        raise ValueError(
            f"cross_entropy: input batch size ({input.shape[0]}) does not match target batch "
            f"size ({target.shape[0]}); expected target of shape {expected}"
        )
    if target.shape[1:] != input.shape[2:]:
        raise RuntimeError(
            f"cross_entropy: target must be class indices of shape {expected} for input of shape "
            f"{tuple(input.shape)}, got shape {tuple(target.shape)}"
        )


def _check_class_weight(input: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dtype != input.dtype and not autocast_enabled(input.device.type):
        raise RuntimeError(
            f"cross_entropy: weight dtype {weight.dtype} differs from input dtype {input.dtype}; "
            f"expected both the same"
        )
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "cross_entropy: weight requires grad, but the loss of class-index targets is not "
            "differentiable with respect to the class weights (nor is torch's nll_loss); "
            "pass weight.detach(), or class-probability targets"
        )


def check_class_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> bool:
    """Every target is in ``[0, num_classes)`` or equals ``ignore_index``.

    Returns False only when it has proven that no target equals ``ignore_index``, so the
    caller may skip the ignore masks; True otherwise.

    On CPU the check raises IndexError at once, with one ``aminmax`` in the common case. On
    CUDA it returns True without looking: reading the targets would make the training step
    wait for the GPU, and the ``nll_loss`` kernel the forward runs checks them anyway, with
    an asynchronous device assert. Skipped while ``torch.compile`` traces or a ``torch.func``
    transform wraps the target, where a data-dependent Python branch is impossible; there
    the kernel itself still rejects bad indices.
    """
    if not target.is_cpu or torch.compiler.is_compiling():
        return True
    if torch._C._functorch.is_functorch_wrapped_tensor(target) or target.numel() == 0:
        return True
    low, high = (int(v) for v in torch.aminmax(target))
    if low >= 0 and high < num_classes:
        return 0 <= ignore_index < num_classes
    out_of_range = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if out_of_range.any():
        position = tuple(out_of_range.nonzero()[0].tolist())
        where = f"target[{', '.join(map(str, position))}]" if position else "target"
        raise IndexError(
            f"cross_entropy: {where} = {int(target[position])} is out of bounds; "
            f"expected class indices in [0, {num_classes}) or ignore_index={ignore_index}"
        )
    return True


def check_mse_args(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None,
    reduce: bool | None,
    reduction: str,
    weight: torch.Tensor | None,
) -> str:
    """Raise on bad arguments of ``mse_loss`` (its parameters, in its order), with torch's
    error types, and warn as torch does about a target of another shape. Returns the
    reduction to apply (:func:`resolve_reduction`)."""
    check_tensor(input, "input", "mse_loss")
    check_tensor(target, "target", "mse_loss")
    if target.shape != input.shape and not is_tracing():  # a warning breaks a compiled graph
        warnings.warn(  # at the caller of mse_loss, as torch's
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to "
            f"broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )
    reduction = resolve_reduction(reduction, size_average, reduce, "mse_loss")
    check_floating(input, "input", "mse_loss")
    if input.shape != target.shape:
        try:
            torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError:  # torch's own error type when the shapes cannot broadcast
            raise RuntimeError(
                f"mse_loss: input shape {tuple(input.shape)} and target shape "
                f"{tuple(target.shape)} cannot broadcast; expected equal shapes"
            ) from None
    if weight is not None:
        check_tensor(weight, "weight", "mse_loss")
        if weight.shape != input.shape:
            raise ValueError(
                f"mse_loss: weight must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(weight.shape)}"
            )
    return reduction


def is_tracing(*tensors: torch.Tensor) -> bool:
    """True while ``torch.compile`` traces or a ``torch.func`` transform runs (or one of
    ``tensors`` is a tensor subclass or a ``torch.func`` wrapper): there no code may depend on
    tensor data (a host read, ``masked_select``'s data-dependent shape), warn, or apply a
    Function that marks its input dirty."""
    return (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or any(
            type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t)
            for t in tensors
        )
    )


def check_conv2d_args(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Tensors, real, and the ranks conv2d reads; torch's kernel checks the rest (channels,
    groups, stride, padding, dilation, sizes) with its own messages."""
    for name, value in (("input", input), ("weight", weight), ("bias", bias)):
        if value is not None or name != "bias":
            check_tensor(value, name, "conv2d")
            check_real(value, name, "conv2d")
    if weight.dim() != 4:
        raise RuntimeError(
            f"conv2d: weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape "
            f"{tuple(weight.shape)}"
        )
    if input.dim() not in (3, 4):
        raise RuntimeError(
            f"conv2d: input must be 4-D (N, C_in, H, W) or unbatched 3-D (C_in, H, W), got "
            f"shape {tuple(input.shape)}"
        )


def check_batch_norm_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """torch's checks of ``F.batch_norm`` and ``aten::batch_norm``, in its order and with its
    error types, before the kernel runs (which does not check the sizes of the statistics,
    and crashes in evaluation without them)."""
    named = (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    )
    check_tensor(input, "input", "batch_norm")
    check_real(input, "input", "batch_norm")
    for name, value in named:
        if value is not None:
            check_tensor(value, name, "batch_norm")
            check_real(value, name, "batch_norm")
    if input.dim() < 2 and input.numel() != 0:
        raise RuntimeError(
            f"batch_norm: input must be (N, C) or (N, C, *), with channels in dimension 1, got "
            f"shape {tuple(input.shape)}"
        )
    if training and input.dim() >= 2:  # torch's _verify_batch_size
        values = input.shape[0] * math.prod(input.shape[2:])
        if values == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if input.numel() == 0:
        return
    if running_mean is None and not training:
        raise RuntimeError(
            "batch_norm: running_mean must be defined in evaluation mode (training=False "
            "normalizes with the running statistics)"
        )
    channels = input.shape[1]
    for name, value in named:
        if value is not None and value.numel() != channels:
            raise RuntimeError(
                f"batch_norm: {name} should contain {channels} elements not {value.numel()} "
                f"(one per channel of input {tuple(input.shape)})"
            )


def check_dropout_args(input: torch.Tensor, p: float) -> None:
    check_tensor(input, "input", "dropout")
    check_real(input, "input", "dropout")
    if not 0.0 <= p <= 1.0:  # torch's message and type
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")

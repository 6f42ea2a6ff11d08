"""Input checks shared by the functional API: clear messages, torch's own error types.

Each check names the argument, what was expected and what arrived. The error type is the
one ``torch.nn.functional`` raises for the same mistake (RuntimeError for shape or dtype
mismatches in linear algebra, ValueError for batch-size and reduction mistakes, IndexError
for out-of-range class indices), so code that catches torch's errors catches ours.
"""

from __future__ import annotations

import torch

from manualbp._precision import autocast_enabled

REDUCTIONS = ("mean", "sum", "none")


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


def check_floating(tensor: torch.Tensor, name: str, function: str) -> None:
    if not tensor.is_floating_point():
        raise RuntimeError(
            f"{function}: {name} must be a floating-point tensor, got dtype {tensor.dtype}"
        )


def check_reduction(reduction: object, function: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{function}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_linear_args(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
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
    input: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int
) -> bool:
    """Raise on bad arguments; return whether some target may equal ``ignore_index``."""
    check_tensor(input, "input", "cross_entropy")
    check_tensor(target, "target", "cross_entropy")
    check_reduction(reduction, "cross_entropy")
    if input.dim() != 2:
        raise ValueError(
            f"cross_entropy: input must be (N, C) logits, got shape {tuple(input.shape)}"
        )
    check_floating(input, "input", "cross_entropy")
    if target.dtype != torch.int64:
        raise RuntimeError(
            f"cross_entropy: target must hold int64 class indices of shape ({input.shape[0]},), "
            f"got dtype {target.dtype} (class-probability targets are not supported)"
        )
    if target.dim() != 1:
        raise RuntimeError(
            f"cross_entropy: target must be 1-D class indices of shape ({input.shape[0]},), "
            f"got shape {tuple(target.shape)}"
        )
    if target.shape[0] != input.shape[0]:
        raise ValueError(
            f"cross_entropy: input batch size ({input.shape[0]}) does not match target batch "
            f"size ({target.shape[0]}); expected target of shape ({input.shape[0]},)"
        )
    if not isinstance(ignore_index, int):
        raise TypeError(
            f"cross_entropy: ignore_index must be an int, got {type(ignore_index).__name__}"
        )
    return check_class_range(target, input.shape[1], ignore_index)


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
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    if torch._C._functorch.is_functorch_wrapped_tensor(target):
        return True
    if target.numel() == 0:
        return True
    low, high = (int(v) for v in torch.aminmax(target))
    if low >= 0 and high < num_classes:
        return 0 <= ignore_index < num_classes
    out_of_range = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0, 0])
        raise IndexError(
            f"cross_entropy: target[{position}] = {int(target[position])} is out of bounds; "
            f"expected class indices in [0, {num_classes}) or ignore_index={ignore_index}"
        )
    return True


def check_mse_args(input: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    check_tensor(input, "input", "mse_loss")
    check_tensor(target, "target", "mse_loss")
    check_reduction(reduction, "mse_loss")
    check_floating(input, "input", "mse_loss")
    check_floating(target, "target", "mse_loss")
    if input.shape != target.shape:
        try:
            torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError:  # torch's own error type when the shapes cannot broadcast
            raise RuntimeError(
                f"mse_loss: input shape {tuple(input.shape)} and target shape "
                f"{tuple(target.shape)} differ and cannot broadcast; expected equal shapes"
            ) from None
        raise ValueError(
            f"mse_loss: input shape {tuple(input.shape)} and target shape "
            f"{tuple(target.shape)} differ; expected equal shapes (manualbp does not "
            f"broadcast the target, which torch only warns about)"
        )

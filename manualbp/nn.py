"""Drop-in modules built on the handwritten Functions, the MLP builder, and the autograd twin.

Each module subclasses its ``torch.nn`` namesake: same constructor arguments, same parameter
names, same initialisation (the parent's ``reset_parameters``), same ``repr``. Only
``forward`` changes, to call :mod:`manualbp.functional`. A ``state_dict`` therefore moves
between the two unchanged, and :func:`autograd_twin` / :func:`manual_twin` turn a model
into its counterpart with identical weights.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from manualbp import functional as MF
from manualbp._validation import check_reduction

__all__ = [
    "MLP",
    "CrossEntropyLoss",
    "Linear",
    "MSELoss",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "autograd_twin",
    "manual_twin",
]

Activation = Literal["relu", "sigmoid", "tanh"]
Backend = Literal["manual", "autograd"]


class _Manual:
    """Marks a module as handwritten in its repr: ``manual.Linear(...)``."""

    def _get_name(self) -> str:
        return "manual." + super()._get_name()


class Linear(_Manual, nn.Linear):
    """``torch.nn.Linear`` whose backward is :class:`manualbp.functional.LinearFunction`.

    Args, Shape and Attributes: as ``torch.nn.Linear`` (input ``(*, in_features)``, output
    ``(*, out_features)``, ``weight (out_features, in_features)``, ``bias (out_features,)``).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.linear(input, self.weight, self.bias)


class Sigmoid(_Manual, nn.Sigmoid):
    """``torch.nn.Sigmoid`` with a handwritten backward. Shape: ``(*)`` → ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.sigmoid(input)


class Tanh(_Manual, nn.Tanh):
    """``torch.nn.Tanh`` with a handwritten backward. Shape: ``(*)`` → ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.tanh(input)


class ReLU(_Manual, nn.ReLU):
    """``torch.nn.ReLU`` with a handwritten backward. Shape: ``(*)`` → ``(*)``.

    ``inplace=True`` is refused: it would overwrite the tensor the previous layer saved.
    """

    def __init__(self, inplace: bool = False) -> None:
        if inplace:
            raise ValueError("ReLU: inplace=True is not supported; expected inplace=False")
        super().__init__(inplace=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.relu(input)


class CrossEntropyLoss(_Manual, nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` with a handwritten, fused backward.

    Args: ``ignore_index`` and ``reduction`` as in torch (class weights and label smoothing
    are not supported). Shape: input ``(N, C)`` logits, target ``(N,)`` int64 classes,
    output ``()`` or ``(N,)`` for ``reduction="none"``.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean") -> None:
        check_reduction(reduction, "CrossEntropyLoss")
        super().__init__(ignore_index=ignore_index, reduction=reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MF.cross_entropy(input, target, self.reduction, self.ignore_index)


class MSELoss(_Manual, nn.MSELoss):
    """``torch.nn.MSELoss`` with a handwritten backward.

    Shape: input ``(*)``, target ``(*)`` of the same shape, output ``()`` or ``(*)``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        check_reduction(reduction, "MSELoss")
        super().__init__(reduction=reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MF.mse_loss(input, target, self.reduction)


# Each manual module and the torch.nn class it stands in for. The manual classes add no
# state to their parents, so converting between the two is a change of class, nothing more.
MANUAL_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {
    Linear: nn.Linear,
    Sigmoid: nn.Sigmoid,
    Tanh: nn.Tanh,
    ReLU: nn.ReLU,
    CrossEntropyLoss: nn.CrossEntropyLoss,
    MSELoss: nn.MSELoss,
}
TORCH_TO_MANUAL = {torch_cls: manual_cls for manual_cls, torch_cls in MANUAL_TO_TORCH.items()}

_ACTIVATIONS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "relu": (ReLU, nn.ReLU),
    "sigmoid": (Sigmoid, nn.Sigmoid),
    "tanh": (Tanh, nn.Tanh),
}
_BACKENDS = ("manual", "autograd")


def _unsupported_options(module: nn.Module) -> str | None:
    """What ``module`` is set to that the manualbp counterpart of its class cannot compute
    (``None`` when the conversion reproduces it exactly)."""
    if isinstance(module, nn.CrossEntropyLoss):
        if module.weight is not None:
            return "class weights (weight=...)"
        if module.label_smoothing != 0.0:
            return f"label_smoothing={module.label_smoothing}"
    if isinstance(module, nn.ReLU) and module.inplace:
        return "inplace=True"
    return None


def _qualified(cls: type) -> str:
    """``torch.nn.Linear`` rather than ``torch.nn.modules.linear.Linear``."""
    for package in ("torch.nn", "manualbp.nn"):
        if cls.__module__.startswith(package):
            return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _convert(model: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    """A deep copy of ``model`` with each module of a class in ``mapping`` changed to the
    mapped class; refuses, naming the module, anything the change could not reproduce."""
    convertible = tuple(mapping)
    for name, module in model.named_modules():
        where = f"{name or 'the model'} ({type(module).__name__})"
        target = mapping.get(type(module))
        if target is None and isinstance(module, convertible):
            base = next(cls for cls in type(module).__mro__ if cls in mapping)
            raise ValueError(
                f"cannot convert {where}: it subclasses {_qualified(base)}, and converting it "
                f"to the counterpart of {base.__name__} would drop what the subclass changes"
            )
        if target is not None:
            unsupported = _unsupported_options(module)
            if unsupported is not None:
                manual_cls = target if target in MANUAL_TO_TORCH else type(module)
                raise ValueError(
                    f"cannot convert {where}: manualbp.nn.{manual_cls.__name__} does not "
                    f"support {unsupported}; the converted model would compute something else"
                )
    twin = copy.deepcopy(model)
    for module in twin.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return twin


def autograd_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every manualbp module replaced by its ``torch.nn`` parent.

    Weights, buffers, ``requires_grad`` flags, device and dtype are identical; the twin's
    gradients come from PyTorch's builtin autograd. ``model`` itself is not changed.
    """
    return _convert(model, MANUAL_TO_TORCH)


def manual_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every supported ``torch.nn`` module made a manualbp one."""
    return _convert(model, TORCH_TO_MANUAL)


class MLP(nn.Sequential):
    """A multilayer perceptron from either backend: ``fc1, act1, fc2, act2, ..., fcL``.

    Args:
        sizes: layer widths, input first, e.g. ``[784, 200, 10]``; at least two.
        activation: hidden nonlinearity, ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        backend: ``"manual"`` (handwritten backward) or ``"autograd"`` (``torch.nn``).
        output_activation: optional nonlinearity after the last layer (``None`` for logits;
            ``"sigmoid"`` for the classic XOR net).
        bias: whether the linear layers have a bias.

    Shape: input ``(*, sizes[0])``, output ``(*, sizes[-1])``.

    Built with the same random state, the two backends hold identical weights.
    """

    def __init__(
        self,
        sizes: list[int],
        activation: Activation = "relu",
        backend: Backend = "manual",
        output_activation: Activation | None = None,
        bias: bool = True,
    ) -> None:
        if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"MLP: sizes must be >= 2 positive ints, got {sizes!r}")
        for name, value in (("activation", activation), ("output_activation", output_activation)):
            if value is not None and value not in _ACTIVATIONS:
                raise ValueError(f"MLP: {name} must be one of {tuple(_ACTIVATIONS)}, got {value!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"MLP: backend must be one of {_BACKENDS}, got {backend!r}")
        manual = backend == "manual"
        linear_cls = Linear if manual else nn.Linear
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        depth = len(sizes) - 1
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            layers[f"fc{index}"] = linear_cls(fan_in, fan_out, bias=bias)
            last = index == depth
            name = output_activation if last else activation
            if name is not None:
                layers[f"act{index}"] = _ACTIVATIONS[name][0 if manual else 1]()
        super().__init__(layers)
        self.sizes = list(sizes)

    @property
    def backend(self) -> Backend:
        """``"manual"`` when any layer uses a handwritten backward, else ``"autograd"``."""
        manual = any(type(m) in MANUAL_TO_TORCH for m in self.modules())
        return "manual" if manual else "autograd"

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
from collections.abc import Callable
from dataclasses import dataclass
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
    "is_handwritten",
    "manual_twin",
    "register_twin",
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


Converter = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class _TwinPair:
    manual: type[nn.Module]
    autograd: type[nn.Module]
    to_autograd: Converter | None
    to_manual: Converter | None


# manual class -> its pair; torch class -> its pair. The built-in pairs change a module's class
# and nothing else: the manual classes add no state to their torch.nn parents.
_BY_MANUAL: dict[type[nn.Module], _TwinPair] = {}
_BY_AUTOGRAD: dict[type[nn.Module], _TwinPair] = {}


def register_twin(
    manual_cls: type[nn.Module],
    autograd_cls: type[nn.Module],
    *,
    to_autograd: Converter | None = None,
    to_manual: Converter | None = None,
) -> None:
    """Declare ``autograd_cls`` the builtin-autograd counterpart of ``manual_cls``, your own
    module with a handwritten backward, so that :func:`autograd_twin` (and
    :func:`manual_twin`, the other way) convert it.

    By default a conversion changes the module's class and keeps its state (parameters,
    buffers, attributes): exact when ``manual_cls`` subclasses ``autograd_cls`` and only
    overrides ``forward``, as manualbp's own modules do. Otherwise give
    ``to_autograd(manual_module) -> autograd_module`` (and ``to_manual`` for the reverse),
    which must reproduce the module exactly, weights included. A module that computes the same
    in both twins (e.g. a reshape) registers with itself: ``register_twin(View, View)``.
    """
    for name, cls in (("manual_cls", manual_cls), ("autograd_cls", autograd_cls)):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_twin: {name} must be an nn.Module class, got {cls!r}")
    same_state = issubclass(manual_cls, autograd_cls) or issubclass(autograd_cls, manual_cls)
    if to_autograd is None and not same_state:
        raise TypeError(
            f"register_twin: {manual_cls.__qualname__} does not subclass "
            f"{_qualified(autograd_cls)}, so changing its class would not rebuild it; pass "
            f"to_autograd=<function building the {autograd_cls.__name__} from a "
            f"{manual_cls.__name__}>"
        )
    pair = _TwinPair(manual_cls, autograd_cls, to_autograd, to_manual)
    _BY_MANUAL[manual_cls] = pair
    if to_manual is not None or same_state:
        _BY_AUTOGRAD[autograd_cls] = pair


def is_handwritten(module: nn.Module) -> bool:
    """Whether ``module``'s class is a registered manual class (manualbp's or your own)."""
    pair = _BY_MANUAL.get(type(module))
    return pair is not None and pair.manual is not pair.autograd


def _qualified(cls: type) -> str:
    """``torch.nn.Linear`` rather than ``torch.nn.modules.linear.Linear``."""
    for package in ("torch.nn", "manualbp.nn"):
        if cls.__module__.startswith(package):
            return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


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


def _is_builtin(cls: type) -> bool:
    return cls.__module__.startswith("torch.nn.")


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )


def _plan(model: nn.Module, to_autograd: bool) -> dict[str, _TwinPair]:
    """Module name → the pair that converts it; raises, naming the module, for anything a
    conversion could not reproduce exactly."""
    registry = _BY_MANUAL if to_autograd else _BY_AUTOGRAD
    plan = {}
    for name, module in model.named_modules():
        where = f"{name or 'the model'} ({type(module).__name__})"
        pair = registry.get(type(module))
        if pair is None:
            if _is_builtin(type(module)):
                continue  # torch.nn's own: builtin autograd in both twins
            base = next((cls for cls in type(module).__mro__[1:] if cls in registry), None)
            if base is not None:
                raise ValueError(
                    f"cannot convert {where}: it subclasses {_qualified(base)}, and converting "
                    f"it as a {base.__name__} would drop what the subclass changes; register "
                    f"it with manualbp.nn.register_twin"
                )
            if to_autograd and (not list(module.children()) or _owns_state(module)):
                raise ValueError(
                    f"cannot make the autograd twin of {where}: manualbp does not know "
                    f"whether it computes by hand, so copying it could compare a "
                    f"handwritten backward with itself; build it from torch.nn and "
                    f"manualbp.nn modules, or declare its counterpart with "
                    f"manualbp.nn.register_twin({type(module).__name__}, <torch module>)"
                )
            continue
        unsupported = _unsupported_options(module)
        if unsupported is not None:
            raise ValueError(
                f"cannot convert {where}: manualbp.nn.{pair.manual.__name__} does not support "
                f"{unsupported}; the converted model would compute something else"
            )
        plan[name] = pair
    return plan


def _convert(model: nn.Module, to_autograd: bool) -> nn.Module:
    plan = _plan(model, to_autograd)
    twin = copy.deepcopy(model)
    for name, pair in plan.items():
        if pair.manual is pair.autograd:
            continue
        module = twin.get_submodule(name)
        converter = pair.to_autograd if to_autograd else pair.to_manual
        if converter is None:
            module.__class__ = pair.autograd if to_autograd else pair.manual
        elif name:
            twin.set_submodule(name, converter(module))
        else:
            twin = converter(module)
    return twin


def autograd_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every handwritten module replaced by its builtin-autograd
    counterpart (``manualbp.nn.Linear`` → ``torch.nn.Linear``, and the pairs declared with
    :func:`register_twin`).

    Weights, buffers, ``requires_grad`` flags, device and dtype are identical; the twin's
    gradients come from PyTorch's builtin autograd. ``model`` itself is not changed. A module
    the conversion cannot reproduce, or one manualbp does not know (neither ``torch.nn``, nor
    registered, nor a container of such modules), is refused with its name.
    """
    return _convert(model, to_autograd=True)


def manual_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``torch.nn`` module that has a handwritten
    counterpart made that counterpart; other modules are left as they are (their gradients
    come from autograd in both models). Refuses, by name, what it cannot reproduce."""
    return _convert(model, to_autograd=False)


for _manual_cls, _autograd_cls in (
    (Linear, nn.Linear),
    (Sigmoid, nn.Sigmoid),
    (Tanh, nn.Tanh),
    (ReLU, nn.ReLU),
    (CrossEntropyLoss, nn.CrossEntropyLoss),
    (MSELoss, nn.MSELoss),
):
    register_twin(_manual_cls, _autograd_cls)

_ACTIVATIONS: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "relu": (ReLU, nn.ReLU),
    "sigmoid": (Sigmoid, nn.Sigmoid),
    "tanh": (Tanh, nn.Tanh),
}
_BACKENDS = ("manual", "autograd")


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
        self.activation = activation
        self.output_activation = output_activation

    @property
    def backend(self) -> Backend:
        """``"manual"`` when any layer uses a handwritten backward, else ``"autograd"``."""
        return "manual" if any(is_handwritten(m) for m in self.modules()) else "autograd"

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
import torch.nn.functional as F
from torch import nn

from manualbp import functional as MF
from manualbp._validation import check_reduction

__all__ = [
    "MLP",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "LayerNorm",
    "LeNet5",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "MaxPool2d",
    "ReLU",
    "Sigmoid",
    "Softmax",
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

    Args: ``inplace`` as in torch: the output overwrites the input (see
    :func:`manualbp.functional.relu`).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.relu(input, inplace=self.inplace)


class CrossEntropyLoss(_Manual, nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` with handwritten, fused backward passes.

    Args: torch's, in torch's order: ``weight (C,)`` (registered as the buffer ``weight``, as
    in torch), ``size_average``, ``ignore_index``, ``reduce``, ``reduction``,
    ``label_smoothing``. Shape: input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits;
    target int64 classes ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, or class probabilities of
    the input's shape; output ``()``, or the target's shape for ``reduction="none"``.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_reduction(self.reduction, "CrossEntropyLoss")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MF.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class MSELoss(_Manual, nn.MSELoss):
    """``torch.nn.MSELoss`` with a handwritten backward.

    Args: torch's ``size_average``, ``reduce`` (deprecated) and ``reduction``. Shape: input
    ``(*)``, target of the same shape (a broadcastable one is broadcast, with torch's
    warning), output ``()`` or ``(*)``.
    """

    def __init__(
        self, size_average: bool | None = None, reduce: bool | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(size_average, reduce, reduction)
        check_reduction(self.reduction, "MSELoss")

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MF.mse_loss(input, target, reduction=self.reduction)


class Conv2d(_Manual, nn.Conv2d):
    """``torch.nn.Conv2d`` whose backward is :class:`manualbp.functional.Conv2dFunction`.

    Args, Shape and Attributes: as ``torch.nn.Conv2d`` (input ``(N, C_in, H, W)`` or
    ``(C_in, H, W)``, ``weight (C_out, C_in/groups, kH, kW)``, ``bias (C_out,)``). A
    ``padding_mode`` other than ``"zeros"`` pads the input with ``F.pad`` first, as torch does.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return MF.conv2d(
                padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
            )
        return MF.conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class MaxPool2d(_Manual, nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` with a handwritten backward. Shape: ``(N, C, H, W)`` or
    ``(C, H, W)`` → ``(*, C, Ho, Wo)`` (and the argmax positions with ``return_indices``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return MF.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class AvgPool2d(_Manual, nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` with a handwritten backward. Shape: ``(N, C, H, W)`` or
    ``(C, H, W)`` → ``(*, C, Ho, Wo)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )


class _ManualBatchNorm(_Manual):
    """torch's ``_BatchNorm.forward`` (running statistics, ``num_batches_tracked``, the
    cumulative average when ``momentum=None``) with :func:`manualbp.functional.batch_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in evaluation when there are no running ones
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        # running statistics are passed to be updated (training) or used (evaluation)
        pass_running = not self.training or self.track_running_stats
        return MF.batch_norm(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            use_batch,
            momentum,
            self.eps,
        )


class BatchNorm1d(_ManualBatchNorm, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with a handwritten backward. Shape: ``(N, C)`` or
    ``(N, C, L)`` → the same; ``weight``, ``bias``, ``running_mean``, ``running_var`` ``(C,)``."""


class BatchNorm2d(_ManualBatchNorm, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with a handwritten backward. Shape: ``(N, C, H, W)`` → the
    same; ``weight``, ``bias``, ``running_mean``, ``running_var`` ``(C,)``."""


class LayerNorm(_Manual, nn.LayerNorm):
    """``torch.nn.LayerNorm`` with a handwritten backward. Shape: ``(*, *normalized_shape)``
    → the same; ``weight`` and ``bias`` ``normalized_shape``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class Dropout(_Manual, nn.Dropout):
    """``torch.nn.Dropout`` with a handwritten backward: the mask is drawn as torch draws it,
    so from the same random state both drop the same units. Shape: ``(*)`` → ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.dropout(input, self.p, self.training, self.inplace)


class LogSoftmax(_Manual, nn.LogSoftmax):
    """``torch.nn.LogSoftmax`` with a handwritten backward. Shape: ``(*)`` → ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.log_softmax(input, self.dim, _stacklevel=5)


class Softmax(_Manual, nn.Softmax):
    """``torch.nn.Softmax`` with a handwritten backward. Shape: ``(*)`` → ``(*)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return MF.softmax(input, self.dim, _stacklevel=5)


Flatten = nn.Flatten
"""``torch.nn.Flatten`` itself: a reshape, whose backward is a reshape, the same in both twins."""


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
    (``None`` when the conversion reproduces it exactly).

    ``CrossEntropyLoss``, ``MSELoss`` and ``ReLU`` compute every option of their torch
    namesakes (class weights, label smoothing, in-place ReLU), so none of them is refused.
    """
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
    (Conv2d, nn.Conv2d),
    (MaxPool2d, nn.MaxPool2d),
    (AvgPool2d, nn.AvgPool2d),
    (BatchNorm1d, nn.BatchNorm1d),
    (BatchNorm2d, nn.BatchNorm2d),
    (LayerNorm, nn.LayerNorm),
    (Dropout, nn.Dropout),
    (LogSoftmax, nn.LogSoftmax),
    (Softmax, nn.Softmax),
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
        batch_norm: a ``BatchNorm1d`` (``bn1``, ...) between each hidden linear layer and its
            activation, as Ioffe & Szegedy (2015) place it; those linear layers then have no
            bias (the normalization would cancel it; its ``β`` takes its place).
        dropout: probability of dropping each hidden unit, after its activation (``drop1``,
            ...); ``input_dropout``: of each input (``drop0``), as Srivastava et al. (2014).

    Shape: input ``(*, sizes[0])`` (``(N, sizes[0])`` with ``batch_norm``), output
    ``(*, sizes[-1])``.

    Built with the same random state, the two backends hold identical weights.
    """

    def __init__(
        self,
        sizes: list[int],
        activation: Activation = "relu",
        backend: Backend = "manual",
        output_activation: Activation | None = None,
        bias: bool = True,
        batch_norm: bool = False,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"MLP: sizes must be >= 2 positive ints, got {sizes!r}")
        for name, value in (("activation", activation), ("output_activation", output_activation)):
            if value is not None and value not in _ACTIVATIONS:
                raise ValueError(f"MLP: {name} must be one of {tuple(_ACTIVATIONS)}, got {value!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"MLP: backend must be one of {_BACKENDS}, got {backend!r}")
        for name, value in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"MLP: {name} must be a probability in [0, 1), got {value!r}")
        manual = backend == "manual"
        linear_cls = Linear if manual else nn.Linear
        batch_norm_cls = BatchNorm1d if manual else nn.BatchNorm1d
        dropout_cls = Dropout if manual else nn.Dropout
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if input_dropout:
            layers["drop0"] = dropout_cls(input_dropout)
        depth = len(sizes) - 1
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), start=1):
            last = index == depth
            normalized = batch_norm and not last
            layers[f"fc{index}"] = linear_cls(fan_in, fan_out, bias=bias and not normalized)
            if normalized:
                layers[f"bn{index}"] = batch_norm_cls(fan_out)
            name = output_activation if last else activation
            if name is not None:
                layers[f"act{index}"] = _ACTIVATIONS[name][0 if manual else 1]()
            if dropout and not last:
                layers[f"drop{index}"] = dropout_cls(dropout)
        super().__init__(layers)
        self.sizes = list(sizes)
        self.activation = activation
        self.output_activation = output_activation

    @property
    def backend(self) -> Backend:
        """``"manual"`` when any layer uses a handwritten backward, else ``"autograd"``."""
        return "manual" if any(is_handwritten(m) for m in self.modules()) else "autograd"


class LeNet5(nn.Sequential):
    """LeNet-5 (LeCun et al. 1998) for 28 × 28 MNIST digits, from either backend.

    ``conv1`` 6@5×5 with padding 2 (the paper's 32 × 32 input: its digits sit in a 28 × 28
    field centred in a 32 × 32 image), ``act1``, ``pool1`` 2×2, ``conv2`` 16@5×5, ``act2``,
    ``pool2`` 2×2, ``flatten`` (16·5·5 = 400), ``fc1`` 400→120, ``act3``, ``fc2`` 120→84,
    ``act4``, ``fc3`` 84→``num_classes``: 61,706 parameters for 10 classes.

    Where the paper differs (its C3 takes 10 of the 16 × 6 channel pairs, its subsampling
    layers scale and shift each channel before a scaled tanh, its output is a layer of RBF
    units), this net uses the modern defaults: every channel pair, ``activation="relu"`` and
    ``pooling="max"``, logits for a softmax cross-entropy. ``activation="tanh"`` with
    ``pooling="avg"`` is the paper's shape without the trainable subsampling coefficients.

    Args:
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        pooling: ``"max"`` or ``"avg"``.
        backend: ``"manual"`` (handwritten backward) or ``"autograd"`` (``torch.nn``).
        num_classes: outputs of ``fc3``.

    Shape: input ``(N, 1, 28, 28)``, output ``(N, num_classes)``.

    Built with the same random state, the two backends hold identical weights.
    """

    def __init__(
        self,
        activation: Activation = "relu",
        pooling: Literal["max", "avg"] = "max",
        backend: Backend = "manual",
        num_classes: int = 10,
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"LeNet5: activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}"
            )
        if pooling not in ("max", "avg"):
            raise ValueError(f"LeNet5: pooling must be 'max' or 'avg', got {pooling!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"LeNet5: backend must be one of {_BACKENDS}, got {backend!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"LeNet5: num_classes must be a positive int, got {num_classes!r}")
        manual = backend == "manual"
        conv = Conv2d if manual else nn.Conv2d
        linear = Linear if manual else nn.Linear
        pool = {"max": (MaxPool2d, nn.MaxPool2d), "avg": (AvgPool2d, nn.AvgPool2d)}[pooling]
        pool_cls = pool[0 if manual else 1]
        act_cls = _ACTIVATIONS[activation][0 if manual else 1]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv1"] = conv(1, 6, kernel_size=5, padding=2)  # (N, 6, 28, 28)
        layers["act1"] = act_cls()
        layers["pool1"] = pool_cls(2)  # (N, 6, 14, 14)
        layers["conv2"] = conv(6, 16, kernel_size=5)  # (N, 16, 10, 10)
        layers["act2"] = act_cls()
        layers["pool2"] = pool_cls(2)  # (N, 16, 5, 5)
        layers["flatten"] = Flatten()  # (N, 400)
        layers["fc1"] = linear(400, 120)
        layers["act3"] = act_cls()
        layers["fc2"] = linear(120, 84)
        layers["act4"] = act_cls()
        layers["fc3"] = linear(84, num_classes)
        super().__init__(layers)
        self.activation = activation
        self.pooling = pooling
        self.num_classes = num_classes

"""Finite-difference checks of every handwritten Function, first and second order.

``torch.autograd.gradcheck`` compares each analytic gradient with central differences in
float64; ``gradgradcheck`` does the same for the gradient of the backward (double backward).
``check_batched_grad=True`` also runs the backward under ``torch.func.vmap``, which the
Functions support through ``generate_vmap_rule = True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from broken_functions import SigmoidMissingFactor
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.gradcheck import GradcheckError

import manualbp.functional as MF


@dataclass(frozen=True)
class GradcheckCase:
    """A function of float64 tensors and a factory for its (seeded) inputs."""

    id: str
    function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    make_inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]


def _randn(*shape: int, gen: torch.Generator, grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(grad)


def _away_from_zero(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Values with |x| >= 0.1, so finite differences never straddle ReLU's kink."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.sign() * (x.abs() + 0.1)).requires_grad_()


TARGET = torch.tensor([0, 3, 1, 4, 2])
TARGET_SOME_IGNORED = torch.tensor([0, -100, 1, 4, -100])
TARGET_CUSTOM_IGNORED = torch.tensor([0, 3, 1, 3, 2])  # ignore_index=3, a valid class


def _cross_entropy(target: torch.Tensor, reduction: str, ignore_index: int = -100):
    def loss(logits: torch.Tensor) -> torch.Tensor:
        return MF.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index)

    return loss


def _cross_entropy_with(target: torch.Tensor, **options):
    """The loss of logits only (class targets, and whatever fixed ``options``)."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return MF.cross_entropy(logits, target, **options)

    return loss


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0, 1.5], dtype=torch.float64)
TARGET_3D = torch.tensor([[0, 5, 1], [-100, 2, 4]])  # for (2, 6, 3) logits
TARGET_4D = torch.tensor([[[0, 5], [1, 3]], [[2, -100], [4, 4]]])  # for (2, 6, 2, 2) logits


def _probabilities(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Class probabilities along dim 1 (dim 0 for a 1-D shape), a differentiable leaf."""
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    return logits.softmax(1 if len(shape) > 1 else 0).requires_grad_()


def _soft_cross_entropy(reduction: str, label_smoothing: float = 0.0):
    """Loss of (logits, probabilities, class weights): every input differentiated."""

    def loss(logits, probabilities, weight):
        return MF.cross_entropy(
            logits, probabilities, weight, reduction=reduction, label_smoothing=label_smoothing
        )

    return loss


def _quiet(function):
    """``function`` without mse_loss's warning about a target of another (broadcast) shape."""

    def quiet(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return function(*args)

    return quiet


def _cross_entropy_both_outputs(target: torch.Tensor, reduction: str):
    """The Function itself: loss and log-probabilities, so their gradients are summed."""

    def both(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MF.CrossEntropyFunction.apply(logits, target, None, reduction, -100, 0.0)

    return both


def _smoothed_cross_entropy_both_outputs(target: torch.Tensor, reduction: str):
    def both(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MF.CrossEntropyFunction.apply(logits, target, CLASS_WEIGHT, reduction, -100, 0.3)

    return both


def _soft_cross_entropy_both_outputs(reduction: str):
    def both(logits, probabilities):
        return MF.SoftCrossEntropyFunction.apply(logits, probabilities, None, reduction, 0.2)

    return both


GRADCHECK_CASES: list[GradcheckCase] = [
    GradcheckCase(
        "linear-2d",
        MF.linear,
        lambda g: (_randn(4, 3, gen=g), _randn(5, 3, gen=g), _randn(5, gen=g)),
    ),
    GradcheckCase(
        "linear-3d-input",
        MF.linear,
        lambda g: (_randn(2, 4, 3, gen=g), _randn(5, 3, gen=g), _randn(5, gen=g)),
    ),
    GradcheckCase(
        "linear-1d-input",
        MF.linear,
        lambda g: (_randn(3, gen=g), _randn(5, 3, gen=g), _randn(5, gen=g)),
    ),
    GradcheckCase(
        "linear-no-bias",
        lambda x, w: MF.linear(x, w),
        lambda g: (_randn(2, 4, 3, gen=g), _randn(5, 3, gen=g)),
    ),
    GradcheckCase(
        "linear-transposed-input",
        lambda x, w, b: MF.linear(x.t(), w, b),
        lambda g: (_randn(3, 4, gen=g), _randn(5, 3, gen=g), _randn(5, gen=g)),
    ),
    GradcheckCase(
        "linear-frozen-weight",
        lambda x, b: MF.linear(x, torch.linspace(-1, 1, 15, dtype=torch.float64).view(5, 3), b),
        lambda g: (_randn(4, 3, gen=g), _randn(5, gen=g)),
    ),
    GradcheckCase("sigmoid", MF.sigmoid, lambda g: (_randn(3, 4, gen=g),)),
    GradcheckCase("tanh", MF.tanh, lambda g: (_randn(3, 4, gen=g),)),
    GradcheckCase("relu", MF.relu, lambda g: (_away_from_zero(3, 4, gen=g),)),
    GradcheckCase("ce-mean", _cross_entropy(TARGET, "mean"), lambda g: (_randn(5, 6, gen=g),)),
    GradcheckCase("ce-sum", _cross_entropy(TARGET, "sum"), lambda g: (_randn(5, 6, gen=g),)),
    GradcheckCase("ce-none", _cross_entropy(TARGET, "none"), lambda g: (_randn(5, 6, gen=g),)),
    GradcheckCase(
        "ce-ignore-mean",
        _cross_entropy(TARGET_SOME_IGNORED, "mean"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-ignore-sum",
        _cross_entropy(TARGET_SOME_IGNORED, "sum"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-ignore-none",
        _cross_entropy(TARGET_SOME_IGNORED, "none"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-custom-ignore-index",
        _cross_entropy(TARGET_CUSTOM_IGNORED, "mean", ignore_index=3),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-function-loss-and-log-probs-mean",
        _cross_entropy_both_outputs(TARGET_SOME_IGNORED, "mean"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-function-loss-and-log-probs-none",
        _cross_entropy_both_outputs(TARGET, "none"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    # class weights, label smoothing, K-dimensional and unbatched input
    *(
        GradcheckCase(
            f"ce-{name}-{reduction}",
            _cross_entropy_with(target, reduction=reduction, **options),
            lambda g, shape=shape: (_randn(*shape, gen=g),),
        )
        for reduction in ("mean", "sum", "none")
        for name, target, shape, options in [
            ("weight", TARGET, (5, 6), {"weight": CLASS_WEIGHT}),
            ("weight-ignore", TARGET_SOME_IGNORED, (5, 6), {"weight": CLASS_WEIGHT}),
            ("smoothing", TARGET, (5, 6), {"label_smoothing": 0.2}),
            ("smoothing-ignore", TARGET_SOME_IGNORED, (5, 6), {"label_smoothing": 0.2}),
            (
                "weight-smoothing-ignore",
                TARGET_SOME_IGNORED,
                (5, 6),
                {"weight": CLASS_WEIGHT, "label_smoothing": 0.35},
            ),
            ("3d", TARGET_3D, (2, 6, 3), {}),
            (
                "4d-weight-smoothing",
                TARGET_4D,
                (2, 6, 2, 2),
                {"weight": CLASS_WEIGHT, "label_smoothing": 0.1},
            ),
            ("unbatched", torch.tensor(4), (6,), {}),
            (
                "unbatched-weight-smoothing",
                torch.tensor(2),
                (6,),
                {"weight": CLASS_WEIGHT, "label_smoothing": 0.5},
            ),
        ]
    ),
    *(
        GradcheckCase(
            f"ce-probabilities-{name}-{reduction}",
            _soft_cross_entropy(reduction, label_smoothing),
            lambda g, shape=shape: (
                _randn(*shape, gen=g),
                _probabilities(*shape, gen=g),
                CLASS_WEIGHT.clone().requires_grad_(),
            ),
        )
        for reduction in ("mean", "sum", "none")
        for name, shape, label_smoothing in [
            ("2d", (4, 6), 0.0),
            ("2d-smoothing", (4, 6), 0.25),
            ("3d-smoothing", (2, 6, 3), 0.25),
            ("unbatched", (6,), 0.0),
        ]
    ),
    GradcheckCase(
        "ce-function-smoothing-loss-and-log-probs-mean",
        _smoothed_cross_entropy_both_outputs(TARGET_SOME_IGNORED, "mean"),
        lambda g: (_randn(5, 6, gen=g),),
    ),
    GradcheckCase(
        "ce-function-probabilities-loss-and-log-probs-none",
        _soft_cross_entropy_both_outputs("none"),
        lambda g: (_randn(5, 6, gen=g), _probabilities(5, 6, gen=g)),
    ),
    GradcheckCase(
        "relu-inplace",
        lambda x: MF.relu(x.clone(), inplace=True),
        lambda g: (_away_from_zero(3, 4, gen=g),),
    ),
    *(
        GradcheckCase(
            f"mse-{reduction}",
            lambda x, y, reduction=reduction: MF.mse_loss(x, y, reduction=reduction),
            lambda g: (_randn(3, 4, gen=g), _randn(3, 4, gen=g, grad=False)),
        )
        for reduction in ("mean", "sum", "none")
    ),
    *(
        GradcheckCase(
            f"mse-{reduction}-target-grad",
            lambda x, y, reduction=reduction: MF.mse_loss(x, y, reduction=reduction),
            lambda g: (_randn(2, 3, 2, gen=g), _randn(2, 3, 2, gen=g)),
        )
        for reduction in ("mean", "sum", "none")
    ),
    *(
        GradcheckCase(
            f"mse-{reduction}-broadcast-{name}",
            _quiet(lambda x, y, reduction=reduction: MF.mse_loss(x, y, reduction=reduction)),
            lambda g, shapes=shapes: tuple(_randn(*shape, gen=g) for shape in shapes),
        )
        for reduction in ("mean", "sum", "none")
        for name, shapes in [("target", [(3, 4), (4,)]), ("input", [(3, 1), (2, 3, 4)])]
    ),
    *(
        GradcheckCase(
            f"mse-{reduction}-weighted",
            _quiet(
                lambda x, y, w, reduction=reduction: MF.mse_loss(
                    x, y, reduction=reduction, weight=w
                )
            ),
            lambda g: (_randn(3, 4, gen=g), _randn(4, gen=g), _randn(3, 4, gen=g)),
        )
        for reduction in ("mean", "sum", "none")
    ),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda case: case.id)
def test_gradcheck(case: GradcheckCase) -> None:
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    assert gradcheck(case.function, inputs, check_batched_grad=True)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda case: case.id)
def test_gradgradcheck(case: GradcheckCase) -> None:
    inputs = case.make_inputs(torch.Generator().manual_seed(0))
    assert gradgradcheck(case.function, inputs, check_batched_grad=True)


def test_gradcheck_catches_a_wrong_backward() -> None:
    """The check can fail: a sigmoid whose backward forgets ``(1 - y)`` is rejected."""

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        gradcheck(SigmoidMissingFactor.apply, (x,))

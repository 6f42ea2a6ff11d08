"""Finite-difference checks of every handwritten Function, first and second order.

``torch.autograd.gradcheck`` compares each analytic gradient with central differences in
float64; ``gradgradcheck`` does the same for the gradient of the backward (double backward).
``check_batched_grad=True`` also runs the backward under ``torch.func.vmap``, which the
Functions support through ``generate_vmap_rule = True``.
"""

from __future__ import annotations

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


def _cross_entropy_both_outputs(target: torch.Tensor, reduction: str):
    """The Function itself: loss and log-probabilities, so their gradients are summed."""

    def both(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MF.CrossEntropyFunction.apply(logits, target, reduction, -100)

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

"""Finite differences, first and second order, of every case in ``layer_cases.LAYER_CASES``.

``gradcheck`` compares each handwritten gradient with central differences in float64;
``gradgradcheck`` does the same for the gradient of the backward (double backward, which goes
through the returned statistics of batch and layer norm). ``check_batched_grad=True`` also
runs each backward under ``torch.func.vmap`` (the Functions' ``generate_vmap_rule``). Pooling
inputs are spread apart so that no finite difference changes a window's maximum; dropout
draws its mask from the same seed at every evaluation. Cases with more than
:data:`FULL_JACOBIAN_LIMIT` input and output entries are checked in ``fast_mode`` (random
projections of the Jacobian, as torch's own OpInfo tests do), the others entry by entry.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import LAYER_CASES, LayerCase
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.gradcheck import GradcheckError

import manualbp.functional as MF

FULL_JACOBIAN_LIMIT = 400


def _function_and_inputs(case: LayerCase):
    """The case's function of float64 inputs, its arguments, and whether to use fast mode."""
    args = case.args(torch.float64)

    def function(*inputs):
        return case.call(case.manual, *inputs)

    entries = sum(a.numel() for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
    entries += function(*args).numel()
    return function, args, entries > FULL_JACOBIAN_LIMIT


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.id)
def test_gradcheck(case: LayerCase) -> None:
    function, args, fast = _function_and_inputs(case)
    assert gradcheck(function, args, check_batched_grad=True, fast_mode=fast)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.id)
def test_gradgradcheck(case: LayerCase) -> None:
    function, args, fast = _function_and_inputs(case)
    assert gradgradcheck(function, args, check_batched_grad=True, fast_mode=fast)


def test_gradgradcheck_needs_the_statistics_as_outputs() -> None:
    """Batch norm's backward reads the batch mean and σ⁻¹ the forward returned; were they
    kept as constants, the second derivative would miss how they move with x. The Function
    returns them, so both are differentiated: the check of the loss through all three
    outputs passes, and so does a loss of the statistics alone."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def all_outputs(x):
        return MF.BatchNormFunction.apply(x, None, None, None, None, True, 0.1, 1e-5)

    def statistics_only(x):
        return all_outputs(x)[1:]

    assert gradcheck(all_outputs, (x,))
    assert gradgradcheck(all_outputs, (x,))
    assert gradcheck(statistics_only, (x,))
    assert gradgradcheck(statistics_only, (x,))


def test_gradcheck_catches_a_wrong_convolution_backward(monkeypatch) -> None:
    """The check can fail: a weight gradient taken with the kernel's rows in the wrong
    order is rejected."""
    original = MF._conv2d_weight_grad
    monkeypatch.setattr(
        MF, "_conv2d_weight_grad", lambda *args: original(*args).flip(-2).contiguous()
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        gradcheck(MF.conv2d, (x, w))

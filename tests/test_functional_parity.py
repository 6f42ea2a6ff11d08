"""Every handwritten Function against its torch reference: forward and all input gradients.

The cases live in ``helpers.PARITY_CASES``; the comparison in ``helpers.assert_parity``.
Cases marked ``exact_on_cpu`` must match torch bit for bit, the others (cross-entropy)
within the float32/float64 tolerances of ``helpers.TOLERANCES``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from broken_functions import SigmoidMissingFactor
from torch.autograd import Function

import manualbp.functional as MF
from manualbp.tools.parity import (
    PARITY_CASES,
    PARITY_DTYPES,
    ParityCase,
    assert_parity,
    format_report,
    leaf_copy,
    parity_report,
    run_case,
)


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=str)
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda case: case.id)
def test_matches_torch(case: ParityCase, dtype: torch.dtype) -> None:
    run_case(case, dtype, "cpu", exact=case.exact_on_cpu)


def test_registry_ids_are_unique() -> None:
    ids = [case.id for case in PARITY_CASES]
    assert len(ids) == len(set(ids))


def test_parity_report_prints_every_case() -> None:
    """The bit-exactness table (``pytest -s`` shows it) covers every case, dtype and
    gradient, and agrees with the registry's exactness claims."""
    rows = parity_report()
    print("\n" + format_report(rows))
    exact_cases = {case.id for case in PARITY_CASES if case.exact_on_cpu}
    assert {row.case for row in rows} == {case.id for case in PARITY_CASES}
    assert all(row.exact for row in rows if row.case in exact_cases)
    assert any(not row.exact for row in rows)  # cross-entropy: torch sums in its own order
    for case in PARITY_CASES:  # an output row, and one row per differentiated tensor
        args = case.args(torch.float32)
        wanted = 1 + sum(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        assert sum(row.case == case.id and row.dtype == torch.float32 for row in rows) == wanted


# --- needs_input_grad and saved tensors -------------------------------------------------


def test_linear_frozen_weight_saves_no_input_and_computes_no_weight_grad() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(5, 3)  # frozen
    bias = torch.randn(5, requires_grad=True)
    out = MF.linear(x, weight, bias)

    saved_input, saved_weight = out.grad_fn.saved_tensors
    assert saved_input is None  # x is only needed for dL/dW
    assert saved_weight is not None
    assert out.grad_fn.needs_input_grad == (True, False, True)
    grad_input, grad_weight, grad_bias = out.grad_fn.apply(torch.ones(4, 5))
    assert grad_weight is None
    assert grad_input is not None and grad_bias is not None

    out.sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(bias.grad, torch.full((5,), 4.0))


def test_linear_frozen_input_saves_no_weight_and_computes_no_input_grad() -> None:
    x = torch.randn(4, 3)  # data, not a parameter
    weight = torch.randn(5, 3, requires_grad=True)
    out = MF.linear(x, weight, None)

    saved_input, saved_weight = out.grad_fn.saved_tensors
    assert saved_weight is None  # W is only needed for dL/dx
    assert saved_input is not None
    grad_input, grad_weight, grad_bias = out.grad_fn.apply(torch.ones(4, 5))
    assert grad_input is None and grad_bias is None
    torch.testing.assert_close(grad_weight, torch.ones(4, 5).t() @ x)


def test_activations_save_only_their_output() -> None:
    x = torch.randn(6, requires_grad=True)
    for function in (MF.sigmoid, MF.tanh, MF.relu):
        out = function(x)
        (saved,) = out.grad_fn.saved_tensors
        assert torch.equal(saved, out), function.__name__


def test_mse_target_without_grad_gets_none() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4)
    out = MF.mse_loss(x, y)
    grad_input, grad_target, grad_reduction = out.grad_fn.apply(torch.tensor(1.0))
    assert grad_target is None and grad_reduction is None
    torch.testing.assert_close(grad_input, 2 * (x - y) / x.numel())


def test_cross_entropy_returns_no_gradient_for_target_or_options() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 2])
    loss = MF.cross_entropy(x, target)
    node = loss.grad_fn
    assert type(node).__name__ == "CrossEntropyFunctionBackward"
    returned = node.apply(torch.tensor(1.0), None)  # no gradient for the log_probs output
    assert returned[1:] == (None,) * 5  # target, weight, reduction, ignore_index, smoothing
    assert returned[0].shape == x.shape


# --- cross-entropy edge cases -----------------------------------------------------------


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_extreme_logits_are_finite(dtype: torch.dtype, reduction: str) -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    logits.requires_grad_()
    target = torch.tensor([1, 2, 0])  # the first and third rows pick a hopeless class
    loss = MF.cross_entropy(logits, target, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    expected = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(loss, expected)


def test_cross_entropy_all_ignored_mean_is_nan_with_zero_grad_like_torch() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3,), -100)
    loss = MF.cross_entropy(logits, target)
    expected = F.cross_entropy(logits, target)
    assert loss.isnan() and expected.isnan()
    (grad,) = torch.autograd.grad(loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert torch.equal(grad, torch.zeros(3, 4)) and torch.equal(expected_grad, grad)


def test_cross_entropy_ignored_rows_get_zero_gradient() -> None:
    logits = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([1, -100, 3, -100, 0])
    MF.cross_entropy(logits, target, reduction="sum").backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 4))
    assert (logits.grad[[0, 2, 4]] != 0).all()


def test_cross_entropy_accepts_uint8_targets_like_torch() -> None:
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 2, 1, 2], dtype=torch.uint8)
    torch.testing.assert_close(
        MF.cross_entropy(logits, target), F.cross_entropy(logits, target.long())
    )


# --- the helper must catch a wrong backward ---------------------------------------------


class _SigmoidOneUlpOff(SigmoidMissingFactor):
    """A sigmoid whose backward is right up to one ulp per element."""

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        exact = grad_output * (1 - output) * output
        return torch.nextafter(exact, torch.full_like(exact, float("inf")))


class _MSEWrongTargetSign(Function):
    """A broken MSE: the target gradient has the input gradient's sign."""

    @staticmethod
    def forward(input, target):
        return ((input - target) ** 2).mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        input, target = ctx.saved_tensors
        grad = 2 * (input - target) / input.numel() * grad_output
        return grad, grad


def test_helper_catches_a_missing_factor() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(AssertionError, match="grad"):
        assert_parity(SigmoidMissingFactor.apply, torch.sigmoid, (x,), exact=False)


def test_helper_catches_one_ulp_when_exactness_is_claimed() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    rows = assert_parity(_SigmoidOneUlpOff.apply, torch.sigmoid, (x,), exact=False)
    assert [row.exact for row in rows] == [True, False]
    assert rows[1].max_ulp == pytest.approx(1.0, abs=0.5)
    with pytest.raises(AssertionError, match="expected bit-exact"):
        assert_parity(_SigmoidOneUlpOff.apply, torch.sigmoid, (x,), exact=True)


def test_helper_checks_every_input_gradient() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.randn(5, 4, requires_grad=True)
    assert_parity(_MSEWrongTargetSign.apply, F.mse_loss, (x, y.detach()), exact=False)
    with pytest.raises(AssertionError, match=r"grad\[1\]"):
        assert_parity(_MSEWrongTargetSign.apply, F.mse_loss, (x, y), exact=False)


def test_helper_catches_a_wrong_output_dtype() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(AssertionError, match="float64"):
        assert_parity(lambda t: torch.sigmoid(t).double(), torch.sigmoid, (x,), exact=False)


def test_leaf_copy_keeps_values_strides_and_grad_flag() -> None:
    base = torch.randn(4, 10)
    view = base[:, ::2].detach().requires_grad_()
    copy = leaf_copy(view)
    assert copy.is_leaf and copy.requires_grad
    assert copy.stride() == view.stride() and not copy.is_contiguous()
    assert torch.equal(copy, view)
    assert copy.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()

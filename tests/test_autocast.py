"""Mixed precision on CPU: ``torch.autocast`` and half-precision inputs without it.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` each handwritten op must give the
builtin op's output dtype (linear → bfloat16, cross-entropy and MSE → float32, activations
keep their input's dtype) and the same values; the gradients, taken with the backward called
OUTSIDE the autocast region as in a training loop, must have the same dtypes and values.
Without autocast, bfloat16/float16 inputs run through each op as torch's kernels do
(sigmoid/tanh backward computing in float32 "opmath" and rounding once).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import manualbp.functional as MF
from manualbp.nn import MLP, autograd_twin
from manualbp.tools.parity import assert_parity

BF16 = torch.bfloat16


def under_cpu_autocast(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` run inside ``torch.autocast("cpu", bfloat16)``; its backward runs outside."""

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16):
            return function(*args, **kwargs)

    return wrapped


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape) + 7)
    values = torch.randn(shape, generator=generator) * scale
    return values.to(dtype).requires_grad_()


def _weight(num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class weights in [0.5, 1.5), no gradient (torch's class-index loss takes none)."""
    generator = torch.Generator().manual_seed(num_classes)
    return (torch.rand(num_classes, generator=generator) + 0.5).to(dtype)


def _classes(n: int, num_classes: int, *dims: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n + num_classes)
    return torch.randint(0, num_classes, (n, *dims), generator=generator)


def _soft_target(n: int, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Class probabilities (rows summing to 1), a differentiable leaf."""
    generator = torch.Generator().manual_seed(n * num_classes)
    probabilities = torch.randn(n, num_classes, generator=generator).softmax(1)
    return probabilities.to(dtype).requires_grad_()


def _target(n: int, num_classes: int) -> torch.Tensor:
    target = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(n))
    target[1] = -100
    return target


# id, manual op, torch op, args factory (given the floating input dtype), kwargs,
# output dtype under CPU bf16 autocast (None: the input's dtype), bit-exact under autocast
AUTOCAST_CASES = [
    pytest.param(
        MF.linear,
        F.linear,
        lambda dt: (_randn(8, 6, dtype=dt), _randn(5, 6), _randn(5)),
        {},
        BF16,
        True,
        id="linear",
    ),
    pytest.param(
        MF.linear,
        F.linear,
        lambda dt: (_randn(2, 4, 6, dtype=dt), _randn(5, 6), None),
        {},
        BF16,
        True,
        id="linear-3d-no-bias",
    ),
    pytest.param(
        MF.sigmoid,
        torch.sigmoid,
        lambda dt: (_randn(8, 6, dtype=dt, scale=3),),
        {},
        None,
        True,
        id="sigmoid",
    ),
    pytest.param(
        MF.tanh,
        torch.tanh,
        lambda dt: (_randn(8, 6, dtype=dt, scale=3),),
        {},
        None,
        True,
        id="tanh",
    ),
    pytest.param(MF.relu, F.relu, lambda dt: (_randn(8, 6, dtype=dt),), {}, None, True, id="relu"),
    *(
        pytest.param(
            MF.cross_entropy,
            F.cross_entropy,
            lambda dt: (_randn(8, 6, dtype=dt, scale=2), _target(8, 6)),
            {"reduction": reduction},
            torch.float32,
            False,
            id=f"cross_entropy-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
    ),
    *(
        pytest.param(
            MF.cross_entropy,
            F.cross_entropy,
            make_args,
            {"reduction": reduction, **options},
            torch.float32,
            False,
            id=f"cross_entropy-{name}-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
        for name, make_args, options in [
            (
                "weight-smoothing",
                lambda dt: (_randn(8, 6, dtype=dt, scale=2), _target(8, 6), _weight(6, dt)),
                {"label_smoothing": 0.2},
            ),
            (
                "4d",
                lambda dt: (_randn(2, 6, 3, 4, dtype=dt, scale=2), _classes(2, 6, 3, 4)),
                {},
            ),
            (
                "probabilities",
                lambda dt: (
                    _randn(8, 6, dtype=dt, scale=2),
                    _soft_target(8, 6, dt),
                    _weight(6, dt),
                ),
                {"label_smoothing": 0.1},
            ),
        ]
    ),
    pytest.param(
        lambda x: MF.relu(x * 1, inplace=True),
        lambda x: F.relu(x * 1, inplace=True),
        lambda dt: (_randn(8, 6, dtype=dt),),
        {},
        None,
        True,
        id="relu-inplace",
    ),
    *(
        pytest.param(
            MF.mse_loss,
            F.mse_loss,
            make_args,
            {"reduction": reduction, **options},
            out_dtype,
            True,
            id=f"mse-{name}-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
        for name, make_args, options, out_dtype in [
            (
                "broadcast",
                lambda dt: (_randn(8, 6, dtype=dt), _randn(6, dtype=dt)),
                {},
                torch.float32,
            ),
            (
                "weighted",
                lambda dt: (_randn(8, 6, dtype=dt), _randn(8, 6, dtype=dt)),
                {"weight": _randn(8, 6, scale=0.5).detach().abs()},
                torch.float32,  # promoted by the float32 weight, autocast or not
            ),
        ]
    ),
    *(
        pytest.param(
            MF.mse_loss,
            F.mse_loss,
            lambda dt: (_randn(8, 6, dtype=dt), _randn(6, 8, dtype=dt).t()),
            {"reduction": reduction},
            torch.float32,
            True,
            id=f"mse-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
    ),
]


@pytest.mark.parametrize("input_dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("manual, reference, make_args, kwargs, out_dtype, exact", AUTOCAST_CASES)
def test_cpu_autocast_matches_builtin(
    manual: Callable,
    reference: Callable,
    make_args: Callable,
    kwargs: dict,
    out_dtype: torch.dtype | None,
    exact: bool,
    input_dtype: torch.dtype,
) -> None:
    args = make_args(input_dtype)
    rows = assert_parity(
        under_cpu_autocast(manual), under_cpu_autocast(reference), args, kwargs, exact=exact
    )
    # assert_parity already failed on any dtype difference; pin the dtype torch documents too
    expected_dtype = out_dtype or input_dtype
    output = under_cpu_autocast(manual)(*args, **kwargs)
    assert output.dtype == expected_dtype
    assert rows[0].dtype == expected_dtype
    grads = torch.autograd.grad(output.float().sum(), [a for a in args if _differentiable(a)])
    for arg, grad in zip([a for a in args if _differentiable(a)], grads, strict=True):
        assert grad.dtype == arg.dtype  # gradients come back in each leaf's own dtype


def _differentiable(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_cpu_autocast_mlp_step_matches_autograd_twin(activation: str) -> None:
    """A whole training step under autocast: bf16 matmuls, float32 loss, float32 grads."""
    torch.manual_seed(0)
    model = MLP([12, 16, 5], activation=activation, backend="manual")
    twin = autograd_twin(model)
    x = torch.randn(10, 12)
    target = torch.randint(0, 5, (10,))

    with torch.autocast("cpu", dtype=BF16):
        manual_loss = MF.cross_entropy(model(x), target)
        torch_loss = F.cross_entropy(twin(x), target)
    manual_loss.backward()
    torch_loss.backward()

    assert manual_loss.dtype == torch_loss.dtype == torch.float32
    torch.testing.assert_close(manual_loss, torch_loss, rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        # cross-entropy's float32 ulps pass through bf16 roundings: bf16 tolerance
        torch.testing.assert_close(p.grad, q.grad, rtol=1.6e-2, atol=1e-4, msg=name)


def test_cpu_autocast_backward_inside_region_gives_same_grads() -> None:
    """Calling backward inside or outside the region makes no difference to linear."""
    x, w, b = _randn(8, 6), _randn(5, 6), _randn(5)
    upstream = torch.randn(8, 5).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        inside = torch.autograd.grad(MF.linear(x, w, b), (x, w, b), upstream)
        out = MF.linear(x, w, b)
    outside = torch.autograd.grad(out, (x, w, b), upstream)
    for a, b_ in zip(inside, outside, strict=True):
        assert torch.equal(a, b_)


# --- half-precision inputs without autocast ---------------------------------------------

HALF_DTYPES = [BF16, torch.float16]


def _half_cases(dtype: torch.dtype) -> list[tuple[str, Callable, Callable, tuple, dict, bool]]:
    """(id, manual, reference, args, kwargs, bit-exact) for ``dtype`` inputs on CPU."""

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return _randn(*shape, dtype=dtype, scale=scale)

    # torch's CPU sigmoid_backward computes float16 in float16 (each op rounded) but bfloat16
    # in float32; manualbp uses float32 for both, so float16 sigmoid is within 1 ulp only.
    sigmoid_exact = dtype == BF16
    return [
        ("linear", MF.linear, F.linear, (r(8, 6), r(5, 6), r(5)), {}, True),
        ("linear-3d", MF.linear, F.linear, (r(2, 4, 6), r(5, 6), None), {}, True),
        ("sigmoid", MF.sigmoid, torch.sigmoid, (r(64, scale=3),), {}, sigmoid_exact),
        ("tanh", MF.tanh, torch.tanh, (r(64, scale=3),), {}, True),
        ("relu", MF.relu, F.relu, (r(64),), {}, True),
        ("cross_entropy", MF.cross_entropy, F.cross_entropy, (r(8, 6), _target(8, 6)), {}, False),
        (
            "cross_entropy-weight-smoothing",
            MF.cross_entropy,
            F.cross_entropy,
            (r(8, 6), _target(8, 6), _weight(6, dtype)),
            {"label_smoothing": 0.2},
            False,
        ),
        (
            "cross_entropy-probabilities",
            MF.cross_entropy,
            F.cross_entropy,
            (r(8, 6), _soft_target(8, 6, dtype), _weight(6, dtype)),
            {"label_smoothing": 0.1},
            False,
        ),
        ("relu-inplace", _relu_in_place(MF.relu), _relu_in_place(F.relu), (r(64),), {}, True),
        # torch rounds mse's 2/numel to the half dtype before multiplying; manualbp does too.
        ("mse-mean", MF.mse_loss, F.mse_loss, (r(8, 6), r(8, 6)), {}, True),
        ("mse-sum", MF.mse_loss, F.mse_loss, (r(8, 6), r(8, 6)), {"reduction": "sum"}, True),
        ("mse-none", MF.mse_loss, F.mse_loss, (r(8, 6), r(8, 6)), {"reduction": "none"}, True),
    ]


def _relu_in_place(relu: Callable) -> Callable:
    """``relu(..., inplace=True)`` of a non-leaf copy (an in-place op on a leaf that requires
    grad is an error)."""
    return lambda x: relu(x.clone(), inplace=True)


def _cross_entropy_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """A couple of ulps at the gradient's scale (1/N = 1/8): torch rounds the nll gradient
    ``-g/N`` to the half dtype before the log-softmax backward, manualbp rounds once."""
    eps = torch.finfo(dtype).eps
    return {"rtol": eps, "atol": eps / 8}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_inputs_match_builtin(dtype: torch.dtype) -> None:
    for case, manual, reference, args, kwargs, exact in _half_cases(dtype):
        tolerance = _cross_entropy_tolerance(dtype) if case.startswith("cross_entropy") else None
        rows = assert_parity(
            manual, reference, args, kwargs, exact=exact, case=case, tolerance=tolerance
        )
        assert all(row.dtype == dtype for row in rows), case


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_precision_cross_entropy_is_at_least_as_accurate_as_torch(
    dtype: torch.dtype, reduction: str
) -> None:
    """Against a float64 ground truth on the same half-precision inputs, manualbp's loss and
    gradient are never further off than torch's (it rounds once, torch twice)."""
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, 10, generator=generator) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, 10, (64,), generator=generator)
    shape = (64,) if reduction == "none" else ()
    upstream = torch.randn(shape, generator=generator).to(dtype)

    def loss_and_grad(function: Callable, x: torch.Tensor, g: torch.Tensor):
        loss = function(x, target, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, x, g)
        return loss.double(), grad.double()

    truth = loss_and_grad(
        F.cross_entropy, logits.detach().double().requires_grad_(), upstream.double()
    )
    manual = loss_and_grad(MF.cross_entropy, logits, upstream)
    builtin = loss_and_grad(F.cross_entropy, logits, upstream)
    for name, t, m, b in zip(("loss", "grad"), truth, manual, builtin, strict=True):
        manual_error, builtin_error = (m - t).abs().max(), (b - t).abs().max()
        assert manual_error <= builtin_error, f"{name}: {manual_error} > {builtin_error}"


def test_float16_sigmoid_backward_is_within_one_ulp_of_torch() -> None:
    x = _randn(256, dtype=torch.float16, scale=3)
    upstream = torch.randn(256).half()
    (manual,) = torch.autograd.grad(MF.sigmoid(x), x, upstream)
    (expected,) = torch.autograd.grad(torch.sigmoid(x), x, upstream)
    ulp = torch.nextafter(expected.abs(), torch.tensor(float("inf")).half()) - expected.abs()
    assert ((manual - expected).abs() <= ulp).all()


def test_sigmoid_and_tanh_backward_compute_in_float32_for_bfloat16() -> None:
    """The float32 "opmath" rounding: one rounding at the end, not one per multiply."""
    x = _randn(4096, dtype=BF16, scale=3)
    upstream = torch.randn(4096).to(BF16)
    for manual, reference in ((MF.sigmoid, torch.sigmoid), (MF.tanh, torch.tanh)):
        (grad,) = torch.autograd.grad(manual(x), x, upstream)
        y, g = reference(x).detach().float(), upstream.float()
        if manual is MF.sigmoid:
            once = (g * (1 - y) * y).to(BF16)
            per_op = upstream * (1 - reference(x).detach()) * reference(x).detach()
        else:
            once = (g * (1 - y * y)).to(BF16)
            per_op = upstream * (1 - reference(x).detach() ** 2)
        assert torch.equal(grad, once)
        assert not torch.equal(grad, per_op)  # the check can tell the two roundings apart

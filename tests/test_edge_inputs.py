"""Inputs at the edges get torch's answer or a clear error, never a silent third answer.

Complex tensors, zero-sized dimensions, empty losses, NaN inputs, special upstream gradients and
the ``meta`` device, on the CPU and (where there is one) on CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import manualbp.functional as MF
from manualbp.tools.parity import assert_parity

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device(device)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("linear", lambda x: MF.linear(x, torch.randn(5, 3, dtype=x.dtype))),
        ("linear", lambda x: MF.linear(x.real, torch.randn(5, 3, dtype=x.dtype))),
        ("sigmoid", MF.sigmoid),
        ("tanh", MF.tanh),
        ("relu", MF.relu),
    ],
)
def test_complex_tensors_are_refused_by_name(name, call) -> None:
    """Complex gradients need conjugates the real formulas do not take: refused, not wrong."""
    x = torch.randn(4, 3, dtype=torch.complex128, requires_grad=True)
    with pytest.raises(RuntimeError, match=rf"{name}: \w+ has dtype torch.complex128"):
        call(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("input_shape", "weight_shape"),
    [
        ((2, 3, 0), (4, 0)),
        ((2, 3, 5), (0, 5)),
        ((5,), (0, 5)),
        ((0, 5), (4, 5)),
        ((2, 0, 5), (4, 5)),
    ],
    ids=["in=0", "out=0", "1d-out=0", "no-rows", "nd-no-rows"],
)
def test_linear_with_zero_sized_dimensions_matches_torch(device, input_shape, weight_shape) -> None:
    device = _device(device)
    x = torch.randn(input_shape, device=device, requires_grad=True)
    w = torch.randn(weight_shape, device=device, requires_grad=True)
    b = torch.randn(weight_shape[0], device=device, requires_grad=True)
    assert_parity(MF.linear, F.linear, (x, w, b), exact=device.type == "cpu", case="linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss_of_empty_tensors_matches_torch(device, reduction) -> None:
    """torch: NaN for the mean of nothing, 0 for its sum, an empty gradient."""
    device = _device(device)
    x = torch.randn(0, 3, device=device, requires_grad=True)
    y = torch.randn(0, 3, device=device, requires_grad=True)
    assert_parity(MF.mse_loss, F.mse_loss, (x, y), {"reduction": reduction}, exact=True)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_passes_the_gradient_through_a_nan_input_as_torch_does(device) -> None:
    device = _device(device)
    x = torch.tensor([float("nan"), -1.0, 0.0, -0.0, 2.0, float("inf")], device=device)
    x.requires_grad_()
    rows = assert_parity(MF.relu, F.relu, (x,), exact=True, case="relu-nan")
    grad = torch.autograd.grad(MF.relu(x), x, torch.arange(1.0, 7.0, device=device))[0]
    assert grad.tolist() == [1.0, 0.0, 0.0, 0.0, 5.0, 6.0]
    assert all(row.exact for row in rows)


SPECIAL_INPUTS = [
    float("nan"),
    float("-inf"),
    -3.0,
    -1e-40,
    -0.0,
    0.0,
    1e-40,
    0.5,
    3.0,
    float("inf"),
]
SPECIAL_GRADS = [float("nan"), float("-inf"), -2.0, -0.0, 0.0, 1.5, float("inf")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize(
    ("manual", "reference"),
    [(MF.relu, F.relu), (MF.sigmoid, torch.sigmoid), (MF.tanh, torch.tanh)],
    ids=["relu", "sigmoid", "tanh"],
)
def test_activation_gradients_of_special_values_match_torch_bit_for_bit(
    manual, reference, dtype, device
) -> None:
    """Every special input (NaN, ±inf, ±0, subnormals) against every special upstream
    gradient (NaN, ±inf, ±0): the same value and the same sign of zero as torch, bit for bit,
    in every dtype on the CPU and on CUDA, e.g. ReLU
    passes a -0 or inf gradient where y > 0 and gives +0 where y <= 0 whatever the gradient."""
    device = _device(device)
    inputs = torch.tensor(SPECIAL_INPUTS, device=device)
    grads = torch.tensor(SPECIAL_GRADS, device=device)
    x = inputs[:, None].expand(-1, len(grads)).to(dtype).contiguous().requires_grad_()
    g = grads[None, :].expand(len(inputs), -1).to(dtype).contiguous()
    ours = torch.autograd.grad(manual(x), x, g)[0]
    theirs = torch.autograd.grad(reference(x), x, g)[0]
    same_value = (ours == theirs) | (ours.isnan() & theirs.isnan())
    same_sign = (torch.signbit(ours) == torch.signbit(theirs)) | ours.isnan()
    wrong = (~(same_value & same_sign)).nonzero().tolist()
    assert not wrong, [(x[i, j].item(), g[i, j].item(), ours[i, j].item()) for i, j in wrong]


@pytest.mark.parametrize(
    ("manual", "reference", "shapes", "kwargs"),
    [
        (MF.linear, F.linear, [(4, 3), (5, 3), (5,)], {}),
        (MF.sigmoid, torch.sigmoid, [(4, 3)], {}),
        (MF.tanh, torch.tanh, [(4, 3)], {}),
        (MF.relu, F.relu, [(4, 3)], {}),
        (MF.mse_loss, F.mse_loss, [(4, 3), (4, 3)], {}),
        (MF.mse_loss, F.mse_loss, [(4, 3), (4, 3)], {"reduction": "none"}),
    ],
    ids=["linear", "sigmoid", "tanh", "relu", "mse", "mse-none"],
)
def test_meta_tensors_get_torchs_shapes_and_dtypes(manual, reference, shapes, kwargs) -> None:
    """On the ``meta`` device (shapes without data) forward and backward run as torch's do."""
    inputs = [torch.randn(s, device="meta", requires_grad=True) for s in shapes]
    for function in (manual, reference):
        out = function(*inputs, **kwargs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        assert out.device.type == "meta"
        assert [(g.shape, g.dtype, g.device.type) for g in grads] == [
            (x.shape, x.dtype, "meta") for x in inputs
        ]


def test_meta_cross_entropy_matches_torch() -> None:
    logits = torch.randn(4, 3, device="meta", requires_grad=True)
    target = torch.zeros(4, dtype=torch.long, device="meta")
    for function in (MF.cross_entropy, F.cross_entropy):
        (grad,) = torch.autograd.grad(function(logits, target), logits)
        assert (grad.shape, grad.dtype, grad.device.type) == ((4, 3), torch.float32, "meta")

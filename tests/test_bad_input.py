"""Every public entry point rejects bad input with a clear message and torch's error type.

Each case calls a manualbp function with one mistake and checks the exception type and that
the message names the argument and the expected and actual value. Where
``torch.nn.functional`` raises for the same mistake, the same call on torch must raise the
same type, so code that catches torch's errors catches manualbp's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.nn import MLP

X = torch.randn(3, 4)  # (N, C) = (3, 4) logits / (N, in) input
W = torch.randn(5, 4)
CLASSES = torch.tensor([0, 1, 3])


@dataclass(frozen=True)
class BadCall:
    """A call with one mistake, the error it must raise, and torch's equivalent call."""

    id: str
    call: Callable[[], object]
    error: type[Exception]
    match: str
    torch_call: Callable[[], object] | None = None


BAD_CALLS: list[BadCall] = [
    # --- linear
    BadCall(
        "linear-in-features-mismatch",
        lambda: MF.linear(X, torch.randn(5, 3)),
        RuntimeError,
        r"input of shape \(3, 4\) does not match weight of shape \(5, 3\).*\(\*, 3\)",
        lambda: F.linear(X, torch.randn(5, 3)),
    ),
    BadCall(
        "linear-3d-input-mismatch",
        lambda: MF.linear(torch.randn(2, 3, 6), W),
        RuntimeError,
        r"input of shape \(2, 3, 6\).*weight of shape \(5, 4\)",
        lambda: F.linear(torch.randn(2, 3, 6), W),
    ),
    BadCall(
        "linear-0d-input",
        lambda: MF.linear(torch.tensor(1.0), W),
        RuntimeError,
        r"input of shape \(\).*expected input shape \(\*, 4\)",
        lambda: F.linear(torch.tensor(1.0), W),
    ),
    BadCall(
        "linear-bias-shape",
        lambda: MF.linear(X, W, torch.randn(4)),
        RuntimeError,
        r"bias must have shape \(5,\).*weight of shape \(5, 4\), got \(4,\)",
        lambda: F.linear(X, W, torch.randn(4)),
    ),
    BadCall(
        "linear-bias-2d",
        lambda: MF.linear(X, W, torch.randn(1, 5)),
        RuntimeError,
        r"bias must have shape \(5,\).*got \(1, 5\)",
    ),
    BadCall(
        "linear-weight-3d",
        lambda: MF.linear(X, torch.randn(2, 5, 4)),
        RuntimeError,
        r"weight must be 2-D \(out_features, in_features\), got shape \(2, 5, 4\)",
    ),
    BadCall(
        "linear-dtype-mismatch",
        lambda: MF.linear(X.double(), W),
        RuntimeError,
        r"input dtype torch.float64 differs from weight dtype torch.float32",
        lambda: F.linear(X.double(), W),
    ),
    BadCall(
        "linear-input-not-tensor",
        lambda: MF.linear([[1.0, 2.0, 3.0, 4.0]], W),
        TypeError,
        r"linear: input must be a torch.Tensor, got list",
        lambda: F.linear([[1.0, 2.0, 3.0, 4.0]], W),
    ),
    BadCall(
        "linear-weight-not-tensor",
        lambda: MF.linear(X, W.numpy()),
        TypeError,
        r"linear: weight must be a torch.Tensor, got ndarray",
        lambda: F.linear(X, W.numpy()),
    ),
    BadCall(
        "linear-bias-not-tensor",
        lambda: MF.linear(X, W, 0.5),
        TypeError,
        r"linear: bias must be a torch.Tensor, got float",
        lambda: F.linear(X, W, 0.5),
    ),
    # --- activations
    BadCall(
        "sigmoid-not-tensor",
        lambda: MF.sigmoid(1.0),
        TypeError,
        r"sigmoid: input must be a torch.Tensor, got float",
        lambda: torch.sigmoid(1.0),
    ),
    BadCall(
        "tanh-not-tensor",
        lambda: MF.tanh([1.0]),
        TypeError,
        r"tanh: input must be a torch.Tensor, got list",
        lambda: torch.tanh([1.0]),
    ),
    BadCall(
        "relu-not-tensor",
        lambda: MF.relu(None),
        TypeError,
        r"relu: input must be a torch.Tensor, got NoneType",
        lambda: F.relu(None),
    ),
    BadCall(
        "relu-inplace-on-a-leaf-that-requires-grad",
        lambda: MF.relu(X.clone().requires_grad_(), inplace=True),
        RuntimeError,
        r"a leaf Variable that requires grad has been used in an in-place operation",
        lambda: F.relu(X.clone().requires_grad_(), inplace=True),
    ),
    # --- cross-entropy
    BadCall(
        "ce-target-too-large",
        lambda: MF.cross_entropy(X, torch.tensor([0, 4, 1])),
        IndexError,
        r"target\[1\] = 4 is out of bounds; expected class indices in \[0, 4\)",
        lambda: F.cross_entropy(X, torch.tensor([0, 4, 1])),
    ),
    BadCall(
        "ce-target-far-too-large",
        lambda: MF.cross_entropy(X, torch.tensor([0, 1, 1000])),
        IndexError,
        r"target\[2\] = 1000 .*\[0, 4\) or ignore_index=-100",
        lambda: F.cross_entropy(X, torch.tensor([0, 1, 1000])),
    ),
    BadCall(
        "ce-target-negative",
        lambda: MF.cross_entropy(X, torch.tensor([-1, 0, 1])),
        IndexError,
        r"target\[0\] = -1 is out of bounds; expected .*\[0, 4\) or ignore_index=-100",
        lambda: F.cross_entropy(X, torch.tensor([-1, 0, 1])),
    ),
    BadCall(
        "ce-default-ignore-index-not-ignored",
        lambda: MF.cross_entropy(X, torch.tensor([0, -100, 1]), ignore_index=2),
        IndexError,
        r"target\[1\] = -100 .*ignore_index=2",
        lambda: F.cross_entropy(X, torch.tensor([0, -100, 1]), ignore_index=2),
    ),
    BadCall(
        "ce-float-target",
        lambda: MF.cross_entropy(X, torch.tensor([0.0, 1.0, 3.0])),
        RuntimeError,
        r"target must hold int64 class indices of shape \(3,\), got dtype torch.float32 "
        r"\(class-probability targets must have the input's shape \(3, 4\)\)",
        lambda: F.cross_entropy(X, torch.tensor([0.0, 1.0, 3.0])),
    ),
    BadCall(
        "ce-int32-target",
        lambda: MF.cross_entropy(X, CLASSES.int()),
        RuntimeError,
        r"target must hold int64 .*got dtype torch.int32",
        lambda: F.cross_entropy(X, CLASSES.int()),
    ),
    BadCall(
        "ce-batch-mismatch",
        lambda: MF.cross_entropy(X, torch.tensor([0, 1, 1, 2])),
        ValueError,
        r"input batch size \(3\) does not match target batch size \(4\); "
        r"expected target of shape \(3,\)",
        lambda: F.cross_entropy(X, torch.tensor([0, 1, 1, 2])),
    ),
    BadCall(
        "ce-2d-target",
        lambda: MF.cross_entropy(X, CLASSES.unsqueeze(1)),
        RuntimeError,
        r"target must be class indices of shape \(3,\) for input of shape \(3, 4\), "
        r"got shape \(3, 1\)",
        lambda: F.cross_entropy(X, CLASSES.unsqueeze(1)),
    ),
    BadCall(
        "ce-0d-logits",
        lambda: MF.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
        ValueError,
        r"input must have a class dimension, \(C,\), \(N, C\) or \(N, C, d1, ..., dk\) "
        r"logits, got shape \(\)",
    ),
    BadCall(
        "ce-unbatched-logits-1d-target",
        lambda: MF.cross_entropy(torch.randn(4), torch.tensor([1])),
        RuntimeError,
        r"for unbatched input of shape \(4,\) target must be a 0-d class index, got shape \(1,\)",
    ),
    BadCall(
        "ce-unbatched-target-out-of-range",
        lambda: MF.cross_entropy(torch.randn(4), torch.tensor(7)),
        IndexError,
        r"cross_entropy: target = 7 is out of bounds; expected class indices in \[0, 4\)",
        lambda: F.cross_entropy(torch.randn(4), torch.tensor(7)),
    ),
    BadCall(
        "ce-kd-target-shape",
        lambda: MF.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
        RuntimeError,
        r"target must be class indices of shape \(2, 5\) for input of shape \(2, 3, 5\), "
        r"got shape \(2, 4\)",
        lambda: F.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
    ),
    BadCall(
        "ce-kd-batch-mismatch",
        lambda: MF.cross_entropy(torch.randn(2, 3, 5, 5), torch.zeros(3, 5, 5, dtype=torch.long)),
        ValueError,
        r"input batch size \(2\) does not match target batch size \(3\); "
        r"expected target of shape \(2, 5, 5\)",
        lambda: F.cross_entropy(torch.randn(2, 3, 5, 5), torch.zeros(3, 5, 5, dtype=torch.long)),
    ),
    BadCall(
        "ce-kd-target-out-of-range",
        lambda: MF.cross_entropy(torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 1], [2, 0, 3, 1]])),
        IndexError,
        r"target\[1, 2\] = 3 is out of bounds; expected class indices in \[0, 3\)",
        lambda: F.cross_entropy(torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 1], [2, 0, 3, 1]])),
    ),
    BadCall(
        "ce-kd-uint8-target",
        lambda: MF.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.uint8)),
        RuntimeError,
        r"target must hold int64 class indices of shape \(2, 5\), got dtype torch.uint8",
        lambda: F.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.uint8)),
    ),
    BadCall(
        "ce-weight-size",
        lambda: MF.cross_entropy(X, CLASSES, torch.ones(3)),
        RuntimeError,
        r"weight must hold one weight per class, shape \(4,\), got shape \(3,\)",
        lambda: F.cross_entropy(X, CLASSES, torch.ones(3)),
    ),
    BadCall(
        "ce-weight-2d",
        lambda: MF.cross_entropy(X, CLASSES, weight=torch.ones(2, 2)),
        RuntimeError,
        r"weight must hold one weight per class, shape \(4,\), got shape \(2, 2\)",
        lambda: F.cross_entropy(X, CLASSES, weight=torch.ones(2, 2)),
    ),
    BadCall(
        "ce-weight-dtype",
        lambda: MF.cross_entropy(X, CLASSES, weight=torch.ones(4, dtype=torch.float64)),
        RuntimeError,
        r"weight dtype torch.float64 differs from input dtype torch.float32",
        lambda: F.cross_entropy(X, CLASSES, weight=torch.ones(4, dtype=torch.float64)),
    ),
    BadCall(
        "ce-weight-requires-grad",
        lambda: MF.cross_entropy(X, CLASSES, weight=torch.ones(4, requires_grad=True)),
        RuntimeError,
        r"weight requires grad, but the loss of class-index targets is not differentiable "
        r"with respect to the class weights",
        lambda: F.cross_entropy(X, CLASSES, weight=torch.ones(4, requires_grad=True)),
    ),
    BadCall(
        "ce-weight-not-tensor",
        lambda: MF.cross_entropy(X, CLASSES, weight=[1.0, 1.0, 1.0, 1.0]),
        TypeError,
        r"cross_entropy: weight must be a torch.Tensor, got list",
        lambda: F.cross_entropy(X, CLASSES, weight=[1.0, 1.0, 1.0, 1.0]),
    ),
    BadCall(
        "ce-label-smoothing-above-one",
        lambda: MF.cross_entropy(X, CLASSES, label_smoothing=1.5),
        RuntimeError,
        r"label_smoothing must be between 0.0 and 1.0, got 1.5",
        lambda: F.cross_entropy(X, CLASSES, label_smoothing=1.5),
    ),
    BadCall(
        "ce-label-smoothing-not-a-number",
        lambda: MF.cross_entropy(X, CLASSES, label_smoothing="0.1"),
        TypeError,
        r"label_smoothing must be a float, got str",
        lambda: F.cross_entropy(X, CLASSES, label_smoothing="0.1"),
    ),
    BadCall(
        "ce-probability-target-integer",
        lambda: MF.cross_entropy(X, torch.ones(3, 4, dtype=torch.long)),
        RuntimeError,
        r"a target of the input's shape \(3, 4\) holds class probabilities and must be "
        r"floating-point, got dtype torch.int64",
        lambda: F.cross_entropy(X, torch.ones(3, 4, dtype=torch.long)),
    ),
    BadCall(
        "ce-probability-target-ignore-index",
        lambda: MF.cross_entropy(X, X.softmax(1), ignore_index=1),
        RuntimeError,
        r"ignore_index=1 is not supported for class-probability targets",
        lambda: F.cross_entropy(X, X.softmax(1), ignore_index=1),
    ),
    BadCall(
        "ce-probability-target-weight-size",
        lambda: MF.cross_entropy(X, X.softmax(1), torch.ones(5)),
        RuntimeError,
        r"weight must hold one weight per class, shape \(4,\), got shape \(5,\)",
        lambda: F.cross_entropy(X, X.softmax(1), torch.ones(5)),
    ),
    BadCall(
        "ce-integer-logits",
        lambda: MF.cross_entropy(X.long(), CLASSES),
        RuntimeError,
        r"input must be a floating-point tensor, got dtype torch.int64",
    ),
    BadCall(
        "ce-unknown-reduction",
        lambda: MF.cross_entropy(X, CLASSES, reduction="avg"),
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'",
        lambda: F.cross_entropy(X, CLASSES, reduction="avg"),
    ),
    BadCall(
        "ce-float-ignore-index",
        lambda: MF.cross_entropy(X, CLASSES, ignore_index=1.5),
        TypeError,
        r"ignore_index must be an int, got float",
        lambda: F.cross_entropy(X, CLASSES, ignore_index=1.5),
    ),
    BadCall(
        "ce-input-not-tensor",
        lambda: MF.cross_entropy(X.tolist(), CLASSES),
        TypeError,
        r"cross_entropy: input must be a torch.Tensor, got list",
        lambda: F.cross_entropy(X.tolist(), CLASSES),
    ),
    BadCall(
        "ce-target-not-tensor",
        lambda: MF.cross_entropy(X, [0, 1, 3]),
        TypeError,
        r"cross_entropy: target must be a torch.Tensor, got list",
        lambda: F.cross_entropy(X, [0, 1, 3]),
    ),
    # --- MSE
    BadCall(
        "mse-unknown-reduction",
        lambda: MF.mse_loss(X, X, reduction="avg"),
        ValueError,
        r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'",
        lambda: F.mse_loss(X, X, reduction="avg"),
    ),
    BadCall(
        "mse-shape-mismatch",
        lambda: MF.mse_loss(X, torch.randn(4, 3)),
        RuntimeError,
        r"input shape \(3, 4\) and target shape \(4, 3\) cannot broadcast",
        lambda: F.mse_loss(X, torch.randn(4, 3)),
    ),
    BadCall(
        "mse-integer-input",
        lambda: MF.mse_loss(X.long(), X),
        RuntimeError,
        r"input must be a floating-point tensor, got dtype torch.int64",
    ),
    BadCall(
        "mse-weight-shape",
        lambda: MF.mse_loss(X, X, weight=torch.ones(4)),
        ValueError,
        r"weight must have the input's shape \(3, 4\), got \(4,\)",
        lambda: F.mse_loss(X, X, weight=torch.ones(4)),
    ),
    BadCall(
        "mse-weight-not-tensor",
        lambda: MF.mse_loss(X, X, weight=2.0),
        TypeError,
        r"mse_loss: weight must be a torch.Tensor, got float",
    ),
    BadCall(
        "mse-target-not-tensor",
        lambda: MF.mse_loss(X, 1.0),
        TypeError,
        r"mse_loss: target must be a torch.Tensor, got float",
    ),
    # --- modules and the MLP builder
    BadCall(
        "ReLU-inplace-on-a-leaf-that-requires-grad",
        lambda: mnn.ReLU(inplace=True)(X.clone().requires_grad_()),
        RuntimeError,
        r"a leaf Variable that requires grad has been used in an in-place operation",
        lambda: nn.ReLU(inplace=True)(X.clone().requires_grad_()),
    ),
    BadCall(
        "CrossEntropyLoss-reduction",
        lambda: mnn.CrossEntropyLoss(reduction="avg"),
        ValueError,
        r"CrossEntropyLoss: reduction must be one of .*got 'avg'",
    ),
    BadCall(
        "MSELoss-reduction",
        lambda: mnn.MSELoss(reduction=None),
        ValueError,
        r"MSELoss: reduction must be one of .*got None",
    ),
    BadCall(
        "Linear-module-input",
        lambda: mnn.Linear(4, 2)(torch.randn(3, 5)),
        RuntimeError,
        r"input of shape \(3, 5\) does not match weight of shape \(2, 4\)",
        lambda: nn.Linear(4, 2)(torch.randn(3, 5)),
    ),
    BadCall(
        "CrossEntropyLoss-module-target",
        lambda: mnn.CrossEntropyLoss()(X, torch.tensor([0, 9, 1])),
        IndexError,
        r"target\[1\] = 9 is out of bounds",
        lambda: nn.CrossEntropyLoss()(X, torch.tensor([0, 9, 1])),
    ),
    BadCall(
        "CrossEntropyLoss-module-weight-size",
        lambda: mnn.CrossEntropyLoss(torch.ones(5))(X, CLASSES),
        RuntimeError,
        r"weight must hold one weight per class, shape \(4,\), got shape \(5,\)",
        lambda: nn.CrossEntropyLoss(torch.ones(5))(X, CLASSES),
    ),
    BadCall(
        "CrossEntropyLoss-legacy-reduce-beats-reduction",
        lambda: mnn.CrossEntropyLoss(reduce=True, reduction="avg")(X, torch.tensor([0, 9, 1])),
        IndexError,
        r"target\[1\] = 9 is out of bounds",
        lambda: nn.CrossEntropyLoss(reduce=True, reduction="avg")(X, torch.tensor([0, 9, 1])),
    ),
    BadCall("mlp-one-size", lambda: MLP([784]), ValueError, r"sizes must be >= 2 .*got \[784\]"),
    BadCall("mlp-zero-size", lambda: MLP([784, 0, 10]), ValueError, r"got \[784, 0, 10\]"),
    BadCall("mlp-float-size", lambda: MLP([784, 2.5, 10]), ValueError, r"got \[784, 2.5, 10\]"),
    BadCall(
        "mlp-activation",
        lambda: MLP([4, 2], activation="gelu"),
        ValueError,
        r"activation must be one of \('relu', 'sigmoid', 'tanh'\), got 'gelu'",
    ),
    BadCall(
        "mlp-output-activation",
        lambda: MLP([4, 2], output_activation="softmax"),
        ValueError,
        r"output_activation must be one of .*got 'softmax'",
    ),
    BadCall(
        "mlp-backend",
        lambda: MLP([4, 2], backend="jax"),
        ValueError,
        r"backend must be one of \('manual', 'autograd'\), got 'jax'",
    ),
]


@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda bad: bad.id)
def test_bad_input_raises_clear_error(bad: BadCall) -> None:
    with pytest.raises(bad.error, match=bad.match) as raised:
        bad.call()
    assert type(raised.value) is bad.error  # not merely a subclass


@pytest.mark.parametrize(
    "bad", [b for b in BAD_CALLS if b.torch_call is not None], ids=lambda bad: bad.id
)
def test_torch_raises_the_same_error_type(bad: BadCall) -> None:
    with pytest.raises(bad.error):
        bad.torch_call()


def test_every_bad_call_id_is_unique() -> None:
    assert len({bad.id for bad in BAD_CALLS}) == len(BAD_CALLS)


def test_valid_targets_at_the_edges_are_accepted() -> None:
    """The range check is tight: class 0, class C-1 and ignore_index pass."""
    loss = MF.cross_entropy(X, torch.tensor([0, 3, -100]))
    torch.testing.assert_close(loss, F.cross_entropy(X, torch.tensor([0, 3, -100])))
    loss = MF.cross_entropy(X, torch.tensor([0, 7, 3]), ignore_index=7)
    torch.testing.assert_close(loss, F.cross_entropy(X, torch.tensor([0, 7, 3]), ignore_index=7))


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_accepts_mixed_dtypes_under_autocast(input_dtype: torch.dtype) -> None:
    """The dtype check steps aside under autocast, which casts both operands. float64 is
    never cast, so float64 input with float32 weight still fails there, as in torch."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MF.linear(X.to(input_dtype), W)
        expected = F.linear(X.to(input_dtype), W)
        with pytest.raises(RuntimeError):
            MF.linear(X.double(), W)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_messages_name_function_argument_and_values() -> None:
    """One full message, read as a user reads it."""
    with pytest.raises(IndexError) as raised:
        MF.cross_entropy(X, torch.tensor([0, 1, 7]))
    assert str(raised.value) == (
        "cross_entropy: target[2] = 7 is out of bounds; "
        "expected class indices in [0, 4) or ignore_index=-100"
    )
    with pytest.raises(RuntimeError) as raised:
        MF.linear(torch.randn(8, 784), torch.randn(10, 200))
    assert re.fullmatch(
        r"linear: input of shape \(8, 784\) does not match weight of shape \(10, 200\): "
        r"expected input shape \(\*, 200\)",
        str(raised.value),
    )

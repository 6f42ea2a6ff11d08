"""The Functions under PyTorch's transforms: torch.func, double backward, torch.compile.

``generate_vmap_rule = True`` lets ``torch.func.vmap``/``grad`` see through each Function;
backward formulas written in differentiable ops give double backward; and nothing in the
Functions or their input checks may break a ``torch.compile(fullgraph=True)`` trace.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.nn import MLP, autograd_twin

F64 = {"rtol": 1e-12, "atol": 1e-14}

ACTIVATION_PAIRS = [
    pytest.param(MF.sigmoid, torch.sigmoid, id="sigmoid"),
    pytest.param(MF.tanh, torch.tanh, id="tanh"),
    pytest.param(MF.relu, torch.relu, id="relu"),
]


def _tiny_mlp(activation: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP([5, 7, 3], activation=activation, backend="manual").double()


# --- torch.func.vmap / grad -------------------------------------------------------------


@pytest.mark.parametrize("manual, reference", ACTIVATION_PAIRS)
def test_vmap_of_grad_of_activation(manual: Callable, reference: Callable) -> None:
    xs = torch.randn(11, dtype=torch.float64) * 3
    manual_grads = vmap(grad(manual))(xs)
    reference_grads = vmap(grad(reference))(xs)
    torch.testing.assert_close(manual_grads, reference_grads, **F64)


@pytest.mark.parametrize("manual, reference", ACTIVATION_PAIRS)
def test_vmap_of_grad_of_activation_rows(manual: Callable, reference: Callable) -> None:
    rows = torch.randn(4, 6, dtype=torch.float64)
    weights = torch.randn(6, dtype=torch.float64)

    def weighted(function: Callable) -> Callable:
        return lambda row: (function(row) * weights).sum()

    torch.testing.assert_close(
        vmap(grad(weighted(manual)))(rows), vmap(grad(weighted(reference)))(rows), **F64
    )


def test_vmap_of_linear_over_an_ensemble_of_weights() -> None:
    x = torch.randn(4, 6, 3, dtype=torch.float64)  # one batch per ensemble member
    w = torch.randn(4, 5, 3, dtype=torch.float64)
    b = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(vmap(MF.linear)(x, w, b), torch.baddbmm(b[:, None], x, w.mT), **F64)


def test_vmap_of_cross_entropy_over_independent_problems() -> None:
    logits = torch.randn(3, 5, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5))
    target[1, 2] = -100
    expected = torch.stack([F.cross_entropy(x, t) for x, t in zip(logits, target, strict=True)])
    torch.testing.assert_close(vmap(MF.cross_entropy)(logits, target), expected, **F64)
    grads = vmap(grad(MF.cross_entropy))(logits, target)
    expected_grads = vmap(grad(F.cross_entropy))(logits, target)
    torch.testing.assert_close(grads, expected_grads, **F64)


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {"weight": CLASS_WEIGHT},
        {"label_smoothing": 0.2},
        {"weight": CLASS_WEIGHT, "label_smoothing": 0.3},
    ],
    ids=["weight", "smoothing", "weight-smoothing"],
)
def test_vmap_of_kd_cross_entropy_with_options(options: dict, reduction: str) -> None:
    """(N, C, d) logits per problem, class weights, smoothing and ignored targets under vmap,
    where masked_select (torch's smoothing denominator) is impossible."""
    logits = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 2, 5))
    target[0, 1, 2] = target[2, 0, 0] = -100

    def manual(x, t):
        return MF.cross_entropy(x, t, reduction=reduction, **options).sum()

    def builtin(x, t):
        return F.cross_entropy(x, t, reduction=reduction, **options).sum()

    expected = torch.stack([builtin(x, t) for x, t in zip(logits, target, strict=True)])
    torch.testing.assert_close(vmap(manual)(logits, target), expected, **F64)
    expected_grads = torch.stack(
        [torch.func.grad(builtin)(x, t) for x, t in zip(logits, target, strict=True)]
    )
    torch.testing.assert_close(vmap(grad(manual))(logits, target), expected_grads, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_grad_of_probability_targets_wrt_logits_target_and_weight(reduction: str) -> None:
    logits = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    target = torch.randn(3, 2, 4, 5, dtype=torch.float64).softmax(2)

    def loss(function):
        def value(x, t, w):
            return function(x, t, w, reduction=reduction, label_smoothing=0.1).sum()

        return value

    argnums = (0, 1, 2)
    manual = vmap(grad(loss(MF.cross_entropy), argnums), in_dims=(0, 0, None))
    builtin = vmap(grad(loss(F.cross_entropy), argnums), in_dims=(0, 0, None))
    for m, b in zip(
        manual(logits, target, CLASS_WEIGHT), builtin(logits, target, CLASS_WEIGHT), strict=True
    ):
        torch.testing.assert_close(m, b, **F64)


def test_vmap_grad_of_in_place_relu() -> None:
    """In place under torch.func (which cannot mark a Function's input dirty): the same
    Function out of place, copied back."""
    xs = torch.randn(5, 7, dtype=torch.float64)

    def through(relu):
        return lambda x: relu(x * 2, inplace=True).sum()

    torch.testing.assert_close(
        vmap(grad(through(MF.relu)))(xs), vmap(grad(through(F.relu)))(xs), **F64
    )


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_grad_of_broadcast_and_weighted_mse(reduction: str) -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = torch.randn(3, 5, dtype=torch.float64)  # broadcast over each problem's rows
    w = torch.rand(3, 4, 5, dtype=torch.float64)

    def loss(function, weighted):
        def value(x, y, w):
            return function(x, y, reduction=reduction, weight=w if weighted else None).sum()

        return value

    for weighted in (False, True):
        manual = vmap(grad(loss(MF.mse_loss, weighted), (0, 1, 2)))(x, y, w)
        builtin = vmap(grad(loss(F.mse_loss, weighted), (0, 1, 2)))(x, y, w)
        for m, b in zip(manual, builtin, strict=True):
            torch.testing.assert_close(m, b, **F64)


def test_func_grad_of_mse_wrt_input_and_target() -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    y = torch.randn(3, 4, dtype=torch.float64)
    grad_x, grad_y = grad(MF.mse_loss, argnums=(0, 1))(x, y)
    expected_x, expected_y = grad(F.mse_loss, argnums=(0, 1))(x, y)
    torch.testing.assert_close(grad_x, expected_x, **F64)
    torch.testing.assert_close(grad_y, expected_y, **F64)
    torch.testing.assert_close(grad_y, -grad_x, **F64)


def _per_sample_grads(
    model: torch.nn.Module, loss: Callable, x: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``vmap(grad(...))`` over the batch: one gradient per sample and parameter."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(params, sample, sample_target):
        output = functional_call(model, params, (sample.unsqueeze(0),))
        return loss(output, sample_target.unsqueeze(0))

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_per_sample_grads_of_manual_mlp_equal_autograd(activation: str, loss_name: str) -> None:
    model = _tiny_mlp(activation)
    twin = autograd_twin(model)
    x = torch.randn(6, 5, dtype=torch.float64)
    if loss_name == "cross_entropy":
        target, manual_loss, torch_loss = (
            torch.randint(0, 3, (6,)),
            MF.cross_entropy,
            F.cross_entropy,
        )
    else:
        target, manual_loss, torch_loss = (
            torch.randn(6, 3, dtype=torch.float64),
            MF.mse_loss,
            F.mse_loss,
        )

    manual = _per_sample_grads(model, manual_loss, x, target)
    for i in range(x.shape[0]):  # plain autograd, one sample at a time, on the torch.nn twin
        twin.zero_grad()
        torch_loss(twin(x[i : i + 1]), target[i : i + 1]).backward()
        for name, p in twin.named_parameters():
            torch.testing.assert_close(manual[name][i], p.grad, **F64, msg=f"{name}[{i}]")


# --- double backward --------------------------------------------------------------------


def _hessian_vector_product(
    model: torch.nn.Module, loss: torch.Tensor, vector: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
    return torch.autograd.grad(dot, params)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_hessian_vector_product_through_mlp_equals_autograd(
    activation: str, loss_name: str
) -> None:
    model = _tiny_mlp(activation, seed=1)
    twin = autograd_twin(model)
    x = torch.randn(8, 5, dtype=torch.float64)
    vector = [torch.randn_like(p) for p in model.parameters()]
    if loss_name == "cross_entropy":
        target = torch.tensor([0, 1, 2, -100, 2, 1, 0, 0])
        manual_loss = MF.cross_entropy(model(x), target)
        torch_loss = F.cross_entropy(twin(x), target)
    else:
        target = torch.randn(8, 3, dtype=torch.float64)
        manual_loss = MF.mse_loss(model(x), target)
        torch_loss = F.mse_loss(twin(x), target)

    manual_hvp = _hessian_vector_product(model, manual_loss, vector)
    torch_hvp = _hessian_vector_product(twin, torch_loss, vector)
    for name, m, t in zip(dict(model.named_parameters()), manual_hvp, torch_hvp, strict=True):
        assert m.abs().sum() > 0, name  # the curvature is really there
        torch.testing.assert_close(m, t, **F64, msg=name)


def test_second_derivative_of_cross_entropy_wrt_logits_equals_autograd() -> None:
    """The full Hessian of the loss in the logits (reverse over reverse: the Functions
    define no forward-mode rule), which exercises the log-softmax JVP of the backward."""
    logits = torch.randn(3, 4, dtype=torch.float64)
    target = torch.tensor([1, -100, 3])
    manual = jacrev(jacrev(lambda z: MF.cross_entropy(z, target)))(logits)
    expected = jacrev(jacrev(lambda z: F.cross_entropy(z, target)))(logits)
    torch.testing.assert_close(manual, expected, **F64)


# --- torch.compile ----------------------------------------------------------------------


def _explain_graph_breaks(function: Callable, *args: torch.Tensor) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(function)(*args)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_dynamo_traces_manual_mlp_and_losses_without_graph_breaks(activation: str) -> None:
    torch.manual_seed(0)
    model = MLP([6, 8, 4], activation=activation, backend="manual")
    x = torch.randn(5, 6)
    classes = torch.tensor([0, 3, 1, -100, 2])
    values = torch.randn(5, 4)

    def cross_entropy_step(x, classes):
        return MF.cross_entropy(model(x), classes)

    def mse_step(x, values):
        return MF.mse_loss(model(x), values)

    assert _explain_graph_breaks(cross_entropy_step, x, classes) == 0
    assert _explain_graph_breaks(mse_step, x, values) == 0


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_dynamo_traces_the_new_loss_options_and_in_place_relu_without_graph_breaks() -> None:
    torch.manual_seed(0)
    weight = torch.rand(4) + 0.5
    logits = torch.randn(3, 4, 5)
    classes = torch.randint(0, 4, (3, 5))
    classes[1, 2] = -100
    probabilities = torch.randn(3, 4, 5).softmax(1)

    def class_targets(x, t):
        return MF.cross_entropy(x, t, weight, label_smoothing=0.2)

    def probability_targets(x, p):
        return MF.cross_entropy(x, p, weight, reduction="sum", label_smoothing=0.1)

    def in_place_relu(x):
        return MF.relu(x * 2, inplace=True).sum()

    def mse(x, y):
        return MF.mse_loss(x, y[0]) + MF.mse_loss(x, y, weight=torch.ones_like(x))

    assert _explain_graph_breaks(class_targets, logits, classes) == 0
    assert _explain_graph_breaks(probability_targets, logits, probabilities) == 0
    assert _explain_graph_breaks(in_place_relu, logits) == 0
    assert _explain_graph_breaks(mse, logits, probabilities) == 0


def test_dynamo_explain_sees_a_graph_break() -> None:
    """The graph-break check can fail: a ``print`` inside the model is a break."""

    def with_break(x):
        y = MF.tanh(x)
        print("", end="")
        return MF.sigmoid(y)

    assert _explain_graph_breaks(with_break, torch.randn(3)) >= 1


@pytest.mark.slow
def test_compiled_manual_mlp_matches_eager_forward_and_gradients() -> None:
    """Inductor compiles forward and (handwritten) backward with ``fullgraph=True``, which
    raises on any graph break; results equal eager up to inductor's reordering."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP([6, 16, 4], activation="tanh", backend="manual")
    x = torch.randn(8, 6)
    target = torch.tensor([0, 3, 1, 2, 2, -100, 0, 1])

    def loss_fn(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return MF.cross_entropy(model(x), target)

    eager_loss = loss_fn(x, target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = torch.compile(loss_fn, fullgraph=True)(x, target)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    assert compiled_loss.grad_fn is not None and "Compiled" in type(compiled_loss.grad_fn).__name__

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, c, e in zip(dict(model.named_parameters()), compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_compiled_new_loss_options_match_eager_forward_and_gradients() -> None:
    """K-dimensional weighted, smoothed cross-entropy with ignored targets, probability
    targets, an in-place ReLU and a broadcast MSE, compiled with ``fullgraph=True``."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(mnn.Linear(6, 8), mnn.ReLU(inplace=True), mnn.Linear(8, 4))
    weight = torch.rand(4) + 0.5
    x = torch.randn(10, 6)
    classes = torch.randint(0, 4, (2, 5))
    classes[0, 3] = -100
    probabilities = torch.randn(2, 4, 5).softmax(1)

    def loss_fn(x, classes, probabilities):
        logits = model(x).view(2, 5, 4).transpose(1, 2)  # (N, C, d)
        return (
            MF.cross_entropy(logits, classes, weight, label_smoothing=0.2)
            + MF.cross_entropy(logits, probabilities, weight, label_smoothing=0.1)
            + MF.mse_loss(logits, probabilities[0])
        )

    eager_loss = loss_fn(x, classes, probabilities)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_loss = torch.compile(loss_fn, fullgraph=True)(x, classes, probabilities)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    assert "Compiled" in type(compiled_loss.grad_fn).__name__

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, c, e in zip(dict(model.named_parameters()), compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)

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
from torch.func import functional_call, grad, jacrev, vmap

import manualbp.functional as MF
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

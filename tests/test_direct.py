"""Direct backprop: the Functions' own forward and backward chained without the autograd engine
give the engine's gradients bit for bit, or refuse a network they cannot differentiate."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import manualbp.functional as MF
from manualbp.direct import DirectBackprop
from manualbp.nn import MLP, CrossEntropyLoss, MSELoss
from manualbp.train.module import TwinModule


def engine_gradients(model, loss_fn, inputs, targets) -> list[torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize(
    ("loss_fn", "one_hot"),
    [(CrossEntropyLoss(), False), (CrossEntropyLoss(reduction="sum"), False), (MSELoss(), True)],
    ids=["ce-mean", "ce-sum", "mse"],
)
def test_gradients_are_the_engines_bit_for_bit(activation, loss_fn, one_hot) -> None:
    torch.manual_seed(0)
    model = MLP([20, 16, 12, 5], activation)
    inputs, targets = torch.randn(8, 20), torch.randint(0, 5, (8,))
    if one_hot:
        targets = nn.functional.one_hot(targets, 5).float()
    expected = engine_gradients(model, loss_fn, inputs, targets)
    loss = DirectBackprop(model, loss_fn)(inputs, targets)
    assert torch.equal(loss, loss_fn(model(inputs), targets).detach())
    for (name, param), grad in zip(model.named_parameters(), expected, strict=True):
        assert torch.equal(param.grad, grad), name
        assert param.grad.stride() == grad.stride(), name


def test_gradients_accumulate_and_frozen_parameters_get_none() -> None:
    """As with autograd: a second step adds to .grad; a frozen parameter gets no gradient."""
    torch.manual_seed(0)
    model = MLP([6, 4, 3])
    model.fc1.weight.requires_grad_(False)
    inputs, targets = torch.randn(5, 6), torch.randint(0, 3, (5,))
    backprop = DirectBackprop(model, CrossEntropyLoss())
    backprop(inputs, targets)
    once = model.fc2.weight.grad.clone()
    backprop(inputs, targets)
    assert torch.equal(model.fc2.weight.grad, once + once)
    assert model.fc1.weight.grad is None and model.fc1.bias.grad is not None


def test_an_op_outside_the_functions_is_refused_by_name() -> None:
    class Reshaping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = MF.linear(x, self.fc1.weight, self.fc1.bias)
            return MF.linear(hidden * 2, self.fc2.weight, self.fc2.bias)  # `* 2` is autograd's

    backprop = DirectBackprop(Reshaping(), CrossEntropyLoss())
    with pytest.raises(RuntimeError, match=r"input of LinearFunction was computed by MulBackward0"):
        backprop(torch.randn(5, 6), torch.randint(0, 3, (5,)))


def test_a_network_without_handwritten_functions_is_refused() -> None:
    backprop = DirectBackprop(nn.Linear(3, 2), nn.MSELoss())
    with pytest.raises(RuntimeError, match=r"applied no handwritten Function"):
        backprop(torch.randn(4, 3), torch.randn(4, 2))


def test_the_engine_path_is_unaffected_outside_a_step() -> None:
    """Recording is scoped to the step: afterwards the Functions build autograd graphs."""
    torch.manual_seed(0)
    model = MLP([6, 4, 3])
    DirectBackprop(model, CrossEntropyLoss())(torch.randn(5, 6), torch.randint(0, 3, (5,)))
    out = model(torch.randn(2, 6))
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "LinearFunctionBackward"


def _train(quiet_trainer, **module_args) -> TwinModule:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(96, 20, generator=generator), torch.arange(96) % 5)
    L.seed_everything(0)
    module = TwinModule(net=MLP([20, 16, 5], "tanh"), check_every_n_steps=2, **module_args)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=48))
    assert trainer.global_step == 12
    return module


@pytest.mark.parametrize("compare", ["off", "check"])
def test_twin_module_direct_trains_exactly_like_the_engine(quiet_trainer, compare) -> None:
    """direct=True (forward and backward by hand, Lightning steps the optimizer) trains to the
    same weights, bit for bit, as the autograd-engine path of the same Functions."""
    engine = _train(quiet_trainer, compare=compare)
    direct = _train(quiet_trainer, compare=compare, direct=True)
    for (name, p), q in zip(
        engine.manual_model.named_parameters(), direct.manual_model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    if compare == "check":  # the gradients checked are the ones the direct step applied
        report = direct.last_gradient_report
        assert report.handwritten == ("DirectBackprop",)
        report.assert_close(rtol=1e-5)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"compare": "lockstep"}, "direct=True trains the manual network by hand"),
        ({"compare": "off", "backend": "autograd"}, "direct=True trains the manual network"),
        ({"compare": "off", "direct": "yes"}, "direct must be a bool"),
    ],
)
def test_direct_refuses_what_it_cannot_do(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        TwinModule(net=MLP([4, 3, 2]), **{"direct": True, **arguments})


def test_direct_refuses_mixed_precision(quiet_trainer) -> None:
    module = TwinModule(net=MLP([4, 3, 2]), compare="off", direct=True)
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.arange(8) % 2), batch_size=4)
    with pytest.raises(ValueError, match=r"direct=True runs in full precision"):
        quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, data)


def test_a_saved_tensor_edited_in_place_is_refused_as_autograd_refuses() -> None:
    """The tape remembers each saved tensor's version: an in-place edit between forward and
    backward raises instead of giving the gradient of the edited values."""
    torch.manual_seed(0)
    model = MLP([6, 4, 3], "sigmoid")
    inputs = torch.randn(5, 6)
    loss, tape = DirectBackprop(model, CrossEntropyLoss()).forward(inputs, torch.arange(5) % 3)
    inputs.mul_(2)  # fc1 saved its input for dW
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation"):
        tape.backward(loss)


def test_the_benchmark_times_direct_or_says_why_not() -> None:
    from manualbp.tools.benchmark import CASES, measure_direct

    mlp = next(case for case in CASES if case.name == "784-200-10 relu")
    timed = measure_direct(mlp, torch.device("cpu"), warmup=1, steps=1, repeats=1)
    assert timed["step_ms_direct"] > 0 and timed["ratio"] > 0
    lenet = next(case for case in CASES if case.network == "lenet5")
    refused = measure_direct(lenet, torch.device("cpu"), warmup=1, steps=1, repeats=1)
    assert "ViewBackward0" in refused["refused"]

"""The drop-in modules, the MLP builder and the manual ↔ autograd twin conversion.

A manual module is its ``torch.nn`` parent with a handwritten backward: same constructor,
parameters, initialisation, ``state_dict`` and (prefixed) ``repr``. A manual MLP and its
autograd twin must agree on the loss and every gradient of one batch: bit for bit with MSE
(every op in the chain is exact on CPU), within float tolerance with cross-entropy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.nn import MLP, autograd_twin, manual_twin
from manualbp.tools.parity import assert_parity

MODULE_PAIRS = [
    pytest.param(lambda: mnn.Linear(6, 4), lambda: nn.Linear(6, 4), id="Linear"),
    pytest.param(
        lambda: mnn.Linear(6, 4, bias=False),
        lambda: nn.Linear(6, 4, bias=False),
        id="Linear-nobias",
    ),
    pytest.param(mnn.Sigmoid, nn.Sigmoid, id="Sigmoid"),
    pytest.param(mnn.Tanh, nn.Tanh, id="Tanh"),
    pytest.param(mnn.ReLU, nn.ReLU, id="ReLU"),
    pytest.param(mnn.CrossEntropyLoss, nn.CrossEntropyLoss, id="CrossEntropyLoss"),
    pytest.param(
        lambda: mnn.CrossEntropyLoss(ignore_index=1, reduction="sum"),
        lambda: nn.CrossEntropyLoss(ignore_index=1, reduction="sum"),
        id="CrossEntropyLoss-sum-ignore",
    ),
    pytest.param(
        lambda: mnn.CrossEntropyLoss(torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 1.5])),
        lambda: nn.CrossEntropyLoss(torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 1.5])),
        id="CrossEntropyLoss-weight",
    ),
    pytest.param(
        lambda: mnn.CrossEntropyLoss(
            torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 1.5]), ignore_index=1, label_smoothing=0.3
        ),
        lambda: nn.CrossEntropyLoss(
            torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0, 1.5]), ignore_index=1, label_smoothing=0.3
        ),
        id="CrossEntropyLoss-weight-ignore-smoothing",
    ),
    pytest.param(
        lambda: mnn.CrossEntropyLoss(size_average=False),
        lambda: nn.CrossEntropyLoss(size_average=False),
        id="CrossEntropyLoss-legacy-size_average",
    ),
    pytest.param(mnn.MSELoss, nn.MSELoss, id="MSELoss"),
    pytest.param(
        lambda: mnn.MSELoss(None, False),
        lambda: nn.MSELoss(None, False),
        id="MSELoss-legacy-reduce",
    ),
    pytest.param(
        lambda: mnn.MSELoss(reduction="none"),
        lambda: nn.MSELoss(reduction="none"),
        id="MSELoss-none",
    ),
]


def _seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


@pytest.mark.parametrize("make_manual, make_torch", MODULE_PAIRS)
def test_module_is_its_torch_namesake_with_same_state_and_repr(make_manual, make_torch) -> None:
    manual, builtin = _seeded(make_manual), _seeded(make_torch)
    assert isinstance(manual, type(builtin)) and type(manual) is not type(builtin)
    assert repr(manual) == "manual." + repr(builtin)
    assert manual.state_dict().keys() == builtin.state_dict().keys()
    for key, value in builtin.state_dict().items():
        assert torch.equal(manual.state_dict()[key], value), key  # same initialisation
    assert vars(manual).keys() == vars(builtin).keys()  # no extra attributes


@pytest.mark.parametrize("make_manual, make_torch", MODULE_PAIRS)
def test_module_forward_and_input_grads_match_torch_module(make_manual, make_torch) -> None:
    manual, builtin = _seeded(make_manual), _seeded(make_torch)
    x = torch.randn(5, 6, requires_grad=True)
    if isinstance(builtin, nn.CrossEntropyLoss):
        args, exact = (x, torch.tensor([0, 1, 5, 1, 3])), False
    elif isinstance(builtin, nn.MSELoss):
        args, exact = (x, torch.randn(5, 6, requires_grad=True)), True
    else:
        args, exact = (x,), True
    assert_parity(manual, builtin, args, exact=exact, case=repr(manual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_manual_mlp_and_autograd_twin_agree_on_one_batch(
    activation: str, loss_name: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    model = MLP([20, 32, 16, 10], activation=activation, backend="manual").to(dtype)
    twin = autograd_twin(model)
    x = torch.randn(16, 20, dtype=dtype)
    if loss_name == "cross_entropy":
        target, criterion = torch.randint(0, 10, (16,)), mnn.CrossEntropyLoss()
    else:
        target, criterion = torch.randn(16, 10, dtype=dtype), mnn.MSELoss()
    twin_criterion = autograd_twin(criterion)
    assert type(twin_criterion) in (nn.CrossEntropyLoss, nn.MSELoss)

    manual_loss = criterion(model(x), target)
    torch_loss = twin_criterion(twin(x), target)
    manual_loss.backward()
    torch_loss.backward()

    exact = loss_name == "mse"  # every op in the chain reproduces torch's CPU kernels
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    )
    torch.testing.assert_close(manual_loss, torch_loss, **tolerance)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **tolerance, msg=name)
        if exact:
            assert torch.equal(p.grad, q.grad), name
    if exact:
        assert torch.equal(manual_loss, torch_loss)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_mlp_backends_from_same_seed_hold_identical_weights(activation: str) -> None:
    torch.manual_seed(3)
    manual = MLP([7, 5, 4, 2], activation=activation, backend="manual")
    torch.manual_seed(3)
    builtin = MLP([7, 5, 4, 2], activation=activation, backend="autograd")
    assert manual.backend == "manual" and builtin.backend == "autograd"
    assert list(manual.state_dict()) == list(builtin.state_dict())
    for key, value in builtin.state_dict().items():
        assert torch.equal(manual.state_dict()[key], value), key
    x = torch.randn(3, 7)
    assert torch.equal(manual(x), builtin(x))


def test_mlp_layout_names_and_options() -> None:
    model = MLP([4, 8, 6, 3], activation="tanh", output_activation="sigmoid", bias=False)
    assert [name for name, _ in model.named_children()] == [
        "fc1",
        "act1",
        "fc2",
        "act2",
        "fc3",
        "act3",
    ]
    assert [type(m) for m in model] == [
        mnn.Linear,
        mnn.Tanh,
        mnn.Linear,
        mnn.Tanh,
        mnn.Linear,
        mnn.Sigmoid,
    ]
    assert all(layer.bias is None for layer in model if isinstance(layer, nn.Linear))
    assert model.sizes == [4, 8, 6, 3]
    out = model(torch.randn(2, 5, 4))  # leading batch dimensions pass through
    assert out.shape == (2, 5, 3) and ((out > 0) & (out < 1)).all()


def test_mlp_repr_names_manual_modules() -> None:
    model = MLP([4, 8, 3], activation="relu", backend="manual")
    assert repr(model) == (
        "MLP(\n"
        "  (fc1): manual.Linear(in_features=4, out_features=8, bias=True)\n"
        "  (act1): manual.ReLU()\n"
        "  (fc2): manual.Linear(in_features=8, out_features=3, bias=True)\n"
        ")"
    )
    assert "manual." not in repr(autograd_twin(model))


def test_state_dict_moves_between_manual_and_torch_modules_unchanged() -> None:
    torch.manual_seed(0)
    manual = MLP([6, 5, 3], activation="sigmoid", backend="manual")
    torch.manual_seed(1)  # different weights, to see the load happen
    builtin = MLP([6, 5, 3], activation="sigmoid", backend="autograd")
    plain = nn.Sequential()
    plain.add_module("fc1", nn.Linear(6, 5))
    plain.add_module("act1", nn.Sigmoid())
    plain.add_module("fc2", nn.Linear(5, 3))

    for destination in (builtin, plain):
        destination.load_state_dict(manual.state_dict(), strict=True)
        for key, value in manual.state_dict().items():
            assert torch.equal(destination.state_dict()[key], value), key
    torch.manual_seed(2)
    fresh_manual = MLP([6, 5, 3], activation="sigmoid", backend="manual")
    fresh_manual.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(4, 6)
    assert torch.equal(fresh_manual(x), manual(x))


def test_autograd_twin_and_manual_twin_are_inverse() -> None:
    torch.manual_seed(0)
    model = MLP([5, 4, 3], activation="tanh", backend="manual")
    twin = autograd_twin(model)
    back = manual_twin(twin)
    assert [type(m) for m in twin] == [nn.Linear, nn.Tanh, nn.Linear]
    assert [type(m) for m in back] == [type(m) for m in model]
    assert model.backend == back.backend == "manual" and twin.backend == "autograd"
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value) and torch.equal(
            back.state_dict()[key], value
        )
    assert type(model[0]) is mnn.Linear  # the original is left as it was


def test_manual_twin_converts_a_plain_torch_model_and_leaves_unknown_modules() -> None:
    builtin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Identity(), nn.Linear(6, 2))
    manual = manual_twin(builtin)
    assert [type(m) for m in manual] == [mnn.Linear, mnn.ReLU, nn.Identity, mnn.Linear]
    x = torch.randn(3, 4)
    assert torch.equal(manual(x), builtin(x))


def test_backend_property_of_a_mixed_model_is_manual() -> None:
    model = MLP([4, 3, 2], activation="relu", backend="autograd")
    assert model.backend == "autograd"
    model.act1 = mnn.ReLU()
    assert model.backend == "manual"


def test_twin_shares_no_storage_with_original() -> None:
    torch.manual_seed(0)
    model = MLP([4, 3, 2], activation="relu", backend="manual")
    twin = autograd_twin(model)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.data_ptr() != q.data_ptr(), name
    before = model.fc1.weight.detach().clone()
    with torch.no_grad():
        twin.fc1.weight.add_(1.0)
    assert torch.equal(model.fc1.weight, before)
    with torch.no_grad():
        model.fc2.bias.zero_()
    assert not torch.equal(twin.fc2.bias, model.fc2.bias)


def test_twin_keeps_dtype_and_requires_grad_flags() -> None:
    model = MLP([4, 3, 2], activation="sigmoid", backend="manual").double()
    model.fc1.weight.requires_grad_(False)
    twin = autograd_twin(model)
    assert twin.fc1.weight.dtype == torch.float64
    assert not twin.fc1.weight.requires_grad and twin.fc1.bias.requires_grad
    twin(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    model(torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    assert model.fc1.weight.grad is None and twin.fc1.weight.grad is None


def test_module_loss_matches_functional_loss() -> None:
    logits = torch.randn(6, 4)
    target = torch.tensor([0, 1, -100, 3, 2, 1])
    torch.testing.assert_close(
        mnn.CrossEntropyLoss(reduction="none")(logits, target),
        F.cross_entropy(logits, target, reduction="none"),
    )


CLASS_WEIGHT = torch.tensor([0.2, 1.0, 3.0])


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(weight=CLASS_WEIGHT),
        nn.CrossEntropyLoss(label_smoothing=0.2),
        nn.CrossEntropyLoss(CLASS_WEIGHT, ignore_index=2, reduction="sum", label_smoothing=0.4),
        nn.CrossEntropyLoss(CLASS_WEIGHT, reduce=False),
    ],
    ids=["weight", "label_smoothing", "weight-ignore-sum-smoothing", "legacy-reduce"],
)
def test_manual_twin_converts_every_loss_option_and_computes_the_same(loss) -> None:
    """A converted module computes what the original did: a class-weighted loss converted
    used to compute 2.135 where the original gave 2.088, before weights were supported."""
    twin = manual_twin(loss)
    assert type(twin) is mnn.CrossEntropyLoss
    assert twin.state_dict().keys() == loss.state_dict().keys()
    logits = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 2, 0])
    assert_parity(twin, loss, (logits, target), exact=False, case=repr(loss))
    assert_parity(autograd_twin(twin), loss, (logits, target), exact=True, case=repr(loss))


def test_manual_twin_converts_in_place_relu() -> None:
    torch.manual_seed(0)
    builtin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    manual = manual_twin(builtin)
    assert [type(m) for m in manual] == [mnn.Linear, mnn.ReLU, mnn.Linear]
    assert manual[1].inplace and repr(manual[1]) == "manual.ReLU(inplace=True)"
    x = torch.randn(3, 4)
    assert_parity(manual, builtin, (x,), exact=True, case="in-place ReLU net")
    grads = [torch.autograd.grad(m(x).sum(), list(m.parameters())) for m in (manual, builtin)]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_autograd_twin_keeps_options_set_after_construction() -> None:
    loss = mnn.CrossEntropyLoss()
    loss.label_smoothing = 0.1  # honoured by the manual forward as by torch's
    twin = autograd_twin(loss)
    assert type(twin) is nn.CrossEntropyLoss and twin.label_smoothing == 0.1
    logits, target = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 4, 1, 1])
    assert_parity(loss, twin, (logits, target), exact=False)


def test_converters_refuse_subclasses_of_the_classes_they_map() -> None:
    class DoubledLinear(nn.Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input)

    class QuietReLU(mnn.ReLU):
        pass

    with pytest.raises(ValueError, match=r"0 \(DoubledLinear\): it subclasses torch.nn.Linear"):
        manual_twin(nn.Sequential(DoubledLinear(2, 2)))
    with pytest.raises(ValueError, match=r"QuietReLU.*subclasses manualbp.nn.ReLU"):
        autograd_twin(nn.Sequential(mnn.Linear(2, 2), QuietReLU()))


class HandwrittenSoftplus(torch.autograd.Function):
    """A user's own Function: ``y = log(1 + e^x)``, ``dL/dx = g · sigmoid(x)``."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return F.softplus(input)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(input)


class ManualSoftplus(nn.Softplus):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return HandwrittenSoftplus.apply(input)


class Scale(nn.Module):
    """A user's leaf module with a parameter: manualbp cannot know how it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.ones(()))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.factor * input


@pytest.fixture
def twin_registry():
    """Registrations made by a test are undone after it."""
    saved = dict(mnn._BY_MANUAL), dict(mnn._BY_AUTOGRAD)
    yield
    for registry, before in zip((mnn._BY_MANUAL, mnn._BY_AUTOGRAD), saved, strict=True):
        registry.clear()
        registry.update(before)


def test_register_twin_converts_a_users_manual_module_both_ways(twin_registry) -> None:
    mnn.register_twin(ManualSoftplus, nn.Softplus)
    model = nn.Sequential(mnn.Linear(3, 4), ManualSoftplus(), mnn.Linear(4, 2))
    twin = autograd_twin(model)
    assert [type(m) for m in twin] == [nn.Linear, nn.Softplus, nn.Linear]
    assert [type(m) for m in manual_twin(twin)] == [mnn.Linear, ManualSoftplus, mnn.Linear]
    assert mnn.is_handwritten(model[1]) and not mnn.is_handwritten(twin[1])


def test_autograd_twin_refuses_a_module_it_does_not_know_by_name() -> None:
    model = nn.Sequential(mnn.Linear(3, 3), nn.Sequential(Scale(), nn.Dropout(0.0)))
    with pytest.raises(ValueError, match=r"autograd twin of 1\.0 \(Scale\).*register_twin"):
        autograd_twin(model)


def test_register_twin_needs_a_converter_unless_the_classes_share_their_state(
    twin_registry,
) -> None:
    with pytest.raises(TypeError, match=r"Scale does not subclass torch.nn.Softplus"):
        mnn.register_twin(Scale, nn.Softplus)
    with pytest.raises(TypeError, match=r"manual_cls must be an nn.Module class"):
        mnn.register_twin(HandwrittenSoftplus, nn.Softplus)


def test_a_converter_rebuilds_a_module_of_another_shape(twin_registry) -> None:
    class ManualAffine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 3))

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return MF.linear(input, self.w)

    def to_linear(module: ManualAffine) -> nn.Linear:
        linear = nn.Linear(3, 2, bias=False)
        linear.weight = nn.Parameter(module.w.detach().clone())
        return linear

    mnn.register_twin(ManualAffine, nn.Linear, to_autograd=to_linear)
    model = nn.Sequential(ManualAffine(), mnn.ReLU())
    twin = autograd_twin(model)
    assert isinstance(twin[0], nn.Linear) and type(twin[1]) is nn.ReLU
    x = torch.randn(4, 3)
    assert torch.equal(twin(x), model(x))

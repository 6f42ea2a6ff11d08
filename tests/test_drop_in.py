"""cross_entropy, mse_loss and relu take torch's whole signature and behave as torch's do.

Signatures and constructors equal to torch's, positional arguments, the legacy
``size_average``/``reduce`` mapping with its warning, broadcasting (with torch's warning),
weighted MSE, in-place ReLU (with torch's errors), state_dicts with the class-weight buffer,
and the common cross-entropy call still running exactly the ops it ran before the new options.
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.tools.parity import assert_parity

LEGACY_WARNING = r"size_average and reduce args will be deprecated"
BROADCAST_WARNING = r"Using a target size .* that is different to the input size"


@pytest.mark.parametrize(
    ("manual", "builtin"),
    [(MF.cross_entropy, F.cross_entropy), (MF.mse_loss, F.mse_loss), (MF.relu, F.relu)],
    ids=["cross_entropy", "mse_loss", "relu"],
)
def test_functions_have_torchs_parameters_in_torchs_order(manual, builtin) -> None:
    def parameters(function):
        return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]

    assert parameters(manual) == parameters(builtin)


@pytest.mark.parametrize(
    ("manual", "builtin"),
    [(mnn.CrossEntropyLoss, nn.CrossEntropyLoss), (mnn.MSELoss, nn.MSELoss), (mnn.ReLU, nn.ReLU)],
    ids=["CrossEntropyLoss", "MSELoss", "ReLU"],
)
def test_modules_take_torchs_constructor_arguments(manual, builtin) -> None:
    def parameters(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()]

    assert parameters(manual) == parameters(builtin)


def test_cross_entropy_takes_weight_positionally() -> None:
    logits = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, 3, 1, 1, 2, 0])
    weight = torch.tensor([0.5, 2.0, 1.0, 0.25])
    assert_parity(MF.cross_entropy, F.cross_entropy, (logits, target, weight), exact=False)
    assert_parity(
        MF.cross_entropy,
        F.cross_entropy,
        (logits, target, weight, None, 1, None, "sum", 0.3),
        exact=False,
    )


@pytest.mark.parametrize(
    ("size_average", "reduce"), list(itertools.product([None, True, False], repeat=2))[1:]
)
def test_legacy_size_average_and_reduce_are_mapped_as_torch_maps_them(size_average, reduce):
    logits = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 2, -100])
    values = torch.randn(5, 3)
    legacy = {"size_average": size_average, "reduce": reduce, "reduction": "none"}
    for manual, builtin, args in (
        (MF.cross_entropy, F.cross_entropy, (logits, target)),
        (MF.mse_loss, F.mse_loss, (logits, values)),
    ):
        with pytest.warns(UserWarning, match=LEGACY_WARNING):
            rows = assert_parity(manual, builtin, args, legacy, exact=False)
        expected = builtin(*args, **legacy)
        assert rows[0].exact and expected.shape == manual(*args, **legacy).shape
    for module in (mnn.CrossEntropyLoss, mnn.MSELoss):
        with pytest.warns(UserWarning, match=LEGACY_WARNING):
            manual = module(size_average=size_average, reduce=reduce)
            builtin = getattr(nn, module.__name__)(size_average=size_average, reduce=reduce)
        assert manual.reduction == builtin.reduction


def test_elementwise_mean_is_mean_with_torchs_warning() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = MF.cross_entropy(logits, target, reduction="elementwise_mean")
    assert torch.equal(loss, F.cross_entropy(logits, target))
    module = mnn.MSELoss(reduction="elementwise_mean")  # accepted at construction, as torch
    with pytest.warns(UserWarning, match="elementwise_mean"):
        assert torch.equal(module(logits, logits + 1), F.mse_loss(logits, logits + 1))


def test_negative_label_smoothing_is_no_smoothing_as_in_torch() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    smoothed = MF.cross_entropy(logits, target, label_smoothing=-0.2)
    assert torch.equal(smoothed, F.cross_entropy(logits, target, label_smoothing=-0.2))
    assert torch.equal(smoothed, MF.cross_entropy(logits, target))


def test_class_weights_that_require_grad_are_accepted_without_grad_mode_as_in_torch() -> None:
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    weight = torch.rand(3, requires_grad=True)
    with torch.no_grad():
        loss = MF.cross_entropy(logits, target, weight)
        assert torch.equal(loss, F.cross_entropy(logits, target, weight))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probability_targets_of_no_entries_give_torchs_answer(reduction: str) -> None:
    logits = torch.randn(0, 3, requires_grad=True)
    target = torch.rand(0, 3, requires_grad=True)
    rows = assert_parity(
        MF.cross_entropy, F.cross_entropy, (logits, target), {"reduction": reduction}, exact=True
    )
    assert len(rows) == 3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("input_shape", "target_shape"),
    [((3, 4), (4,)), ((3, 4), (1, 4)), ((4,), (3, 4)), ((3, 1), (2, 3, 4)), ((), (2, 2))],
)
def test_mse_broadcasts_with_torchs_warning(input_shape, target_shape, reduction: str) -> None:
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    y = torch.randn(target_shape, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_parity(MF.mse_loss, F.mse_loss, (x, y), {"reduction": reduction}, exact=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and messages[0] == messages[1]  # manualbp's, then torch's
    with pytest.warns(UserWarning, match=BROADCAST_WARNING) as record:
        MF.mse_loss(x, y, reduction=reduction)
    assert record[0].filename == __file__  # points at the caller, as torch's does


def test_mse_promotes_an_integer_target_as_torch_does() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randint(-2, 3, (3, 4))
    assert_parity(MF.mse_loss, F.mse_loss, (x, y), exact=True)


@pytest.mark.filterwarnings(f"ignore:{BROADCAST_WARNING}")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_shape", [(3, 4), (4,)], ids=["same-shape", "broadcast"])
def test_weighted_mse_matches_torch_with_the_weight_gradient(target_shape, reduction) -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(target_shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    args = (x, y, None, None, reduction, w)  # weight positionally, as the 6th argument
    rows = assert_parity(MF.mse_loss, F.mse_loss, args, exact=True)
    assert [row.tensor for row in rows] == ["output", "grad[0]", "grad[1]", "grad[5]"]


def test_in_place_relu_overwrites_and_returns_its_input() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    hidden = x * 2
    out = MF.relu(hidden, inplace=True)
    assert out is hidden and torch.equal(hidden, torch.relu(x.detach() * 2))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, 2.0 * (x.detach() > 0))
    assert type(out.grad_fn).__name__ == "ReLUFunctionBackward"


@pytest.mark.parametrize("relu", [MF.relu, F.relu], ids=["manualbp", "torch"])
def test_in_place_relu_after_an_op_that_saved_its_input_fails_as_in_torch(relu) -> None:
    """sigmoid saves its output: overwriting it makes torch's version-counter check fail."""
    x = torch.randn(6, requires_grad=True)
    y = torch.sigmoid(x)
    relu(y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_in_place_relu_module_and_its_repr() -> None:
    manual, builtin = mnn.ReLU(inplace=True), nn.ReLU(inplace=True)
    assert repr(manual) == "manual." + repr(builtin) == "manual.ReLU(inplace=True)"
    assert mnn.is_handwritten(manual) and type(mnn.manual_twin(builtin)) is mnn.ReLU
    x = torch.randn(3, 4)
    expected = builtin(x.clone())
    copy = x.clone()
    assert manual(copy) is copy and torch.equal(copy, expected)


def test_class_weights_are_the_registered_buffer_and_move_between_the_two() -> None:
    weight = torch.tensor([0.2, 1.0, 3.0])
    manual = mnn.CrossEntropyLoss(weight, label_smoothing=0.1)
    builtin = nn.CrossEntropyLoss(weight, label_smoothing=0.1)
    assert dict(manual.named_buffers()).keys() == {"weight"} == builtin.state_dict().keys()
    fresh_manual = mnn.CrossEntropyLoss(torch.ones(3), label_smoothing=0.1)
    fresh_manual.load_state_dict(builtin.state_dict())
    fresh_builtin = nn.CrossEntropyLoss(torch.ones(3), label_smoothing=0.1)
    fresh_builtin.load_state_dict(manual.state_dict())
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 2, 0])
    assert torch.equal(fresh_manual(logits, target), builtin(logits, target))
    assert torch.equal(fresh_builtin(logits, target), manual(logits, target))
    assert fresh_manual.double().weight.dtype == torch.float64  # moves with .to() as a buffer


class _AtenOps(TorchDispatchMode):
    """The aten ops a region of code runs, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_common_cross_entropy_runs_only_the_ops_it_always_ran() -> None:
    """(N, C) logits, class targets, no weight, no smoothing: the range check's one host read
    (aminmax), torch's two forward kernels; a backward without masks or gathers. The options
    cost this call nothing."""
    logits = torch.randn(64, 10, requires_grad=True)
    target = torch.randint(0, 10, (64,))
    with _AtenOps() as forward:
        loss = MF.cross_entropy(logits, target)
    with _AtenOps() as backward:
        loss.backward()
    host_reads = ["_local_scalar_dense"] * 2
    assert forward.names == ["aminmax", *host_reads, "_log_softmax", "nll_loss_forward", "detach"]
    fused = ["exp", "unsqueeze", "div", "expand", "mul", "neg", "scatter_add_"]
    assert sorted(backward.names) == sorted(["ones_like", "detach", *fused, "detach"])

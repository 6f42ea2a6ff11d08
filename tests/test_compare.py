"""Unit tests of manualbp.compare: the gradient statistics, the report and its assertion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.compare import (
    STATISTICS,
    GradientReport,
    agreement,
    compare_gradients,
    gradients_at,
)
from manualbp.nn import MLP, CrossEntropyLoss, MSELoss, autograd_twin

PARAMS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(8, 5)`` float64 and class targets ``(8,)`` for a 5-7-3 net."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (8,), generator=generator)
    return inputs, targets


@pytest.fixture
def manual_model() -> MLP:
    torch.manual_seed(0)
    return MLP([5, 7, 3], "tanh", "manual").double()


def mse_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with one-hot float64 targets ``(8, 3)`` for the MSE loss."""
    inputs, targets = batch
    return inputs, F.one_hot(targets, 3).double()


def test_bit_exact_formulas_agree_exactly(manual_model, batch):
    """Linear, tanh and MSE reproduce torch's CPU kernels bit for bit: every statistic is at
    its exact value."""
    twin = autograd_twin(manual_model)
    report = compare_gradients(manual_model, twin, MSELoss(), nn.MSELoss(), *mse_targets(batch))

    assert list(report.statistics) == list(PARAMS)
    assert report.all_exact
    for stats in report.statistics.values():
        assert set(stats) == set(STATISTICS)
        assert stats["exact"].item() == 1.0
        assert stats["max_abs"].item() == 0.0
        assert stats["max_rel"].item() == 0.0
        assert stats["cosine"].item() == pytest.approx(1.0, abs=1e-12)
        assert stats["norm_ratio"].item() == 1.0
    assert report.max_rel == 0.0
    assert torch.equal(report.loss_manual, report.loss_autograd)
    assert report.handwritten == ("LinearFunction", "MSELossFunction", "TanhFunction")
    report.assert_close(rtol=0.0)


def test_comparing_a_model_with_itself_is_refused(manual_model, batch):
    """A handwritten backward checked against itself, or autograd against autograd, would
    always agree: both are refused, naming what is wrong."""
    loss = CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"reference model runs custom autograd Functions"):
        compare_gradients(manual_model, copy.deepcopy(manual_model), loss, loss, *batch)
    twin, reference_loss = autograd_twin(manual_model), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"manual model runs no handwritten Function"):
        compare_gradients(twin, twin, reference_loss, reference_loss, *batch)


def test_a_function_called_in_forward_is_caught_in_the_twin(batch):
    """A network whose forward calls manualbp.functional.relu keeps calling it in its autograd
    twin (only modules convert): the check refuses instead of comparing relu with itself."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = mnn.Linear(5, 7), mnn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(MF.relu(self.fc1(x)))

    model = Net().double()
    twin = autograd_twin(model)
    with pytest.raises(ValueError, match=r"\(ReLUFunction\)"):
        compare_gradients(model, twin, CrossEntropyLoss(), nn.CrossEntropyLoss(), *batch)


def test_manual_model_agrees_with_its_autograd_twin(manual_model, batch):
    twin = autograd_twin(manual_model)
    report = compare_gradients(
        manual_model, twin, CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), *batch
    )
    # float64 round-off; the handwritten formulas are right.
    assert report.max_rel < 1e-12
    for stats in report.statistics.values():
        assert stats["cosine"].item() == pytest.approx(1.0, abs=1e-12)
        assert stats["norm_ratio"].item() == pytest.approx(1.0, abs=1e-12)
    report.assert_close(rtol=1e-12)


def test_scaled_gradient_gives_the_expected_statistics(manual_model, batch):
    """A loss scaled by 1.01 scales every gradient by 1.01: max_abs = 0.01·max|g|,
    max_rel = 0.01, cosine = 1, norm ratio = 1.01; the assertion names every parameter."""
    loss = CrossEntropyLoss()

    def scaled_loss(outputs, targets):
        return 1.01 * loss(outputs, targets)

    twin, reference_loss = autograd_twin(manual_model), nn.CrossEntropyLoss()
    report = compare_gradients(manual_model, twin, scaled_loss, reference_loss, *batch)
    parameters = dict(manual_model.named_parameters())
    _, reference = gradients_at(twin, reference_loss, parameters, *batch)

    for name, stats in report.statistics.items():
        scale = reference[name].abs().max().item()
        assert stats["exact"].item() == 0.0
        assert stats["max_abs"].item() == pytest.approx(0.01 * scale, rel=1e-9)
        assert stats["max_rel"].item() == pytest.approx(0.01, rel=1e-9)
        assert stats["cosine"].item() == pytest.approx(1.0, abs=1e-12)
        assert stats["norm_ratio"].item() == pytest.approx(1.01, rel=1e-12)
    assert report.max_rel == pytest.approx(0.01, rel=1e-9)
    assert not report.all_exact
    with pytest.raises(AssertionError) as excinfo:
        report.assert_close(rtol=1e-5)
    for name in PARAMS:
        assert name in str(excinfo.value)
    report.assert_close(rtol=0.02)  # within a looser tolerance it passes


def test_assert_close_names_only_the_parameters_that_disagree():
    close = agreement(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    far = agreement(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0]))
    report = GradientReport(torch.tensor(0.0), torch.tensor(0.0), {"good": close, "bad": far})
    with pytest.raises(AssertionError, match=r"for bad:") as excinfo:
        report.assert_close()
    assert "| good |" in str(excinfo.value)  # the table is attached
    assert "good," not in str(excinfo.value)


def test_max_rel_is_normwise():
    """An error of 0.001 on a 0.001 entry is relative to the largest entry, 1.0: no blow-up."""
    stats = agreement(torch.tensor([1.0, 0.002]), torch.tensor([1.0, 0.001]))
    assert stats["max_abs"].item() == pytest.approx(0.001, rel=1e-6)
    assert stats["max_rel"].item() == pytest.approx(0.001, rel=1e-6)


def test_zero_gradients():
    zeros = torch.zeros(3)
    both = agreement(zeros, zeros)
    assert both["exact"].item() == 1.0
    assert both["max_rel"].item() == 0.0
    assert both["cosine"].item() == 1.0
    assert both["norm_ratio"].item() == 1.0
    # A non-zero manual gradient where autograd's is zero can never pass.
    wrong = agreement(torch.tensor([0.0, 1e-3, 0.0]), zeros)
    assert wrong["max_rel"].item() == float("inf")
    assert wrong["cosine"].item() == 0.0


def test_nan_gradient_fails_the_check():
    stats = agreement(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    report = GradientReport(torch.tensor(0.0), torch.tensor(0.0), {"w": stats})
    with pytest.raises(AssertionError, match="w"):
        report.assert_close()


def test_agreement_rejects_different_shapes():
    with pytest.raises(ValueError, match=r"manual \(2,\) vs reference \(3,\)"):
        agreement(torch.zeros(2), torch.zeros(3))


def test_as_scalars_keys_and_values(manual_model, batch):
    twin = autograd_twin(manual_model)
    report = compare_gradients(manual_model, twin, MSELoss(), nn.MSELoss(), *mse_targets(batch))
    scalars = report.as_scalars()
    expected = {f"grad_check/{p}/{s}" for p in PARAMS for s in STATISTICS}
    expected |= {"grad_check/max_rel", "grad_check/all_exact", "grad_check/loss_diff"}
    assert set(scalars) == expected
    assert all(isinstance(v, torch.Tensor) and v.shape == () for v in scalars.values())
    assert scalars["grad_check/all_exact"].item() == 1.0
    assert scalars["grad_check/loss_diff"].item() == 0.0
    assert set(report.as_scalars(prefix="check")) == {
        key.replace("grad_check/", "check/", 1) for key in expected
    }


def test_table_format(manual_model, batch):
    twin = autograd_twin(manual_model)
    report = compare_gradients(manual_model, twin, MSELoss(), nn.MSELoss(), *mse_targets(batch))
    lines = report.table().splitlines()
    assert lines[0] == (
        "| parameter | exact | allclose | max_abs | max_rel | max_ulp | cosine | norm ratio |"
    )
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- | --- |"
    assert len(lines) == 2 + len(PARAMS)
    for line, name in zip(lines[2:], PARAMS, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[:3] == [name, "True", "True"]
        assert float(cells[3]) == 0.0
        assert float(cells[4]) == 0.0
        assert float(cells[5]) == 0.0
        assert float(cells[6]) == pytest.approx(1.0)


def test_models_and_grads_are_left_alone(manual_model, batch):
    twin = autograd_twin(manual_model)
    twin.requires_grad_(False)  # a frozen twin still works: its weights are not used
    manual_model.fc1.weight.grad = torch.full_like(manual_model.fc1.weight, 7.0)
    before = {k: v.clone() for k, v in manual_model.state_dict().items()}
    twin_before = {k: v.clone() for k, v in twin.state_dict().items()}

    compare_gradients(manual_model, twin, CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), *batch)

    for key, value in manual_model.state_dict().items():
        assert torch.equal(value, before[key])
    for key, value in twin.state_dict().items():
        assert torch.equal(value, twin_before[key])
    assert torch.equal(manual_model.fc1.weight.grad, torch.full_like(before["fc1.weight"], 7.0))
    assert all(p.grad is None for n, p in manual_model.named_parameters() if n != "fc1.weight")
    assert all(p.grad is None for p in twin.parameters())
    assert all(p.requires_grad for p in manual_model.parameters())
    assert not any(p.requires_grad for p in twin.parameters())


def test_check_is_taken_at_the_manual_weights(manual_model, batch):
    """The reference model's own (stale) weights are ignored."""
    twin = autograd_twin(manual_model)
    with torch.no_grad():
        for param in twin.parameters():
            param.add_(1.0)
    report = compare_gradients(
        manual_model, twin, CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), *batch
    )
    assert report.max_rel < 1e-12


def test_mismatched_parameter_names_are_rejected(manual_model, batch):
    other = MLP([5, 7, 7, 3], "tanh", "autograd").double()
    with pytest.raises(
        ValueError, match=r"only in the reference model: \['fc3.bias', 'fc3.weight'\]"
    ):
        compare_gradients(manual_model, other, CrossEntropyLoss(), CrossEntropyLoss(), *batch)

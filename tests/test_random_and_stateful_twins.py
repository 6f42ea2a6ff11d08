"""Twins that draw random numbers (dropout) or keep state (batch norm's running statistics).

* manualbp's dropout draws its mask exactly as torch's does: from the same random state the
  same units are dropped, and the generator is left in the same state;
* the gradient check (``compare_gradients``) runs both twins from one random state, so they
  drop the same units, and leaves no trace: the generator's state and every buffer are as
  they were;
* in lockstep, each twin trains exactly as its network alone would: the same masks, the same
  running statistics, bit for bit.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import manualbp.functional as MF
from manualbp.compare import compare_gradients
from manualbp.nn import MLP, CrossEntropyLoss, autograd_twin
from manualbp.train.module import TwinModule


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7,), (64, 33), (3, 5, 17)], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_draws_torchs_mask_and_leaves_torchs_random_state(shape, dtype, p) -> None:
    x = torch.randn(shape).to(dtype)
    torch.manual_seed(11)
    manual = MF.dropout(x, p)
    state_after_manual = torch.get_rng_state()
    torch.manual_seed(11)
    reference = F.dropout(x, p)
    assert torch.equal(manual, reference)
    assert torch.equal(state_after_manual, torch.get_rng_state())


def test_dropout_without_training_or_with_p_zero_returns_its_input() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    assert MF.dropout(x, 0.5, training=False) is x
    assert MF.dropout(x, 0.0) is x


def _dropout_batch_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return MLP([12, 32, 32, 4], "tanh", batch_norm=True, dropout=0.5, input_dropout=0.2)


def test_gradient_check_draws_one_mask_for_both_twins_and_leaves_no_trace() -> None:
    manual = _dropout_batch_norm_net()
    twin = autograd_twin(manual)
    inputs = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    targets = torch.arange(16) % 4
    state = torch.get_rng_state()
    buffers = {name: b.clone() for name, b in manual.named_buffers()}
    twin_buffers = {name: b.clone() for name, b in twin.named_buffers()}
    report = compare_gradients(
        manual, twin, CrossEntropyLoss(), nn.CrossEntropyLoss(), inputs, targets
    )
    report.assert_close(rtol=1e-5)  # with different masks the gradients would differ at O(1)
    assert torch.equal(state, torch.get_rng_state())
    for name, b in manual.named_buffers():
        assert torch.equal(b, buffers[name]), name
    for name, b in twin.named_buffers():
        assert torch.equal(b, twin_buffers[name]), name
    assert set(report.handwritten) >= {"BatchNormFunction", "DropoutFunction"}


def _loaders(steps: int, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(steps * batch_size, 12, generator=generator)
    targets = (inputs[:, :4] * 3).argmax(dim=1)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


def _trained(quiet_trainer, steps: int, **module_args) -> TwinModule:
    L.seed_everything(0)
    module = TwinModule(
        net=_dropout_batch_norm_net(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        check_every_n_steps=7,
        **module_args,
    )
    trainer = quiet_trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, _loaders(steps))
    assert trainer.global_step == steps
    return module


def test_lockstep_twins_drop_the_same_units_and_train_as_each_would_alone(quiet_trainer) -> None:
    steps = 20
    lockstep = _trained(quiet_trainer, steps, compare="lockstep")
    manual_alone = _trained(quiet_trainer, steps, compare="off")
    autograd_alone = _trained(quiet_trainer, steps, compare="off", backend="autograd")
    pairs = [
        (lockstep.manual_model, manual_alone.manual_model),
        (lockstep.autograd_model, autograd_alone.autograd_model),
    ]
    for twin, alone in pairs:
        for (name, a), b in zip(
            twin.state_dict().items(), alone.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name  # parameters and running statistics, bit for bit
    # The same masks in both twins: the weights differ by round-off only (different masks
    # would move them apart by the size of a step).
    assert float(lockstep.divergence()["divergence/max"]) < 1e-5
    assert float(lockstep.worst_grad_max_rel) < 1e-5

"""In lockstep each twin trains exactly as its network would alone, under every option.

One optimizer over both twins used to couple them: Lightning clipped the total norm of both
twins' gradients together (1-3% weight differences after 40 steps at ``gradient_clip_val``
0.05). Here every option a user can set — clipping by norm or value, gradient accumulation,
weight decay, schedulers (a plateau scheduler included), bf16 mixed precision, any optimizer,
LBFGS included — trains the lockstep twins and the same networks alone, and each twin must
match its network trained alone.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import ReduceLROnPlateau
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from manualbp.nn import MLP
from manualbp.train.module import TwinModule

STEPS = 40
# Bit-identical in every case measured; the bound is the acceptance criterion's.
RELATIVE_TOLERANCE = 1e-4


def loaders(batches: int = STEPS, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """A fixed (unshuffled) 20-feature, 5-class problem: train and validation loaders."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batches * batch_size, 20, generator=generator)
    targets = (inputs[:, :5] * 3).argmax(dim=1)  # learnable classes
    train = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)
    val = DataLoader(TensorDataset(inputs[:64], targets[:64]), batch_size=32)
    return train, val


def train(quiet_trainer, module_args: dict, trainer_args: dict) -> TwinModule:
    L.seed_everything(0)
    module = TwinModule(net=MLP([20, 32, 16, 5], "tanh"), check_every_n_steps=10, **module_args)
    trainer = quiet_trainer(max_steps=STEPS, max_epochs=-1, **trainer_args)
    train_loader, val_loader = loaders()
    trainer.fit(module, train_loader, val_loader)
    assert trainer.global_step == STEPS
    return module


def relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        scale = q.detach().abs().max().clamp_min(1e-12)
        worst = max(worst, float((p.detach() - q.detach()).abs().max() / scale))
    return worst


SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
OPTIONS = {
    "clip-norm": ({"optimizer": SGD}, {"gradient_clip_val": 0.05}),
    "clip-value": (
        {"optimizer": SGD},
        {"gradient_clip_val": 0.002, "gradient_clip_algorithm": "value"},
    ),
    "accumulate-3": ({"optimizer": SGD}, {"accumulate_grad_batches": 3}),
    "weight-decay-nesterov": (
        {
            "optimizer": functools.partial(
                torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05
            )
        },
        {},
    ),
    "adam-step-lr": (
        {
            "optimizer": functools.partial(torch.optim.Adam, lr=0.01),
            "lr_scheduler": functools.partial(
                torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.3
            ),
        },
        {"limit_train_batches": 10},  # four epochs: the scheduler steps
    ),
    "reduce-on-plateau": (
        {
            "optimizer": functools.partial(torch.optim.SGD, lr=0.5),
            "lr_scheduler": functools.partial(
                ReduceLROnPlateau, monitor="val/loss/manual", patience=0, factor=0.5
            ),
        },
        {"limit_train_batches": 5},
    ),
    "bf16-mixed": ({"optimizer": SGD}, {"precision": "bf16-mixed", "gradient_clip_val": 0.05}),
    "adamw": ({"optimizer": functools.partial(torch.optim.AdamW, lr=0.01)}, {}),
    "rmsprop": ({"optimizer": functools.partial(torch.optim.RMSprop, lr=0.003)}, {}),
    "adagrad": ({"optimizer": functools.partial(torch.optim.Adagrad, lr=0.05)}, {}),
    "lbfgs": (
        {"optimizer": functools.partial(torch.optim.LBFGS, lr=0.5, max_iter=3)},
        {"gradient_clip_val": 0.5},
    ),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_lockstep_twin_trains_as_its_network_alone(quiet_trainer, option) -> None:
    module_args, trainer_args = OPTIONS[option]
    lockstep = train(quiet_trainer, {"compare": "lockstep", **module_args}, trainer_args)
    manual_alone = train(quiet_trainer, {"compare": "off", **module_args}, trainer_args)
    autograd_alone = train(
        quiet_trainer, {"compare": "off", "backend": "autograd", **module_args}, trainer_args
    )
    assert relative_difference(lockstep.manual_model, manual_alone.manual_model) <= (
        RELATIVE_TOLERANCE
    )
    assert relative_difference(lockstep.autograd_model, autograd_alone.autograd_model) <= (
        RELATIVE_TOLERANCE
    )
    # And training did something: the weights moved from their initial values.
    L.seed_everything(0)
    initial = MLP([20, 32, 16, 5], "tanh")
    assert relative_difference(lockstep.manual_model, initial) > 1e-3


def test_one_shared_clipping_norm_would_couple_the_twins(quiet_trainer) -> None:
    """The failure this guards against, shown directly: clipping the two twins' gradients by
    their joint norm trains the manual twin differently from the network alone."""
    module_args, trainer_args = OPTIONS["clip-norm"]
    alone = train(quiet_trainer, {"compare": "off", **module_args}, trainer_args)

    class JointlyClipped(TwinModule):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            parameters = [p for _, model in self._models() for p in model.parameters()]
            torch.nn.utils.clip_grad_norm_(parameters, gradient_clip_val)

    L.seed_everything(0)
    coupled = JointlyClipped(
        net=MLP([20, 32, 16, 5], "tanh"), check_every_n_steps=10, **module_args
    )
    trainer = quiet_trainer(max_steps=STEPS, max_epochs=-1, **trainer_args)
    trainer.fit(coupled, *loaders())
    assert relative_difference(coupled.manual_model, alone.manual_model) > 1e-3


def test_mixed_float16_loss_scaling_is_refused_in_lockstep(quiet_trainer) -> None:
    """One gradient scaler for both twins would skip both steps when one overflows."""
    module = TwinModule(net=MLP([20, 8, 5]))
    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = quiet_trainer(max_steps=1, plugins=[scaled])
    with pytest.raises(ValueError, match=r"'16-mixed' scales both twins' losses with one"):
        trainer.fit(module, loaders()[0])

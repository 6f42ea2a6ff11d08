"""The end-of-run summary: what it reports, when a gradient check passes or fails, and that the
record of the checks travels in checkpoints."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from broken_functions import SigmoidMissingFactor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manualbp.nn import MLP, Linear, register_twin
from manualbp.train.module import TwinModule
from manualbp.train.summary import PASS_MAX_REL, RunRecord, RunSummary, summarize


class BrokenSigmoid(nn.Sigmoid):
    """A sigmoid whose handwritten backward forgets the ``(1 - y)`` factor."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return SigmoidMissingFactor.apply(input)


register_twin(BrokenSigmoid, nn.Sigmoid)


def loaders(samples: int = 64) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, 8, generator=generator)  # (N, 8)
    targets = torch.randint(0, 3, (samples,), generator=generator)  # (N,)
    data = TensorDataset(inputs, targets)
    return DataLoader(data, batch_size=16), DataLoader(data, batch_size=32)


def fit_and_test(module: TwinModule, quiet_trainer, **overrides):
    record = RunRecord()
    trainer = quiet_trainer(callbacks=[record], max_epochs=2, log_every_n_steps=1, **overrides)
    train, evaluate = loaders()
    trainer.fit(module, train_dataloaders=train, val_dataloaders=evaluate)
    trainer.test(module, dataloaders=evaluate, verbose=False)
    return trainer, record


def test_a_correct_network_passes_with_every_number_reported(quiet_trainer):
    torch.manual_seed(0)
    module = TwinModule(net=MLP([8, 6, 3], "relu"), compare="lockstep", check_every_n_steps=2)
    trainer, record = fit_and_test(module, quiet_trainer)
    assert (record.checks, record.epochs, record.steps) == (4, 2, 8)  # steps 0, 2, 4, 6
    summary = summarize(trainer, module, "fit")
    assert summary.stage == "test"
    assert summary.passed is True
    assert summary.worst_max_rel == pytest.approx(float(module.worst_grad_max_rel))
    assert summary.worst_max_rel <= 1e-6
    assert summary.worst_max_ulp is not None and summary.worst_max_ulp >= 0
    assert summary.divergence == pytest.approx(float(module.divergence()["divergence/max"]))
    for twin in ("manual", "autograd"):
        expected = trainer.callback_metrics[f"test/acc/{twin}"].item()
        assert summary.metrics[twin]["acc"] == pytest.approx(expected)
    text = str(summary)
    assert text.startswith("manualbp fit, 2 epochs (8 steps), compare=lockstep")
    assert "test accuracy" in text and "test loss" in text
    assert re.search(r"passed: 4 checks, worst max_rel \d\.\de-\d\d <= 1e-05, worst max_ulp", text)
    assert PASS_MAX_REL["32-true"] == 1e-5
    assert "weight divergence" in text
    assert "tensorboard --logdir" not in text  # no logger, no run directory to open


def test_a_wrong_formula_fails(quiet_trainer):
    """The verdict can fail: a sigmoid backward missing its (1 - y) factor."""
    torch.manual_seed(0)
    net = nn.Sequential(Linear(8, 6), BrokenSigmoid(), Linear(6, 3))
    module = TwinModule(net=net, compare="check", check_every_n_steps=2)
    trainer, record = fit_and_test(module, quiet_trainer)
    summary = summarize(trainer, module, "fit")
    assert record.worst_max_rel > 1e-2
    assert summary.passed is False
    assert re.search(r"FAILED: 4 checks, worst max_rel \d\.\de[-+]\d\d > 1e-05", str(summary))
    assert summary.divergence is None  # check mode trains one network


def test_the_record_travels_in_the_checkpoint(quiet_trainer, tmp_path):
    torch.manual_seed(0)
    module = TwinModule(net=MLP([8, 6, 3], "relu"), compare="lockstep", check_every_n_steps=3)
    trainer, record = fit_and_test(module, quiet_trainer)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    restored = RunRecord()
    evaluation = quiet_trainer(callbacks=[restored])
    evaluation.test(module, dataloaders=loaders()[1], ckpt_path=path, verbose=False)
    assert restored.state_dict() == record.state_dict()
    assert str(summarize(evaluation, module, "test")).startswith(
        "manualbp test, trained 2 epochs (8 steps)"
    )


def test_a_nan_check_is_the_worst_and_fails() -> None:
    summary = RunSummary(
        command="fit",
        stage="test",
        compare="check",
        checks=2,
        worst_max_rel=math.nan,
        tolerance=1e-3,
    )
    assert summary.passed is False
    record = RunRecord()
    record.worst_max_rel = math.nan
    record.checks = 1
    record._seen = None

    module = SimpleNamespace(
        last_check_values={"grad_check/max_rel": 1e-7, "grad_check/fc1.weight/max_ulp": 3.0}
    )
    trainer = SimpleNamespace(current_epoch=0, global_step=5)
    record.on_train_batch_end(trainer, module, None, None, 0)
    assert math.isnan(record.worst_max_rel) and record.worst_max_ulp == 3.0
    assert record.checks == 2


def test_mixed_precision_gets_numbers_without_a_verdict() -> None:
    summary = RunSummary(
        command="fit",
        stage="val",
        compare="check",
        checks=3,
        worst_max_rel=2e-3,
        precision="bf16-mixed",
        tolerance=PASS_MAX_REL.get("bf16-mixed"),
    )
    assert summary.passed is None
    assert "no pass/fail threshold for bf16-mixed" in str(summary)
    assert "val accuracy" not in str(summary)  # no metrics given, no line

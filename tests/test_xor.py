"""The classic 2-4-1 sigmoid MSE network learns XOR, with both twins (experiments/xor.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manualbp.data.xor import XORDataModule
from manualbp.train.cli import cli_main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_xor_experiment_converges_for_both_twins(tmp_path):
    """experiments/xor.yaml, shortened from 4 to 2 epochs of 500 full-batch steps (the loss is
    ~1e-4 by then): loss < 0.01 and 4/4 correct for the manual model and its twin."""
    cli = cli_main(
        [
            "fit",
            f"--config={EXPERIMENTS / 'xor.yaml'}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    assert cli.trainer.global_step == 1000
    metrics = cli.trainer.callback_metrics
    for model in ("manual", "autograd"):
        assert metrics[f"test/loss/{model}"].item() < 0.01
        assert metrics[f"test/acc/{model}"].item() == 1.0

    data = XORDataModule()
    module = cli.model
    with torch.no_grad():
        for model in (module.manual_model, module.autograd_model):
            outputs = model(data.inputs)  # (4, 1)
            assert torch.equal((outputs > 0.5).float(), data.targets)
            assert torch.nn.functional.mse_loss(outputs, data.targets).item() < 0.01
    assert module.worst_grad_max_rel.item() < 1e-5
    assert module.divergence()["divergence/max"].item() < 1e-4


def test_xor_datamodule_serves_the_truth_table():
    data = XORDataModule(steps_per_epoch=3)
    batches = list(data.train_dataloader())
    assert len(batches) == 3
    for inputs, targets in batches:
        assert torch.equal(inputs, torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
        assert torch.equal(targets, torch.tensor([[0.0], [1.0], [1.0], [0.0]]))
    assert len(list(data.val_dataloader())) == len(list(data.test_dataloader())) == 1
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive int"):
        XORDataModule(steps_per_epoch=0)

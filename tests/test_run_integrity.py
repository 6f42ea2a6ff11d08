"""What a run leaves behind is true: it stops at the first non-finite loss, never checkpoints
non-finite weights, ``last.ckpt`` is its end, and ``test``/``validate`` evaluate what was
trained (or refuse)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from manualbp.data import MNISTDataModule
from manualbp.nn import MLP
from manualbp.train.checkpoint import LastStateCheckpoint
from manualbp.train.cli import cli_main
from manualbp.train.module import TwinModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def first_nonfinite_step(mnist_root: Path, lr: float, steps: int) -> int:
    """The first step at which 784-200-10 ReLU / SGD(lr, momentum 0.9) on MNIST batches of 64
    (the DataModule's epoch-0 order, seed 0) has a non-finite loss: computed without
    Lightning, from the same weights and batches."""
    L.seed_everything(0)
    net = MLP([784, 200, 10])
    data = MNISTDataModule(data_dir=str(mnist_root), batch_size=64)
    data.setup("fit")
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for step, (inputs, targets) in zip(range(steps), data.train_dataloader(), strict=False):
        loss = torch.nn.functional.cross_entropy(net(inputs), targets)
        if not torch.isfinite(loss):
            return step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(f"the loss stayed finite for {steps} steps")


def test_a_diverging_run_stops_at_its_first_non_finite_loss(mnist_root, tmp_path):
    """lr 1e6 with a gradient check only every 1000 steps: the run stops at the step whose
    loss is first non-finite (not at the next check), names the twins, exits non-zero and
    writes no checkpoint."""
    expected = first_nonfinite_step(mnist_root, lr=1e6, steps=100)
    command = [
        sys.executable,
        "-m",
        "manualbp",
        "fit",
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--optimizer.init_args.lr=1e6",
        "--model.check_every_n_steps=1000",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=100",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    message = re.search(r"FloatingPointError: (.*)", result.stderr)
    assert message, result.stderr[-3000:]
    assert (
        f"the training loss of the manual and autograd model is not finite at step {expected}"
        in message.group(1)
    )
    assert "lr=1000000.0" in message.group(1)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_non_finite_weights_are_never_checkpointed(tmp_path, quiet_trainer):
    module = TwinModule(net=MLP([4, 3, 2]), compare="off")
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, loader)
    with torch.no_grad():
        module.manual_model.fc2.bias[0] = float("inf")
    with pytest.raises(
        FloatingPointError, match=r"parameters manual_model.fc2.bias hold non-finite"
    ):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


@pytest.mark.parametrize("compare", ["lockstep", "check", "off"])
def test_a_non_finite_loss_names_the_step_and_twin(quiet_trainer, compare):
    """NaN inputs at the third batch: the error names step 2, not the next check step."""
    inputs = torch.randn(8, 2)
    inputs[4] = float("nan")
    targets = torch.randint(0, 2, (8,))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    module = TwinModule(net=MLP([2, 4, 2], "sigmoid"), compare=compare, check_every_n_steps=100)
    trainer = quiet_trainer(limit_val_batches=0)
    twins = "manual and autograd" if compare == "lockstep" else "manual"
    with pytest.raises(
        FloatingPointError, match=rf"loss of the {twins} model is not finite at step 2;"
    ):
        trainer.fit(module, loader)


def _short_runs(quiet_trainer, tmp_path, checkpoint: ModelCheckpoint) -> tuple[L.Trainer, int]:
    """Three epochs in which only the first can improve the monitored accuracy (lr 0)."""
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 6, generator=generator), torch.arange(40) % 3)
    loader = DataLoader(data, batch_size=8)
    L.seed_everything(0)
    module = TwinModule(net=MLP([6, 5, 3]), optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    trainer = quiet_trainer(
        max_epochs=3, enable_checkpointing=True, callbacks=[checkpoint], log_dir=tmp_path
    )
    trainer.fit(module, loader, loader)
    return trainer, trainer.global_step


def test_last_ckpt_is_the_end_of_the_run(quiet_trainer, tmp_path):
    """When later epochs do not improve the monitored metric, Lightning's ModelCheckpoint
    leaves last.ckpt at the best epoch; manualbp's holds the final step."""
    options = {"monitor": "val/acc/manual", "mode": "max", "save_last": True}
    lightning_dir, manualbp_dir = tmp_path / "lightning", tmp_path / "manualbp"
    _, steps = _short_runs(quiet_trainer, tmp_path, ModelCheckpoint(lightning_dir, **options))
    stale = torch.load(lightning_dir / "last.ckpt", weights_only=False)
    assert stale["global_step"] < steps  # the behaviour this guards against
    _, steps = _short_runs(quiet_trainer, tmp_path, LastStateCheckpoint(manualbp_dir, **options))
    final = torch.load(manualbp_dir / "last.ckpt", weights_only=False)
    assert final["global_step"] == steps == 15
    assert final["epoch"] == 2


def _fit_tiny(root: Path, mnist_root: Path) -> Path:
    cli_main(
        [
            "fit",
            f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
            f"--data.init_args.data_dir={mnist_root}",
            f"--trainer.logger.init_args.save_dir={root}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=5",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
        ]
    )
    return root / "mnist_mlp" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_evaluation_without_a_checkpoint_uses_the_latest_fit_and_says_so(
    mnist_root, tmp_path, capsys, subcommand
):
    last = _fit_tiny(tmp_path, mnist_root)
    capsys.readouterr()
    options = [
        subcommand,
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.limit_test_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
    ]
    cli = cli_main(options)
    assert f"evaluating {last}, the final state of the latest fit" in capsys.readouterr().out
    trained = torch.load(last, weights_only=False)["state_dict"]
    for key, value in cli.model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_evaluation_without_any_fit_is_refused(mnist_root, tmp_path):
    with pytest.raises(SystemExit, match=r"no --ckpt_path given and no checkpoint of a fit"):
        cli_main(
            [
                "test",
                f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
                f"--data.init_args.data_dir={mnist_root}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
            ]
        )

"""Two-process DDP on CPU (gloo) through the ``manualbp`` command, in check and lockstep mode.

In check mode the autograd twin is frozen and its gradients are taken with
``torch.func.functional_call`` on detached copies of the manual weights, so DDP's reducer
never sees them: no "parameters that were not used in producing loss" error, no hang. Each
rank checks its own shard of the batch; the logged statistics are the worst over ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from manualbp.data import MNISTDataModule
from manualbp.data.device_loader import DeviceTensorLoader
from manualbp.nn import MLP
from manualbp.tools.runs import read_scalars
from manualbp.train.module import TwinModule

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TIMEOUT_S = 240


def run_to_completion(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``command`` in its own process group; on timeout kill the whole group (both DDP
    ranks) and fail. Returns ``(returncode, stdout + stderr)``."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"DDP run hung for {TIMEOUT_S} s:\n{output[-4000:]}")
    return process.returncode, output


def rank0_first_batch(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's first training batch of a 2-rank run: the even entries of epoch 0's order."""
    datamodule = MNISTDataModule(data_dir=str(data_dir), batch_size=64)
    datamodule.setup("fit")
    inputs, targets = datamodule.split_tensors("train")
    loader = DeviceTensorLoader(inputs, targets, 64, shuffle=True, seed=0, rank=0, world_size=2)
    return next(iter(loader))


@pytest.mark.slow
@pytest.mark.parametrize("compare", ["check", "lockstep"])
def test_ddp_two_cpu_processes(mnist_root, tmp_path, compare):
    script = shutil.which("manualbp", path=str(Path(sys.executable).parent))
    assert script or shutil.which("manualbp"), "the manualbp console script is not installed"
    command = [
        script or shutil.which("manualbp"),
        "fit",
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=ddp",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=6",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--model.compare={compare}",
        "--model.check_every_n_steps=2",
    ]
    returncode, output = run_to_completion(command, tmp_path)
    assert returncode == 0, output[-4000:]
    assert "were not used in producing" not in output
    assert "Traceback" not in output

    scalars = read_scalars(tmp_path / "ddp" / "version_0", finite_only=False)
    assert scalars["grad_check/max_rel"].steps.tolist() == [0, 2, 4]
    for param in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        for value in scalars[f"grad_check/{param}/max_rel"].values:
            assert value < 1e-5
        for value in scalars[f"grad_check/{param}/cosine"].values:
            assert value > 1 - 1e-6
    assert "test/acc/manual" in scalars and "val/acc/manual" in scalars

    if compare == "lockstep":
        assert scalars["divergence/max"].steps.tolist() == [0, 2, 4]
        assert all(value < 1e-7 for value in scalars["divergence/max"].values)
        assert scalars["train/loss/autograd"].steps.tolist() == [1, 3, 5]
    else:
        assert not any(tag.startswith("divergence/") for tag in scalars)
        # The twin's loss in check mode is rank 0's, on rank 0's own shard of the data.
        L.seed_everything(0)
        module = TwinModule(net=MLP([784, 200, 10]), compare="check")
        inputs, targets = rank0_first_batch(mnist_root)
        expected = module.gradient_report(inputs, targets).loss_autograd.item()
        assert scalars["train/loss/autograd"].pairs()[0] == (0, pytest.approx(expected, rel=1e-6))

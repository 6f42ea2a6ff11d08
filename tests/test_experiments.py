"""The experiments of issue 14: a user's own Function and network trained through
``manualbp fit`` with its twin, a network the registry cannot twin refused, and the optimizer
and gradient-clipping configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manualbp
from manualbp.compare import compare_gradients
from manualbp.tools.runs import read_scalars
from manualbp.train.cli import cli_main

REPOSITORY = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPOSITORY / "experiments"
TRAIN_STEPS = 4


def manualbp_command() -> str:
    """The installed console script, next to this interpreter when it is in a venv."""
    script = shutil.which("manualbp", path=str(Path(sys.executable).parent))
    script = script or shutil.which("manualbp")
    assert script, "the manualbp console script is not installed (pip install -e .)"
    return script


@pytest.fixture
def user_function(monkeypatch: pytest.MonkeyPatch):
    """``experiments.user_function`` imported as ``manualbp`` imports it from the repository
    root (the working directory on ``sys.path``)."""
    monkeypatch.syspath_prepend(str(REPOSITORY))
    from experiments import user_function

    return user_function


def test_the_users_function_passes_manualbp_check(user_function) -> None:
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    report = manualbp.check(user_function.gelu, F.gelu, x)
    assert report.ok, str(report)
    assert report["forward"].statistics["max_abs"] == 0.0  # torch's forward kernel


def test_the_users_network_is_twinned_with_torch_gelu(user_function, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main([f"--config={EXPERIMENTS / 'user_function.yaml'}"], run=False)
    manual, twin = cli.model.manual_model, cli.model.autograd_model
    assert type(manual) is type(twin) is user_function.GELUNet
    assert type(manual.act1) is user_function.GELU and type(twin.act1) is nn.GELU
    assert type(manual.fc1) is manualbp.nn.Linear and type(twin.fc1) is nn.Linear
    x = torch.randn(32, 784, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(2))
    report = compare_gradients(manual, twin, cli.model.manual_loss, nn.CrossEntropyLoss(), x, y)
    assert "GELUFunction" in report.handwritten
    report.assert_close()


def test_the_users_network_trains_through_manualbp_fit(mnist_root: Path, tmp_path: Path) -> None:
    """The real console script from the repository root, as the config's comment says."""
    command = [
        manualbp_command(),
        "fit",
        "--config=experiments/user_function.yaml",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={TRAIN_STEPS}",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
        "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false",
        "--model.check_every_n_steps=2",
    ]
    result = subprocess.run(
        command, cwd=REPOSITORY, capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log_dir = tmp_path / "user_function" / "version_0"
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    scalars = read_scalars(log_dir)
    assert scalars["grad_check/fc1.weight/max_rel"].steps.tolist() == [0, 2]
    assert scalars["grad_check/max_rel"].values.max() < 1e-5  # GELU's backward vs torch's
    manual, twin = scalars["train/loss/manual"].values, scalars["train/loss/autograd"].values
    assert len(manual) == 2 and torch.allclose(torch.tensor(manual), torch.tensor(twin))
    assert "test/acc/manual" in scalars


UNTWINNABLE_NETWORK = """
import torch
from torch import nn

import manualbp.nn as mnn


class SquareFunction(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_output


class Square(nn.Module):  # computes by hand, never registered with register_twin
    def forward(self, x):
        return SquareFunction.apply(x)


class SquareNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = mnn.Linear(784, 16)
        self.square = Square()
        self.fc2 = mnn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.square(self.fc1(x)))
"""


def test_a_network_the_registry_cannot_twin_is_refused_at_fit(mnist_root, tmp_path) -> None:
    (tmp_path / "my_net.py").write_text(textwrap.dedent(UNTWINNABLE_NETWORK))
    (tmp_path / "my_net.yaml").write_text("model:\n  net:\n    class_path: my_net.SquareNet\n")
    command = [
        manualbp_command(),
        "fit",
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        "--config=my_net.yaml",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "cannot make the autograd twin of square (Square)" in result.stderr
    assert "manualbp.nn.register_twin(Square, <torch module>)" in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "config, optimizer, settings",
    [
        ("optimizers_sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0}),
        ("optimizers_momentum", torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
        ("optimizers_adam", torch.optim.Adam, {"lr": 0.001, "betas": (0.9, 0.999)}),
    ],
)
def test_the_optimizer_comparison_gives_each_twin_its_optimizer(
    tmp_path, monkeypatch, config, optimizer, settings
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main([f"--config={EXPERIMENTS / f'{config}.yaml'}"], run=False)
    assert cli.model.manual_model.sizes == [784, 256, 128, 10]
    assert cli.model.manual_model.activation == "relu"
    configured = cli.model.configure_optimizers()  # no scheduler: the optimizer alone
    optimizers = configured.optimizers
    assert set(optimizers) == {"manual", "autograd"}
    assert optimizers["manual"] is not optimizers["autograd"]
    for inner in optimizers.values():
        assert type(inner) is optimizer
        group = inner.param_groups[0]
        assert {key: group[key] for key in settings} == settings


def test_the_clipped_deep_sigmoid_config_clips_gradients(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = cli_main([f"--config={EXPERIMENTS / 'mnist_sigmoid_deep_clipped.yaml'}"], run=False)
    plain = cli_main([f"--config={EXPERIMENTS / 'mnist_sigmoid_deep.yaml'}"], run=False)
    assert cli.trainer.gradient_clip_val == 1.0
    assert cli.trainer.gradient_clip_algorithm == "norm"
    assert plain.trainer.gradient_clip_val is None
    assert cli.model.manual_model.sizes == plain.model.manual_model.sizes
    assert cli.model.manual_model.activation == "sigmoid"

"""TwinModule trained through Lightning on real MNIST (CPU): check, lockstep, off, resume.

Measured on this suite's runs (CPU, float32): the per-step gradient check of a correct model
gives ``max_rel`` of 1e-7..5e-7 (1.5e-6 at worst over 300 steps) and cosines of 1 to within
1e-7; lockstep twins trained for 30 steps (784-200-10 ReLU, SGD momentum, lr 0.01) sit
2e-8..3e-8 apart, a few float32 ulps of weights of size ~0.05.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import manualbp.functional
from manualbp.data import MNISTDataModule
from manualbp.nn import MLP, MSELoss
from manualbp.tools.runs import read_scalars
from manualbp.train.callbacks import GradientMonitor
from manualbp.train.checkpoint import LastStateCheckpoint
from manualbp.train.cli import cli_main
from manualbp.train.module import HP_METRICS, TwinModule
from manualbp.train.twin_optimizers import TwinOptimizers

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# Float32 round-off bounds for a correct model (measured values are in the module docstring).
MAX_REL_TOLERANCE = 1e-5
COSINE_TOLERANCE = 1e-6
# Lockstep divergence after 30 steps was measured at 2.2e-8 (ReLU) to 3.0e-8 (tanh); the bound
# leaves a factor of ~4 for other CPUs' summation orders while staying far below any real
# error (a 1% gradient error moves the weights by ~1e-5 in 30 steps).
LOCKSTEP_DIVERGENCE_TOLERANCE = 1e-7


def mnist(root: Path, batch_size: int = 64) -> MNISTDataModule:
    return MNISTDataModule(data_dir=str(root), batch_size=batch_size, eval_batch_size=500)


# ----------------------------------------------------------------------------- check mode
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_check_mode_gradients_agree_to_float32_roundoff(
    mnist_root, tmp_path, quiet_trainer, activation
):
    L.seed_everything(0)
    module = TwinModule(
        net=MLP([784, 64, 32, 10], activation), compare="check", check_every_n_steps=4
    )
    initial_twin = copy.deepcopy(module.autograd_model.state_dict())
    trainer = quiet_trainer(
        log_dir=tmp_path, limit_train_batches=12, limit_val_batches=1, log_every_n_steps=4
    )
    trainer.fit(module, mnist(mnist_root))

    scalars = read_scalars(tmp_path, finite_only=False)
    assert scalars["grad_check/max_rel"].steps.tolist() == [0, 4, 8]  # at the step measured
    assert scalars["train/loss/autograd"].steps.tolist() == [0, 4, 8]  # the twin's, at checks
    params = [name for name, _ in module.manual_model.named_parameters()]
    for name in params:
        for value in scalars[f"grad_check/{name}/max_rel"].values:
            assert value < MAX_REL_TOLERANCE, name
        for value in scalars[f"grad_check/{name}/cosine"].values:
            assert value > 1 - COSINE_TOLERANCE, name
        for value in scalars[f"grad_check/{name}/norm_ratio"].values:
            assert value == pytest.approx(1.0, abs=MAX_REL_TOLERANCE), name
    worst = scalars["grad_check/max_rel"].values.max()
    assert scalars["grad_check/worst_max_rel"].last == pytest.approx(worst)
    assert scalars["hp/worst_grad_max_rel"].pairs()[-1] == (12, pytest.approx(worst))
    module.last_gradient_report.assert_close(rtol=MAX_REL_TOLERANCE)

    # The twin only lends its structure: frozen, out of the optimizer, weights untouched.
    assert not any(p.requires_grad for p in module.autograd_model.parameters())
    assert len(trainer.optimizers[0].param_groups) == 1
    for key, value in module.autograd_model.state_dict().items():
        assert torch.equal(value, initial_twin[key])


def test_check_mode_flags_a_broken_backward(mnist_root, tmp_path, quiet_trainer, monkeypatch):
    """A sigmoid backward that is 1% too large must be caught, layer by layer: fc2 sits
    behind one sigmoid (error 1%), fc1 behind two (2.01%), the output layer fc3 behind none."""
    correct_backward = manualbp.functional.SigmoidFunction.backward

    def backward_one_percent_too_large(ctx, grad_output):
        return correct_backward(ctx, grad_output) * 1.01

    monkeypatch.setattr(
        manualbp.functional.SigmoidFunction,
        "backward",
        staticmethod(backward_one_percent_too_large),
    )
    L.seed_everything(0)
    module = TwinModule(
        net=MLP([784, 64, 32, 10], "sigmoid"), compare="check", check_every_n_steps=4
    )
    trainer = quiet_trainer(
        log_dir=tmp_path, limit_train_batches=8, limit_val_batches=1, log_every_n_steps=4
    )
    trainer.fit(module, mnist(mnist_root))

    scalars = read_scalars(tmp_path, finite_only=False)
    for step, value in scalars["grad_check/max_rel"].pairs():
        assert value == pytest.approx(0.0201, rel=0.01), step
    for value in scalars["grad_check/fc1.weight/max_rel"].values:
        assert value == pytest.approx(0.0201, rel=0.01)
    for value in scalars["grad_check/fc2.weight/max_rel"].values:
        assert value == pytest.approx(0.01, rel=0.01)
    for value in scalars["grad_check/fc3.weight/max_rel"].values:
        assert value < MAX_REL_TOLERANCE
    assert scalars["hp/worst_grad_max_rel"].last == pytest.approx(0.0201, rel=0.01)

    report = module.last_gradient_report
    assert report.max_rel == pytest.approx(0.0201, rel=0.01)
    with pytest.raises(AssertionError) as excinfo:
        report.assert_close(rtol=MAX_REL_TOLERANCE)
    message = str(excinfo.value)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert name in message.splitlines()[0]
    assert "fc3" not in message.splitlines()[0]


# -------------------------------------------------------------------------- lockstep mode
def test_lockstep_twins_stay_together_on_mnist(mnist_root, tmp_path, quiet_trainer):
    """30 steps of 784-200-10 ReLU / SGD momentum: every parameter of the two twins within
    LOCKSTEP_DIVERGENCE_TOLERANCE (1e-7) of each other; both losses and accuracies logged."""
    L.seed_everything(0)
    module = TwinModule(net=MLP([784, 200, 10]), compare="lockstep", check_every_n_steps=10)
    initial = copy.deepcopy(module.manual_model.state_dict())
    for key, value in module.autograd_model.state_dict().items():
        assert torch.equal(value, initial[key])  # identical initial weights
    trainer = quiet_trainer(
        log_dir=tmp_path, limit_train_batches=30, limit_val_batches=1, log_every_n_steps=10
    )
    trainer.fit(module, mnist(mnist_root))

    assert trainer.global_step == 30
    divergence = module.divergence()
    assert divergence["divergence/max"].item() < LOCKSTEP_DIVERGENCE_TOLERANCE
    assert not torch.equal(module.manual_model.fc1.weight, initial["fc1.weight"])  # it trained

    scalars = read_scalars(tmp_path, finite_only=False)
    assert scalars["divergence/max"].steps.tolist() == [0, 10, 20]
    assert scalars["divergence/max"].values[0] == 0.0
    assert all(value < LOCKSTEP_DIVERGENCE_TOLERANCE for value in scalars["divergence/max"].values)
    hp_divergence = scalars["hp/divergence_max"].pairs()[-1]
    assert hp_divergence == (30, pytest.approx(divergence["divergence/max"]))
    for metric in ("loss", "acc"):
        manual, autograd = scalars[f"train/{metric}/manual"], scalars[f"train/{metric}/autograd"]
        assert manual.steps.tolist() == autograd.steps.tolist() == [9, 19, 29]
        for m, a in zip(manual.values, autograd.values, strict=True):
            assert m == pytest.approx(a, rel=1e-5)
    assert scalars["train/loss/manual"].last < scalars["train/loss/manual"].values[0]
    for tag in ("val/acc/manual", "val/acc/autograd", "val/loss/manual", "val/loss/autograd"):
        assert scalars[tag].steps.tolist() == [29]  # Lightning labels it with the last step


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_off_mode_logs_fresh_training_metrics(mnist_root, tmp_path, quiet_trainer, backend):
    """compare="off" trains one model (the manual one, or the autograd baseline). Training
    metrics are logged only on the steps Lightning writes: the value written at step s must
    be the loss of step s, not a stale one."""

    class LossRecorder(L.Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[trainer.global_step - 1] = outputs["loss"].item()

    recorder = LossRecorder()
    L.seed_everything(0)
    module = TwinModule(
        net=MLP([784, 32, 10]), compare="off", check_every_n_steps=5, backend=backend
    )
    initial = copy.deepcopy(module.manual_model.state_dict())
    trainer = quiet_trainer(
        log_dir=tmp_path,
        limit_train_batches=9,
        limit_val_batches=1,
        log_every_n_steps=3,
        callbacks=[recorder, GradientMonitor(norm_every_n_steps=4, histogram_every_n_steps=0)],
    )
    trainer.fit(module, mnist(mnist_root))

    scalars = read_scalars(tmp_path, finite_only=False)
    logged = scalars[f"train/loss/{backend}"]
    assert logged.steps.tolist() == [2, 5, 8]
    for step, value in logged.pairs():
        assert value == pytest.approx(recorder.losses[step], rel=1e-7)
    assert scalars[f"train/acc/{backend}"].steps.tolist() == [2, 5, 8]
    assert scalars[f"val/acc/{backend}"].steps.tolist() == [8]
    assert not any(tag.startswith(("grad_check/", "divergence/")) for tag in scalars)
    other = "autograd" if backend == "manual" else "manual"
    assert not any(tag.endswith(f"/{other}") for tag in scalars)
    # The gradient monitor follows the trained model; a frozen twin has no gradients.
    params = ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight")
    norms = sorted(tag for tag in scalars if tag.startswith("grad_norm/"))
    assert norms == [f"grad_norm/{backend}/{param}" for param in params]
    assert scalars[norms[0]].steps.tolist() == [0, 4, 8]
    if backend == "manual":
        assert module.autograd_model is None
    else:
        assert (
            module.manual_model.backend == "manual" and module.autograd_model.backend == "autograd"
        )
        for key, value in module.manual_model.state_dict().items():
            assert torch.equal(value, initial[key])  # built for identical weights, not trained
        assert not torch.equal(module.autograd_model.fc1.weight, initial["fc1.weight"])


# ---------------------------------------------------------------------- resume, checkpoints
@pytest.mark.slow
def test_resume_from_last_checkpoint_is_exact(mnist_root, tmp_path):
    """Two epochs straight == one epoch, then a resume from its last.ckpt for the second:
    identical weights, optimizer state and logged metrics of the second epoch."""
    common = [
        f"--config={EXPERIMENTS / 'mnist_mlp.yaml'}",
        f"--data.init_args.data_dir={mnist_root}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=resume",
        "--trainer.limit_train_batches=8",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.check_every_n_steps=3",
        "--test_after_fit=false",
    ]
    cli_main(["fit", *common, "--trainer.max_epochs=2", "--trainer.logger.init_args.version=full"])
    cli_main(["fit", *common, "--trainer.max_epochs=1", "--trainer.logger.init_args.version=a"])
    first_half = tmp_path / "resume" / "a" / "checkpoints" / "last.ckpt"
    cli_main(
        [
            "fit",
            *common,
            "--trainer.max_epochs=2",
            "--trainer.logger.init_args.version=b",
            f"--ckpt_path={first_half}",
        ]
    )

    full = torch.load(tmp_path / "resume/full/checkpoints/last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resume/b/checkpoints/last.ckpt", weights_only=False)
    assert full["global_step"] == resumed["global_step"] == 16
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for twin in ("manual", "autograd"):  # each twin's own optimizer state
        full_state = full["optimizer_states"][0][twin]["state"]
        resumed_state = resumed["optimizer_states"][0][twin]["state"]
        assert len(full_state) == 4
        for index, buffers in full_state.items():
            momentum = resumed_state[index]["momentum_buffer"]
            assert torch.equal(buffers["momentum_buffer"], momentum)

    straight = read_scalars(tmp_path / "resume" / "full", finite_only=False)
    second_half = read_scalars(tmp_path / "resume" / "b", finite_only=False)
    for tag in (
        "val/acc/manual",
        "val/acc/autograd",
        "val/loss/manual",
        "val/loss/autograd",
        "train/loss/manual",
        "train/loss/autograd",
        "grad_check/max_rel",
        "divergence/max",
    ):
        expected = [(step, value) for step, value in straight[tag].pairs() if step >= 8]
        assert expected, tag
        assert second_half[tag].pairs() == expected, tag


def test_checkpoint_holds_both_models_and_each_twins_optimizer(mnist_root, tmp_path, quiet_trainer):
    def network() -> MLP:
        return MLP([784, 16, 10], "tanh")

    adam = functools.partial(torch.optim.Adam, lr=0.003, weight_decay=1e-4)
    step_lr = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    L.seed_everything(0)
    module = TwinModule(
        net=network(), loss=MSELoss(), optimizer=adam, lr_scheduler=step_lr, check_every_n_steps=2
    )
    initial = copy.deepcopy(module.state_dict())
    checkpoint = LastStateCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(
        log_dir=tmp_path,
        limit_train_batches=5,
        limit_val_batches=1,
        enable_checkpointing=True,
        callbacks=[checkpoint],
    )
    trainer.fit(module, mnist(mnist_root))

    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    assert dict(saved["hyper_parameters"]) == {
        "compare": "lockstep",
        "check_every_n_steps": 2,
        "backend": "manual",
        "cuda_graph": False,
        "direct": False,
    }
    (optimizers,) = saved["optimizer_states"]
    assert set(optimizers) == {"manual", "autograd"}  # one optimizer per twin
    for name in ("manual", "autograd"):
        assert optimizers[name]["param_groups"][0]["weight_decay"] == 1e-4
        assert optimizers[name]["param_groups"][0]["name"] == name
        assert saved["lr_schedulers"][0][name]["gamma"] == 0.5

    # Built in Python, the network is passed again (a LightningCLI checkpoint rebuilds it).
    loaded = TwinModule.load_from_checkpoint(path, net=network(), loss=MSELoss())
    assert loaded.manual_model.backend == "manual"
    assert loaded.autograd_model.backend == "autograd"
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
        if key.startswith(("manual_model.", "autograd_model.")):
            assert not torch.equal(value, initial[key]), f"{key} was not trained"
    assert loaded.divergence()["divergence/max"].item() < LOCKSTEP_DIVERGENCE_TOLERANCE


# ------------------------------------------------------------------------- failure modes
@pytest.mark.parametrize("compare", ["lockstep", "check", "off"])
def test_non_finite_loss_stops_training_with_a_clear_error(quiet_trainer, compare):
    inputs = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])  # (2, 2)
    targets = torch.tensor([[1.0], [0.0]])  # (2, 1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    module = TwinModule(net=MLP([2, 4, 1], "sigmoid"), loss=MSELoss(), compare=compare)
    trainer = quiet_trainer(limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"training loss of the manual.* at step 0"):
        trainer.fit(module, loader)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"compare": "sideways"}, "compare must be one of"),
        ({"check_every_n_steps": 0}, "check_every_n_steps must be >= 1"),
        ({"check_every_n_steps": 2.5}, "check_every_n_steps must be an int"),
        ({"backend": "jax"}, "backend must be one of"),
        ({"backend": "autograd", "compare": "check"}, "backend='autograd' needs compare='off'"),
        ({"cuda_graph": True, "direct": True}, "direct=True trains the manual network"),
        ({"cuda_graph": "yes", "compare": "off"}, "cuda_graph must be a bool"),
        ({"net": torch.nn.Linear(4, 2)}, r"net \(Linear\) holds no handwritten module"),
    ],
)
def test_bad_arguments_are_rejected(arguments, message):
    with pytest.raises(ValueError, match=message):
        TwinModule(**arguments)


def test_net_and_loss_must_be_modules():
    with pytest.raises(TypeError, match=r"net must be an nn.Module"):
        TwinModule(net=[784, 10])


def test_each_trained_twin_gets_its_own_optimizer_and_scheduler():
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.5, nesterov=True)
    lockstep = TwinModule(net=MLP([4, 3, 2]), optimizer=sgd)
    optimizer = lockstep.configure_optimizers()
    assert isinstance(optimizer, TwinOptimizers)
    manual, autograd = optimizer.optimizers["manual"], optimizer.optimizers["autograd"]
    assert manual is not autograd and isinstance(manual, torch.optim.SGD)
    assert manual.param_groups[0]["params"] == list(lockstep.manual_model.parameters())
    assert autograd.param_groups[0]["params"] == list(lockstep.autograd_model.parameters())
    assert manual.param_groups[0]["momentum"] == 0.5 and manual.param_groups[0]["nesterov"]

    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3)
    check = TwinModule(net=MLP([4, 3, 2]), compare="check", optimizer=adam, lr_scheduler=step)
    config = check.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.Adam)
    assert len(config["optimizer"].param_groups) == 1
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)

    default = TwinModule(net=MLP([4, 3, 2]), compare="off").configure_optimizers()
    assert isinstance(default, torch.optim.SGD)
    assert (default.defaults["lr"], default.defaults["momentum"]) == (0.01, 0.9)


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_predict_step_returns_the_trained_models_outputs(backend):
    module = TwinModule(net=MLP([4, 3, 2]), compare="off", backend=backend)
    inputs, targets = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    trained = module.autograd_model if backend == "autograd" else module.manual_model
    expected = trained(inputs)
    assert torch.equal(module.predict_step((inputs, targets), 0), expected)
    assert torch.equal(module.predict_step(inputs, 0), expected)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"compare": "lockstep"}, HP_METRICS),
        (
            {"compare": "check"},
            ("hp/val_acc_manual", "hp/test_acc_manual", "hp/worst_grad_max_rel"),
        ),
        ({"compare": "off"}, ("hp/val_acc_manual", "hp/test_acc_manual")),
        (
            {"compare": "off", "backend": "autograd"},
            ("hp/val_acc_autograd", "hp/test_acc_autograd"),
        ),
    ],
)
def test_hparams_tab_registers_the_metrics_the_mode_produces(arguments, expected):
    assert TwinModule(net=MLP([4, 3, 2]), **arguments).hp_metrics() == expected

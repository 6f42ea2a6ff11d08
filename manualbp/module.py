"""The LightningModule that trains a manual network beside its builtin-autograd twin.

Three comparison modes (``compare=``):

* ``"check"``: train the manual model; every ``check_every_n_steps`` compute the autograd
  gradients on the same batch at the same weights and log their agreement per parameter.
* ``"lockstep"``: train both models, each on its own gradients, on the same batches; log both
  losses and accuracies and the per-parameter divergence. The gradient check runs too.
* ``"off"``: the manual model alone, the fast path for benchmarks.

Both models sit in one optimizer (one parameter group each). SGD and Adam update every
tensor independently, so this is the same as two optimizers, and one ``step`` per batch keeps
Lightning's automatic optimization, ``global_step`` and checkpoints simple. Because the two
models share no parameters, ``d(loss_manual + loss_autograd)/dθ_manual`` is exactly
``d loss_manual/dθ_manual``: one backward pass serves both.

TensorBoard tags (stable): ``train/loss/{manual,autograd}``, ``train/acc/{..}``,
``val/loss/{..}``, ``val/acc/{..}``, ``test/..``, ``grad_check/<param>/<statistic>``,
``grad_check/max_rel``, ``grad_check/worst_max_rel``, ``divergence/<param>``,
``divergence/max``, ``hp/*`` (hparams-tab metrics).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from manualbp.compare import compare_gradients
from manualbp.nn import MLP, CrossEntropyLoss, MSELoss, autograd_twin

__all__ = ["HP_METRICS", "TwinModule"]

CompareMode = Literal["check", "lockstep", "off"]
LossName = Literal["cross_entropy", "mse"]
OptimizerName = Literal["sgd", "adam"]
SchedulerName = Literal["none", "step", "cosine"]

# Metrics shown in TensorBoard's hparams tab next to the hyperparameters.
HP_METRICS = (
    "hp/val_acc_manual",
    "hp/val_acc_autograd",
    "hp/test_acc_manual",
    "hp/test_acc_autograd",
    "hp/worst_grad_max_rel",
)


class TwinModule(L.LightningModule):
    """A manual MLP and its autograd twin with identical initial weights, trained side by side.

    Args:
        sizes: layer widths, input first (``[784, 200, 10]`` for MNIST).
        activation: hidden nonlinearity: ``relu``, ``sigmoid`` or ``tanh``.
        output_activation: optional nonlinearity on the output (``sigmoid`` for XOR).
        loss: ``cross_entropy`` (class targets) or ``mse`` (float targets, or class targets
            turned into one-hot vectors).
        optimizer: ``sgd`` (with ``momentum``, optional ``nesterov``) or ``adam``.
        lr: learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum for SGD.
        weight_decay: L2 penalty added by the optimizer.
        lr_scheduler: ``none``, ``step`` (times ``lr_gamma`` every ``lr_step_size`` epochs) or
            ``cosine`` (to zero over ``trainer.max_epochs``).
        lr_step_size: epochs between decays of the ``step`` scheduler.
        lr_gamma: decay factor of the ``step`` scheduler.
        compare: ``check``, ``lockstep`` or ``off`` (see module docstring).
        check_every_n_steps: steps between gradient checks and divergence measurements
            (step 0 is always checked).

    Batches: ``(inputs (N, sizes[0]), targets)`` with ``targets`` ``(N,)`` int64 classes, or
    ``(N, sizes[-1])`` floats for ``mse``.
    """

    def __init__(
        self,
        sizes: list[int] = [784, 200, 10],  # noqa: B006 - LightningCLI needs a visible default
        activation: Literal["relu", "sigmoid", "tanh"] = "relu",
        output_activation: Literal["relu", "sigmoid", "tanh"] | None = None,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        lr_scheduler: SchedulerName = "none",
        lr_step_size: int = 10,
        lr_gamma: float = 0.1,
        compare: CompareMode = "lockstep",
        check_every_n_steps: int = 50,
    ) -> None:
        super().__init__()
        _check_choice("loss", loss, ("cross_entropy", "mse"))
        _check_choice("optimizer", optimizer, ("sgd", "adam"))
        _check_choice("lr_scheduler", lr_scheduler, ("none", "step", "cosine"))
        _check_choice("compare", compare, ("check", "lockstep", "off"))
        if not lr > 0:
            raise ValueError(f"TwinModule: lr must be > 0, got {lr}")
        if check_every_n_steps < 1:
            raise ValueError(
                f"TwinModule: check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        self.save_hyperparameters()
        self.manual_model = MLP(sizes, activation, "manual", output_activation)
        self.manual_loss = CrossEntropyLoss() if loss == "cross_entropy" else MSELoss()
        self.autograd_loss = autograd_twin(self.manual_loss)
        self.autograd_model: nn.Module | None = None
        if compare != "off":
            self.autograd_model = autograd_twin(self.manual_model)
            # In check mode the twin lends only its structure: gradients are taken at the
            # manual weights. Frozen, it is skipped by the optimizer and by DDP.
            self.autograd_model.requires_grad_(compare == "lockstep")
        self.register_buffer("worst_grad_max_rel", torch.zeros((), dtype=torch.float64))

    # ----------------------------------------------------------------- helpers
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The manual model's outputs ``(N, sizes[-1])`` for ``inputs (N, sizes[0])``."""
        return self.manual_model(inputs)

    @property
    def lockstep(self) -> bool:
        return self.hparams.compare == "lockstep"

    def _loss_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "mse" and not targets.is_floating_point():
            return F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)  # (N, C)
        return targets

    def _manual_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.manual_loss(outputs, self._loss_targets(outputs, targets))

    def _autograd_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.autograd_loss(outputs, self._loss_targets(outputs, targets))

    @staticmethod
    def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not targets.is_floating_point():
            return (outputs.argmax(dim=-1) == targets).float().mean()
        # Float targets (XOR-style): a sample is right when every output is on the right side
        # of 0.5.
        return ((outputs > 0.5) == (targets > 0.5)).all(dim=-1).float().mean()

    def _models(self) -> list[tuple[str, nn.Module]]:
        models = [("manual", self.manual_model)]
        if self.lockstep:
            models.append(("autograd", self.autograd_model))
        return models

    # ---------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        inputs, targets = batch
        due = self.global_step % self.hparams.check_every_n_steps == 0
        if due and self.autograd_model is not None:
            self._log_gradient_check(inputs, targets)
        if due and self.lockstep:
            self._log_divergence()

        total = None
        for name, model in self._models():
            outputs = model(inputs)
            loss_fn = self._manual_loss if name == "manual" else self._autograd_loss
            loss = loss_fn(outputs, targets)
            if due and not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the {name} model's training loss is {loss.item()} at step "
                    f"{self.global_step}; lower the learning rate (lr={self.hparams.lr})"
                )
            self.log(f"train/loss/{name}", loss, prog_bar=name == "manual")
            self.log(f"train/acc/{name}", self._accuracy(outputs.detach(), targets))
            total = loss if total is None else total + loss
        return total

    def _log_gradient_check(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        report = compare_gradients(
            self.manual_model,
            self.autograd_model,
            self._manual_loss,
            self._autograd_loss,
            inputs,
            targets,
        )
        scalars = report.as_scalars()
        self.worst_grad_max_rel = torch.maximum(
            self.worst_grad_max_rel, scalars["grad_check/max_rel"]
        )
        scalars["grad_check/worst_max_rel"] = self.worst_grad_max_rel
        if not self.lockstep:  # in check mode this is the twin's only loss
            self.log("train/loss/autograd", report.loss_autograd)
        for key, value in scalars.items():
            worst_is_min = key.endswith(("exact", "cosine"))
            self.log(key, value.float(), sync_dist=True, reduce_fx="min" if worst_is_min else "max")

    @torch.no_grad()
    def _log_divergence(self) -> None:
        autograd_params = dict(self.autograd_model.named_parameters())
        largest = []
        for name, manual_param in self.manual_model.named_parameters():
            gap = (manual_param - autograd_params[name]).abs().max()
            largest.append(gap)
            self.log(f"divergence/{name}", gap, sync_dist=True, reduce_fx="max")
        self.log("divergence/max", torch.stack(largest).max(), sync_dist=True, reduce_fx="max")

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        inputs, targets = batch
        for name, model in self._models():
            outputs = model(inputs)
            loss_fn = self._manual_loss if name == "manual" else self._autograd_loss
            accuracy = self._accuracy(outputs, targets)
            self.log(f"{stage}/loss/{name}", loss_fn(outputs, targets), sync_dist=True)
            self.log(f"{stage}/acc/{name}", accuracy, sync_dist=True, prog_bar=name == "manual")
            self.log(f"hp/{stage}_acc_{name}", accuracy, sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_fit_start(self) -> None:
        # Register the hparams-tab metrics once; their values arrive under the same tags.
        if isinstance(self.logger, TensorBoardLogger):
            self.logger.log_hyperparams(self.hparams, dict.fromkeys(HP_METRICS, float("nan")))

    def on_train_end(self) -> None:
        if isinstance(self.logger, TensorBoardLogger) and self.autograd_model is not None:
            self.logger.log_metrics(
                {"hp/worst_grad_max_rel": float(self.worst_grad_max_rel)}, self.global_step
            )

    # -------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        groups = [{"params": list(self.manual_model.parameters())}]
        if self.lockstep:
            groups.append({"params": list(self.autograd_model.parameters())})
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                groups,
                lr=hp.lr,
                momentum=hp.momentum,
                nesterov=hp.nesterov,
                weight_decay=hp.weight_decay,
            )
        else:
            optimizer = torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_scheduler == "none":
            return optimizer
        if hp.lr_scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=hp.lr_step_size, gamma=hp.lr_gamma
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, self.trainer.max_epochs or 1)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"TwinModule: {name} must be one of {choices}, got {value!r}")

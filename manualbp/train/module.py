"""The LightningModule that trains a manual network beside its builtin-autograd twin.

Three comparison modes (``compare=``):

* ``"check"``: train the manual model; every ``check_every_n_steps`` compute the autograd
  gradients on the same batch at the same weights and log their agreement per parameter.
  The twin's parameters are frozen (``requires_grad=False``): it lends only its structure,
  so neither the optimizer nor DDP's gradient reducer ever sees them.
* ``"lockstep"``: train both models, each on its own gradients, on the same batches; log both
  losses and accuracies and the per-parameter divergence. The gradient check runs too.
* ``"off"``: one model alone, the fast path for benchmarks: the manual model, or with
  ``backend="autograd"`` its builtin-autograd twin (the baseline through the same Lightning
  path).

Both models sit in one optimizer (one parameter group each). SGD and Adam update every
tensor independently, so this is the same as two optimizers, and one ``step`` per batch keeps
Lightning's automatic optimization, ``global_step`` and checkpoints simple. Because the two
models share no parameters, ``d(loss_manual + loss_autograd)/dθ_manual`` is exactly
``d loss_manual/dθ_manual``: one backward pass serves both.

TensorBoard tags (stable):

* through ``self.log`` on the steps where Lightning writes (every ``log_every_n_steps``):
  ``train/loss/{manual,autograd}``, ``train/acc/{manual,autograd}``;
* at the end of every validation/test epoch: ``val/loss/..``, ``val/acc/..``, ``test/..``
  and the hparams-tab metrics ``hp/{val,test}_acc_{manual,autograd}``;
* written directly at the step they were measured on, every ``check_every_n_steps``:
  ``grad_check/<param>/<statistic>``, ``grad_check/{max_rel,all_exact,loss_diff}``,
  ``grad_check/worst_max_rel``, ``divergence/<param>``, ``divergence/max`` (and, in check
  mode, ``train/loss/autograd``: the twin's loss at the manual weights);
* at the end of training: ``hp/worst_grad_max_rel`` and ``hp/divergence_max``.

Per-step cost: ``self.log`` costs Lightning about a millisecond per call on CPU, more than a
whole training step of a small net, so the training metrics are logged only on the steps
Lightning writes to the loggers; values measured in between would never have reached
TensorBoard. The check steps gather their statistics across ranks in one ``all_gather`` and
convert them to numbers once; other steps cause no host-device synchronisation.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from manualbp.compare import GradientReport, compare_gradients
from manualbp.nn import MLP, CrossEntropyLoss, MSELoss, autograd_twin
from manualbp.train.cuda_graph import CUDAGraphStep

__all__ = ["HP_METRICS", "TwinModule"]

CompareMode = Literal["check", "lockstep", "off"]
LossName = Literal["cross_entropy", "mse"]
OptimizerName = Literal["sgd", "adam"]
SchedulerName = Literal["none", "step", "cosine"]
Batch = tuple[torch.Tensor, torch.Tensor]

# Metrics shown in TensorBoard's hparams tab next to the hyperparameters (each run registers
# the ones its mode produces, see TwinModule.hp_metrics).
HP_METRICS = (
    "hp/val_acc_manual",
    "hp/val_acc_autograd",
    "hp/test_acc_manual",
    "hp/test_acc_autograd",
    "hp/worst_grad_max_rel",
    "hp/divergence_max",
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
        check_every_n_steps: optimizer steps between gradient checks, divergence measurements
            and loss finiteness checks (step 0 is always checked).
        backend: which twin trains with ``compare="off"``: ``manual`` or ``autograd``; the
            other modes always train the manual model.
        cuda_graph: the opt-in fast path (``compare="off"`` on one CUDA device): forward,
            loss and backward are captured once as a CUDA graph and replayed for every batch
            (:class:`~manualbp.train.cuda_graph.CUDAGraphStep`), and Lightning steps the optimizer
            (manual optimization), so step counting, checkpoints and schedulers work as
            usual. A batch of another shape (a short last batch) runs eagerly.

    Batches: ``(inputs (N, sizes[0]), targets)`` with ``targets`` ``(N,)`` int64 classes, or
    ``(N, sizes[-1])`` floats for ``mse``.

    Attributes:
        last_gradient_report: the :class:`~manualbp.compare.GradientReport` of the latest
            gradient check on this rank (``None`` before the first one).
        worst_grad_max_rel: buffer ``()``, the largest ``grad_check/max_rel`` seen over all
            checks and ranks so far (saved in checkpoints).
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
        backend: Literal["manual", "autograd"] = "manual",
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("loss", loss, ("cross_entropy", "mse"))
        _check_choice("optimizer", optimizer, ("sgd", "adam"))
        _check_choice("lr_scheduler", lr_scheduler, ("none", "step", "cosine"))
        _check_choice("compare", compare, ("check", "lockstep", "off"))
        _check_choice("backend", backend, ("manual", "autograd"))
        if backend == "autograd" and compare != "off":
            raise ValueError(
                f"TwinModule: backend='autograd' needs compare='off' (compare={compare!r} "
                "trains the manual model and checks it against its twin)"
            )
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"TwinModule: cuda_graph must be a bool, got {cuda_graph!r}")
        if cuda_graph and compare != "off":
            raise ValueError(
                f"TwinModule: cuda_graph=True needs compare='off' (compare={compare!r} runs "
                "gradient checks between steps, which a replayed graph cannot)"
            )
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
        if compare != "off" or backend == "autograd":
            self.autograd_model = autograd_twin(self.manual_model)
            # In check mode the twin lends only its structure: gradients are taken at the
            # manual weights. Frozen, it is skipped by the optimizer and by DDP.
            self.autograd_model.requires_grad_(compare == "lockstep" or backend == "autograd")
        if backend == "autograd":
            self.manual_model.requires_grad_(False)  # built for identical weights, not trained
        self.register_buffer("worst_grad_max_rel", torch.zeros(()))
        self.last_gradient_report: GradientReport | None = None
        self._hparams_tab_written = False
        # With cuda_graph the step is replayed, so Lightning must not call backward itself.
        self.automatic_optimization = not cuda_graph
        self._graph_step: CUDAGraphStep | None = None

    # ----------------------------------------------------------------- helpers
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The trained model's outputs ``(N, sizes[-1])`` for ``inputs (N, sizes[0])`` (the
        manual model's unless ``backend="autograd"``)."""
        return self._models()[0][1](inputs)

    @property
    def lockstep(self) -> bool:
        """True when both twins train (``compare="lockstep"``)."""
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
        """Fraction of correct rows ``()`` for outputs ``(N, C)``."""
        if not targets.is_floating_point():
            return (outputs.argmax(dim=-1) == targets).float().mean()
        # Float targets (XOR-style): a sample is right when every output is on the right side
        # of 0.5.
        return ((outputs > 0.5) == (targets > 0.5)).all(dim=-1).float().mean()

    def _models(self) -> list[tuple[str, nn.Module]]:
        """The trained models, by tag name."""
        if self.hparams.backend == "autograd":
            return [("autograd", self.autograd_model)]
        models = [("manual", self.manual_model)]
        if self.lockstep:
            models.append(("autograd", self.autograd_model))
        return models

    def _train_metrics_due(self) -> bool:
        """Whether Lightning writes this training step's ``self.log`` values to the loggers.

        Lightning writes when ``(step + 1) % log_every_n_steps == 0`` (its counter of stepped
        batches equals ``global_step`` under automatic optimization), on the last step of
        ``fast_dev_run`` and when training stops.
        """
        trainer = self.trainer
        every = trainer.log_every_n_steps
        due = every > 0 and (self.global_step + 1) % every == 0
        return due or bool(trainer.fast_dev_run) or trainer.should_stop

    @torch.no_grad()
    def divergence(self) -> dict[str, torch.Tensor]:
        """``max |θ_manual - θ_autograd|`` per parameter ``()`` and overall (lockstep only).

        Returns ``{"divergence/<param>": (), ..., "divergence/max": ()}``.
        """
        if not self.lockstep:
            raise RuntimeError("TwinModule.divergence: both twins train only in lockstep mode")
        autograd_params = dict(self.autograd_model.named_parameters())
        gaps = {
            f"divergence/{name}": (param - autograd_params[name]).abs().max()
            for name, param in self.manual_model.named_parameters()
        }
        gaps["divergence/max"] = torch.stack(list(gaps.values())).max()
        return gaps

    def gradient_report(self, inputs: torch.Tensor, targets: torch.Tensor) -> GradientReport:
        """Manual vs autograd gradients at the manual model's current weights on one batch.

        Args:
            inputs: ``(N, sizes[0])``.
            targets: ``(N,)`` int64 classes, or ``(N, sizes[-1])`` floats for ``mse``.
        """
        if self.autograd_model is None:
            raise RuntimeError("TwinModule.gradient_report: this module has no autograd twin")
        return compare_gradients(
            self.manual_model,
            self.autograd_model,
            self._manual_loss,
            self._autograd_loss,
            inputs,
            targets,
        )

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.hparams.cuda_graph:
            return self._graph_training_step(batch)
        inputs, targets = batch
        log_now = self._train_metrics_due()
        progress_bar = self.trainer.progress_bar_callback is not None
        losses: dict[str, torch.Tensor] = {}
        models = self._models()
        for name, model in models:
            outputs = model(inputs)
            loss_fn = self._manual_loss if name == "manual" else self._autograd_loss
            losses[name] = loss_fn(outputs, targets)
            if log_now:
                self.log(
                    f"train/loss/{name}",
                    losses[name],
                    prog_bar=progress_bar and name == models[0][0],
                )
                self.log(f"train/acc/{name}", self._accuracy(outputs.detach(), targets))
        if self.global_step % self.hparams.check_every_n_steps == 0:
            self._check_step(inputs, targets, losses)
        return sum(losses.values())

    def _graph_training_step(self, batch: Batch) -> torch.Tensor:
        """``cuda_graph=True``: replay the captured forward + backward, then step."""
        inputs, targets = batch
        name, model = self._models()[0]
        loss_fn = self._manual_loss if name == "manual" else self._autograd_loss
        if self._graph_step is None:  # captured at the first batch (weights untouched)
            self._graph_step = CUDAGraphStep(model, loss_fn, inputs, targets)
        loss, outputs = self._graph_step(inputs, targets)
        if self._train_metrics_due():
            # Clones: the graph's own outputs are overwritten by the next replay.
            progress_bar = self.trainer.progress_bar_callback is not None
            self.log(f"train/loss/{name}", loss.clone(), prog_bar=progress_bar)
            self.log(f"train/acc/{name}", self._accuracy(outputs, targets))
        if self.global_step % self.hparams.check_every_n_steps == 0:
            self._check_step(inputs, targets, {name: loss})
        self.optimizers().step()  # through Lightning: counts global_step, runs its hooks
        return loss

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers() if not self.automatic_optimization else None
        if scheduler is not None:  # manual optimization steps its schedulers itself
            scheduler.step()

    def _check_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, losses: dict[str, torch.Tensor]
    ) -> None:
        """Gradient check, divergence and loss finiteness, reduced over ranks and logged at
        this step. Every rank checks its own batch; all ranks reach the same verdict."""
        measured: dict[str, torch.Tensor] = {
            f"_finite/{name}": torch.isfinite(loss.detach()) for name, loss in losses.items()
        }
        if self.hparams.compare != "off":
            self.last_gradient_report = self.gradient_report(inputs, targets)
            measured.update(self.last_gradient_report.as_scalars())
            if not self.lockstep:  # in check mode this is the twin's only loss
                measured["train/loss/autograd"] = self.last_gradient_report.loss_autograd
        if self.lockstep:
            measured.update(self.divergence())
        values = self._reduce_over_ranks(measured)

        broken = [key.split("/")[1] for key in measured if key.startswith("_finite/")]
        broken = [name for name in broken if values.pop(f"_finite/{name}") < 1]
        if broken:
            local = ", ".join(f"{name}={losses[name].item()}" for name in losses)
            raise FloatingPointError(
                f"the training loss of the {' and '.join(broken)} model is not finite at step "
                f"{self.global_step} (this rank: {local}); lower the learning rate "
                f"(lr={self.hparams.lr})"
            )
        if "grad_check/max_rel" in values:
            previous, current = float(self.worst_grad_max_rel), values["grad_check/max_rel"]
            nan = math.isnan(previous) or math.isnan(current)  # a NaN check stays the worst
            worst = math.nan if nan else max(previous, current)
            self.worst_grad_max_rel.fill_(worst)
            values["grad_check/worst_max_rel"] = worst
        self._write(values)

    def _reduce_over_ranks(self, measured: dict[str, torch.Tensor]) -> dict[str, float]:
        """One ``all_gather`` of every scalar, then the worst value over ranks per key.

        ``exact``, ``cosine`` and finiteness flags take the minimum, ``norm_ratio`` the value
        farthest from 1, losses rank 0's value (as Lightning's unsynced ``self.log``), the rest
        the maximum.
        """
        keys = list(measured)
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS: no float64
        stacked = torch.stack([measured[key].detach().to(dtype) for key in keys])  # (K,)
        if self.trainer.world_size > 1:
            stacked = self.all_gather(stacked)  # (W, K)
        per_rank = stacked.reshape(-1, len(keys)).cpu()  # (W, K)
        values = {}
        for column, key in enumerate(keys):
            ranks = per_rank[:, column]  # (W,)
            if key.startswith("train/loss/"):
                values[key] = float(ranks[0])
            elif key.endswith(("exact", "cosine")) or key.startswith("_finite/"):
                values[key] = float(ranks.min())
            elif key.endswith("norm_ratio"):
                values[key] = float(ranks[(ranks - 1).abs().argmax()])
            else:
                values[key] = float(ranks.max())
        return values

    def _write(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send ``metrics`` straight to every logger at ``step`` (default: this step).

        Loggers write from global rank 0 only."""
        step = self.global_step if step is None else step
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Batch, stage: str) -> None:
        inputs, targets = batch
        models = self._models()
        for name, model in models:
            outputs = model(inputs)
            loss_fn = self._manual_loss if name == "manual" else self._autograd_loss
            accuracy = self._accuracy(outputs, targets)
            self.log(f"{stage}/loss/{name}", loss_fn(outputs, targets), sync_dist=True)
            prog_bar = name == models[0][0]
            self.log(f"{stage}/acc/{name}", accuracy, sync_dist=True, prog_bar=prog_bar)
            self.log(f"hp/{stage}_acc_{name}", accuracy, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch | torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Outputs ``(N, sizes[-1])`` of the trained model for ``(inputs, targets)`` or
        ``inputs (N, sizes[0])``."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    # ------------------------------------------------------------------ hparams
    def hp_metrics(self) -> tuple[str, ...]:
        """The ``hp/*`` metrics this module's mode gives values to (a subset of HP_METRICS)."""
        trained = [name for name, _ in self._models()]
        metrics = [f"hp/{stage}_acc_{name}" for name in trained for stage in ("val", "test")]
        if self.hparams.compare != "off":
            metrics.append("hp/worst_grad_max_rel")
        if self.lockstep:
            metrics.append("hp/divergence_max")
        return tuple(metric for metric in HP_METRICS if metric in metrics)

    def _write_hparams_tab(self) -> None:
        """Register the hyperparameters (the module's and the DataModule's) and the ``hp/*``
        metrics in TensorBoard's hparams tab, once per module; the metrics' values arrive
        later under the same tags (NaN placeholders until then)."""
        if self._hparams_tab_written:
            return
        self._hparams_tab_written = True
        params = dict(self.hparams)
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            params.update(
                {
                    f"data.{key}": value
                    for key, value in datamodule.hparams.items()
                    if key != "_class_path"
                }
            )
        params = {key: value for key, value in params.items() if key != "_class_path"}
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, dict.fromkeys(self.hp_metrics(), math.nan))

    def on_fit_start(self) -> None:
        if self.hparams.cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(
                    f"TwinModule: cuda_graph=True needs a CUDA device, but the trainer runs on "
                    f"{self.device.type}; use accelerator='gpu' or cuda_graph=False"
                )
            if self.trainer.world_size > 1:
                raise ValueError(
                    "TwinModule: cuda_graph=True runs on one device; got world_size="
                    f"{self.trainer.world_size}"
                )
            if self.trainer.precision in ("16-mixed", "16"):
                # float16 training scales the loss before backward; the graph's backward runs
                # unscaled, so the scaler would shrink every gradient.
                raise ValueError(
                    f"TwinModule: cuda_graph=True does not support precision="
                    f"{self.trainer.precision!r} (loss scaling); use 'bf16-mixed' or '32-true'"
                )
        self._graph_step = None  # a new fit captures anew
        self._write_hparams_tab()

    def on_validation_start(self) -> None:
        if not self.trainer.training and self.trainer.state.fn == "validate":
            self._write_hparams_tab()

    def on_test_start(self) -> None:
        self._write_hparams_tab()

    def on_train_end(self) -> None:
        final = {}
        if self.hparams.compare != "off":
            final["hp/worst_grad_max_rel"] = float(self.worst_grad_max_rel)
        if self.lockstep:
            final["hp/divergence_max"] = float(self.divergence()["divergence/max"])
        if final:
            self._write(final)

    # -------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        groups = [{"params": list(model.parameters())} for _, model in self._models()]
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

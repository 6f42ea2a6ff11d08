"""The LightningModule that trains a manual network beside its builtin-autograd twin.

Three comparison modes (``compare=``):

* ``"check"``: train the manual network; every ``check_every_n_steps`` compute the autograd
  gradients on the same batch at the same weights and log their agreement per parameter.
  The twin's parameters are frozen (``requires_grad=False``): it lends only its structure,
  so neither the optimizer nor DDP's gradient reducer ever sees them.
* ``"lockstep"``: train both networks, each on its own gradients, on the same batches; log both
  losses and accuracies and the per-parameter divergence. The gradient check runs too.
* ``"off"``: one network alone, the fast path for benchmarks: the manual one, or with
  ``backend="autograd"`` its builtin-autograd twin (the baseline through the same Lightning
  path).

Each trained twin has its own optimizer and scheduler instance (:class:`TwinOptimizers`), its
gradients are clipped on their own, and a plateau scheduler watches its own loss: a lockstep
twin trains exactly as its network would alone, under every optimizer, scheduler and Trainer
option. The twins share no parameters, so ``d(loss_manual + loss_autograd)/dθ_manual`` is
exactly ``d loss_manual/dθ_manual``: one backward pass serves both.

A non-finite training loss stops the run at the step it occurs, naming the twin; a checkpoint
of non-finite weights is never written. On CUDA the check is a device-side flag, read where the
host waits for the GPU anyway (logging and check steps, epoch ends, checkpoints), and the error
names the first bad step.

TensorBoard tags (stable):

* through ``self.log`` on the steps where Lightning writes (every ``log_every_n_steps``):
  ``train/loss/{manual,autograd}``, ``train/acc/{manual,autograd}``;
* at the end of every validation/test epoch: ``val/loss/..``, ``val/acc/..``, ``test/..``
  and the hparams-tab metrics ``hp/{val,test}_acc_{manual,autograd}``;
* written directly at the step they were measured on, every ``check_every_n_steps``:
  ``grad_check/<param>/<statistic>``, ``grad_check/{max_rel,all_exact,loss_diff}``,
  ``grad_check/worst_max_rel``, ``divergence/<param>``, ``divergence/max`` (and, in check
  mode, ``train/loss/autograd``: the twin's loss at the manual weights);
* at the start of every training epoch: ``lr/{manual,autograd}``;
* at the end of training: ``hp/worst_grad_max_rel`` and ``hp/divergence_max``.

Per-step cost: ``self.log`` costs Lightning about a millisecond per call on CPU, more than a
whole training step of a small net, so the training metrics are logged only on the steps
Lightning writes to the loggers; values measured in between would never have reached
TensorBoard. The check steps gather their statistics across ranks in one ``all_gather`` and
convert them to numbers once; other steps cause no host-device synchronisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from manualbp.compare import (
    GradientReport,
    agreement,
    compare_gradients,
    custom_functions,
    forked_rng,
    gradients_at,
)
from manualbp.direct import DirectBackprop
from manualbp.nn import MLP, CrossEntropyLoss, autograd_twin, is_handwritten
from manualbp.train.cuda_graph import CUDAGraphStep
from manualbp.train.dashboard import twin_layout
from manualbp.train.twin_optimizers import TwinOptimizers, TwinSchedulers, needs_closure

__all__ = ["HP_METRICS", "TwinModule"]

CompareMode = Literal["check", "lockstep", "off"]
Batch = tuple[torch.Tensor, torch.Tensor]

DEFAULT_OPTIMIZER = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
"""The optimizer when none is given: SGD with learning rate 0.01 and momentum 0.9."""

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
    """A manual network and its autograd twin with identical initial weights, trained side by side.

    Args:
        net: the network with handwritten backward passes: built from ``manualbp.nn`` modules
            and your own modules declared with :func:`manualbp.nn.register_twin`. Its autograd
            twin is :func:`manualbp.nn.autograd_twin` of it, which refuses, by name, a module
            it does not know. Default ``MLP([784, 200, 10], "relu")``.
        loss: the handwritten loss module; default ``manualbp.nn.CrossEntropyLoss()``. With an
            MSE loss, integer class targets are turned into one-hot vectors.
        optimizer: builds an optimizer from parameters (LightningCLI: ``class_path`` and
            ``init_args``, here or as the top-level ``optimizer:`` section); every trained twin
            gets its own instance. Default SGD, lr 0.01, momentum 0.9.
        lr_scheduler: builds a scheduler from an optimizer; every trained twin gets its own. A
            ``ReduceLROnPlateau`` watches its own twin's ``val/loss/<twin>`` (or, if it has a
            ``monitor`` attribute like LightningCLI's, that metric with the twin's name).
        compare: ``check``, ``lockstep`` or ``off`` (see module docstring).
        check_every_n_steps: optimizer steps between gradient checks and divergence
            measurements (step 0 is always checked).
        backend: which twin trains with ``compare="off"``: ``manual`` or ``autograd``; the
            other modes always train the manual network.
        cuda_graph: the opt-in fast path on one CUDA device, in every comparison mode: the
            trained networks' forward, loss and backward (in lockstep both twins', in one
            graph) are captured once as a CUDA graph and replayed for every batch
            (:class:`~manualbp.train.cuda_graph.CUDAGraphStep`), and Lightning steps the
            optimizer (manual optimization), so step counting, checkpoints and schedulers
            work as usual. Gradient checks and divergence run eagerly between replays, as
            without it. A batch of another shape (a short last batch) runs eagerly. Lockstep
            refuses a network that draws random numbers (dropout): one graph cannot give both
            twins the same masks. Trainer gradient clipping and accumulation are not
            available with it (Lightning refuses them).
        direct: the other opt-in fast path (``compare="off"`` or ``"check"``, float32): the
            manual network's forward and backward are chained by hand
            (:class:`~manualbp.direct.DirectBackprop`: the same Functions, no autograd
            engine) and Lightning steps the optimizer (manual optimization). In check mode
            the gradients checked are the ones applied. Trainer gradient clipping and
            accumulation are not available with it (Lightning refuses them).

    Batches: ``(inputs (N, *), targets)`` with ``targets`` ``(N,)`` int64 classes, or float
    targets of the output's shape for an MSE loss.

    Attributes:
        manual_model, autograd_model: the two networks (``autograd_model`` is ``None`` when
            ``compare="off"`` trains the manual one).
        last_gradient_report: the :class:`~manualbp.compare.GradientReport` of the latest
            gradient check on this rank (``None`` before the first one).
        worst_grad_max_rel: buffer ``()``, the largest ``grad_check/max_rel`` seen over all
            checks and ranks so far (saved in checkpoints).
        last_check_values: the values logged at the latest check step (gradient agreement
            and divergence, reduced over ranks; a new dict each check), ``None`` before one.
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        loss: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compare: CompareMode = "lockstep",
        check_every_n_steps: int = 50,
        backend: Literal["manual", "autograd"] = "manual",
        cuda_graph: bool = False,
        direct: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("compare", compare, ("check", "lockstep", "off"))
        _check_choice("backend", backend, ("manual", "autograd"))
        if backend == "autograd" and compare != "off":
            raise ValueError(
                f"TwinModule: backend='autograd' needs compare='off' (compare={compare!r} "
                "trains the manual network and checks it against its twin)"
            )
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"TwinModule: cuda_graph must be a bool, got {cuda_graph!r}")
        if not isinstance(direct, bool):
            raise ValueError(f"TwinModule: direct must be a bool, got {direct!r}")
        if direct and (compare == "lockstep" or backend == "autograd" or cuda_graph):
            raise ValueError(
                "TwinModule: direct=True trains the manual network by hand and needs "
                f"compare='off' or 'check' with backend='manual' and cuda_graph=False (got "
                f"compare={compare!r}, backend={backend!r}, cuda_graph={cuda_graph!r})"
            )
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise ValueError(
                f"TwinModule: check_every_n_steps must be an int, got {check_every_n_steps!r}"
            )
        if check_every_n_steps < 1:
            raise ValueError(
                f"TwinModule: check_every_n_steps must be >= 1, got {check_every_n_steps}"
            )
        net = MLP([784, 200, 10], "relu") if net is None else net
        loss = CrossEntropyLoss() if loss is None else loss
        for name, value in (("net", net), ("loss", loss)):
            if not isinstance(value, nn.Module):
                raise TypeError(f"TwinModule: {name} must be an nn.Module, got {value!r}")
        if not any(is_handwritten(module) for module in net.modules()):
            raise ValueError(
                f"TwinModule: net ({type(net).__name__}) holds no handwritten module, so there "
                "is nothing to compare; build it from manualbp.nn modules (or your own, declared "
                "with manualbp.nn.register_twin), or convert a torch network with manual_twin"
            )
        # Through LightningCLI the hyperparameters are the config (net and loss as class paths),
        # enough to rebuild the module from a checkpoint; built in Python, the objects are not
        # hyperparameters (pass them again to load_from_checkpoint). Logged by
        # _write_hparams_tab, flat, with what was trained.
        from_config = _given_hyperparameters.get() is not None
        objects = [] if from_config else ["net", "loss", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=objects, logger=False)
        self.manual_model = net
        self.manual_loss = loss
        self.autograd_loss = autograd_twin(loss)
        self.autograd_model: nn.Module | None = None
        if compare != "off" or backend == "autograd":
            self.autograd_model = autograd_twin(net)
            # In check mode the twin lends only its structure: gradients are taken at the
            # manual weights. Frozen, it is skipped by the optimizer and by DDP.
            self.autograd_model.requires_grad_(compare == "lockstep" or backend == "autograd")
        if backend == "autograd":
            self.manual_model.requires_grad_(False)  # built for identical weights, not trained
        self.optimizer_factory: OptimizerCallable = optimizer or DEFAULT_OPTIMIZER
        self.lr_scheduler_factory: LRSchedulerCallable | None = lr_scheduler
        self.register_buffer("worst_grad_max_rel", torch.zeros(()))
        self.last_gradient_report: GradientReport | None = None
        self.last_check_values: dict[str, float] | None = None
        self._hparams_tab_written = False
        # With cuda_graph the step is replayed, with direct it is driven by hand: either way
        # Lightning must not call backward itself.
        self.automatic_optimization = not (cuda_graph or direct)
        self._direct = DirectBackprop(self.manual_model, self._manual_loss) if direct else None
        self._graph_step: CUDAGraphStep | None = None
        self._step_losses: dict[str, torch.Tensor] = {}
        self._plateau_monitors: dict[str, str] = {}
        # Per trained twin, the first step whose loss was not finite (-1: none so far).
        self._first_nonfinite_step: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- helpers
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The trained network's outputs for ``inputs (N, *)`` (the manual one's unless
        ``backend="autograd"``)."""
        return self._models()[0][1](inputs)

    @property
    def lockstep(self) -> bool:
        """True when both twins train (``compare="lockstep"``)."""
        return self.hparams.compare == "lockstep"

    def _loss_targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if isinstance(self.manual_loss, nn.MSELoss) and not targets.is_floating_point():
            return F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)  # (N, C)
        return targets

    def _manual_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.manual_loss(outputs, self._loss_targets(outputs, targets))

    def _autograd_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.autograd_loss(outputs, self._loss_targets(outputs, targets))

    def _loss_fn(self, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self._manual_loss if name == "manual" else self._autograd_loss

    @staticmethod
    def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Fraction of correct rows ``()`` for outputs ``(N, C)``."""
        if not targets.is_floating_point():
            return (outputs.argmax(dim=-1) == targets).float().mean()
        # Float targets (XOR-style): a sample is right when every output is on the right side
        # of 0.5.
        return ((outputs > 0.5) == (targets > 0.5)).all(dim=-1).float().mean()

    def _models(self) -> list[tuple[str, nn.Module]]:
        """The trained networks, by tag name."""
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
        """Manual vs autograd gradients at the manual network's current weights on one batch.

        Args:
            inputs: ``(N, *)``.
            targets: ``(N,)`` int64 classes, or float targets for an MSE loss.
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
        if self._direct is not None:
            return self._direct_training_step(batch)
        inputs, targets = batch
        log_now = self._train_metrics_due()
        progress_bar = self.trainer.progress_bar_callback is not None
        losses: dict[str, torch.Tensor] = {}
        models = self._models()
        for index, (name, model) in enumerate(models):
            # The twins draw the same random numbers (dropout masks): each starts from the
            # state the first found, and the last leaves it where one network alone would.
            with forked_rng(inputs.device, enabled=index < len(models) - 1):
                outputs = model(inputs)
            losses[name] = self._loss_fn(name)(outputs, targets)
            if log_now:
                self.log(f"train/loss/{name}", losses[name], prog_bar=progress_bar)
                self.log(f"train/acc/{name}", self._accuracy(outputs.detach(), targets))
        if self.global_step == 0 and batch_idx == 0:
            self._check_what_is_handwritten(losses)
        self._step_losses = losses
        self._watch_finite(losses, read_now=log_now)
        if self.global_step % self.hparams.check_every_n_steps == 0:
            self._check_step(inputs, targets, losses)
        return sum(losses.values())

    def _graph_training_step(self, batch: Batch) -> torch.Tensor:
        """``cuda_graph=True``: replay the captured forward + backward of every trained
        network, check as the eager step does, then step."""
        inputs, targets = batch
        if self._graph_step is None:  # captured at the first batch (weights untouched)
            self._graph_step = self._capture(inputs, targets)
        stacked, outputs = self._graph_step(inputs, targets)  # (T,), T outputs
        names = [name for name, _ in self._models()]
        losses = dict(zip(names, stacked.unbind(), strict=True))
        log_now = self._train_metrics_due()
        if log_now:
            # Clones: the graph's own outputs are overwritten by the next replay.
            progress_bar = self.trainer.progress_bar_callback is not None
            for name, twin_outputs in zip(names, outputs, strict=True):
                self.log(f"train/loss/{name}", losses[name].clone(), prog_bar=progress_bar)
                self.log(f"train/acc/{name}", self._accuracy(twin_outputs, targets))
        self._watch_finite(losses, read_now=log_now)
        if self.global_step % self.hparams.check_every_n_steps == 0:
            self._check_step(inputs, targets, losses)
        self.optimizers().step()  # through Lightning: counts global_step, runs its hooks
        return stacked.sum()

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> CUDAGraphStep:
        """The trained networks' forward, losses ``(T,)`` and backward as one CUDA graph; the
        first warm-up step checks what is handwritten, as the eager first step does."""
        models = self._models()
        checked = False

        def losses(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor) -> torch.Tensor:
            nonlocal checked
            per_twin = {
                name: self._loss_fn(name)(twin_outputs, targets)
                for (name, _), twin_outputs in zip(models, outputs, strict=True)
            }
            if not checked:
                self._check_what_is_handwritten(per_twin)
                checked = True
            return torch.stack(list(per_twin.values()))  # (T,)

        step = CUDAGraphStep(_Together([model for _, model in models]), losses, inputs, targets)
        if len(models) > 1 and step.draws_random_numbers:
            raise ValueError(
                "TwinModule: cuda_graph=True in lockstep needs a network that draws no random "
                "numbers, but this one does (dropout?): the twins must draw the same masks, "
                "which the eager step arranges by forking the generator and one captured graph "
                "cannot. Use cuda_graph=False, or compare='check'"
            )
        return step

    def _direct_training_step(self, batch: Batch) -> torch.Tensor:
        """``direct=True``: forward and backward by hand, then Lightning steps the optimizer."""
        inputs, targets = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self._direct(inputs, targets)
        if self.global_step == 0 and self.autograd_model is not None:
            twin_loss = self._autograd_loss(self.autograd_model(inputs), targets)
            self._check_what_is_handwritten({"autograd": twin_loss})
        log_now = self._train_metrics_due()
        if log_now:
            progress_bar = self.trainer.progress_bar_callback is not None
            self.log("train/loss/manual", loss, prog_bar=progress_bar)
        self._watch_finite({"manual": loss}, read_now=log_now)
        if self.global_step % self.hparams.check_every_n_steps == 0:
            self._check_step(inputs, targets, {"manual": loss})
        optimizer.step()
        return loss

    def _applied_gradient_report(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> GradientReport:
        """With ``direct=True``: the gradients the direct step wrote into ``.grad`` (the ones
        the optimizer applies) against the autograd twin's at the same weights."""
        parameters = dict(self.manual_model.named_parameters())
        loss_a, grads_a = gradients_at(
            self.autograd_model, self._autograd_loss, parameters, inputs, targets
        )
        with torch.no_grad():
            loss_m = self._manual_loss(self.manual_model(inputs), targets)
        statistics = {
            name: agreement(
                torch.zeros_like(param) if param.grad is None else param.grad, grads_a[name]
            )
            for name, param in parameters.items()
        }
        return GradientReport(loss_m.detach(), loss_a, statistics, ("DirectBackprop",))

    def _check_what_is_handwritten(self, losses: dict[str, torch.Tensor]) -> None:
        """At the first step: the manual network's loss must run through handwritten Functions
        and the autograd twin's through builtin ops only, or the comparison would be empty."""
        for name, loss in losses.items():
            functions = custom_functions(loss)
            if name == "manual" and not functions:
                raise ValueError(
                    "TwinModule: the manual network's loss runs no handwritten Function; its "
                    "gradients come from builtin autograd alone"
                )
            if name == "autograd" and functions:
                raise ValueError(
                    f"TwinModule: the autograd twin still runs handwritten Functions "
                    f"({', '.join(functions)}): a forward calls them directly, so they were "
                    f"copied into the twin, not converted; use modules (manualbp.nn, or yours "
                    f"with register_twin) so that autograd_twin can convert them"
                )

    def _watch_finite(self, losses: dict[str, torch.Tensor], read_now: bool) -> None:
        """Record the first step at which a twin's loss is not finite, and stop there.

        On the CPU the flag is read at once; on an accelerator it stays on the device and is
        read at ``read_now`` steps and the other points where the host waits anyway; under
        DDP all ranks read it together, at check steps and epoch ends.
        """
        single = self.trainer.world_size == 1
        if single and self.device.type == "cpu":  # reading a CPU scalar costs nothing
            for name, loss in losses.items():
                if not math.isfinite(loss.item()):
                    step = torch.tensor(self.global_step)
                    self._first_nonfinite_step[name] = step
            self._raise_if_nonfinite()
            return
        names = list(losses)
        stacked = torch.stack([loss.detach() for loss in losses.values()])  # (T,)
        known = self._first_nonfinite_step
        none_yet = None
        if not all(name in known for name in names):
            none_yet = torch.full((), -1, dtype=torch.int64, device=stacked.device)
        # (T,)  each twin's first bad step so far, -1 for none
        flags = torch.stack([known.get(name, none_yet) for name in names])
        # x·0 is 0 for a finite x and NaN for ±inf and NaN: two kernels, isfinite takes four
        bad = stacked.mul(0).ne(0) & flags.lt(0)  # (T,)
        flags = torch.where(bad, self.global_step, flags)
        self._first_nonfinite_step.update(zip(names, flags.unbind(), strict=True))
        if single and read_now:
            self._raise_if_nonfinite()

    def _raise_if_nonfinite(self, reduce_over_ranks: bool = False) -> None:
        if not self._first_nonfinite_step:
            return
        names = list(self._first_nonfinite_step)
        steps = torch.stack([self._first_nonfinite_step[name] for name in names])  # (T,)
        if reduce_over_ranks and self.trainer.world_size > 1:
            gathered = self.all_gather(steps).reshape(-1, len(names))  # (W, T)
            flagged = torch.where(gathered >= 0, gathered, torch.iinfo(torch.int64).max)
            first = flagged.min(dim=0).values
            steps = torch.where(first == torch.iinfo(torch.int64).max, -1, first)
        bad = {
            name: int(step) for name, step in zip(names, steps.tolist(), strict=True) if step >= 0
        }
        if not bad:
            return
        step = min(bad.values())
        twins = " and ".join(name for name, s in bad.items() if s == step)
        lrs = ", ".join(f"{name} lr={self._learning_rates().get(name, '?')}" for name in bad)
        raise FloatingPointError(
            f"the training loss of the {twins} model is not finite at step {step}; training "
            f"stopped, and no checkpoint was written after that step. Lower the learning rate "
            f"({lrs}) or look for non-finite inputs"
        )

    def _check_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, losses: dict[str, torch.Tensor]
    ) -> None:
        """Gradient check and divergence, reduced over ranks and logged at this step. Every
        rank checks its own batch; all ranks reach the same verdict."""
        self._raise_if_nonfinite(reduce_over_ranks=True)
        measured: dict[str, torch.Tensor] = {}
        if self.hparams.compare != "off":
            if self._direct is not None:
                self.last_gradient_report = self._applied_gradient_report(inputs, targets)
            else:
                self.last_gradient_report = self.gradient_report(inputs, targets)
            measured.update(self.last_gradient_report.as_scalars())
            if not self.lockstep:  # in check mode this is the twin's only loss
                measured["train/loss/autograd"] = self.last_gradient_report.loss_autograd
        if self.lockstep:
            measured.update(self.divergence())
        if not measured:
            return
        values = self._reduce_over_ranks(measured)
        if "grad_check/max_rel" in values:
            previous, current = float(self.worst_grad_max_rel), values["grad_check/max_rel"]
            nan = math.isnan(previous) or math.isnan(current)  # a NaN check stays the worst
            worst = math.nan if nan else max(previous, current)
            self.worst_grad_max_rel.fill_(worst)
            values["grad_check/worst_max_rel"] = worst
        self.last_check_values = values
        self._write(values)

    def _reduce_over_ranks(self, measured: dict[str, torch.Tensor]) -> dict[str, float]:
        """One ``all_gather`` of every scalar, then the worst value over ranks per key.

        ``exact`` and ``cosine`` take the minimum, ``norm_ratio`` the value farthest from 1,
        losses rank 0's value (as Lightning's unsynced ``self.log``), the rest the maximum.
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
            elif key.endswith(("exact", "cosine")):
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

    def on_train_epoch_start(self) -> None:
        rates = self._learning_rates()
        if rates:
            self._write({f"lr/{name}": rate for name, rate in rates.items()})

    def on_train_epoch_end(self) -> None:
        self._raise_if_nonfinite(reduce_over_ranks=True)
        scheduler = self.lr_schedulers() if not self.automatic_optimization else None
        if scheduler is not None:  # manual optimization steps its schedulers itself
            self._step_scheduler(scheduler, self.trainer.callback_metrics)

    def on_validation_start(self) -> None:
        if self.trainer.training:
            self._raise_if_nonfinite(reduce_over_ranks=True)
        elif self.trainer.state.fn == "validate":
            self._write_hparams_tab()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write a checkpoint after a non-finite loss or of non-finite weights."""
        self._raise_if_nonfinite(reduce_over_ranks=True)
        finite = torch.stack([torch.isfinite(p).all() for p in self.parameters()]).all()
        if not bool(finite):
            bad = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
            raise FloatingPointError(
                f"not writing a checkpoint at step {self.global_step}: parameters "
                f"{', '.join(bad)} hold non-finite values"
            )

    # -------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Batch, stage: str) -> None:
        inputs, targets = batch
        models = self._models()
        for name, model in models:
            outputs = model(inputs)
            accuracy = self._accuracy(outputs, targets)
            self.log(f"{stage}/loss/{name}", self._loss_fn(name)(outputs, targets), sync_dist=True)
            prog_bar = name == models[0][0]
            self.log(f"{stage}/acc/{name}", accuracy, sync_dist=True, prog_bar=prog_bar)
            self.log(f"hp/{stage}_acc_{name}", accuracy, sync_dist=True)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Batch | torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Outputs ``(N, out)`` of the trained network for ``(inputs, targets)`` or
        ``inputs (N, *)``."""
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

    def description(self) -> dict[str, Any]:
        """What was trained, as flat values for the hparams tab and ``hparams.yaml``: the
        network (``sizes`` and ``activation`` for an MLP), the loss and, once training is set
        up, the optimizer with its settings and the scheduler."""
        net = self.manual_model
        description: dict[str, Any] = {"net": type(net).__name__}
        if isinstance(net, MLP):
            description.update(
                sizes=list(net.sizes),
                activation=net.activation,
                output_activation=net.output_activation,
            )
        description["parameters"] = sum(p.numel() for p in net.parameters())
        loss_names = {nn.CrossEntropyLoss: "cross_entropy", nn.MSELoss: "mse"}
        loss_name = next(
            (name for cls, name in loss_names.items() if isinstance(self.manual_loss, cls)),
            type(self.manual_loss).__name__,
        )
        description["loss"] = loss_name
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        inner = getattr(optimizers[0], "optimizers", None) if optimizers else None
        optimizer = next(iter(inner.values())) if inner else (optimizers or [None])[0]
        if optimizer is not None:
            description["optimizer"] = type(optimizer).__name__
            for key, value in optimizer.defaults.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    description[key] = value
                elif key == "betas" and isinstance(value, tuple):
                    description.update(beta1=float(value[0]), beta2=float(value[1]))
        for config in self.trainer.lr_scheduler_configs if self._trainer is not None else []:
            scheduler = config.scheduler
            inner = getattr(scheduler, "schedulers", None)
            description["lr_scheduler"] = type(
                next(iter(inner.values())) if inner else scheduler
            ).__name__
        return description

    def _write_hparams_tab(self) -> None:
        """Register the hyperparameters (the module's, what was trained and the DataModule's)
        and the ``hp/*`` metrics in TensorBoard's hparams tab, once per module; the metrics'
        values arrive later under the same tags (NaN placeholders until then). Also writes the
        CUSTOM SCALARS layout that overlays the twins (:func:`~.dashboard.twin_layout`)."""
        if self._hparams_tab_written:
            return
        self._hparams_tab_written = True
        params = {
            key: value
            for key, value in self.hparams.items()
            if key in ("compare", "check_every_n_steps", "backend", "cuda_graph", "direct")
        }
        params.update(self.description())
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            params.update(
                {
                    f"data.{key}": value
                    for key, value in datamodule.hparams.items()
                    if not key.startswith("_")
                }
            )
        names = [name for name, _ in self.manual_model.named_parameters()]
        layout = twin_layout(names, self.hparams.compare, [name for name, _ in self._models()])
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, dict.fromkeys(self.hp_metrics(), math.nan))
                logger.experiment.add_custom_scalars(layout)

    def on_fit_start(self) -> None:
        if self.lockstep and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"TwinModule: precision={self.trainer.precision!r} scales both twins' losses "
                "with one gradient scaler, so an overflow in one twin would skip the other's "
                "step and change its scale: the twins would not train as each would alone. Use "
                "'bf16-mixed' or '32-true' in lockstep, or compare='check'"
            )
        if self._direct is not None and self.trainer.precision not in ("32-true", "64-true"):
            raise ValueError(
                f"TwinModule: direct=True runs in full precision; got precision="
                f"{self.trainer.precision!r} (use '32-true', or direct=False for mixed precision)"
            )
        if self.hparams.cuda_graph:
            inner = [
                twin_optimizer
                for optimizer in self.trainer.optimizers
                for twin_optimizer in getattr(optimizer, "optimizers", {"": optimizer}).values()
            ]
            closure_based = [type(o).__name__ for o in inner if needs_closure(o)]
            if closure_based:
                raise ValueError(
                    f"TwinModule: cuda_graph=True replays one forward and backward per step, "
                    f"but {closure_based[0]} re-evaluates the loss inside its step; use "
                    "cuda_graph=False"
                )
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
        self._first_nonfinite_step = {}
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
        """One optimizer (and scheduler) per trained twin, behind one :class:`TwinOptimizers`
        in lockstep."""
        optimizers = {
            name: self.optimizer_factory(model.parameters()) for name, model in self._models()
        }
        if len(optimizers) == 1:
            ((name, optimizer),) = optimizers.items()
            for group in optimizer.param_groups:
                group.setdefault("name", name)
        else:
            optimizer = TwinOptimizers(optimizers, losses=lambda: self._step_losses)
        if self.lr_scheduler_factory is None:
            return optimizer
        schedulers = {name: self.lr_scheduler_factory(opt) for name, opt in optimizers.items()}
        if len(schedulers) == 1:
            (scheduler,) = schedulers.values()
        else:
            scheduler = TwinSchedulers(optimizer, schedulers)
        config: dict[str, Any] = {"scheduler": scheduler}
        self._plateau_monitors = {
            twin: _monitor_key(inner, twin)
            for twin, inner in schedulers.items()
            if isinstance(inner, ReduceLROnPlateau)
        }
        if self._plateau_monitors:
            first = next(iter(self._plateau_monitors.values()))
            config.update(monitor=first, reduce_on_plateau=True)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        """Step each twin's scheduler; a plateau scheduler with its own twin's metric."""
        self._step_scheduler(scheduler, self.trainer.callback_metrics)

    def _step_scheduler(self, scheduler: Any, metrics: dict[str, torch.Tensor]) -> None:
        schedulers = (
            scheduler.schedulers
            if isinstance(scheduler, TwinSchedulers)
            else {self._models()[0][0]: scheduler}
        )
        for twin, inner in schedulers.items():
            if isinstance(inner, ReduceLROnPlateau):
                key = self._plateau_monitors[twin]
                if key not in metrics:
                    raise KeyError(
                        f"TwinModule: the {twin} twin's ReduceLROnPlateau watches {key!r}, which "
                        f"was not logged (logged: {sorted(metrics)})"
                    )
                inner.step(metrics[key])
            else:
                inner.step()

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each twin's gradients on their own, as each network would be clipped alone
        (Lightning's default clips every parameter of the optimizer together)."""
        inner = getattr(optimizer, "optimizers", None)
        if inner is None:
            inner = getattr(getattr(optimizer, "_optimizer", None), "optimizers", None)
        if inner is None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        for twin_optimizer in inner.values():
            self.clip_gradients(twin_optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _learning_rates(self) -> dict[str, float]:
        """Each trained twin's learning rate (its first parameter group's), once the trainer
        has set up the optimizers."""
        if self._trainer is None or not self.trainer.optimizers:
            return {}
        rates = {}
        for group in self.trainer.optimizers[0].param_groups:
            name = group.get("name", self._models()[0][0])
            rates.setdefault(name, float(group["lr"]))
        return rates


class _Together(nn.Module):
    """Several networks run on the same inputs: ``forward(inputs (N, *))`` returns each one's
    outputs, in order (what one CUDA graph captures in lockstep)."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(model(inputs) for model in self.models)


def _monitor_key(scheduler: ReduceLROnPlateau, twin: str) -> str:
    """The metric ``twin``'s plateau scheduler watches: its ``monitor`` attribute (as
    LightningCLI's ``ReduceLROnPlateau`` has) with the twin's name in place of the other's,
    else ``val/loss/<twin>``."""
    monitor = getattr(scheduler, "monitor", None)
    if not monitor:
        return f"val/loss/{twin}"
    other = "autograd" if twin == "manual" else "manual"
    return monitor.replace(f"/{other}", f"/{twin}").replace(f"_{other}", f"_{twin}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"TwinModule: {name} must be one of {choices}, got {value!r}")

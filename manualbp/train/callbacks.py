"""TensorBoard views of the gradients: per-layer norms and histograms.

Per-layer gradient norms (``grad_norm/<model>/<param>``) are the vanishing-gradient picture:
in a deep sigmoid net the first layers' norms sit orders of magnitude below the last ones',
in its ReLU counterpart they do not. Histograms (``grad/<model>/<param>``,
``weight/<model>/<param>``) are costly, so they have their own, longer interval.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["GradientMonitor"]


class GradientMonitor(L.Callback):
    """Logs gradient norms every ``norm_every_n_steps`` and histograms every
    ``histogram_every_n_steps`` optimizer steps (0 disables either; step 0 is included).

    Works with any LightningModule; for a :class:`manualbp.train.module.TwinModule` the tags carry
    the model's name (``manual``/``autograd``; a frozen twin has no gradients and is skipped).
    Gradients are read just before the optimizer step, after any AMP unscaling and DDP
    all-reduce, so every rank holds the same values and only global rank 0 computes and
    writes them, straight to the loggers at the step they belong to (the step of the
    ``train/loss`` value computed on the same batch). Other steps cost one modulo.
    """

    def __init__(self, norm_every_n_steps: int = 50, histogram_every_n_steps: int = 500) -> None:
        for name, value in (
            ("norm_every_n_steps", norm_every_n_steps),
            ("histogram_every_n_steps", histogram_every_n_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GradientMonitor: {name} must be an int >= 0, got {value!r}")
        self.norm_every_n_steps = norm_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps

    @staticmethod
    def _named_models(pl_module: L.LightningModule) -> list[tuple[str, torch.nn.Module]]:
        models = []
        for name in ("manual", "autograd"):
            model = getattr(pl_module, f"{name}_model", None)
            if model is not None and any(p.requires_grad for p in model.parameters()):
                models.append((name, model))
        return models or [("model", pl_module)]

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        log_norms = self._due(step, self.norm_every_n_steps) and bool(trainer.loggers)
        log_histograms = self._due(step, self.histogram_every_n_steps)
        if not (log_norms or log_histograms):
            return
        tags, grads = [], []
        for model_name, model in self._named_models(pl_module):
            for param_name, param in model.named_parameters():
                if param.grad is not None:
                    tags.append(f"{model_name}/{param_name}")
                    grads.append(param.grad.detach())
        if not grads:
            return
        if log_norms:
            norms = torch.stack([torch.linalg.vector_norm(g).float() for g in grads]).tolist()
            metrics = {f"grad_norm/{tag}": norm for tag, norm in zip(tags, norms, strict=True)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if log_histograms:
            params = {
                f"{model_name}/{name}": param
                for model_name, model in self._named_models(pl_module)
                for name, param in model.named_parameters()
            }
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    writer = logger.experiment
                    for tag, grad in zip(tags, grads, strict=True):
                        writer.add_histogram(f"grad/{tag}", grad, step)
                        writer.add_histogram(f"weight/{tag}", params[tag].detach(), step)

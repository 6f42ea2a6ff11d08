"""Gradient comparison between a manual model and its autograd twin on one batch.

The question answered here is *check*: are the handwritten gradients right, now, for these
weights? Both models are evaluated with the **same parameter tensors** (the manual model's,
via ``torch.func.functional_call``), on the same batch, and their parameter gradients are
compared one by one:

* ``exact``      1.0 when the two gradients are bit-identical, else 0.0;
* ``max_abs``    ``max |g_manual - g_autograd|``;
* ``max_rel``    ``max_abs / max |g_autograd|`` (normwise: no blow-up at zero entries;
                 ``inf`` when the reference is zero and the manual gradient is not);
* ``cosine``     cosine similarity of the flattened gradients (1 for two zero gradients);
* ``norm_ratio`` ``‖g_manual‖ / ‖g_autograd‖`` (1 for two zero gradients).

All statistics stay tensors on the model's device until a report is printed, so calling this
from a training step forces no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "STATISTICS",
    "GradientReport",
    "compare_gradients",
    "gradient_agreement",
    "gradients_at",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STATISTICS = ("exact", "max_abs", "max_rel", "cosine", "norm_ratio")


def gradients_at(
    model: nn.Module,
    loss_fn: LossFn,
    parameters: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of ``model`` evaluated at ``parameters``.

    Args:
        model: any module whose parameter names are the keys of ``parameters``.
        loss_fn: ``loss_fn(outputs, targets)`` → scalar.
        parameters: name → tensor; detached copies are differentiated, so neither ``model``
            nor the tensors passed in are modified and no ``.grad`` is touched.
        inputs: the batch, e.g. ``(N, in)``.
        targets: what ``loss_fn`` expects, e.g. ``(N,)`` class indices.

    Returns:
        ``(loss, grads)`` with ``grads[name]`` shaped like ``parameters[name]``.
    """
    leaves = {name: p.detach().requires_grad_(True) for name, p in parameters.items()}
    with torch.enable_grad():
        loss = loss_fn(functional_call(model, leaves, (inputs,)), targets)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads, strict=True))


def gradient_agreement(manual: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """The five agreement statistics of two gradients of the same shape ``(*)``.

    Computed in float64 (float32 on MPS, which has no float64), so the statistics add no
    round-off of their own to a float32 comparison. Returns name → ``()`` tensor.
    """
    if manual.shape != reference.shape:
        raise ValueError(
            f"gradient_agreement: shapes differ, manual {tuple(manual.shape)} vs reference "
            f"{tuple(reference.shape)}"
        )
    dtype = torch.float32 if manual.device.type == "mps" else torch.float64
    manual, reference = manual.detach().to(dtype), reference.detach().to(dtype)
    diff = (manual - reference).abs()
    zero = manual.new_zeros(())
    max_abs = diff.max() if diff.numel() else zero
    scale = reference.abs().max() if reference.numel() else zero
    manual_norm = torch.linalg.vector_norm(manual)
    reference_norm = torch.linalg.vector_norm(reference)
    tiny = torch.finfo(dtype).tiny
    # Against a zero (or non-finite) reference any difference is an infinite relative error,
    # so a check can never pass by dividing by nothing.
    max_rel = torch.where(
        scale > 0, max_abs / scale.clamp_min(tiny), torch.where(max_abs == 0, 0.0, math.inf)
    )
    both_zero = (manual_norm == 0) & (reference_norm == 0)  # two zero gradients agree
    cosine = (manual * reference).sum() / (manual_norm * reference_norm).clamp_min(tiny)
    return {
        "exact": (manual == reference).all().to(dtype),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "cosine": torch.where(both_zero, 1.0, cosine),
        "norm_ratio": torch.where(both_zero, 1.0, manual_norm / reference_norm.clamp_min(tiny)),
    }


@dataclass
class GradientReport:
    """Per-parameter agreement of manual vs autograd gradients on one batch.

    Attributes:
        loss_manual: the manual model's loss ``()``.
        loss_autograd: the twin's loss ``()`` at the same weights.
        statistics: parameter name → statistic name → ``()`` tensor (see module docstring).
    """

    loss_manual: torch.Tensor
    loss_autograd: torch.Tensor
    statistics: dict[str, dict[str, torch.Tensor]]

    @property
    def all_exact(self) -> bool:
        return all(bool(s["exact"]) for s in self.statistics.values())

    @property
    def max_rel(self) -> float:
        """The largest ``max_rel`` over all parameters."""
        return max(float(s["max_rel"]) for s in self.statistics.values())

    def as_scalars(self, prefix: str = "grad_check") -> dict[str, torch.Tensor]:
        """Flat ``{"grad_check/<param>/<statistic>": tensor}`` for ``self.log_dict``."""
        scalars = {
            f"{prefix}/{name}/{stat}": value
            for name, stats in self.statistics.items()
            for stat, value in stats.items()
        }
        rel = torch.stack([s["max_rel"] for s in self.statistics.values()])
        exact = torch.stack([s["exact"] for s in self.statistics.values()])
        scalars[f"{prefix}/max_rel"] = rel.max()
        scalars[f"{prefix}/all_exact"] = exact.min()
        scalars[f"{prefix}/loss_diff"] = (self.loss_manual - self.loss_autograd).abs().to(rel.dtype)
        return scalars

    def table(self) -> str:
        """A markdown table ``name | exact | allclose | max_abs | max_rel | cos | norm ratio``."""
        lines = [
            "| parameter | exact | allclose | max_abs | max_rel | cosine | norm ratio |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in self.statistics.items():
            close = float(s["max_rel"]) <= 1e-5
            lines.append(
                f"| {name} | {bool(s['exact'])} | {close} | {float(s['max_abs']):.3e} | "
                f"{float(s['max_rel']):.3e} | {float(s['cosine']):.9f} | "
                f"{float(s['norm_ratio']):.9f} |"
            )
        return "\n".join(lines)

    def assert_close(self, rtol: float = 1e-5) -> None:
        """Raise AssertionError naming every parameter whose ``max_rel`` exceeds ``rtol``."""
        bad = [n for n, s in self.statistics.items() if not float(s["max_rel"]) <= rtol]
        if bad:
            raise AssertionError(
                f"manual gradients disagree with autograd beyond max_rel={rtol:g} for "
                f"{', '.join(bad)}:\n{self.table()}"
            )


def compare_gradients(
    manual_model: nn.Module,
    reference_model: nn.Module,
    manual_loss: LossFn,
    reference_loss: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> GradientReport:
    """Compare the gradients of two models at the **manual model's** current weights.

    ``reference_model`` only contributes its structure (``torch.nn`` layers, builtin
    autograd); its own weights are ignored, so it may lag behind or be frozen. Neither model
    is modified.

    Args:
        manual_model: the model with handwritten backward passes.
        reference_model: its autograd twin (same parameter names).
        manual_loss / reference_loss: ``(outputs, targets)`` → scalar loss, one per backend.
        inputs: the batch ``(N, in)``.
        targets: the loss targets, e.g. ``(N,)`` class indices.
    """
    parameters = dict(manual_model.named_parameters())
    reference_names = {name for name, _ in reference_model.named_parameters()}
    if reference_names != set(parameters):
        missing = sorted(set(parameters) - reference_names)
        extra = sorted(reference_names - set(parameters))
        raise ValueError(
            "compare_gradients: the models' parameter names differ; missing from the reference "
            f"model: {missing}, only in the reference model: {extra}"
        )
    loss_m, grads_m = gradients_at(manual_model, manual_loss, parameters, inputs, targets)
    loss_a, grads_a = gradients_at(reference_model, reference_loss, parameters, inputs, targets)
    statistics = {name: gradient_agreement(grads_m[name], grads_a[name]) for name in grads_m}
    return GradientReport(loss_m, loss_a, statistics)

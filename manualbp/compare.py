"""The one vocabulary of agreement between a handwritten result and its reference.

Every comparison in manualbp — the gradient check of a training run, ``manualbp.check``, the
parity tables, TensorBoard — uses these statistics of two tensors of the same shape, ``a``
(manual) and ``r`` (reference):

* ``exact``      1.0 when the two are equal entry for entry (NaN where the other is NaN; ``+0``
                 and ``-0`` count as equal), else 0.0;
* ``max_abs``    ``max |a - r|``;
* ``max_rel``    ``max_abs / max |r|``, normwise (no blow-up at zero entries; ``inf`` when the
                 reference is zero and ``a`` is not);
* ``max_ulp``    ``max |a - r| / ulp(r)``, entrywise, in units in the last place of ``r``'s own
                 dtype (0 for bit-identical, 1 for one rounding step apart);
* ``cosine``     cosine similarity of the flattened tensors (1 for two zero tensors);
* ``norm_ratio`` ``‖a‖ / ‖r‖`` (1 for two zero tensors).

Entries that are NaN (or the same infinity) in both count as agreeing; a NaN or infinity on one
side only makes ``max_abs``, ``max_rel`` and ``max_ulp`` NaN or infinite, never small.

:func:`compare_gradients` answers the *check* question for a model: are the handwritten
gradients right, now, for these weights? Both models are evaluated with the **same parameter
tensors** (the manual model's, via ``torch.func.functional_call``), on the same batch, and their
parameter gradients are compared one by one. All statistics stay tensors on the model's device
until a report is printed, so calling this from a training step forces no host-device
synchronisation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "STATISTICS",
    "GradientReport",
    "agreement",
    "compare_gradients",
    "custom_function_nodes",
    "custom_functions",
    "forked_rng",
    "gradients_at",
    "ulp",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STATISTICS = ("exact", "max_abs", "max_rel", "max_ulp", "cosine", "norm_ratio")


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
        ``(loss, grads)`` with ``grads[name]`` shaped like ``parameters[name]`` (zeros for a
        parameter the loss does not use).

    The evaluation leaves no trace: it runs on copies of the model's buffers (batch norm's
    running statistics are not updated) and its random draws (dropout masks) start from the
    current state of the random generator, which is then restored.
    """
    loss, grads, _ = _loss_gradients_and_functions(model, loss_fn, parameters, inputs, targets)
    return loss, grads


def forked_rng(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """A region that draws random numbers from the current state of the CPU generator and of
    ``device``'s, and restores both on exit (``torch.random.fork_rng``): two forwards run in
    such regions draw the same dropout masks, and leave the stream where it was."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[], enabled=enabled)
    return torch.random.fork_rng(devices=[device], enabled=enabled, device_type=device.type)


def _loss_gradients_and_functions(
    model: nn.Module,
    loss_fn: LossFn,
    parameters: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[str, ...]]:
    """:func:`gradients_at`, and the custom Functions the loss ran through; ``buffers`` (by
    default the model's own) are copied in, so a forward in training mode changes none."""
    leaves = {name: p.detach().requires_grad_(True) for name, p in parameters.items()}
    buffers = dict(model.named_buffers()) if buffers is None else buffers
    state = {**{name: b.detach().clone() for name, b in buffers.items()}, **leaves}
    with torch.enable_grad(), forked_rng(inputs.device):
        loss = loss_fn(functional_call(model, state, (inputs,)), targets)
        functions = custom_functions(loss)
        grads = torch.autograd.grad(
            loss, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
    return loss.detach(), dict(zip(leaves, grads, strict=True)), functions


def custom_function_nodes(*outputs: torch.Tensor) -> list[torch.autograd.graph.Node]:
    """The autograd nodes of ``torch.autograd.Function`` classes (handwritten backward passes)
    in the graph of ``outputs``, each once."""
    found, seen = [], set()
    pending = [output.grad_fn for output in outputs]
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        pending.extend(next_node for next_node, _ in node.next_functions)
    return found


def custom_functions(output: torch.Tensor) -> tuple[str, ...]:
    """The ``torch.autograd.Function`` classes (handwritten backward passes) that ``output``'s
    autograd graph runs through, by name, sorted; ``()`` for a graph of builtin ops only."""
    names = {type(node).__name__.removesuffix("Backward") for node in custom_function_nodes(output)}
    return tuple(sorted(names))


def ulp(reference: torch.Tensor) -> torch.Tensor:
    """The gap from ``|reference|`` to the next larger number of ``reference``'s dtype,
    entrywise, as float64 (float32 on MPS), shape ``(*)`` like ``reference``.

    ``ulp(1.0) = eps``; for zero and subnormal entries it is the smallest subnormal; for NaN
    or infinite entries it is NaN/inf (any difference there is not a rounding error).
    """
    info = torch.finfo(reference.dtype)
    dtype = torch.float32 if reference.device.type == "mps" else torch.float64
    magnitude = reference.detach().to(dtype).abs()
    _, exponent = torch.frexp(magnitude)  # |r| = m · 2^e with m in [0.5, 1)
    gaps = torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)  # eps · 2^(e-1)
    smallest = info.tiny * info.eps  # the smallest subnormal of the dtype
    gaps = torch.where(magnitude == 0, smallest, gaps.clamp_min(smallest))
    return torch.where(magnitude.isfinite(), gaps, magnitude)


def agreement(manual: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """The six agreement statistics (:data:`STATISTICS`) of ``manual`` against ``reference``,
    two tensors of the same shape ``(*)``.

    Computed in float64 (float32 on MPS, which has no float64), so the statistics add no
    round-off of their own to a float32 comparison; ``max_ulp`` counts in ulps of
    ``reference``'s own dtype. Returns name → ``()`` tensor, on the tensors' device.
    """
    if manual.shape != reference.shape:
        raise ValueError(
            f"agreement: shapes differ, manual {tuple(manual.shape)} vs reference "
            f"{tuple(reference.shape)}"
        )
    dtype = torch.float32 if manual.device.type == "mps" else torch.float64
    units = ulp(reference)
    manual, reference = manual.detach().to(dtype), reference.detach().to(dtype)
    same = (manual == reference) | (manual.isnan() & reference.isnan())  # (*)
    diff = torch.where(same, 0.0, (manual - reference).abs())  # (*)  NaN where one side is
    zero = manual.new_zeros(())
    max_abs = diff.max() if diff.numel() else zero
    max_ulp = torch.where(same, 0.0, diff / units).max() if diff.numel() else zero
    finite_reference = torch.where(reference.isfinite(), reference.abs(), 0.0)
    scale = finite_reference.max() if reference.numel() else zero
    tiny = torch.finfo(dtype).tiny
    # Against a zero reference any difference is an infinite relative error, so a check can
    # never pass by dividing by nothing.
    max_rel = torch.where(
        scale > 0, max_abs / scale.clamp_min(tiny), torch.where(max_abs == 0, 0.0, math.inf)
    )
    # Entries that agree but are not finite (NaN in both, the same infinity) are left out of
    # the direction and length, which they would make NaN.
    agreeing_nonfinite = same & ~reference.isfinite()  # (*)
    manual = manual.masked_fill(agreeing_nonfinite, 0.0)
    reference = reference.masked_fill(agreeing_nonfinite, 0.0)
    manual_norm = torch.linalg.vector_norm(manual)
    reference_norm = torch.linalg.vector_norm(reference)
    both_zero = (manual_norm == 0) & (reference_norm == 0)  # two zero tensors agree
    cosine = (manual * reference).sum() / (manual_norm * reference_norm).clamp_min(tiny)
    return {
        "exact": same.all().to(dtype),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "max_ulp": max_ulp,
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
        handwritten: the custom Functions the manual model's loss ran through (what the
            check checked), e.g. ``("CrossEntropyFunction", "LinearFunction", ...)``.
    """

    loss_manual: torch.Tensor
    loss_autograd: torch.Tensor
    statistics: dict[str, dict[str, torch.Tensor]]
    handwritten: tuple[str, ...] = ()

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
        """A markdown table ``parameter | exact | allclose | max_abs | max_rel | max_ulp | cosine
        | norm ratio``."""
        lines = [
            "| parameter | exact | allclose | max_abs | max_rel | max_ulp | cosine | norm ratio |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, s in self.statistics.items():
            close = float(s["max_rel"]) <= 1e-5
            lines.append(
                f"| {name} | {bool(s['exact'])} | {close} | {float(s['max_abs']):.3e} | "
                f"{float(s['max_rel']):.3e} | {float(s['max_ulp']):.3g} | "
                f"{float(s['cosine']):.9f} | "
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
    is modified: both run on copies of the manual model's buffers (when the reference's have
    the same names) and draw the same random numbers (dropout masks), from the generator's
    current state, which is restored.

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
    # Both at the manual model's buffers too (running statistics), when the names agree.
    buffers = dict(manual_model.named_buffers())
    same_names = {name for name, _ in reference_model.named_buffers()} == set(buffers)
    reference_buffers = buffers if same_names else None
    loss_m, grads_m, handwritten = _loss_gradients_and_functions(
        manual_model, manual_loss, parameters, inputs, targets, buffers
    )
    loss_a, grads_a, in_reference = _loss_gradients_and_functions(
        reference_model, reference_loss, parameters, inputs, targets, reference_buffers
    )
    if not handwritten:
        raise ValueError(
            "compare_gradients: the manual model runs no handwritten Function (its gradients "
            "come from builtin autograd alone), so the check would compare autograd with "
            "itself; build it from manualbp.functional / manualbp.nn or your own Functions"
        )
    if in_reference:
        raise ValueError(
            f"compare_gradients: the reference model runs custom autograd Functions "
            f"({', '.join(in_reference)}), so the check would compare a handwritten backward "
            f"with itself; the reference must compute with builtin ops (its forward calls "
            f"them directly, or one of its modules was copied, not converted: use modules, "
            f"e.g. manualbp.nn.ReLU rather than manualbp.functional.relu, so that "
            f"autograd_twin can convert them, and register your own with register_twin)"
        )
    statistics = {name: agreement(grads_m[name], grads_a[name]) for name in grads_m}
    return GradientReport(loss_m, loss_a, statistics, handwritten)

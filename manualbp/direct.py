"""Backpropagation driven by hand: the Functions' own forward and backward, without autograd.

This is backprop as it is taught: the forward pass keeps what each layer saves, the backward
pass walks the layers in reverse, feeding each layer's ``backward`` the gradient of its output,
and the gradients of the parameters land in ``.grad``::

    backprop = DirectBackprop(model, loss_fn)
    loss = backprop(inputs, targets)  # forward, then backward: every .grad written
    optimizer.step()

No autograd graph is built and the engine never runs; what runs are the very ``forward``,
``setup_context`` and ``backward`` of the Functions in :mod:`manualbp.functional` (and your
own), called from :func:`manualbp._function.apply` while a :class:`Tape` records. The gradients
are those of the autograd-engine path of the same Functions (tested bit for bit).

What it needs: every differentiable operation of the forward is a handwritten Function applied
through :mod:`manualbp.functional` (the modules of :mod:`manualbp.nn` are). A tensor computed
from a parameter by anything else (``x.view(...)``, ``x + y`` between layers) cannot be
differentiated by hand and is refused at once, naming the Function it reached.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DirectBackprop", "Tape", "record", "recording"]

_TAPE: contextvars.ContextVar[Tape | None] = contextvars.ContextVar("manualbp_tape", default=None)


def recording() -> Tape | None:
    """The tape recording the current forward pass, or ``None`` (ordinary autograd)."""
    return _TAPE.get()


def record(tape: Tape, forward: Callable[..., Any], *args: Any) -> Any:
    """``forward(*args)``, with every Function it applies recorded on ``tape``."""
    token = _TAPE.set(tape)
    try:
        return forward(*args)
    finally:
        _TAPE.reset(token)


class DirectContext:
    """What a Function's ``setup_context`` and ``backward`` use of ``ctx``, without autograd.

    Like autograd's, it remembers each saved tensor's version: a tensor modified in place
    between the forward and the backward makes ``saved_tensors`` raise, as autograd does.
    """

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self._saved: tuple[Any, ...] = ()
        self._versions: tuple[int, ...] = ()
        self.materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self._saved = tensors
        self._versions = tuple([-1 if t is None else t._version for t in tensors])

    @property
    def saved_tensors(self) -> tuple[Any, ...]:
        for index, (tensor, version) in enumerate(zip(self._saved, self._versions, strict=True)):
            if tensor is not None and tensor._version != version:
                raise RuntimeError(
                    f"direct backprop: saved tensor {index} {tuple(tensor.shape)} was modified "
                    f"by an inplace operation after the forward saved it (version "
                    f"{tensor._version}, expected {version}); autograd refuses the same"
                )
        return self._saved

    def set_materialize_grads(self, value: bool) -> None:
        self.materialize_grads = value

    def mark_dirty(self, *tensors: torch.Tensor) -> None:
        """In-place Functions mark their output; nothing to do without a graph."""

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        self.non_differentiable = {id(t) for t in tensors}


class Tape:
    """The record of one forward pass: each Function applied, its context, inputs and outputs.

    Args:
        leaves: the tensors whose gradients are wanted (the trainable parameters, and the
            network's input where its gradient is wanted).
    """

    def __init__(self, leaves: Sequence[torch.Tensor]) -> None:
        self.leaves = {id(leaf): leaf for leaf in leaves}
        self.entries: list[tuple[Any, DirectContext, tuple[Any, ...], tuple[Any, ...]]] = []
        self._differentiable: set[int] = set(self.leaves)

    def apply(self, function: Any, *inputs: Any) -> Any:
        """Run ``function``'s forward and ``setup_context`` and keep them for the backward."""
        differentiable = self._differentiable
        needs = tuple(
            [
                isinstance(x, torch.Tensor)
                and (id(x) in differentiable or self._refuse_if_computed(x, function))
                for x in inputs
            ]
        )
        ctx = DirectContext(needs)
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            output = function.forward(*inputs)
        finally:
            torch._C._set_grad_enabled(grad_mode)
        function.setup_context(ctx, inputs, output)
        outputs = output if isinstance(output, tuple) else (output,)
        if True in needs:
            skip = getattr(ctx, "non_differentiable", ())
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and id(tensor) not in skip:
                    self._differentiable.add(id(tensor))
                    # Marks the output for the refusal check (_refuse_if_computed): an op outside
                    # the Functions applied to it makes a tensor with a grad_fn.
                    if grad_mode and tensor.is_floating_point() and not tensor.requires_grad:
                        tensor.requires_grad_(True)
        self.entries.append((function, ctx, inputs, outputs))
        return output

    @staticmethod
    def _refuse_if_computed(tensor: torch.Tensor, function: Any) -> bool:
        """False (not differentiated) for a tensor from outside the tape; raises for one
        computed from a parameter outside the Functions, whose gradient is lost."""
        if tensor.grad_fn is not None:
            raise RuntimeError(
                f"direct backprop: an input of {function.__name__} was computed by "
                f"{tensor.grad_fn.name()} from a parameter, outside manualbp's Functions, so "
                f"its gradient cannot be taken by hand; build the forward from handwritten "
                f"Functions only, or train with autograd"
            )
        return False

    def gradients(
        self, output: torch.Tensor, grad_output: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Walk the tape in reverse from ``output`` (``grad_output`` its gradient, ones when
        ``None``): each Function's ``backward`` gets the gradient of its outputs. Returns the
        leaves' gradients by ``id``; the tape is emptied."""
        grads: dict[int, torch.Tensor] = {
            id(output): torch.ones_like(output) if grad_output is None else grad_output
        }
        leaf_grads: dict[int, torch.Tensor] = {}
        leaves = self.leaves
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            for function, ctx, inputs, outputs in reversed(self.entries):
                if len(outputs) == 1:
                    grad = grads.pop(id(outputs[0]), None)
                    if grad is None:
                        continue
                    grad_inputs = function.backward(ctx, grad)
                else:
                    grad_outputs = [grads.pop(id(t), None) for t in outputs]
                    if all(g is None for g in grad_outputs):
                        continue
                    if ctx.materialize_grads:
                        grad_outputs = [
                            torch.zeros_like(t) if g is None else g
                            for g, t in zip(grad_outputs, outputs, strict=True)
                        ]
                    grad_inputs = function.backward(ctx, *grad_outputs)
                if not isinstance(grad_inputs, tuple):
                    grad_inputs = (grad_inputs,)
                for tensor, grad, needed in zip(
                    inputs, grad_inputs, ctx.needs_input_grad, strict=True
                ):
                    if grad is None or not needed:
                        continue
                    key = id(tensor)
                    into = leaf_grads if key in leaves else grads
                    into[key] = grad if key not in into else into[key] + grad
        finally:
            torch._C._set_grad_enabled(grad_mode)
            self.entries.clear()
        return leaf_grads

    def backward(self, output: torch.Tensor) -> None:
        """:meth:`gradients` from a scalar ``output``, added to the leaves' ``.grad``."""
        for key, grad in self.gradients(output).items():
            leaf = self.leaves[key]
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad


class DirectBackprop:
    """A training step's forward and backward for ``model`` and ``loss_fn``, by hand.

    Args:
        model: a network whose differentiable operations are all handwritten Functions (e.g.
            ``manualbp.nn.MLP``).
        loss_fn: ``loss_fn(outputs, targets)`` → ``()``, a handwritten loss (e.g.
            ``manualbp.nn.CrossEntropyLoss()``).

    Calling it with ``inputs (N, *)`` and ``targets`` runs the forward (recording each
    Function), the loss, and the backward; the gradients of ``model``'s trainable parameters
    (those it has when DirectBackprop is built) are written (accumulated, as autograd does)
    into their ``.grad``. Returns the loss ``()``, detached. Set the gradients to ``None``
    (``optimizer.zero_grad()``) between steps.
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self._parameters = list(model.parameters())

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Tape]:
        """The loss ``()`` and the tape of the forward pass that computed it."""
        tape = Tape([p for p in self._parameters if p.requires_grad])
        loss = record(tape, lambda: self.loss_fn(self.model(inputs), targets))
        if not tape.entries:
            raise RuntimeError(
                "direct backprop: the forward applied no handwritten Function; nothing to "
                "differentiate by hand"
            )
        return loss, tape

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, tape = self.forward(inputs, targets)
        tape.backward(loss)
        return loss.detach()

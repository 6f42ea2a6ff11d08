"""A whole training step captured once as a CUDA graph and replayed: the opt-in fast path.

In eager mode a small network's training step is bound by the host, not the GPU: every op
costs a Python call and a kernel launch, and a handwritten Function pays for two trips
through Python (its forward and its backward) where a builtin op pays for none. A CUDA graph
records the step's kernels once and replays them with a single launch, so neither Python
nor the autograd engine runs per step, and a handwritten network costs what its kernels
cost::

    step = CUDAGraphStep(model, loss_fn, inputs, targets, optimizer=optimizer)
    for inputs, targets in batches:
        loss, outputs = step(inputs, targets)  # forward, loss, backward, optimizer.step()

Without ``optimizer`` the graph ends after the backward and the caller steps the optimizer
(what :class:`~manualbp.train.module.TwinModule` does with ``cuda_graph=True``, so that Lightning
keeps counting steps and learning-rate schedulers keep working).

Several networks that share no parameters train in one graph when ``model`` runs them all and
``loss_fn`` returns their losses stacked, ``(T,)``: the backward runs on the sum, whose
gradient with respect to each network's parameters is that network's own. This is how the
lockstep twins (the manual network and its autograd twin) are captured together.

Rules:

* ``model``, ``inputs`` and ``targets`` live on one CUDA device, and the step never makes the
  host wait for the GPU (no ``.item()``; manualbp's Functions make no such call on CUDA);
* a batch of another shape or dtype than the captured one (a short last batch) runs eagerly,
  with the same arithmetic, and its gradients land in the same ``.grad`` tensors;
* the warm-up before capture leaves no trace: parameters, buffers (BatchNorm's running
  statistics), optimizer state and the device's random-number generator are put back;
* every replay overwrites the gradient tensors the graph captured, so nothing needs zeroing;
  if something sets ``.grad`` to ``None`` in between (``zero_grad()``; Lightning does so
  before every validation loop), the next call puts the captured tensors back first;
* an optimizer inside the graph must be capturable: SGD with ``dampening=0``, or Adam/AdamW
  with ``capturable=True``. Hyperparameters held as Python numbers (a float ``lr``) are
  frozen into the graph at capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CUDAGraphStep"]

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class CUDAGraphStep:
    """Forward, loss, backward (and optionally ``optimizer.step()``) as one CUDA graph.

    Args:
        model: the network (or a module running several); its parameters that require grad
            are trained.
        loss_fn: ``loss_fn(outputs, targets)`` → ``()`` loss, or ``(T,)`` losses of T
            networks that share no parameters (the backward runs on their sum).
        inputs: an example batch ``(N, *)`` on the CUDA device; fixes the captured shape.
        targets: its targets ``(N, *)`` (e.g. ``(N,)`` int64 classes).
        optimizer: stepped inside the graph if given; otherwise the caller steps it.
        warmup_steps: eager steps run on a side stream before capture, so that lazy
            initialisation (cuBLAS workspaces, optimizer state) happens outside the graph.
            Their effect on the parameters and the optimizer state is undone: the first
            replay is the first training step.

    Calling the object runs one step on ``inputs (N, *)`` and ``targets (N, *)`` and returns
    ``(loss, outputs)``: the loss ``()`` (or losses ``(T,)``) and the model's outputs (a tensor
    ``(N, out)``, or whatever tuple of tensors the model returns). For the captured shape these
    are the graph's own output tensors, overwritten by the next call: clone them to keep them.

    Attributes:
        draws_random_numbers: whether a warm-up step drew from the device's random-number
            generator (dropout): the replays draw fresh numbers from it every step, as eager
            steps do, but two networks in one graph never draw the same ones.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        warmup_steps: int = 3,
    ) -> None:
        if optimizer is not None:
            _check_capturable(optimizer)
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"CUDAGraphStep: warmup_steps must be an int >= 1, got {warmup_steps}")
        for name, tensor in (("inputs", inputs), ("targets", targets)):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cuda":
                where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"CUDAGraphStep: {name} must be a tensor on a CUDA device, got {where} "
                    "(CUDA graphs exist only on CUDA; use the eager step elsewhere)"
                )
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("CUDAGraphStep: model has no parameter that requires grad")
        off_device = [p.device for p in self.params if p.device != inputs.device]
        if off_device:
            raise ValueError(
                f"CUDAGraphStep: model parameters must be on {inputs.device} like inputs, "
                f"found one on {off_device[0]}"
            )
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.static_inputs = inputs.detach().clone()  # (N, *)
        self.static_targets = targets.detach().clone()  # (N, *)
        self._warm_up(warmup_steps)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = model(self.static_inputs)  # (N, out), or a tuple
            self.static_loss = loss_fn(self.static_outputs, self.static_targets)  # () or (T,)
            _total(self.static_loss).backward()
            if optimizer is not None:
                optimizer.step()
        self.static_outputs = _detached(self.static_outputs)
        self.static_loss = self.static_loss.detach()
        # The graph writes its gradients here on every replay; eager steps copy into them.
        self.static_grads = [p.grad for p in self.params]

    def _eager_body(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.model(inputs), targets)
        _total(loss).backward()
        if self.optimizer is not None:
            self.optimizer.step()
        return loss

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` eager steps on a side stream, then restore parameters, buffers,
        optimizer state and the device's random-number generator."""
        saved_params = [p.detach().clone() for p in self.params]
        buffers = list(self.model.buffers())
        saved_buffers = [b.clone() for b in buffers]
        saved_state = _optimizer_state_tensors(self.optimizer)
        saved_state = {key: value.clone() for key, value in saved_state.items()}
        device = self.static_inputs.device
        saved_rng = torch.cuda.get_rng_state(device)
        side_stream = torch.cuda.Stream(device)
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(steps):
                self._eager_body(self.static_inputs, self.static_targets)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        self.draws_random_numbers = not torch.equal(torch.cuda.get_rng_state(device), saved_rng)
        torch.cuda.set_rng_state(saved_rng, device)
        with torch.no_grad():
            for p, saved in zip(self.params, saved_params, strict=True):
                p.copy_(saved)
            for buffer, saved in zip(buffers, saved_buffers, strict=True):
                buffer.copy_(saved)
            # State that existed before is restored; state the warm-up created (momentum
            # buffers, Adam's moments and step count) goes back to zero, which is exactly a
            # fresh optimizer's first step for the optimizers _check_capturable admits.
            for key, value in _optimizer_state_tensors(self.optimizer).items():
                if key in saved_state:
                    value.copy_(saved_state[key])
                else:
                    value.zero_()
        for p in self.params:
            p.grad = None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """One step on ``inputs (N, *)``, ``targets (N, *)``; returns ``(loss, outputs)``."""
        for param, grad in zip(self.params, self.static_grads, strict=True):
            if param.grad is not grad:  # set to None (zero_grad) since the last step
                param.grad = grad
        static_x, static_t = self.static_inputs, self.static_targets
        same_x = inputs.shape == static_x.shape and inputs.dtype == static_x.dtype
        same_t = targets.shape == static_t.shape and targets.dtype == static_t.dtype
        if not (same_x and same_t):
            return self._eager_step(inputs, targets)
        static_x.copy_(inputs, non_blocking=True)
        static_t.copy_(targets, non_blocking=True)
        self.graph.replay()
        return self.static_loss, self.static_outputs

    def _eager_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The same step for a batch the graph was not captured for."""
        outputs = self.model(inputs)  # (N, out), or a tuple
        loss = self.loss_fn(outputs, targets)  # () or (T,)
        grads = torch.autograd.grad(_total(loss), self.params)
        with torch.no_grad():
            for static_grad, grad in zip(self.static_grads, grads, strict=True):
                static_grad.copy_(grad)  # keep the tensors the graph writes to
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach(), _detached(outputs)


def _total(loss: torch.Tensor) -> torch.Tensor:
    """The loss the backward runs on: ``loss ()`` itself, or the sum of ``loss (T,)``."""
    return loss if loss.dim() == 0 else loss.sum()


def _detached(outputs: Any) -> Any:
    """``outputs`` (a tensor or a tuple of tensors), detached."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    return tuple(output.detach() for output in outputs)


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Raise unless ``optimizer.step()`` can run inside a CUDA graph, with a warm-up that
    can be undone by zeroing the state it created."""
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group["momentum"] != 0 and group["dampening"] != 0:
                raise ValueError(
                    "CUDAGraphStep: optimizer SGD must have dampening=0 to be captured, got "
                    f"dampening={group['dampening']} (its first step differs from later ones)"
                )
        return
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError(
                f"CUDAGraphStep: optimizer {type(optimizer).__name__} must be built with "
                "capturable=True to run inside a CUDA graph"
            )
        return
    raise ValueError(
        f"CUDAGraphStep: optimizer {type(optimizer).__name__} is not supported inside the "
        "graph; expected SGD or Adam/AdamW (capturable=True), or pass optimizer=None and "
        "step it yourself after each call"
    )


def _optimizer_state_tensors(
    optimizer: torch.optim.Optimizer | None,
) -> dict[tuple[int, str], torch.Tensor]:
    """Every tensor of ``optimizer``'s per-parameter state, keyed by (param id, name)."""
    if optimizer is None:
        return {}
    return {
        (id(param), name): value
        for param, state in optimizer.state.items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }

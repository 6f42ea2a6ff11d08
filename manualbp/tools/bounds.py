"""What bounds the speed ratios on this machine, measured rather than assumed.

The costs that no handwritten formula removes, and the floor no driver of the Functions beats:

* **a node**: one ``torch.autograd.Function`` applied and run backward costs more host time
  than one builtin op's node. :func:`node_costs` times a chain of ``k`` identity nodes
  (forward ``x.clone()``, backward the gradient itself) as builtin ops, as classic-style
  Functions (how :mod:`manualbp.functional` applies them in eager mode) and as
  ``setup_context``-style Functions, and reports the time per node, forward and backward: the
  slope between chains of 1 and ``k`` nodes, so the engine's fixed start-up cost drops out;
* **a line of a backward**: each formula line of a handwritten backward is a call from Python
  into ATen; :func:`op_call_us` times one (a 4-element multiply, in a warm loop: a lower
  bound, as inside a training step the caches are colder). torch's own backward formulas
  run in C++ and pay none of it;
* **a Lightning step**: :func:`~manualbp.tools.harness.lightning_loop_seconds_per_step`, the
  training loop around the smallest possible step, with automatic and with manual
  optimization;
* **the floor of direct backprop**: :func:`function_bodies_ratio`, a training step made of the
  Functions' own ``forward``/``setup_context``/``backward`` called in sequence, with nothing
  around them (no modules, checks, tape or engine), against the autograd step.

``python scripts/benchmark.py --bounds`` prints them all. A network of ``F`` handwritten Functions
replacing ``B`` builtin nodes pays about ``F · function - B · builtin`` per step in host time
beyond its kernels, whatever its formulas.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.autograd import Function

__all__ = ["function_bodies_ratio", "node_costs", "op_call_us"]


class _ClassicClone(Function):
    """An identity node in the classic ``forward(ctx, ...)`` style."""

    @staticmethod
    def forward(ctx, input):
        return input.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _SetupContextClone(Function):
    """The same node in the ``forward`` + ``setup_context`` style (``torch.func``-ready)."""

    @staticmethod
    def forward(input):
        return input.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


_NODES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "builtin op": torch.clone,
    "classic Function": _ClassicClone.apply,
    "setup_context Function": _SetupContextClone.apply,
}


def _chain_seconds(node: Callable, length: int, leaf: torch.Tensor, calls: int) -> float:
    """Seconds per forward + backward of ``length`` chained ``node``s from ``leaf``."""
    start = time.perf_counter()
    for _ in range(calls):
        out = leaf
        for _ in range(length):
            out = node(out)
        out.backward(torch.ones_like(out))
    return (time.perf_counter() - start) / calls


def node_costs(length: int = 8, calls: int = 200, repeats: int = 15) -> dict[str, float]:
    """Microseconds per node (forward and backward) of each kind in :data:`_NODES`, on a
    4-element CPU tensor: the median over ``repeats`` interleaved rounds of
    ``(t(length) - t(1)) / (length - 1)``, ``t`` a chain's time."""
    leaf = torch.ones(4, requires_grad=True)
    per_node: dict[str, list[float]] = {name: [] for name in _NODES}
    for node in _NODES.values():  # warm-up
        _chain_seconds(node, length, leaf, calls // 4)
    for _ in range(repeats):
        for name, node in _NODES.items():
            long = _chain_seconds(node, length, leaf, calls)
            short = _chain_seconds(node, 1, leaf, calls)
            per_node[name].append((long - short) / (length - 1) * 1e6)
    return {name: statistics.median(values) for name, values in per_node.items()}


def op_call_us(calls: int = 20000, repeats: int = 15) -> float:
    """Microseconds per call of a 4-element ``torch.mul`` from Python, median of
    ``repeats`` loops of ``calls`` calls."""
    a, b = torch.ones(4), torch.ones(4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mul(a, b)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _bodies_step(
    layers: list[torch.nn.Linear], inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[], None]:
    """A training step (SGD with momentum) of the ReLU MLP of ``layers`` on ``inputs (N, in)``
    and class ``targets (N,)``, from the Functions' own ``forward``, ``setup_context`` and
    ``backward`` called in sequence: no modules, input checks, tape or engine."""
    from manualbp.direct import DirectContext
    from manualbp.functional import CrossEntropyFunction, LinearFunction, ReLUFunction

    parameters = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=1e-3, momentum=0.9)
    loss_args = (None, "mean", None, 0.0)  # weight, reduction, ignore_index, label_smoothing

    def run(function, needs, *args):
        ctx = DirectContext(needs)
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return ctx, output

    @torch.no_grad()
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        h, tape = inputs, []
        for index, layer in enumerate(layers):
            ctx, h = run(LinearFunction, (index > 0, True, True), h, layer.weight, layer.bias)
            tape.append((LinearFunction, ctx, layer))
            if index < len(layers) - 1:
                ctx, h = run(ReLUFunction, (True, False), h, False)
                tape.append((ReLUFunction, ctx, None))
        ctx, (loss, _) = run(CrossEntropyFunction, (True, *[False] * 5), h, targets, *loss_args)
        grad = CrossEntropyFunction.backward(ctx, torch.ones_like(loss), None)[0]
        for function, ctx, layer in reversed(tape):
            grads = function.backward(ctx, grad)
            grad = grads[0]
            if layer is not None:
                layer.weight.grad, layer.bias.grad = grads[1], grads[2]
        optimizer.step()

    return step


def function_bodies_ratio(
    sizes: tuple[int, ...] = (784, 200, 10), batch: int = 64, steps: int = 50, repeats: int = 15
) -> dict[str, float]:
    """The floor of direct backprop with these Functions: the step of :func:`_bodies_step`
    against the benchmark's autograd step (:func:`~manualbp.tools.benchmark.training_step`)
    of the same weights and batch, interleaved (median ms per step, and the median of the
    per-round ratios bodies/autograd)."""
    from manualbp.tools.benchmark import (
        BenchmarkCase,
        _batch,
        _twins,
        interleaved_ratio,
        training_step,
    )

    device = torch.device("cpu")
    case = BenchmarkCase("relu MLP", sizes, "relu", batch)
    _, network = _twins(case, device)
    inputs, targets = _batch(case, device)
    layers = [m for m in copy.deepcopy(network).modules() if isinstance(m, torch.nn.Linear)]
    bodies = _bodies_step(layers, inputs, targets)
    autograd_step = training_step(network, torch.nn.CrossEntropyLoss(), inputs, targets)
    time_b, time_a, ratio, _ = interleaved_ratio(
        bodies, autograd_step, device, warmup=10, steps=steps, repeats=repeats
    )
    return {"bodies_ms": time_b * 1e3, "autograd_ms": time_a * 1e3, "ratio": ratio}

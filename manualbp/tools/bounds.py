"""What bounds the speed ratios on this machine, measured rather than assumed.

Two costs that no handwritten formula can remove:

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
  optimization.

``python scripts/benchmark.py --bounds`` prints both. A network of ``F`` handwritten Functions
replacing ``B`` builtin nodes pays about ``F · function - B · builtin`` per step in host time
beyond its kernels, whatever its formulas.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.autograd import Function

__all__ = ["node_costs", "op_call_us"]


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

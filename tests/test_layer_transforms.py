"""The layers under torch's transforms: ``torch.func.vmap``, ``torch.compile`` and autocast.

* vmap: a batch of inputs mapped through each manual op (and ``torch.func.grad`` of it)
  gives torch's answers; where torch refuses (batch norm updating unbatched running
  statistics) manualbp refuses too.
* ``torch.compile(fullgraph=True)``: a chain through every Function traces without a graph
  break and gives the eager gradients; dropout compiled with torch's random stream drops
  eager's units.
* CPU autocast (bfloat16): each op gives the output dtype torch's does (convolution in
  bfloat16, the others in their input's dtype), gradients in each leaf's own dtype, values
  within bfloat16 rounding of torch's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from layer_cases import LAYER_CASES, MAX_REL, LayerCase

import manualbp.functional as MF
from manualbp.compare import agreement
from manualbp.tools.parity import compare_with_reference

BF16 = torch.bfloat16
CASES = {case.id: case for case in LAYER_CASES}


def _updates_running_statistics(case: LayerCase) -> bool:
    return (
        case.manual is MF.batch_norm and case.kwargs["training"] and case.args(BF16)[1] is not None
    )


def _first_input_mapped(case: LayerCase, function: Callable, args: tuple) -> Callable:
    """``x ↦ function(x, *args[1:])`` for one example of the mapped batch."""
    return lambda x: case.call(function, x, *args[1:])


VMAP_CASES = [
    case for case in LAYER_CASES if not case.random and not _updates_running_statistics(case)
]


@pytest.mark.parametrize("case", VMAP_CASES, ids=lambda case: case.id)
def test_vmap_over_a_batch_of_inputs(case: LayerCase) -> None:
    args = case.args(torch.float64)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(3, *args[0].shape, generator=gen, dtype=torch.float64)
    weights = torch.randn(case.call(case.reference, *args).shape, generator=gen).double()
    results = {}
    for name, function in (("manual", case.manual), ("torch", case.reference)):
        one = _first_input_mapped(case, function, args)
        outputs = torch.func.vmap(one)(batch)
        grads = torch.func.vmap(torch.func.grad(lambda x, one=one: (one(x) * weights).sum()))(batch)
        results[name] = (outputs, grads)
    assert torch.equal(results["manual"][0], results["torch"][0])
    assert float(agreement(results["manual"][1], results["torch"][1])["max_rel"]) <= 1e-13


@pytest.mark.parametrize("function", [MF.batch_norm, torch.nn.functional.batch_norm])
def test_vmap_refuses_batch_norm_updating_unbatched_running_statistics_like_torch(
    function: Callable,
) -> None:
    mean, var = torch.zeros(3), torch.ones(3)
    batch = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="updated in place"):
        torch.func.vmap(lambda x: function(x, mean, var, training=True))(batch)


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_dropout_draws_torchs_masks(randomness: str) -> None:
    batch = torch.randn(3, 5, 6)
    outputs = []
    for function in (MF.dropout, torch.nn.functional.dropout):
        torch.manual_seed(0)
        outputs.append(
            torch.func.vmap(lambda x, f=function: f(x, 0.4), randomness=randomness)(batch)
        )
    assert torch.equal(*outputs)


def _pooled(x, weight, gamma, beta):
    """``x (N, 3, 9, 8)`` through convolution, batch norm and both poolings → ``(N, 4, 3, 4)``
    (no convolution bias: batch norm would cancel it, and its gradient would be round-off)."""
    y = MF.conv2d(x, weight, None, padding="same")  # (N, 4, 9, 8), an even kernel
    y = MF.batch_norm(y, torch.zeros(4), torch.ones(4), gamma, beta, training=True)
    y = MF.max_pool2d(y, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), ceil_mode=True)
    return MF.avg_pool2d(y, 2, stride=2, padding=1, ceil_mode=True, count_include_pad=False)


def _every_layer(x, weight, gamma, beta, ln_weight, ln_bias):
    """One chain through every new Function but dropout: ``x (N, 3, 9, 8)`` → ``(N, 48)``."""
    y = _pooled(x, weight, gamma, beta).flatten(1)  # (N, 48)
    y = MF.layer_norm(y, tuple(ln_weight.shape), ln_weight, ln_bias)
    return MF.log_softmax(y, 1) + MF.softmax(y, 0)


@pytest.mark.slow
def test_compile_fullgraph_gives_eager_gradients() -> None:
    """``torch.compile(fullgraph=True)`` traces every Function (and its backward) without a
    graph break, and gives eager's outputs and gradients to float32 round-off."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 9, 8, generator=gen)
    with torch.no_grad():
        features = _pooled(x, *_layer_parameters())[0].numel()
    norm = [torch.randn(features, generator=gen).requires_grad_() for _ in range(2)]
    args = (x.requires_grad_(), *_layer_parameters(), *norm)
    torch._dynamo.reset()
    eager = _output_and_grads(_every_layer, args)
    traced = _output_and_grads(torch.compile(_every_layer, fullgraph=True), args)
    for name, e, c in zip(("output", *range(len(eager) - 1)), eager, traced, strict=True):
        assert float(agreement(c, e)["max_rel"]) <= MAX_REL[torch.float32], name


def _layer_parameters() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 2, 2), (4,), (4,)]
    return tuple(torch.randn(shape, generator=gen).requires_grad_() for shape in shapes)


@pytest.mark.slow
def test_compile_dropout_with_torchs_random_stream_matches_eager() -> None:
    """Inductor draws random numbers its own way unless told to fall back to torch's: with
    ``fallback_random`` the compiled dropout drops eager's units."""
    torch._dynamo.reset()
    case = CASES["dropout"]
    args = case.args(torch.float32)
    dropout = functools.partial(MF.dropout, **case.kwargs)  # seeded outside: dynamo cannot
    eager = _output_and_grads(dropout, args)
    with torch._inductor.config.patch(fallback_random=True):
        traced = _output_and_grads(torch.compile(dropout, fullgraph=True), args)
    for e, c in zip(eager, traced, strict=True):
        assert torch.equal(e, c)
    torch._dynamo.reset()  # the next compile must not reuse this configuration's code


def _output_and_grads(function: Callable, args: tuple) -> tuple[torch.Tensor, ...]:
    """``function(*args)`` and the gradients of its differentiable arguments (seed 0 before
    the call, one seeded upstream gradient)."""
    torch.manual_seed(0)
    output = function(*args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    return (output.detach(), *torch.autograd.grad(output, inputs, upstream))


def _under_cpu_autocast(case: LayerCase, function: Callable) -> Callable:
    def run(*args: Any) -> Any:
        with torch.autocast("cpu", dtype=BF16):
            return case.call(function, *args)

    return run


def _in_dtype(args: tuple, dtype: torch.dtype) -> tuple:
    """The input (the first argument) in ``dtype``; parameters stay float32."""
    first = args[0].detach().to(dtype).requires_grad_(args[0].requires_grad)
    return (first, *args[1:])


AUTOCAST_CASES = [case for case in LAYER_CASES if not case.id.endswith("unbatched")]


@pytest.mark.parametrize("input_dtype", [torch.float32, BF16], ids=str)
@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=lambda case: case.id)
def test_cpu_autocast_matches_torch(case: LayerCase, input_dtype: torch.dtype) -> None:
    args = _in_dtype(case.args(torch.float32), input_dtype)
    manual, reference = (
        _under_cpu_autocast(case, case.manual),
        _under_cpu_autocast(case, case.reference),
    )
    expected = reference(*args)
    out_dtype = BF16 if case.manual is MF.conv2d else input_dtype  # torch's autocast policy
    assert expected.dtype == out_dtype
    bf16 = {"rtol": 2e-2, "atol": 2e-2}
    tolerance = bf16 if BF16 in (out_dtype, input_dtype) else {"rtol": 1e-4, "atol": 1e-4}
    rows = compare_with_reference(manual, reference, args, case=case.id, tolerance=tolerance)
    assert rows[0].dtype == out_dtype and rows[0].exact  # the forward is torch's own kernel
    differentiable = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(manual(*args).float().sum(), differentiable)
    assert [g.dtype for g in grads] == [a.dtype for a in differentiable]

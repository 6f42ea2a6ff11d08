"""torch's own test inputs for these ops and modules, run through manualbp.

``op_db`` (OpInfo) holds the sample inputs torch tests ``nn.functional.conv2d``,
``max_pool2d``, ``avg_pool2d``, ``batch_norm``, ``layer_norm``, ``log_softmax``, ``softmax``
and ``dropout`` with; ``module_db`` (ModuleInfo) the constructor and forward inputs of
``nn.Conv2d``, ``MaxPool2d``, ``AvgPool2d``, ``BatchNorm1d``/``2d``, ``LayerNorm``,
``LogSoftmax`` and ``Softmax``. Every sample, in float32 and float64, ends in one of:

* ``agree``: the manual op's outputs, the gradients of every input that requires grad, and
  (modules) the buffers after the forward match torch's;
* ``torch refuses too``: both raise the same error type;
* ``refused``: manualbp raises a deliberate error naming the unsupported feature.

None may be silently different, and at least 95% must agree. ``pytest -s`` prints the counts
per op and dtype (recorded in ``docs/results/layers.md``). The ops' ``error_inputs`` must give
torch's error type.
"""

from __future__ import annotations

import collections
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.testing._utils import wrapper_set_seed
from torch.utils._pytree import tree_flatten, tree_map
from torch_test_db import torch_test_db

import manualbp.functional as MF
from manualbp.nn import manual_twin

DTYPES = (torch.float32, torch.float64)
TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
}

MANUAL_OPS: dict[str, Callable[..., Any]] = {
    "nn.functional.conv2d": MF.conv2d,
    "nn.functional.max_pool2d": MF.max_pool2d,
    "nn.functional.avg_pool2d": MF.avg_pool2d,
    "nn.functional.batch_norm": MF.batch_norm,
    "nn.functional.layer_norm": MF.layer_norm,
    "log_softmax": MF.log_softmax,
    "softmax": MF.softmax,
    "nn.functional.dropout": MF.dropout,
}
# (name, variant) of every OpInfo of these ops in torch 2.14's op_db
OP_VARIANTS = [
    ("nn.functional.conv2d", ""),
    ("nn.functional.max_pool2d", ""),
    ("nn.functional.avg_pool2d", ""),
    ("nn.functional.batch_norm", ""),
    ("nn.functional.batch_norm", "without_cudnn"),
    ("nn.functional.layer_norm", ""),
    ("log_softmax", ""),
    ("log_softmax", "with_dtype"),
    ("softmax", ""),
    ("softmax", "with_dtype"),
    ("nn.functional.dropout", ""),
]
MODULE_NAMES = (
    "Conv2d",
    "MaxPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "LayerNorm",
    "LogSoftmax",
    "Softmax",
)


@functools.cache
def _torch_test_db() -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """op_db and module_db entries of these ops and modules (:func:`torch_test_db`)."""
    op_db, module_db = torch_test_db()
    ops = {(op.name, op.variant_test_name): op for op in op_db if op.name in MANUAL_OPS}
    modules = {m.module_cls.__name__: m for m in module_db if m.module_cls.__name__ in MODULE_NAMES}
    return ops, modules


RANDOM = {"nn.functional.dropout"}


def _copy(value: Any) -> Any:
    """Independent leaves with the same values, strides and requires_grad."""

    def copy_tensor(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        clone = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())
        return clone.requires_grad_(t.requires_grad)

    return tree_map(copy_tensor, value)


def _leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


def _outputs_and_grads(function: Callable[[], Any], leaves: list[torch.Tensor], seed: int) -> list:
    """``function()``'s floating outputs (and integer ones, e.g. max-pool indices) and the
    gradients of ``leaves`` against a seeded random upstream gradient."""
    torch.manual_seed(seed)
    result = function()
    outputs = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
    differentiable = [t for t in outputs if t.requires_grad]
    grads: tuple = ()
    if differentiable and leaves:
        generator = torch.Generator().manual_seed(seed)
        upstream = [
            torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
            for t in differentiable
        ]
        grads = torch.autograd.grad(
            differentiable, leaves, upstream, allow_unused=True, materialize_grads=True
        )
    return [t.detach() for t in outputs] + list(grads)


def _same(manual: list, torch_side: list, dtype: torch.dtype) -> bool:
    if len(manual) != len(torch_side):
        return False
    for a, b in zip(manual, torch_side, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return False
        elif not torch.allclose(a, b, equal_nan=True, **TOLERANCE[dtype]):
            return False
    return True


def _no_farther(manual: list, torch_side: list, truth: list) -> bool:
    """Every float entry of ``manual`` at most as far from ``truth`` (the same sample computed
    by torch in float64) as torch's own entry is, give or take float32 rounding."""
    for a, b, t in zip(manual, torch_side, truth, strict=True):
        if a.is_floating_point():
            t = t.to(torch.float64)
            slack = TOLERANCE[torch.float32]["atol"] + 2e-7 * t.abs()
            if ((a.double() - t).abs() > (b.double() - t).abs() + slack).any():
                return False
    return True


def _outcome(
    run_manual: Callable[[], list],
    run_torch: Callable[[], list],
    dtype: torch.dtype,
    run_truth: Callable[[], list] | None = None,
) -> str:
    try:
        expected = run_torch()
    except Exception as torch_error:
        try:
            run_manual()
        except type(torch_error):
            return "torch refuses too"
        except Exception:
            return "different error"
        return "manual accepts what torch refuses"
    try:
        actual = run_manual()
    except (RuntimeError, ValueError, TypeError) as error:
        return "refused" if "not supported" in str(error) else f"unexpected error: {error}"
    if _same(actual, expected, dtype):
        return "agree"
    # float32: is the difference torch's own rounding, or ours?
    nearer = dtype == torch.float32 and run_truth is not None
    if nearer and _no_farther(actual, expected, run_truth()):
        return "agree (nearer the float64 result than torch's)"
    return "differ"


def _op_outcomes(op, dtype: torch.dtype) -> Iterator[str]:
    manual_op = MANUAL_OPS[op.name]
    if op.name in RANDOM:  # torch's sample op draws from seed 42 (wrapper_set_seed): so do we
        manual_op = functools.partial(wrapper_set_seed, manual_op)
    for index, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        call = [sample.input, *sample.args], dict(sample.kwargs)

        def run(function, call=call, seed=index):
            (args, kwargs) = _copy(call)  # batch norm updates its running statistics in place
            leaves = _leaves((args, kwargs))
            result = _outputs_and_grads(lambda: function(*args, **kwargs), leaves, seed)
            return result + [
                t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
            ]

        def truth(call=call, seed=index):
            (args, kwargs) = tree_map(_as_float64, _copy(call))
            leaves = _leaves((args, kwargs))
            result = _outputs_and_grads(lambda: op.op(*args, **kwargs), leaves, seed)
            return result + [
                t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
            ]

        yield _outcome(lambda run=run: run(manual_op), lambda run=run: run(op.op), dtype, truth)


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _module_outcomes(info, dtype: torch.dtype) -> Iterator[str]:
    for training in (True, False):
        inputs = info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
        for index, module_input in enumerate(inputs):
            constructor, forward = module_input.constructor_input, module_input.forward_input
            reference = info.module_cls(*constructor.args, **constructor.kwargs).to(dtype)
            reference.train(training)
            manual = manual_twin(reference)

            def run(module, forward=forward, seed=index):
                module = copy.deepcopy(module)
                (args, kwargs) = _copy((forward.args, forward.kwargs))
                leaves = _leaves((args, kwargs)) + list(module.parameters())
                result = _outputs_and_grads(lambda: module(*args, **kwargs), leaves, seed)
                return result + [b.detach() for b in module.buffers()]

            yield _outcome(
                lambda run=run, m=manual: run(m), lambda run=run, r=reference: run(r), dtype
            )


def _tally(outcomes: Iterator[str]) -> collections.Counter:
    return collections.Counter(outcomes)


def _check(counts: collections.Counter, what: str) -> None:
    nearer = "agree (nearer the float64 result than torch's)"
    allowed = {"agree", nearer, "torch refuses too", "refused"}
    assert set(counts) <= allowed, f"{what}: {dict(counts)}"
    agreeing = counts["agree"] + counts[nearer] + counts["torch refuses too"]
    assert agreeing >= 0.95 * sum(counts.values()), f"{what}: {dict(counts)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, variant", OP_VARIANTS, ids=lambda v: v)
def test_opinfo_samples_agree(name: str, variant: str, dtype: torch.dtype) -> None:
    op = _torch_test_db()[0][name, variant]
    counts = _tally(_op_outcomes(op, dtype))
    print(f"\n{op.name} {op.variant_test_name} {str(dtype)[6:]}: {dict(counts)}")
    _check(counts, op.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("module_name", MODULE_NAMES)
def test_moduleinfo_inputs_agree(module_name: str, dtype: torch.dtype) -> None:
    info = _torch_test_db()[1][module_name]
    counts = _tally(_module_outcomes(info, dtype))
    print(f"\n{info.module_cls.__name__} {str(dtype)[6:]}: {dict(counts)}")
    _check(counts, info.module_cls.__name__)


def test_every_op_and_module_is_covered() -> None:
    ops, modules = _torch_test_db()
    assert set(ops) == set(OP_VARIANTS)
    assert set(modules) == set(MODULE_NAMES)
    assert not torch.backends.flags_frozen()


ERROR_OPS = ["nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d"]


@pytest.mark.parametrize("name", ERROR_OPS)
def test_opinfo_error_inputs_raise_torchs_error_type(name: str) -> None:
    op = _torch_test_db()[0][name, ""]
    manual_op = MANUAL_OPS[name]
    count = 0
    for error_input in op.error_inputs("cpu"):
        sample = error_input.sample_input
        with pytest.raises(error_input.error_type):
            manual_op(sample.input, *sample.args, **sample.kwargs)
        count += 1
    assert count > 0

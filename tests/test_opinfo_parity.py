"""manualbp against torch on torch's own test inputs.

PyTorch tests its operators on the ``sample_inputs`` (and ``reference_inputs``) of their OpInfo
entries in ``torch.testing._internal.common_methods_invocations.op_db`` and its modules on the
inputs of their ModuleInfo entries in ``common_modules.module_db``; both ship in the torch
wheel. Here every one of those inputs for linear, sigmoid, tanh, relu, cross_entropy and
mse_loss (float32 and float64), and for the six modules, runs through manualbp and through torch:
the forward output and the gradient of every input (and, for modules, every parameter) must
agree within :data:`manualbp.tools.parity.TOLERANCES`. A sample manualbp cannot compute must be
refused deliberately (NotImplementedError naming the function and the feature), never answered
differently and never crash from deep inside.

``pytest tests/test_opinfo_parity.py -s -k summary`` prints the per-op table of
docs/exactness.md: samples that agree, that are bit-exact, that were refused, and the largest
difference in ulps.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch_test_db import torch_test_db

import manualbp.functional as MF
import manualbp.nn as mnn
from manualbp.compare import agreement
from manualbp.tools.parity import TOLERANCES, leaf_copy

DTYPES = (torch.float32, torch.float64)

# OpInfo name in op_db -> the manualbp function with the same signature
OPS: dict[str, Callable[..., torch.Tensor]] = {
    "nn.functional.linear": MF.linear,
    "sigmoid": MF.sigmoid,
    "tanh": MF.tanh,
    "nn.functional.relu": MF.relu,
    "nn.functional.cross_entropy": MF.cross_entropy,
    "nn.functional.mse_loss": MF.mse_loss,
}

# torch.nn class in module_db -> its manualbp drop-in
MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: mnn.Linear,
    nn.Sigmoid: mnn.Sigmoid,
    nn.Tanh: mnn.Tanh,
    nn.ReLU: mnn.ReLU,
    nn.CrossEntropyLoss: mnn.CrossEntropyLoss,
    nn.MSELoss: mnn.MSELoss,
}

AGREEMENT_GOAL = 0.98  # the share of samples that must agree with torch (the rest: refused)


@functools.cache
def _torch_test_db() -> tuple[dict[str, Any], dict[type[nn.Module], Any]]:
    """op_db and module_db entries by name/class (:func:`torch_test_db`)."""
    op_db, module_db = torch_test_db()
    ops = {info.name: info for info in op_db if info.name in OPS and not info.variant_test_name}
    modules = {info.module_cls: info for info in module_db if info.module_cls in MODULES}
    assert ops.keys() == OPS.keys() and modules.keys() == MODULES.keys()
    return ops, modules


@dataclass(frozen=True)
class Outcome:
    """How one sample went: ``agree`` (every tensor close), ``refused`` (a deliberate
    NotImplementedError), or ``disagree`` (with what differed)."""

    name: str
    dtype: torch.dtype
    status: str
    exact: bool = False
    max_ulp: float = 0.0
    max_rel: float = 0.0
    detail: str = ""


def _compare(
    name: str,
    dtype: torch.dtype,
    run: Callable[[bool], tuple[torch.Tensor, list[torch.Tensor]]],
) -> Outcome:
    """``run(manual)`` returns an output and the tensors to differentiate it by; both sides
    are differentiated against one seeded random upstream gradient and compared."""
    try:
        manual_out, manual_wrt = run(True)
    except NotImplementedError as error:  # a deliberate refusal must name what is missing
        if "not supported" not in str(error) or ":" not in str(error):
            return Outcome(name, dtype, "disagree", detail=f"unclear refusal: {error}")
        return Outcome(name, dtype, "refused", detail=str(error))
    reference_out, reference_wrt = run(False)
    pairs = [("output", manual_out, reference_out)]
    if manual_wrt and reference_out.requires_grad:
        generator = torch.Generator().manual_seed(0)
        upstream = torch.randn(reference_out.shape, generator=generator, dtype=torch.float64)
        upstream = upstream.to(reference_out.dtype)
        manual_grads = torch.autograd.grad(manual_out, manual_wrt, upstream, allow_unused=True)
        reference_grads = torch.autograd.grad(
            reference_out, reference_wrt, upstream, allow_unused=True
        )
        pairs += [
            (f"grad[{i}]", m, r)
            for i, (m, r) in enumerate(zip(manual_grads, reference_grads, strict=True))
        ]
    exact, worst_ulp, worst_rel = True, 0.0, 0.0
    for tensor, manual, reference in pairs:
        if (manual is None) != (reference is None):
            return Outcome(name, dtype, "disagree", detail=f"{tensor}: one side has no gradient")
        if manual is None:
            continue
        if (manual.shape, manual.dtype) != (reference.shape, reference.dtype):
            detail = f"{tensor}: {manual.dtype} {tuple(manual.shape)} vs torch's "
            detail += f"{reference.dtype} {tuple(reference.shape)}"
            return Outcome(name, dtype, "disagree", detail=detail)
        close = torch.allclose(manual, reference, equal_nan=True, **TOLERANCES[reference.dtype])
        stats = agreement(manual, reference)
        if not close:
            detail = f"{tensor}: max_abs {float(stats['max_abs']):.3g}"
            return Outcome(name, dtype, "disagree", detail=detail)
        exact &= bool(stats["exact"])
        worst_ulp = max(worst_ulp, float(stats["max_ulp"]))
        worst_rel = max(worst_rel, float(stats["max_rel"]))
    return Outcome(name, dtype, "agree", exact=exact, max_ulp=worst_ulp, max_rel=worst_rel)


def _sample_sources(info: Any) -> list[str]:
    """``sample_inputs``, and ``reference_inputs`` where the OpInfo defines its own."""
    return ["sample", "reference"] if info.reference_inputs_func is not None else ["sample"]


def op_outcomes(name: str, dtype: torch.dtype) -> Iterator[Outcome]:
    """One outcome per OpInfo sample of ``name`` in ``dtype`` on the CPU."""
    ops, _ = _torch_test_db()
    info, manual = ops[name], OPS[name]
    for source in _sample_sources(info):
        generate = info.sample_inputs if source == "sample" else info.reference_inputs
        torch.manual_seed(0)  # torch draws the samples from the global generator
        for index, sample in enumerate(generate("cpu", dtype, requires_grad=True)):
            args = [sample.input, *sample.args]

            def run(use_manual: bool, args=args, kwargs=sample.kwargs):
                copies = [leaf_copy(a) if isinstance(a, torch.Tensor) else a for a in args]
                out = (manual if use_manual else info.op)(*copies, **kwargs)
                return out, [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]

            yield _compare(f"{name} {source}[{index}]", dtype, run)


def module_outcomes(module_cls: type[nn.Module], dtype: torch.dtype) -> Iterator[Outcome]:
    """One outcome per ModuleInfo input of ``module_cls``: the torch module against the
    manualbp module built from the same constructor arguments and the same random state
    (parameters must be identical), input and parameter gradients compared."""
    _, modules = _torch_test_db()
    info, manual_cls = modules[module_cls], MODULES[module_cls]
    torch.manual_seed(0)  # torch draws the inputs from the global generator
    inputs = info.module_inputs_func(info, "cpu", dtype, requires_grad=True, training=True)
    for index, module_input in enumerate(inputs):
        constructor, forward = module_input.constructor_input, module_input.forward_input
        built = {}
        for use_manual, cls in ((True, manual_cls), (False, module_cls)):
            torch.manual_seed(index)
            built[use_manual] = cls(*constructor.args, **constructor.kwargs).to(dtype)
        for key, value in built[False].state_dict().items():
            assert torch.equal(built[True].state_dict()[key], value), key

        def run(use_manual: bool, built=built, forward=forward):
            module = copy.deepcopy(built[use_manual])
            args = [leaf_copy(a) if isinstance(a, torch.Tensor) else a for a in forward.args]
            kwargs = {
                k: leaf_copy(v) if isinstance(v, torch.Tensor) else v
                for k, v in forward.kwargs.items()
            }
            out = module(*args, **kwargs)
            wrt = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
            wrt = [t for t in wrt if t.requires_grad] + list(module.parameters())
            return out, wrt

        name = f"{module_cls.__name__} {module_input.desc or 'default'}[{index}]"
        yield _compare(name, dtype, run)


CASES = [
    *[pytest.param("op", name, id=name) for name in OPS],
    *[pytest.param("module", cls, id=f"nn.{cls.__name__}") for cls in MODULES],
]


@functools.cache  # the summary reuses the parametrized tests' outcomes
def _outcomes(kind: str, what: Any, dtype: torch.dtype) -> tuple[Outcome, ...]:
    return tuple((op_outcomes if kind == "op" else module_outcomes)(what, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, what", CASES)
def test_torch_sample_inputs_agree_or_are_refused(kind: str, what: Any, dtype) -> None:
    outcomes = _outcomes(kind, what, dtype)
    assert outcomes, "torch defines no inputs"
    disagreements = [f"{o.name}: {o.detail}" for o in outcomes if o.status == "disagree"]
    assert not disagreements, "\n".join(disagreements)
    agreeing = sum(o.status == "agree" for o in outcomes)
    assert agreeing >= AGREEMENT_GOAL * len(outcomes), [o.detail for o in outcomes]


def test_summary_of_torch_sample_inputs() -> None:
    """Counts per op and dtype (``-s`` prints the table of docs/exactness.md); every sample
    agrees or is refused, and at least 98% of all agree."""
    lines = [
        "| op / module | dtype | samples | agree | bit-exact | refused | max_ulp | max_rel |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    totals = {"samples": 0, "agree": 0, "exact": 0, "refused": 0}
    for dtype in DTYPES:
        for case in CASES:
            kind, what = case.values
            outcomes = _outcomes(kind, what, dtype)
            agree = [o for o in outcomes if o.status == "agree"]
            refused = sum(o.status == "refused" for o in outcomes)
            exact = sum(o.exact for o in agree)
            worst = max((o.max_ulp for o in agree), default=0.0)
            worst_rel = max((o.max_rel for o in agree), default=0.0)
            label = what if kind == "op" else f"nn.{what.__name__}"
            dtype_name = str(dtype).removeprefix("torch.")
            lines.append(
                f"| {label} | {dtype_name} | {len(outcomes)} | {len(agree)} | {exact} | "
                f"{refused} | {worst:.3g} | {worst_rel:.2g} |"
            )
            totals["samples"] += len(outcomes)
            totals["agree"] += len(agree)
            totals["exact"] += exact
            totals["refused"] += refused
    lines.append(
        f"\nall: {totals['agree']}/{totals['samples']} agree "
        f"({totals['exact']} bit-exact), {totals['refused']} refused"
    )
    print("\n" + "\n".join(lines))
    assert totals["agree"] + totals["refused"] == totals["samples"]
    assert totals["agree"] >= math.ceil(AGREEMENT_GOAL * totals["samples"])

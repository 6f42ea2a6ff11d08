"""``manualbp.check``: a correct Function passes, each planted mistake fails its property.

A user's softplus Function (``SoftplusFunction``) is the subject; every planted mistake is a
one-method change of it (or of a sigmoid) and must fail the property named for it, and only
the properties the mistake affects. Then every manualbp Function passes every property, and
the parity table is shown to run the very comparison of the check's forward and backward.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

import manualbp
import manualbp.functional as MF
from manualbp.checks import (
    PROPERTIES,
    CheckReport,
    CheckUsageError,
    check_properties,
    forward_backward_agreement,
)
from manualbp.tools.parity import PARITY_CASES, run_case


class SoftplusFunction(Function):
    """``y = log(1 + e^x)``;  ``dL/dx = g · sigmoid(x)``. A correct user Function."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


# --- planted mistakes ---------------------------------------------------------------------


class WrongGradient(SoftplusFunction):
    """Returns the sigmoid's derivative instead of the sigmoid."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x) * (1 - torch.sigmoid(x))


class WrongForNonContiguousInput(SoftplusFunction):
    """Reads the saved input as if it were stored contiguously (a kernel ignoring strides)."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        flat = x.as_strided((x.numel(),), (1,))  # wrong unless x is contiguous
        return grad_output * torch.sigmoid(flat).reshape(x.shape)


class WrongForNonContiguousUpstream(SoftplusFunction):
    """Reads the upstream gradient as if it were contiguous."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        g = grad_output.as_strided(grad_output.shape, torch.empty(grad_output.shape).stride())
        return g * torch.sigmoid(x)


class ViewOfNonContiguous(SoftplusFunction):
    """``.view`` where ``.reshape`` is needed: raises for non-contiguous input."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return (grad_output.reshape(-1) * torch.sigmoid(x.view(-1))).view(x.shape)


class DetachedBackward(SoftplusFunction):
    """First derivative right, but the backward is cut from the graph: no double backward."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x).detach()


class NoGradBackward(SoftplusFunction):
    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return grad_output * torch.sigmoid(x)


class NumpyBackward(SoftplusFunction):
    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        sigmoid = 1 / (1 + np.exp(-x.detach().cpu().numpy()))
        return grad_output * torch.from_numpy(sigmoid).to(grad_output)


class OnceDifferentiableBackward(SoftplusFunction):
    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


class InputKeptOnCtx(SoftplusFunction):
    """Keeps its input as a ctx attribute instead of ``ctx.save_for_backward``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input = inputs[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * torch.sigmoid(ctx.input)


class SigmoidOutputKeptOnCtx(Function):
    """A sigmoid keeping its output as a ctx attribute."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.output = output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.output * (1 - ctx.output)


class WrongUnderCompile(SoftplusFunction):
    """Takes another code path when traced by torch.compile, and that path is wrong."""

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        scale = 1.01 if torch.compiler.is_compiling() else 1.0
        return grad_output * torch.sigmoid(x) * scale


class MatmulKeepingInputDtype(Function):
    """``a @ b`` cast back to the input dtype: float32 under autocast, where torch gives
    bfloat16."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return torch.mm(a, b).to(a.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        return grad_output.mm(b.t()), a.t().mm(grad_output)


class SoftplusWithoutVmapRule(Function):
    """Correct, but neither ``generate_vmap_rule`` nor a ``vmap`` staticmethod."""

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(x)


class MulComputingEveryGradient(Function):
    """``a · b``, always computing both gradients, ignoring ``ctx.needs_input_grad``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        a, b = ctx.saved_tensors
        return grad_output * b, grad_output * a


def sample(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


SOFTPLUS_MISTAKES = [
    pytest.param(WrongGradient, {"backward", "gradcheck"}, id="wrong-gradient"),
    pytest.param(WrongForNonContiguousInput, {"non_contiguous"}, id="non-contiguous-input"),
    pytest.param(WrongForNonContiguousUpstream, {"non_contiguous"}, id="non-contiguous-upstream"),
    pytest.param(ViewOfNonContiguous, {"non_contiguous"}, id="view-of-non-contiguous"),
    pytest.param(DetachedBackward, {"gradgradcheck"}, id="double-backward-detached"),
    pytest.param(NoGradBackward, {"gradgradcheck"}, id="double-backward-no-grad"),
    pytest.param(OnceDifferentiableBackward, {"gradgradcheck"}, id="double-backward-once"),
    pytest.param(NumpyBackward, {"gradgradcheck"}, id="double-backward-numpy"),
    pytest.param(InputKeptOnCtx, {"saved_tensors"}, id="input-kept-on-ctx"),
    pytest.param(WrongUnderCompile, {"compile"}, id="wrong-under-compile"),
]


def test_a_correct_user_function_passes_every_property_that_applies() -> None:
    report = manualbp.check(SoftplusFunction.apply, F.softplus, sample(8, 5))
    assert isinstance(report, CheckReport)
    assert report.ok and report.failed == []
    assert list(report.results) == list(PROPERTIES)
    verdicts = {name: result.verdict for name, result in report.results.items()}
    # one input: no Function input ever needs no gradient, so there is nothing to observe
    assert verdicts == {**dict.fromkeys(PROPERTIES, "passed"), "needs_input_grad": "skipped"}
    assert report["forward"].statistics == {"max_abs": 0.0, "max_rel": 0.0, "max_ulp": 0.0}
    assert 0 < report["backward"].statistics["max_ulp"] <= 4  # another formula than torch's
    assert "input 0: backward raises" in report["saved_tensors"].note


@pytest.mark.parametrize("function, expected_failures", SOFTPLUS_MISTAKES)
def test_each_planted_mistake_fails_its_property(
    function: type[Function], expected_failures: set[str]
) -> None:
    report = manualbp.check(function.apply, F.softplus, sample(8, 5))
    assert not report.ok
    assert expected_failures <= set(report.failed), str(report)
    assert report["forward"].verdict == "passed"  # every mistake is in the backward
    for name in report.failed:
        assert report[name].error, name  # the evidence: the exception or the mismatch
        assert name in str(report)


@pytest.mark.parametrize(
    "function",
    [
        WrongForNonContiguousInput,
        WrongForNonContiguousUpstream,
        DetachedBackward,
        NoGradBackward,
        InputKeptOnCtx,
        WrongUnderCompile,
    ],
)
def test_a_mistake_fails_only_the_properties_it_breaks(function: type[Function]) -> None:
    """No collateral failures: the report points at the mistake."""
    expected = next(p.values[1] for p in SOFTPLUS_MISTAKES if p.values[0] is function)
    report = manualbp.check(function.apply, F.softplus, sample(8, 5))
    assert set(report.failed) == expected, str(report)


def test_an_output_kept_on_ctx_fails_saved_tensors() -> None:
    report = manualbp.check(SigmoidOutputKeptOnCtx.apply, torch.sigmoid, sample(8, 5))
    assert report.failed == ["saved_tensors"], str(report)
    assert "output 0" in report["saved_tensors"].note
    assert "save_for_backward" in report["saved_tensors"].error


def test_saved_tensors_passes_a_function_that_saves_what_torch_saves() -> None:
    report = manualbp.check(MF.sigmoid, torch.sigmoid, sample(8, 5))
    # sigmoid saves its output: editing the input does not matter, editing the output raises
    assert report["saved_tensors"].note == "output 0: backward raises; input 0: not needed"


def test_wrong_dtype_under_autocast_fails_autocast_only() -> None:
    report = manualbp.check(MatmulKeepingInputDtype.apply, torch.mm, sample(6, 4), sample(4, 3))
    assert report.failed == ["autocast"], str(report)
    assert "float32" in report["autocast"].error and "bfloat16" in report["autocast"].error


def test_wrong_gradient_evidence_names_the_tensor_and_the_statistics() -> None:
    report = manualbp.check(WrongGradient.apply, F.softplus, sample(8, 5))
    backward = report["backward"]
    assert backward.verdict == "failed"
    assert backward.note.startswith("grad[0]: 40/40 elements differ beyond rtol=1e-05")
    assert backward.statistics["max_rel"] > 0.1
    (comparison,) = backward.comparisons
    assert comparison.tensor == "grad[0]" and not comparison.close
    assert "Greatest absolute difference" in backward.error


def test_a_function_without_vmap_rule_skips_vmap_with_the_reason() -> None:
    report = manualbp.check(SoftplusWithoutVmapRule.apply, F.softplus, sample(8, 5))
    assert report.ok
    assert report["vmap"].verdict == "skipped"
    assert "no vmap rule" in report["vmap"].note
    assert "generate_vmap_rule" in report["vmap"].error  # torch's own message as evidence


def test_gradients_for_inputs_that_need_none_are_reported_not_failed() -> None:
    report = manualbp.check(
        MulComputingEveryGradient.apply, torch.mul, sample(4, 3).requires_grad_(), sample(4, 3)
    )
    assert report.ok
    assert report["needs_input_grad"].verdict == "reported"
    assert "MulComputingEveryGradient input 1" in report["needs_input_grad"].note


def test_a_property_that_cannot_apply_is_skipped_never_passed() -> None:
    """Integer input: nothing to differentiate, nothing to autocast, no custom Function."""

    def reverse(t: torch.Tensor) -> torch.Tensor:
        return t.flip(0)

    report = manualbp.check(reverse, reverse, torch.arange(6))
    assert report.ok
    assert report["forward"].verdict == "passed"
    skipped = {name for name, result in report.results.items() if result.verdict == "skipped"}
    assert skipped == {
        "backward",
        "gradcheck",
        "gradgradcheck",
        "autocast",
        "saved_tensors",
        "needs_input_grad",
    }
    assert report["autocast"].note == "no floating-point input"
    assert report["needs_input_grad"].note == "fn runs no custom autograd.Function"
    assert all(report[name].note for name in skipped)


def test_finite_differences_are_skipped_where_the_reference_fails_them_too() -> None:
    """ReLU at exact zeros has no derivative: torch's own relu fails gradcheck there."""
    x = sample(4, 5)
    x[0] = 0.0
    report = manualbp.check(MF.relu, F.relu, x)
    assert report.ok
    assert report["gradcheck"].verdict == "skipped"
    assert "the reference fails gradcheck too" in report["gradcheck"].note


def test_keyword_and_non_tensor_arguments_reach_both_callables() -> None:
    class SoftplusBeta(Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, beta):
            return F.softplus(x, beta=beta)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.beta = inputs[1]

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            return grad_output * torch.sigmoid(ctx.beta * x), None

    def softplus(x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        return SoftplusBeta.apply(x, beta)

    assert manualbp.check(softplus, F.softplus, sample(8, 5), beta=2.0).ok
    wrong_beta = manualbp.check(softplus, lambda x, beta: F.softplus(x), sample(8, 5), beta=2.0)
    assert "forward" in wrong_beta.failed


def test_the_callers_tensors_are_never_modified() -> None:
    x = sample(8, 5)
    before = x.clone()
    manualbp.check(InputKeptOnCtx.apply, F.softplus, x)  # saved_tensors edits its copies
    assert torch.equal(x, before)
    assert not x.requires_grad and x.grad is None


def test_a_reference_that_raises_on_the_samples_is_a_usage_error() -> None:
    with pytest.raises(CheckUsageError, match=r"the reference .*linear raised on the samples"):
        manualbp.check(SoftplusFunction.apply, F.linear, sample(8, 5))
    with pytest.raises(CheckUsageError, match="complex"):
        manualbp.check(SoftplusFunction.apply, F.softplus, torch.randn(3, dtype=torch.cfloat))
    with pytest.raises(ValueError, match="unknown properties"):
        check_properties(SoftplusFunction.apply, F.softplus, (sample(3),), properties=["speed"])
    with pytest.raises(CheckUsageError, match=r"unknown torch\.compile backend"):
        check_properties(SoftplusFunction.apply, F.softplus, (sample(3),), compile_backend="x")


def test_a_function_that_raises_fails_forward_and_skips_the_rest() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("not implemented for this shape")

    report = manualbp.check(broken, F.softplus, sample(3))
    assert report.failed == ["forward"]
    assert "not implemented for this shape" in report["forward"].note
    assert {r.verdict for name, r in report.results.items() if name != "forward"} == {"skipped"}


def test_the_report_prints_the_table_and_the_evidence_of_each_failure() -> None:
    report = manualbp.check(InputKeptOnCtx.apply, F.softplus, sample(8, 5))
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "manualbp.check: InputKeptOnCtx.apply against torch.nn.functional.softplus"
    header = next(line for line in lines if line.startswith("| property"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "property",
        "verdict",
        "max_abs",
        "max_rel",
        "max_ulp",
        "note",
    ]
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(PROPERTIES) <= set(rows)
    assert "| failed " in rows["saved_tensors"]
    assert "FAILED: saved_tensors" in text
    assert "save it with ctx.save_for_backward" in text


def test_the_package_exports_the_function_and_keeps_the_module_importable() -> None:
    import manualbp.checks as checks_module

    assert callable(manualbp.check) and manualbp.check is checks_module.check
    assert manualbp.CheckReport is CheckReport
    assert checks_module.__name__ == "manualbp.checks"


# --- every manualbp Function through manualbp.check ------------------------------------


def _manualbp_cases() -> list[Any]:
    g = torch.Generator().manual_seed(3)

    def r(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(shape, generator=g).requires_grad_(grad)

    target = torch.tensor([0, 3, -100, 1, 4, 2, 3, -100])
    return [
        pytest.param(MF.linear, F.linear, (r(8, 6), r(5, 6), r(5)), {}, id="linear"),
        pytest.param(MF.linear, F.linear, (r(2, 4, 6), r(5, 6)), {}, id="linear-3d-no-bias"),
        pytest.param(MF.sigmoid, torch.sigmoid, (r(8, 6),), {}, id="sigmoid"),
        pytest.param(MF.tanh, torch.tanh, (r(8, 6),), {}, id="tanh"),
        pytest.param(MF.relu, F.relu, (r(8, 6),), {}, id="relu"),
        pytest.param(MF.cross_entropy, F.cross_entropy, (r(8, 5), target), {}, id="cross_entropy"),
        pytest.param(
            MF.cross_entropy,
            F.cross_entropy,
            (r(8, 5), target),
            {"reduction": "none"},
            id="cross_entropy-none",
        ),
        pytest.param(MF.mse_loss, F.mse_loss, (r(8, 6), r(8, 6)), {}, id="mse_loss"),
        pytest.param(
            MF.mse_loss,
            F.mse_loss,
            (r(8, 6), r(8, 6, grad=False)),
            {"reduction": "sum"},
            id="mse_loss-sum-fixed-target",
        ),
        pytest.param(
            MF.conv2d,
            F.conv2d,
            (r(2, 3, 7, 7), r(4, 3, 3, 3), r(4)),
            {"stride": 2, "padding": 1},
            id="conv2d",
        ),
        pytest.param(
            MF.max_pool2d, F.max_pool2d, (r(2, 3, 8, 8),), {"kernel_size": 2}, id="max_pool2d"
        ),
        pytest.param(
            MF.avg_pool2d,
            F.avg_pool2d,
            (r(2, 3, 8, 8),),
            {"kernel_size": 3, "stride": 2, "padding": 1},
            id="avg_pool2d",
        ),
        pytest.param(
            MF.batch_norm,
            F.batch_norm,
            (r(6, 4, 3), None, None, r(4), r(4)),
            {"training": True},
            id="batch_norm",
        ),
        pytest.param(MF.layer_norm, F.layer_norm, (r(5, 6), (6,), r(6), r(6)), {}, id="layer_norm"),
        pytest.param(MF.log_softmax, F.log_softmax, (r(5, 6),), {"dim": 1}, id="log_softmax"),
        pytest.param(MF.softmax, F.softmax, (r(5, 6),), {"dim": -1}, id="softmax"),
    ]


@pytest.mark.parametrize("manual, reference, args, kwargs", _manualbp_cases())
def test_every_manualbp_function_passes_every_property(
    manual: Any, reference: Any, args: tuple, kwargs: dict
) -> None:
    report = manualbp.check(manual, reference, *args, **kwargs)
    assert report.ok, str(report)
    single_input = sum(isinstance(a, torch.Tensor) for a in args) == 1
    for name, result in report.results.items():
        if name == "needs_input_grad" and single_input:
            assert result.verdict == "skipped", str(report)  # nothing to observe
        else:
            assert result.verdict == "passed", str(report)


def test_the_parity_table_runs_the_checks_forward_and_backward_comparison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compare_with_reference is a client of the check: it compares through the check's own
    code (every tensor goes through manualbp.checks.agree), with the same statistics."""
    compared: list[str] = []
    agree = manualbp.checks.agree

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        compared.append(name)
        return agree(name, *args, **kwargs)

    monkeypatch.setattr(manualbp.checks, "agree", spy)
    case = next(c for c in PARITY_CASES if c.id == "linear-frozen-weight")
    rows = run_case(case, torch.float32, exact=False)
    assert compared == [r.tensor for r in rows]
    monkeypatch.undo()
    seed = sum((i + 1) * ord(c) for i, c in enumerate(case.id)) % (2**31)  # run_case's seed
    args = case.args(torch.float32)
    agreements = forward_backward_agreement(case.manual, case.reference, args, seed=seed)
    report = check_properties(
        case.manual, case.reference, args, properties=("forward", "backward"), seed=seed
    )
    checked = [*report["forward"].comparisons, *report["backward"].comparisons]
    assert [r.tensor for r in rows] == [a.tensor for a in agreements] == [c.tensor for c in checked]
    assert [r.tensor for r in rows] == ["output", "grad[0]", "grad[2]"]
    for row, a, c in zip(rows, agreements, checked, strict=True):
        assert (row.exact, row.max_abs, row.max_ulp) == (a.exact, a.max_abs, a.max_ulp)
        assert (a.exact, a.max_abs, a.max_ulp) == (c.exact, c.max_abs, c.max_ulp)


def test_the_documented_example_gives_the_documented_verdicts() -> None:
    """docs/check.md's my_functions.py gives the verdicts and notes its pasted tables show."""
    document = (Path(__file__).resolve().parents[1] / "docs" / "check.md").read_text()
    source = re.findall(r"^```python\n(.*?)^```", document, flags=re.M | re.S)[0]
    namespace: dict[str, Any] = {}
    exec(compile(source, "docs/check.md my_functions.py", "exec"), namespace)
    outputs = re.findall(r"^```text\n(.*?)^```", document, flags=re.M | re.S)
    tables = [block for block in outputs if "| property " in block]
    x = torch.randn((8, 5), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, table in zip(("SoftplusFunction", "SoftplusKeepsInput"), tables, strict=True):
        report = manualbp.check(namespace[name].apply, F.softplus, x.float())
        documented = [
            [cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| property", "| ---"))
        ]
        actual = [[r.name, r.verdict, r.note] for r in report.results.values()]
        assert [[row[0], row[1], row[5]] for row in documented] == actual, name

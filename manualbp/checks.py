"""``manualbp.check``: prove a handwritten ``torch.autograd.Function`` against a reference.

``manualbp.check(fn, reference, *sample_args, **kwargs)`` runs ``fn`` (e.g.
``MyFunction.apply``, or an alias around it) and ``reference`` (the torch op, or a plain-autograd
implementation) on the samples and on variants derived from them, and judges ten properties:

==================  ==========================================================================
``forward``         the outputs match the reference's: dtype, shape, values within the dtype's
                    tolerance (:data:`TOLERANCES`).
``backward``        ``torch.autograd.grad`` of every input that requires grad, against one
                    random upstream gradient, matches the reference's.
``gradcheck``       ``torch.autograd.gradcheck`` on float64 copies: the backward is the
                    derivative of the forward (finite differences).
``gradgradcheck``   ``torch.autograd.gradgradcheck`` on float64 copies: the backward is itself
                    differentiable (double backward), e.g. no ``.detach()``, numpy or
                    ``torch.no_grad()`` inside it.
``vmap``            ``torch.func.vmap`` of the forward and of the vector-Jacobian product over a
                    batch of 3 variants of the samples matches the reference run on each.
``compile``         ``torch.compile(fn)`` (backend ``aot_eager`` by default: Dynamo's graph
                    capture and AOTAutograd's forward/backward graphs, where custom Functions
                    are traced) gives the reference's outputs and gradients.
``autocast``        under ``torch.autocast`` of the samples' device, the output and gradient
                    dtypes are the reference's, the values within the autocast dtype's
                    precision (backward outside the region, as in a training loop).
``non_contiguous``  step-sliced and column-major copies of the inputs (and of the upstream
                    gradient) give the reference's outputs and gradients.
``saved_tensors``   after an in-place edit of an input or output, backward either raises, as
                    autograd does for a tensor saved with ``ctx.save_for_backward``, or computes
                    what it computed without the edit; a tensor kept on ``ctx`` as an attribute
                    lets the edit change the gradient silently, which fails.
``needs_input_grad``  no custom Function computes a gradient for an input that needs none
                    (``ctx.needs_input_grad``): wasted work, *reported*, not failed.
==================  ==========================================================================

Each property is ``passed``, ``failed``, ``reported`` (needs_input_grad only) or ``skipped``
with the reason when it cannot apply (a Function without a vmap rule, no floating-point input
for autocast, a reference that itself fails finite differences at these inputs, ...): a
property is never ``passed`` unless it was run. Statistics are those of
:func:`manualbp.compare.agreement` (max_abs, max_rel normwise, max_ulp), the worst over the
tensors a property compared.

The samples: tensors that require grad are differentiated (when none does, every
floating-point tensor is); every property runs on its own copies, so the caller's tensors are
never modified. Variants are derived by rolling values (a permutation keeps every value in the
input's domain: probabilities stay probabilities, class indices stay classes). A reference
that raises on the samples is a usage error (:class:`CheckUsageError`).

:func:`forward_backward_agreement` is the comparison behind ``forward`` and ``backward``; the
parity table of manualbp's own Functions (``manualbp.tools.parity``) is built on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from manualbp.compare import agreement, custom_function_nodes

__all__ = [
    "CUDA_TOLERANCES",
    "PROPERTIES",
    "TOLERANCES",
    "CheckReport",
    "CheckUsageError",
    "PropertyResult",
    "TensorAgreement",
    "agree",
    "check",
    "check_properties",
    "forward_backward_agreement",
    "leaf_copy",
    "tolerance_for",
]

PROPERTIES = (
    "forward",
    "backward",
    "gradcheck",
    "gradgradcheck",
    "vmap",
    "compile",
    "autocast",
    "non_contiguous",
    "saved_tensors",
    "needs_input_grad",
)

Verdict = Literal["passed", "failed", "skipped", "reported"]
Tolerance = Mapping[str, float] | Callable[[torch.Tensor], Mapping[str, float]]

# Tolerances of the "close" check (torch.testing.assert_close: |a - r| <= atol + rtol·|r|):
# loose enough for a reordered reduction (a few ulps times the reduction length), tight enough
# to catch any wrong formula.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}

# On CUDA a matmul may take another cuBLAS kernel than the reference's, and reductions run in
# parallel: the same formula, other roundings.
CUDA_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}

_EXACT = {"rtol": 0.0, "atol": 0.0}
_VMAP_BATCH = 3
# Finite differences on at most this many input and output elements use gradcheck's full
# Jacobian; larger samples its fast mode (random projections).
_FULL_JACOBIAN_LIMIT = 256
_NO_VMAP_RULE = ("does not have vmap support", "must override the setup_context staticmethod")
_SAVED_TENSOR_MODIFIED = "modified by an inplace operation"


class CheckUsageError(ValueError):
    """The samples cannot be checked: the reference raises on them, or they are not tensors a
    check can copy (e.g. complex)."""


def tolerance_for(dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, float]:
    """The ``rtol``/``atol`` a tensor of ``dtype`` on ``device`` is compared with (exact for
    integer and boolean tensors)."""
    if not dtype.is_floating_point:
        return dict(_EXACT)
    if torch.device(device).type == "cuda" and dtype in CUDA_TOLERANCES:
        return dict(CUDA_TOLERANCES[dtype])
    if dtype in TOLERANCES:
        return dict(TOLERANCES[dtype])
    eps = torch.finfo(dtype).eps
    return {"rtol": 4 * eps, "atol": eps}


# --- comparing two tensors ----------------------------------------------------------------


@dataclass(frozen=True)
class TensorAgreement:
    """How one tensor of ``fn`` (an output, or one input's gradient) compares to the
    reference's.

    Attributes:
        tensor: ``"output"`` (``"output[j]"`` for the j-th of several) or ``"grad[i]"`` for
            the gradient of positional argument ``i``; a variant adds its name in brackets.
        dtype: the reference tensor's dtype.
        exact: bit-identical (NaN where the reference is NaN).
        max_abs, max_rel, max_ulp: :func:`manualbp.compare.agreement`'s statistics (NaN when
            dtype or shape differ).
        mismatch: why the tensor is not close (dtype, shape, or the values beyond the
            tolerance, as ``torch.testing.assert_close`` words it); ``None`` when close.
    """

    tensor: str
    dtype: torch.dtype
    exact: bool
    max_abs: float
    max_rel: float
    max_ulp: float
    mismatch: str | None = None

    @property
    def close(self) -> bool:
        return self.mismatch is None


def agree(
    name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance | None = None
) -> TensorAgreement:
    """Compare ``actual`` (from ``fn``) with ``expected`` (from the reference), two tensors
    ``(*)``: statistics always, closeness within ``tolerance`` (``{"rtol", "atol"}``, a
    function of ``expected`` giving one, or by default :func:`tolerance_for` its dtype).
    Never raises for a mismatch; it is recorded in :attr:`TensorAgreement.mismatch`."""
    if (actual.dtype, actual.shape, actual.device) != (
        expected.dtype,
        expected.shape,
        expected.device,
    ):
        where = actual.device != expected.device
        return TensorAgreement(
            name,
            expected.dtype,
            False,
            math.nan,
            math.nan,
            math.nan,
            f"fn gives {_kind(actual, where)}, the reference gives {_kind(expected, where)}",
        )
    exact, max_abs, max_rel, max_ulp = _statistics(actual, expected)
    if not expected.dtype.is_floating_point:
        bounds = _EXACT  # integer and boolean tensors: equal or not
    elif tolerance is None:
        bounds = tolerance_for(expected.dtype, expected.device)
    elif callable(tolerance):
        bounds = tolerance(expected)
    else:
        bounds = tolerance
    mismatch = None
    try:
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True, **bounds)
    except AssertionError as error:
        mismatch = _not_close(actual, expected, bounds, str(error))
    return TensorAgreement(name, expected.dtype, exact, max_abs, max_rel, max_ulp, mismatch)


def _kind(tensor: torch.Tensor, with_device: bool) -> str:
    where = f" on {tensor.device}" if with_device else ""
    return f"{tensor.dtype} {tuple(tensor.shape)}{where}"


def _not_close(
    actual: torch.Tensor, expected: torch.Tensor, bounds: Mapping[str, float], details: str
) -> str:
    """A first line saying how many elements are off, then ``assert_close``'s details."""
    a, e = actual.detach(), expected.detach()
    if a.is_floating_point():
        off = ~torch.isclose(a, e, rtol=bounds["rtol"], atol=bounds["atol"], equal_nan=True)
    else:
        off = a != e
    within = f"rtol={bounds['rtol']:.3g}, atol={bounds['atol']:.3g}"
    lines = [line for line in details.splitlines() if line and "are not close" not in line]
    summary = f"{int(off.sum())}/{off.numel()} elements differ beyond {within}"
    return "\n".join([summary, *lines])


def _statistics(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float, float, float]:
    """exact, max_abs, max_rel, max_ulp; integer tensors count in units of 1."""
    if expected.dtype.is_floating_point:
        stats = {key: float(value) for key, value in agreement(actual, expected).items()}
        return stats["exact"] == 1.0, stats["max_abs"], stats["max_rel"], stats["max_ulp"]
    difference = (actual.detach().double() - expected.detach().double()).abs()  # (*)
    max_abs = float(difference.max()) if difference.numel() else 0.0
    scale = float(expected.detach().double().abs().max()) if expected.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs == 0, max_abs, max_rel, max_abs


# --- copies and variants of the samples ---------------------------------------------------


def leaf_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A new leaf with the same values, dtype, device, sizes, strides and requires_grad.

    ``clone()`` would make a step-sliced view contiguous; copying the whole storage and
    re-viewing it keeps the layout, so both sides of a comparison see identical strides.
    """
    storage = tensor.detach().untyped_storage().clone()
    copy = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    copy.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    return copy.requires_grad_(tensor.requires_grad)


Layout = Literal["step-sliced", "column-major"]
LAYOUTS: tuple[Layout, ...] = ("step-sliced", "column-major")


def _laid_out(tensor: torch.Tensor, layout: Layout) -> torch.Tensor | None:
    """A leaf with ``tensor``'s values in a non-contiguous ``layout`` (``None`` when the tensor
    cannot be stored that way: fewer than two elements, or for column-major fewer than two
    dimensions longer than 1).

    ``step-sliced``: every other element along the last dimension longer than 1 of a tensor
    twice as long there. ``column-major``: the dimensions stored in reverse order.
    """
    long_dims = [d for d in range(tensor.dim()) if tensor.shape[d] > 1]
    if layout == "step-sliced" and long_dims:
        d = long_dims[-1]
        wide = list(tensor.shape)
        wide[d] *= 2
        storage = torch.empty(wide, dtype=tensor.dtype, device=tensor.device)
        view = storage[(slice(None),) * d + (slice(None, None, 2),)]  # stride 2 along d
    elif layout == "column-major" and len(long_dims) >= 2:
        storage = torch.empty(tensor.shape[::-1], dtype=tensor.dtype, device=tensor.device)
        view = storage.permute(tuple(range(tensor.dim() - 1, -1, -1)))  # strides ascending
    else:
        return None
    view.copy_(tensor.detach())
    return view.detach().requires_grad_(tensor.requires_grad)


def _rolled(tensor: torch.Tensor, shift: int) -> torch.Tensor:
    """``tensor``'s values shifted ``shift`` places in row-major order: a permutation, so every
    value stays in the input's domain. Shape ``(*)`` like ``tensor``, contiguous, detached."""
    values = tensor.detach().flatten()
    return values.roll(shift).reshape(tensor.shape) if values.numel() > 1 else values.clone()


def _to_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        copy = value.detach().to(torch.float64, copy=True)
        return copy.requires_grad_(value.requires_grad)
    return value


def _describe_args(args: Sequence[Any]) -> str:
    parts = []
    for value in args:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            grad = "" if value.requires_grad else ", no grad"
            parts.append(f"{tuple(value.shape)} {dtype}{grad}")
        else:
            parts.append(repr(value))
    return ", ".join(parts)


def _describe_callable(function: Callable[..., Any]) -> str:
    """``SoftplusFunction.apply``, ``torch.nn.functional.softplus``, ... for the report."""
    owner = getattr(function, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__qualname__}.{function.__name__}"
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None)
    if name is None:
        return repr(function)
    if module == "torch._C._nn":  # torch.nn.functional's builtins
        module = "torch.nn.functional"
    if name.startswith("_VariableFunctionsClass."):  # torch.sigmoid, torch.tanh, ...
        module, name = "torch", function.__name__
    return f"{module}.{name}" if module and module != "__main__" else name


# --- running a callable and its backward --------------------------------------------------


class _Raised(Exception):
    """An exception of ``fn`` or of the reference, with where it happened and what had been
    compared before it."""

    def __init__(
        self,
        side: Literal["fn", "reference"],
        phase: Literal["forward", "backward"],
        error: Exception,
        forward: list[TensorAgreement] | None = None,
    ) -> None:
        super().__init__(f"{side} {phase}: {type(error).__name__}: {error}")
        self.side, self.phase, self.error = side, phase, error
        self.forward = forward or []


def _outputs(value: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return tuple(value)
    raise TypeError(f"returned {type(value).__name__}; expected a tensor or a tuple of tensors")


class _Run:
    """One callable evaluated on its own copies of the arguments (``layout``: non-contiguous
    copies of the tensors that can be stored so)."""

    def __init__(
        self,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        layout: Layout | None = None,
    ) -> None:
        self.leaves = [_copy(value, layout) for value in args]
        self.outputs = _outputs(function(*self.leaves, **kwargs))

    @property
    def differentiable(self) -> list[int]:
        return [
            i for i, a in enumerate(self.leaves) if isinstance(a, torch.Tensor) and a.requires_grad
        ]

    def gradients(self, upstream: Sequence[torch.Tensor | None]) -> dict[int, torch.Tensor]:
        """Argument position → ``dL/d arg`` with ``L = Σ_j <upstream[j], outputs[j]>`` (zeros
        where the outputs do not depend on the argument)."""
        indices = self.differentiable
        pairs = [
            (output, grad.to(output.dtype))
            for output, grad in zip(self.outputs, upstream, strict=False)
            if grad is not None and output.requires_grad
        ]
        if not indices:
            return {}
        if not pairs:
            return {i: torch.zeros_like(self.leaves[i]) for i in indices}
        grads = torch.autograd.grad(
            [output for output, _ in pairs],
            [self.leaves[i] for i in indices],
            [grad for _, grad in pairs],
            allow_unused=True,
            materialize_grads=True,
        )
        return dict(zip(indices, grads, strict=True))


def _copy(value: Any, layout: Layout | None) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if layout is not None:
        laid_out = _laid_out(value, layout)
        if laid_out is not None:
            return laid_out
    return leaf_copy(value)


def _upstream(
    outputs: Sequence[torch.Tensor], seed: int, layout: Layout | None = None
) -> list[torch.Tensor | None]:
    """One random upstream gradient per differentiable output (drawn in float64 on the CPU, so
    every dtype and device sees the same numbers), ``None`` for the others."""
    generator = torch.Generator().manual_seed(seed)
    upstream: list[torch.Tensor | None] = []
    for output in outputs:
        if not (output.requires_grad and output.is_floating_point()):
            upstream.append(None)
            continue
        values = torch.randn(output.shape, generator=generator, dtype=torch.float64)
        grad = values.to(dtype=output.dtype, device=output.device)
        laid_out = _laid_out(grad, layout) if layout is not None else None
        upstream.append(grad if laid_out is None else laid_out.detach())
    return upstream


def _output_agreements(
    actual: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    tolerance: Tolerance | None,
    suffix: str = "",
) -> list[TensorAgreement]:
    if len(actual) != len(expected):
        return [
            TensorAgreement(
                f"outputs{suffix}",
                expected[0].dtype,
                False,
                math.nan,
                math.nan,
                math.nan,
                f"fn returns {len(actual)} tensors, the reference {len(expected)}",
            )
        ]
    names = ["output"] if len(expected) == 1 else [f"output[{j}]" for j in range(len(expected))]
    return [
        agree(name + suffix, a, e, tolerance)
        for name, a, e in zip(names, actual, expected, strict=True)
    ]


def _gradient_agreements(
    actual: Mapping[int, torch.Tensor],
    expected: Mapping[int, torch.Tensor],
    tolerance: Tolerance | None,
    suffix: str = "",
) -> list[TensorAgreement]:
    return [agree(f"grad[{i}]{suffix}", actual[i], expected[i], tolerance) for i in expected]


def _same_structure(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> bool:
    return len(actual) == len(expected) and all(
        a.shape == e.shape for a, e in zip(actual, expected, strict=True)
    )


def _compare(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    seed: int,
    tolerance: Tolerance | None,
    layout: Layout | None = None,
    suffix: str = "",
) -> tuple[list[TensorAgreement], list[TensorAgreement]]:
    """Forward and backward agreement of ``fn`` with ``reference`` on separate copies of
    ``args``, one upstream gradient for both. Returns ``(outputs, gradients)``; the gradients
    are empty when nothing requires grad or the outputs differ in number or shape. An
    exception of either side is raised as :class:`_Raised`."""
    try:
        expected = _Run(reference, args, kwargs, layout)
    except Exception as error:
        raise _Raised("reference", "forward", error) from error
    upstream = _upstream(expected.outputs, seed, layout)
    try:
        actual = _Run(fn, args, kwargs, layout)
    except Exception as error:
        raise _Raised("fn", "forward", error) from error
    outputs = _output_agreements(actual.outputs, expected.outputs, tolerance, suffix)
    if not expected.differentiable or not _same_structure(actual.outputs, expected.outputs):
        return outputs, []
    try:
        actual_grads = actual.gradients(upstream)
    except Exception as error:
        raise _Raised("fn", "backward", error, outputs) from error
    try:
        expected_grads = expected.gradients(upstream)
    except Exception as error:
        raise _Raised("reference", "backward", error, outputs) from error
    return outputs, _gradient_agreements(actual_grads, expected_grads, tolerance, suffix)


def forward_backward_agreement(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    tolerance: Tolerance | None = None,
) -> list[TensorAgreement]:
    """The comparison of ``check``'s ``forward`` and ``backward`` properties, as rows.

    Runs ``fn(*args, **kwargs)`` and ``reference(*args, **kwargs)`` on separate leaf copies of
    ``args`` (same values and strides) and compares every output, then the gradient of every
    argument that requires grad, both taken against one random upstream gradient (seeded by
    ``seed``). Returns one :class:`TensorAgreement` per output, then one per differentiated
    argument (``grad[i]``, ``i`` its position); mismatches are recorded, not raised. An
    exception of ``fn`` or ``reference`` propagates unchanged.
    """
    try:
        outputs, gradients = _compare(
            fn, reference, args, kwargs or {}, seed=seed, tolerance=tolerance
        )
    except _Raised as raised:
        raise raised.error from None
    return outputs + gradients


# --- the report -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PropertyResult:
    """The verdict on one property and its evidence.

    Attributes:
        name: one of :data:`PROPERTIES`.
        verdict: ``passed``, ``failed``, ``skipped`` (could not apply; ``note`` says why) or
            ``reported`` (a finding that does not fail the check).
        note: one line: what was run, or why it failed or was skipped.
        statistics: the worst ``max_abs``, ``max_rel``, ``max_ulp`` over the compared tensors
            (empty when the property compares no tensors, e.g. gradcheck).
        comparisons: one :class:`TensorAgreement` per compared tensor.
        error: the full text of the exception or mismatch behind a failure (``None`` if none).
    """

    name: str
    verdict: Verdict
    note: str = ""
    statistics: dict[str, float] = field(default_factory=dict)
    comparisons: tuple[TensorAgreement, ...] = ()
    error: str | None = None


_STATISTICS = ("max_abs", "max_rel", "max_ulp")


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check` found: ``ok``, the ``failed`` property names, and per property the
    :class:`PropertyResult` (``report["backward"]`` or ``report.results``). ``str(report)``
    is the table ``property | verdict | max_abs | max_rel | max_ulp | note`` and the evidence
    of every failure."""

    function: str
    reference: str
    samples: str
    results: dict[str, PropertyResult]

    @property
    def ok(self) -> bool:
        """True when no property failed (skipped and reported ones do not fail the check)."""
        return not self.failed

    @property
    def failed(self) -> list[str]:
        return [name for name, result in self.results.items() if result.verdict == "failed"]

    def __getitem__(self, name: str) -> PropertyResult:
        return self.results[name]

    def table(self) -> str:
        header = ("property", "verdict", "max_abs", "max_rel", "max_ulp", "note")
        rows = [
            (
                result.name,
                result.verdict,
                *(_number(result.statistics.get(key)) for key in _STATISTICS),
                result.note,
            )
            for result in self.results.values()
        ]
        widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header) - 1)]

        def line(cells: Sequence[str]) -> str:
            padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
            return "| " + " | ".join([*padded, cells[-1]]) + " |"

        rule = "| " + " | ".join(["-" * w for w in widths] + ["---"]) + " |"
        return "\n".join([line(header), rule, *(line(row) for row in rows)])

    def __str__(self) -> str:
        lines = [
            f"manualbp.check: {self.function} against {self.reference}",
            f"samples: {self.samples}",
            "",
            self.table(),
            "",
        ]
        if self.ok:
            lines.append("ok: no property failed")
        else:
            lines.append(f"FAILED: {', '.join(self.failed)}")
            for name in self.failed:
                evidence = (self.results[name].error or self.results[name].note).strip()
                shown = evidence.splitlines()[:12]
                lines.append("")
                lines.append(f"{name}:")
                lines.extend("    " + text for text in shown)
        return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _worst(comparisons: Sequence[TensorAgreement]) -> dict[str, float]:
    if not comparisons:
        return {}
    worst = {}
    for key in _STATISTICS:
        values = [getattr(c, key) for c in comparisons]
        worst[key] = math.nan if any(math.isnan(v) for v in values) else max(values)
    return worst


def _brief(error: BaseException | str) -> str:
    """The first line of an exception (type included) or message, at most 110 characters."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first if len(first) <= 110 else first[:107] + "..."


def _from_comparisons(
    name: str, comparisons: Sequence[TensorAgreement], note: str
) -> PropertyResult:
    bad = [c for c in comparisons if not c.close]
    if not bad:
        return PropertyResult(name, "passed", note, _worst(comparisons), tuple(comparisons))
    error = "\n".join(f"{c.tensor}: {c.mismatch}" for c in bad)
    summary = f"{bad[0].tensor}: {_brief(bad[0].mismatch or '')}"
    if len(bad) > 1:
        summary += f" (and {len(bad) - 1} more)"
    return PropertyResult(name, "failed", summary, _worst(comparisons), tuple(comparisons), error)


def _failed(name: str, note: str, error: BaseException | str) -> PropertyResult:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    return PropertyResult(name, "failed", note, error=text)


def _skipped(name: str, reason: str) -> PropertyResult:
    return PropertyResult(name, "skipped", reason)


# --- the properties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Subject:
    fn: Callable[..., Any]
    reference: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    seed: int
    compile_backend: str

    @property
    def differentiable(self) -> list[int]:
        return [
            i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor) and a.requires_grad
        ]

    @property
    def tensors(self) -> list[int]:
        return [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]


def _forward_and_backward(s: _Subject) -> tuple[list[PropertyResult], bool]:
    """The ``forward`` and ``backward`` results, and whether ``fn`` raised in forward."""
    try:
        outputs, gradients = _compare(
            s.fn, s.reference, s.args, s.kwargs, seed=s.seed, tolerance=None
        )
    except _Raised as raised:
        if raised.side == "reference":  # ran in check_properties' probe; cannot happen twice
            raise CheckUsageError(f"the reference raised: {_brief(raised.error)}") from None
        if raised.phase == "forward":
            forward = _failed("forward", f"fn raised: {_brief(raised.error)}", raised.error)
            return [forward, _skipped("backward", "fn raised in forward (see forward)")], True
        forward = _from_comparisons("forward", raised.forward, _output_note(raised.forward))
        note = f"fn's backward raised: {_brief(raised.error)}"
        return [forward, _failed("backward", note, raised.error)], False
    forward = _from_comparisons("forward", outputs, _output_note(outputs))
    if not s.differentiable:
        backward = _skipped("backward", "no input requires grad")
    elif not gradients:
        backward = _skipped("backward", "the outputs differ in number or shape (see forward)")
    else:
        names = ", ".join(c.tensor for c in gradients)
        backward = _from_comparisons("backward", gradients, f"{names} against one upstream")
    return [forward, backward], False


def _output_note(outputs: Sequence[TensorAgreement]) -> str:
    exact = sum(c.exact for c in outputs)
    if len(outputs) == 1:
        return "output bit-exact" if exact else "output within tolerance"
    return f"{len(outputs)} outputs, {exact} bit-exact"


def _finite_differences(s: _Subject, order: Literal[1, 2]) -> PropertyResult:
    name = "gradcheck" if order == 1 else "gradgradcheck"
    if not s.differentiable:
        return _skipped(name, "no input requires grad")
    check_fn = torch.autograd.gradcheck if order == 1 else torch.autograd.gradgradcheck
    args64 = [_to_float64(a) for a in s.args]
    positions = s.tensors
    try:
        reference_outputs = _outputs(s.reference(*args64, **s.kwargs))
    except Exception as error:
        return _skipped(name, f"the reference raised on float64 copies: {_brief(error)}")
    numel = sum(args64[i].numel() for i in s.differentiable)
    numel += sum(o.numel() for o in reference_outputs)
    fast = numel > _FULL_JACOBIAN_LIMIT
    mode = "fast mode" if fast else "full Jacobian"

    def bound(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*tensors: torch.Tensor) -> Any:
            full = list(args64)
            for i, tensor in zip(positions, tensors, strict=True):
                full[i] = tensor
            return function(*full, **s.kwargs)

        return call

    def run(function: Callable[..., Any]) -> None:
        tensors = tuple(leaf_copy(args64[i]) for i in positions)
        check_fn(bound(function), tensors, fast_mode=fast, raise_exception=True)

    try:
        run(s.fn)
    except Exception as error:
        try:
            run(s.reference)
        except Exception as reference_error:
            return _skipped(
                name,
                f"the reference fails {name} too at these float64 inputs: "
                f"{_brief(reference_error)}",
            )
        return _failed(name, _brief(error), error)
    return PropertyResult(name, "passed", f"float64 copies, finite differences ({mode})")


def _vmap(s: _Subject) -> PropertyResult:
    name = "vmap"
    samples = [
        [
            _rolled(a, b).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in s.args
        ]
        for b in range(_VMAP_BATCH)
    ]
    try:
        runs = [_Run(s.reference, sample, s.kwargs) for sample in samples]
        upstreams = [_upstream(run.outputs, s.seed + b) for b, run in enumerate(runs)]
        reference_grads = [run.gradients(u) for run, u in zip(runs, upstreams, strict=True)]
    except Exception as error:
        return _skipped(
            name, f"the reference raised on a rolled copy of the samples: {_brief(error)}"
        )
    expected_outputs = [torch.stack(o) for o in zip(*(run.outputs for run in runs), strict=True)]
    batched = [
        torch.stack([sample[i] for sample in samples]).detach()
        if isinstance(a, torch.Tensor)
        else a
        for i, a in enumerate(s.args)
    ]
    in_dims = tuple(0 if isinstance(a, torch.Tensor) else None for a in s.args)
    differentiable = s.differentiable
    float_outputs = [j for j, u in enumerate(upstreams[0]) if u is not None]

    def forward(*args: Any) -> tuple[torch.Tensor, ...]:
        return _outputs(s.fn(*args, **s.kwargs))

    def vector_jacobian_product(*args_and_upstream: Any) -> tuple[torch.Tensor, ...]:
        args, upstream = args_and_upstream[: len(s.args)], args_and_upstream[len(s.args) :]

        def selected(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            full = list(args)
            for i, value in zip(differentiable, values, strict=True):
                full[i] = value
            outputs = _outputs(s.fn(*full, **s.kwargs))
            return tuple(outputs[j] for j in float_outputs)

        _, pullback = torch.func.vjp(selected, *(args[i] for i in differentiable))
        return pullback(tuple(upstream))

    try:
        outputs = torch.func.vmap(forward, in_dims)(*batched)
        comparisons = _output_agreements(outputs, expected_outputs, None, " (vmap)")
        if differentiable and float_outputs and _same_structure(outputs, expected_outputs):
            upstream = [torch.stack([u[j] for u in upstreams]) for j in float_outputs]
            grads = torch.func.vmap(vector_jacobian_product, (*in_dims, *[0] * len(upstream)))(
                *batched, *upstream
            )
            actual = dict(zip(differentiable, grads, strict=True))
            expected = {i: torch.stack([g[i] for g in reference_grads]) for i in differentiable}
            comparisons += _gradient_agreements(actual, expected, None, " (vmap)")
    except Exception as error:
        if _NO_VMAP_RULE[0] in str(error):
            reason = "a Function in fn has no vmap rule (generate_vmap_rule = True or vmap)"
            return PropertyResult(name, "skipped", reason, error=f"{type(error).__name__}: {error}")
        if _NO_VMAP_RULE[1] in str(error):
            reason = "a Function in fn has no setup_context (torch.func transforms need one)"
            return PropertyResult(name, "skipped", reason, error=f"{type(error).__name__}: {error}")
        return _failed(name, f"fn raised under vmap: {_brief(error)}", error)
    what = "forward and vector-Jacobian product" if len(comparisons) > 1 else "forward"
    return _from_comparisons(name, comparisons, f"{what} of a batch of {_VMAP_BATCH}")


def _compile(s: _Subject) -> PropertyResult:
    name = "compile"

    def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return torch.compile(call, backend=s.compile_backend)

    # A fresh cache: Dynamo keys compiled code by the wrapper's code object, shared by every
    # check, and falls back to eager after a few recompiles.
    torch.compiler.reset()
    try:
        outputs, gradients = _compare(
            compiled(s.fn), s.reference, s.args, s.kwargs, seed=s.seed, tolerance=None
        )
    except _Raised as raised:
        if raised.side == "reference":
            return _skipped(name, f"the reference raised: {_brief(raised.error)}")
        try:
            torch.compiler.reset()
            _Run(compiled(s.reference), s.args, s.kwargs)
        except Exception as reference_error:
            return _skipped(
                name, f"torch.compile cannot run the reference either: {_brief(reference_error)}"
            )
        return _failed(name, f"compiled fn raised: {_brief(raised.error)}", raised.error)
    finally:
        torch.compiler.reset()
    return _from_comparisons(
        name, outputs + gradients, f"torch.compile(backend={s.compile_backend!r})"
    )


def _autocast(s: _Subject) -> PropertyResult:
    name = "autocast"
    floating = [s.args[i] for i in s.tensors if s.args[i].is_floating_point()]
    if not floating:
        return _skipped(name, "no floating-point input")
    device_type = floating[0].device.type
    if not torch.amp.is_autocast_available(device_type):
        return _skipped(name, f"torch.autocast is not available on {device_type}")
    dtype = torch.get_autocast_dtype(device_type)
    eps = torch.finfo(dtype).eps

    def within_precision(expected: torch.Tensor) -> dict[str, float]:
        """A few ulps of the autocast dtype at the tensor's own scale."""
        finite = expected.detach().double().abs().nan_to_num(nan=0.0, posinf=0.0)
        scale = max(float(finite.max()) if finite.numel() else 0.0, 1e-3)
        return {"rtol": 4 * eps, "atol": 4 * eps * scale}

    def autocast(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with torch.autocast(device_type, dtype=dtype):
                return function(*args, **kwargs)

        return call

    try:
        outputs, gradients = _compare(
            autocast(s.fn),
            autocast(s.reference),
            s.args,
            s.kwargs,
            seed=s.seed,
            tolerance=within_precision,
        )
    except _Raised as raised:
        if raised.side == "reference":
            return _skipped(name, f"the reference raised under autocast: {_brief(raised.error)}")
        hint = (
            "\n(the backward runs outside the autocast region, as in a training loop: a "
            "Function whose backward mixes the dtypes autocast gave its forward must replay "
            "the forward's autocast state, e.g. with torch.amp.custom_fwd / custom_bwd)"
        )
        error = f"{type(raised.error).__name__}: {raised.error}{hint}"
        return _failed(name, f"fn raised under autocast: {_brief(raised.error)}", error)
    dtypes = ", ".join(str(c.dtype).removeprefix("torch.") for c in outputs)
    note = f"torch.autocast({device_type!r}, {str(dtype).removeprefix('torch.')}): output {dtypes}"
    return _from_comparisons(name, outputs + gradients, note)


def _non_contiguous(s: _Subject) -> PropertyResult:
    name = "non_contiguous"
    comparisons: list[TensorAgreement] = []
    used = []
    for layout in LAYOUTS:
        if all(_laid_out(s.args[i], layout) is None for i in s.tensors):
            continue
        used.append(layout)
        try:
            outputs, gradients = _compare(
                s.fn,
                s.reference,
                s.args,
                s.kwargs,
                seed=s.seed,
                tolerance=None,
                layout=layout,
                suffix=f" ({layout})",
            )
        except _Raised as raised:
            if raised.side == "reference":
                return _skipped(
                    name, f"the reference raised on {layout} inputs: {_brief(raised.error)}"
                )
            where = "backward" if raised.phase == "backward" else "forward"
            return _failed(
                name,
                f"fn's {where} raised on {layout} inputs: {_brief(raised.error)}",
                raised.error,
            )
        comparisons += outputs + gradients
    if not used:
        return _skipped(name, "no input has two or more elements")
    return _from_comparisons(name, comparisons, f"{' and '.join(used)} copies, upstream too")


def _edit_in_place(tensor: torch.Tensor) -> bool:
    """Change ``tensor``'s values in place (a rolled permutation, or halving a single value),
    bumping its version counter as any in-place op does; False if the values cannot change."""
    with torch.no_grad():
        rolled = _rolled(tensor, 1)
        if not torch.equal(rolled, tensor.detach()):
            tensor.copy_(rolled)
            return True
        if tensor.is_floating_point() and tensor.numel() and bool((tensor != 0).any()):
            tensor.mul_(0.5)
            return True
    return False


def _saved_tensors(s: _Subject) -> PropertyResult:
    name = "saved_tensors"
    if not s.differentiable:
        return _skipped(name, "no input requires grad: backward never runs")
    try:
        baseline = _Run(s.fn, s.args, s.kwargs)
        upstream = _upstream(baseline.outputs, s.seed)
        expected = baseline.gradients(upstream)
    except Exception as error:
        return _skipped(name, f"fn raised before any edit (see forward/backward): {_brief(error)}")
    targets = [("input", i) for i in s.tensors] + [
        ("output", j) for j, o in enumerate(baseline.outputs) if o.is_floating_point()
    ]
    raised, unaffected, silent = [], [], []
    comparisons: list[TensorAgreement] = []
    for kind, index in targets:
        label = f"{kind} {index}"
        run = _Run(s.fn, s.args, s.kwargs)
        edited = run.leaves[index] if kind == "input" else run.outputs[index]
        try:
            if not _edit_in_place(edited):
                continue
        except RuntimeError:  # e.g. an output that is a view the Function returned
            continue
        try:
            grads = run.gradients(upstream)
        except RuntimeError as error:
            if _SAVED_TENSOR_MODIFIED in str(error):
                raised.append(label)
                continue
            return _failed(
                name, f"backward raised after an in-place edit of {label}: {_brief(error)}", error
            )
        rows = _gradient_agreements(grads, expected, None, f" after editing {label}")
        comparisons += rows
        (silent if any(not r.close for r in rows) else unaffected).append(label)
    if silent:
        error = (
            f"backward used {', '.join(silent)} after an in-place edit without raising: a tensor "
            "backward needs is kept on ctx as an attribute (or a detached alias); save it with "
            "ctx.save_for_backward so that autograd refuses a modified one"
        )
        note = f"the gradient changed silently after editing {', '.join(silent)}"
        return PropertyResult(name, "failed", note, _worst(comparisons), tuple(comparisons), error)
    if not raised and not unaffected:
        return _skipped(name, "no input or output could be edited (single constant values)")
    parts = []
    if raised:
        parts.append(f"{', '.join(raised)}: backward raises")
    if unaffected:
        parts.append(f"{', '.join(unaffected)}: not needed")
    return PropertyResult(name, "passed", "; ".join(parts), _worst(comparisons), tuple(comparisons))


def _needs_input_grad(s: _Subject) -> PropertyResult:
    name = "needs_input_grad"
    variants = [s.args]  # as given, then with each differentiable input frozen in turn
    for i in s.differentiable:
        frozen = list(s.args)
        frozen[i] = s.args[i].detach()
        variants.append(tuple(frozen))
    wasted: set[str] = set()
    observed = False
    functions: set[str] = set()
    for args in variants:
        try:
            run = _Run(s.fn, args, s.kwargs)
        except Exception as error:
            return _skipped(name, f"fn raised (see forward): {_brief(error)}")
        if not run.differentiable:
            continue
        for node in custom_function_nodes(*run.outputs):
            function = type(node).__name__.removesuffix("Backward")
            functions.add(function)
            frozen = [k for k, (edge, _) in enumerate(node.next_functions) if edge is None]
            if not frozen:
                continue
            observed = True

            def hook(grad_inputs, grad_outputs, function=function, frozen=frozen):
                for k in frozen:
                    if k < len(grad_inputs) and grad_inputs[k] is not None:
                        wasted.add(f"{function} input {k}")

            node.register_hook(hook)
        try:
            run.gradients(_upstream(run.outputs, s.seed))
        except Exception as error:
            return _skipped(name, f"fn's backward raised (see backward): {_brief(error)}")
    if not functions:
        return _skipped(name, "fn runs no custom autograd.Function")
    if not observed:
        return _skipped(name, "no run had a Function input that needs no gradient")
    if wasted:
        listed = ", ".join(sorted(wasted))
        return PropertyResult(
            name,
            "reported",
            f"gradient computed for an input that needs none: {listed}",
            error=f"{listed}: check ctx.needs_input_grad before computing each gradient",
        )
    return PropertyResult(name, "passed", "None returned for every input that needs no gradient")


_RUNNERS: dict[str, Callable[[_Subject], PropertyResult]] = {
    "gradcheck": lambda s: _finite_differences(s, 1),
    "gradgradcheck": lambda s: _finite_differences(s, 2),
    "vmap": _vmap,
    "compile": _compile,
    "autocast": _autocast,
    "non_contiguous": _non_contiguous,
    "saved_tensors": _saved_tensors,
    "needs_input_grad": _needs_input_grad,
}


def check_properties(
    fn: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    properties: Sequence[str] = PROPERTIES,
    seed: int = 0,
    compile_backend: str = "aot_eager",
) -> CheckReport:
    """:func:`check` with its options: ``properties`` to run (a subset of
    :data:`PROPERTIES`, in any order), the ``seed`` of the random upstream gradients, and the
    ``torch.compile`` backend (``"inductor"`` adds code generation: slower, same verdicts up
    to rounding)."""
    unknown = [p for p in properties if p not in PROPERTIES]
    if unknown:
        raise ValueError(f"check: unknown properties {unknown}; expected some of {PROPERTIES}")
    if "compile" in properties and isinstance(compile_backend, str):
        known = torch.compiler.list_backends(exclude_tags=())
        if compile_backend not in known:
            usual = ", ".join(["aot_eager", "eager", *torch.compiler.list_backends()])
            raise CheckUsageError(
                f"check: unknown torch.compile backend {compile_backend!r}; expected e.g. {usual}"
            )
    kwargs = dict(kwargs or {})
    samples = []
    for position, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                raise CheckUsageError(
                    f"check: argument {position} is complex ({value.dtype}); complex tensors "
                    "are not supported"
                )
            value = leaf_copy(value)
        samples.append(value)
    if not any(isinstance(v, torch.Tensor) and v.requires_grad for v in samples):
        for value in samples:  # nothing marked: differentiate every floating-point tensor
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.requires_grad_(True)
    subject = _Subject(fn, reference, tuple(samples), kwargs, seed, compile_backend)
    reference_name = _describe_callable(reference)
    try:
        probe = _Run(reference, subject.args, kwargs)
        probe.gradients(_upstream(probe.outputs, seed))
    except Exception as error:
        raise CheckUsageError(
            f"check: the reference {reference_name} raised on the samples "
            f"({_describe_args(subject.args)}): {_brief(error)}"
        ) from error
    results: dict[str, PropertyResult] = {}
    wanted = [p for p in PROPERTIES if p in properties]
    fn_raised = False
    if "forward" in wanted or "backward" in wanted:
        forward_and_backward, fn_raised = _forward_and_backward(subject)
        results.update((result.name, result) for result in forward_and_backward)
    for name in wanted:
        if name in ("forward", "backward"):
            continue
        if fn_raised:
            results[name] = _skipped(name, "fn raised on the samples (see forward)")
            continue
        try:
            results[name] = _RUNNERS[name](subject)
        except Exception as error:  # a failure of fn where no property expected one
            results[name] = _failed(name, f"raised: {_brief(error)}", error)
    ordered = {name: results[name] for name in wanted}
    return CheckReport(
        _describe_callable(fn), reference_name, _describe_args(subject.args), ordered
    )


def check(
    fn: Callable[..., Any], reference: Callable[..., Any], /, *sample_args: Any, **kwargs: Any
) -> CheckReport:
    """Prove ``fn`` against ``reference`` on ``sample_args`` in one call.

    Args:
        fn: the callable under test, e.g. ``MyFunction.apply`` or an alias calling it.
        reference: what it must agree with, e.g. the torch op or a plain-autograd version.
        *sample_args: the positional arguments of both (tensors and other values); tensors
            that require grad are differentiated (all floating-point ones if none does).
        **kwargs: keyword arguments of both (e.g. ``reduction="sum"``).

    Returns:
        A :class:`CheckReport`: ``report.ok``, ``report.failed`` (property names),
        ``print(report)`` for the table, ``report["backward"]`` for one property's evidence.

    Raises:
        CheckUsageError: the reference raises on the samples, or a sample is complex.

    Example::

        report = manualbp.check(SoftplusFunction.apply, F.softplus, torch.randn(8, 5))
        assert report.ok, report
    """
    return check_properties(fn, reference, sample_args, kwargs)

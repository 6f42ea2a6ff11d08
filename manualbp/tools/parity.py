"""The exactness table: every handwritten Function against its torch reference.

:func:`compare_with_reference` is a client of ``manualbp.check``: it runs
:func:`manualbp.checks.forward_backward_agreement`, the comparison behind the check's
``forward`` and ``backward`` properties (after tinygrad's ``helper_test_op``: two independent
leaf copies of the inputs with the same values and strides, the manualbp op on one and the
``torch.nn.functional`` reference on the other, the forward output and ``torch.autograd.grad``
of every input that requires grad against one random upstream gradient). Each compared tensor
yields a :class:`ParityRow` with the statistics of :mod:`manualbp.compare` (exact, max_abs,
max_rel, max_ulp); :func:`assert_parity` turns the rows into assertions (a dtype-appropriate
tolerance always, bit-exactness on request).

``PARITY_CASES`` is the registry of cases the test suite parametrizes over. ``exact_on_cpu``
marks the cases known to reproduce torch's CPU kernels bit for bit (linear, sigmoid, tanh,
relu, MSE); cross-entropy is only within a few ulps, because torch's fused log_softmax kernel
sums and exponentiates in its own order.

``python scripts/parity.py`` prints the table of every case on the CPU (``--device cuda`` on a
GPU, TF32 off).
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import manualbp.functional as MF

# The tolerances per dtype (CPU, CUDA) and leaf_copy are manualbp.check's, re-exported here.
from manualbp.checks import CUDA_TOLERANCES, TOLERANCES, forward_backward_agreement
from manualbp.checks import leaf_copy as leaf_copy

PARITY_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ParityRow:
    """How one tensor (the forward output or one input's gradient) compares to torch."""

    case: str
    dtype: torch.dtype
    tensor: str
    exact: bool
    max_abs: float
    max_rel: float
    max_ulp: float


def compare_with_reference(
    manual: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    case: str = "case",
    seed: int = 0,
    tolerance: dict[str, float] | None = None,
) -> list[ParityRow]:
    """Run ``manual(*args, **kwargs)`` and ``reference(*args, **kwargs)`` on separate leaf
    copies and compare the output and every input gradient against one upstream gradient.

    The comparison of ``manualbp.check``'s forward and backward properties
    (:func:`manualbp.checks.forward_backward_agreement`). Every tensor must be close
    (``tolerance``, by default :data:`TOLERANCES` of its dtype) and of the reference's dtype
    and shape, else AssertionError naming the case and the tensor. Returns one row for the
    output and one per differentiated input (named ``grad[i]`` by argument position).
    """
    agreements = forward_backward_agreement(
        manual, reference, args, kwargs, seed=seed, tolerance=tolerance
    )
    for agreement in agreements:
        if not agreement.close:
            raise AssertionError(
                f"{case} {agreement.tensor}: manual vs torch: {agreement.mismatch}"
            )
    dtype = agreements[0].dtype  # the reference output's: the case's dtype
    return [
        ParityRow(case, dtype, a.tensor, a.exact, a.max_abs, a.max_rel, a.max_ulp)
        for a in agreements
    ]


def assert_parity(
    manual: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    exact: bool,
    case: str = "case",
    seed: int = 0,
    tolerance: dict[str, float] | None = None,
) -> list[ParityRow]:
    """:func:`compare_with_reference`, then fail unless every tensor is bit-exact when
    ``exact`` is set (closeness within ``tolerance`` is always asserted)."""
    rows = compare_with_reference(
        manual, reference, args, kwargs, case=case, seed=seed, tolerance=tolerance
    )
    if exact:
        inexact = [r for r in rows if not r.exact]
        if inexact:
            details = ", ".join(
                f"{r.tensor} (max_abs={r.max_abs:.3g}, max_ulp={r.max_ulp:.3g})" for r in inexact
            )
            raise AssertionError(f"{case}: expected bit-exact, differs in {details}")
    return rows


# ---------------------------------------------------------------------------------------
# The registry of parity cases.
# ---------------------------------------------------------------------------------------

ArgsFactory = Callable[[torch.dtype, torch.device, torch.Generator], tuple[Any, ...]]


@dataclass(frozen=True)
class ParityCase:
    """One call of a manualbp op and its torch reference with freshly generated arguments.

    ``make_args(dtype, device, generator)`` returns the positional arguments; tensors that
    should be differentiated come back with ``requires_grad=True``.
    """

    id: str
    manual: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    make_args: ArgsFactory
    exact_on_cpu: bool
    kwargs: dict[str, Any] = field(default_factory=dict)

    def args(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[Any, ...]:
        generator = torch.Generator().manual_seed(_stable_seed(self.id))
        return self.make_args(dtype, torch.device(device), generator)


def _stable_seed(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % (2**31)


def _randn(
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    *,
    scale: float = 1.0,
    grad: bool = True,
) -> torch.Tensor:
    """A leaf drawn on CPU in float64 (so every dtype and device sees the same numbers)."""
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale
    return values.to(dtype=dtype, device=device).requires_grad_(grad)


def _leaf(view: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Make a (possibly non-contiguous) view its own leaf, keeping its strides."""
    return view.detach().requires_grad_(grad)


def _classes(
    n: int, num_classes: int, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=generator).to(device)


def _linear_case(
    id: str,
    input_shape: Sequence[int],
    *,
    out_features: int = 5,
    bias: bool = True,
    input_layout: str = "contiguous",
    weight_layout: str = "contiguous",
    input_grad: bool = True,
    weight_grad: bool = True,
) -> ParityCase:
    in_features = input_shape[-1]

    def make(dtype, device, gen):
        if input_layout == "transposed":  # (N, in) stored column-major
            x = _leaf(_randn(input_shape[::-1], dtype, device, gen).t(), input_grad)
        elif input_layout == "padded-transposed":  # column-major with a row stride > N
            n = input_shape[0]
            x = _leaf(_randn((in_features, n + 3), dtype, device, gen)[:, :n].t(), input_grad)
        elif input_layout == "step-sliced":  # every other column of a (N, 2·in) tensor
            wide = (*input_shape[:-1], 2 * in_features)
            x = _leaf(_randn(wide, dtype, device, gen)[..., ::2], input_grad)
        elif input_layout == "batch-transposed":  # (B, N, in) from a (N, B, in) tensor
            b, n, i = input_shape
            x = _leaf(_randn((n, b, i), dtype, device, gen).transpose(0, 1), input_grad)
        else:
            x = _randn(input_shape, dtype, device, gen, grad=input_grad)
        if weight_layout == "transposed":  # (out, in) stored column-major
            w = _leaf(_randn((in_features, out_features), dtype, device, gen).t(), weight_grad)
        else:
            w = _randn((out_features, in_features), dtype, device, gen, grad=weight_grad)
        b = _randn((out_features,), dtype, device, gen) if bias else None
        return x, w, b

    return ParityCase(id, MF.linear, F.linear, make, exact_on_cpu=True)


def _unary_case(
    id: str,
    manual: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    shape: Sequence[int],
    *,
    scale: float = 1.0,
    layout: str = "contiguous",
    with_zeros: bool = False,
) -> ParityCase:
    def make(dtype, device, gen):
        if layout == "transposed":
            x = _leaf(_randn(shape[::-1], dtype, device, gen, scale=scale).t())
        elif layout == "step-sliced":
            wide = (*shape[:-1], 3 * shape[-1])
            x = _leaf(_randn(wide, dtype, device, gen, scale=scale)[..., ::3])
        else:
            x = _randn(shape, dtype, device, gen, scale=scale)
        if with_zeros:  # exact zeros (ReLU's kink) and negative zeros
            x = x.detach().clone()
            x.view(-1)[::4] = 0.0
            x.view(-1)[1::8] = -0.0
            x.requires_grad_()
        return (x,)

    return ParityCase(id, manual, reference, make, exact_on_cpu=True)


def _cross_entropy_case(
    id: str,
    n: int = 8,
    num_classes: int = 7,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    ignored_rows: slice | None = None,
    scale: float = 2.0,
    extreme: bool = False,
    layout: str = "contiguous",
) -> ParityCase:
    def make(dtype, device, gen):
        if layout == "transposed":
            x = _leaf(_randn((num_classes, n), dtype, device, gen, scale=scale).t())
        else:
            x = _randn((n, num_classes), dtype, device, gen, scale=scale)
        if extreme:  # ±1e4 logits: naive exp would overflow to inf, log(softmax) to -inf
            signs = torch.randint(0, 2, (n, num_classes), generator=gen).to(device) * 2 - 1
            x = (signs * 1e4).to(dtype).requires_grad_()
        target = _classes(n, num_classes, device, gen)
        if ignored_rows is not None:
            target[ignored_rows] = ignore_index
        return x, target

    kwargs = {"reduction": reduction, "ignore_index": ignore_index}
    return ParityCase(id, MF.cross_entropy, F.cross_entropy, make, False, kwargs)


def _mse_case(
    id: str,
    shape: Sequence[int] = (6, 4),
    *,
    reduction: str = "mean",
    target_grad: bool = False,
    layout: str = "contiguous",
) -> ParityCase:
    def make(dtype, device, gen):
        if layout == "transposed":
            x = _leaf(_randn(shape[::-1], dtype, device, gen).t())
        else:
            x = _randn(shape, dtype, device, gen)
        y = _randn(shape, dtype, device, gen, grad=target_grad)
        return x, y

    return ParityCase(id, MF.mse_loss, F.mse_loss, make, True, {"reduction": reduction})


def _cross_entropy_options_case(
    id: str,
    shape: Sequence[int] = (8, 7),
    *,
    reduction: str = "mean",
    weighted: bool = False,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    ignored: slice | None = None,
    probabilities: bool = False,
) -> ParityCase:
    """Cross-entropy with torch's other options: class weights, label smoothing, logits of any
    rank ``(C,)``, ``(N, C)``, ``(N, C, d1, ...)``, and class-probability targets (whose
    gradient, and the class weights', is compared too)."""
    class_dim = 1 if len(shape) > 1 else 0

    def make(dtype, device, gen):
        x = _randn(shape, dtype, device, gen, scale=2.0)
        num_classes = shape[class_dim]
        weight = None
        if weighted:
            values = torch.rand(num_classes, generator=gen, dtype=torch.float64) + 0.5
            weight = values.to(dtype=dtype, device=device).requires_grad_(probabilities)
        if probabilities:
            target = _randn(shape, torch.float64, torch.device("cpu"), gen, grad=False)
            target = target.softmax(class_dim).to(dtype=dtype, device=device).requires_grad_()
            return x, target, weight
        target_shape = [size for dim, size in enumerate(shape) if dim != class_dim]
        target = torch.randint(0, num_classes, target_shape, generator=gen)
        if ignored is not None:
            target.view(-1)[ignored] = ignore_index
        return x, target.to(device), weight

    kwargs = {
        "reduction": reduction,
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
    }
    return ParityCase(id, MF.cross_entropy, F.cross_entropy, make, False, kwargs)


def _quietly(mse_loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``mse_loss`` without its warning about a target of another (broadcast) shape."""

    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return mse_loss(*args, **kwargs)

    return quiet


def _mse_options_case(
    id: str,
    input_shape: Sequence[int] = (6, 4),
    target_shape: Sequence[int] = (6, 4),
    *,
    reduction: str = "mean",
    weighted: bool = False,
) -> ParityCase:
    """MSE with a broadcast target (or input) and torch 2.14's ``weight`` (of the input's
    shape, differentiated too); arguments positional, in torch's order."""

    def make(dtype, device, gen):
        x = _randn(input_shape, dtype, device, gen)
        y = _randn(target_shape, dtype, device, gen)
        weight = None
        if weighted:
            values = torch.rand(tuple(input_shape), generator=gen, dtype=torch.float64)
            weight = values.to(dtype=dtype, device=device).requires_grad_()
        return x, y, None, None, reduction, weight

    return ParityCase(id, _quietly(MF.mse_loss), _quietly(F.mse_loss), make, True)


def _in_place(relu: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``relu(..., inplace=True)`` on a non-leaf copy of its input (a leaf that requires grad
    cannot be overwritten)."""

    def in_place(input):
        return relu(input.clone(), inplace=True)

    return in_place


PARITY_CASES: list[ParityCase] = [
    # linear: every variant is bit-exact on CPU
    _linear_case("linear-2d", (8, 6)),
    _linear_case("linear-3d-input", (3, 4, 6)),
    _linear_case("linear-4d-input", (2, 3, 4, 6)),
    _linear_case("linear-1d-input", (6,)),
    _linear_case("linear-no-bias", (8, 6), bias=False),
    _linear_case("linear-3d-no-bias", (3, 4, 6), bias=False),
    _linear_case("linear-input-transposed", (8, 6), input_layout="transposed"),
    _linear_case("linear-input-padded-transposed", (8, 6), input_layout="padded-transposed"),
    _linear_case("linear-input-step-sliced", (8, 6), input_layout="step-sliced"),
    _linear_case("linear-3d-input-batch-transposed", (3, 4, 6), input_layout="batch-transposed"),
    _linear_case("linear-weight-transposed", (8, 6), weight_layout="transposed"),
    _linear_case(
        "linear-both-transposed", (8, 6), input_layout="transposed", weight_layout="transposed"
    ),
    _linear_case("linear-frozen-weight", (8, 6), weight_grad=False),
    _linear_case("linear-frozen-input", (8, 6), input_grad=False),
    _linear_case("linear-wide", (33, 70), out_features=40),
    # elementwise activations: bit-exact on CPU
    _unary_case("sigmoid-2d", MF.sigmoid, torch.sigmoid, (8, 6)),
    _unary_case("sigmoid-saturating", MF.sigmoid, torch.sigmoid, (8, 6), scale=20.0),
    _unary_case("sigmoid-transposed", MF.sigmoid, torch.sigmoid, (8, 6), layout="transposed"),
    _unary_case("sigmoid-4d", MF.sigmoid, torch.sigmoid, (2, 3, 4, 5)),
    _unary_case("tanh-2d", MF.tanh, torch.tanh, (8, 6)),
    _unary_case("tanh-saturating", MF.tanh, torch.tanh, (8, 6), scale=10.0),
    _unary_case("tanh-step-sliced", MF.tanh, torch.tanh, (8, 6), layout="step-sliced"),
    _unary_case("tanh-1d", MF.tanh, torch.tanh, (37,)),
    _unary_case("relu-2d", MF.relu, F.relu, (8, 6)),
    _unary_case("relu-with-zeros", MF.relu, F.relu, (8, 6), with_zeros=True),
    _unary_case("relu-step-sliced", MF.relu, F.relu, (8, 6), layout="step-sliced"),
    _unary_case("relu-3d", MF.relu, F.relu, (2, 5, 7)),
    # cross-entropy: within a few ulps only (torch's fused log_softmax kernel)
    _cross_entropy_case("ce-mean", reduction="mean"),
    _cross_entropy_case("ce-sum", reduction="sum"),
    _cross_entropy_case("ce-none", reduction="none"),
    _cross_entropy_case("ce-ignore-some-mean", reduction="mean", ignored_rows=slice(0, 8, 3)),
    _cross_entropy_case("ce-ignore-some-sum", reduction="sum", ignored_rows=slice(0, 8, 3)),
    _cross_entropy_case("ce-ignore-some-none", reduction="none", ignored_rows=slice(0, 8, 3)),
    _cross_entropy_case(
        "ce-ignore-custom-index", reduction="mean", ignore_index=2, ignored_rows=slice(1, 4)
    ),
    _cross_entropy_case("ce-ignore-all-mean", reduction="mean", ignored_rows=slice(None)),
    _cross_entropy_case("ce-ignore-all-sum", reduction="sum", ignored_rows=slice(None)),
    _cross_entropy_case("ce-extreme-logits-mean", reduction="mean", extreme=True),
    _cross_entropy_case("ce-extreme-logits-none", reduction="none", extreme=True),
    _cross_entropy_case("ce-transposed-logits", reduction="mean", layout="transposed"),
    _cross_entropy_case("ce-many-classes", n=16, num_classes=100, reduction="mean"),
    _cross_entropy_case("ce-one-row", n=1, num_classes=5, reduction="mean"),
    # MSE: bit-exact on CPU, input and target gradients
    _mse_case("mse-mean", reduction="mean"),
    _mse_case("mse-sum", reduction="sum"),
    _mse_case("mse-none", reduction="none"),
    _mse_case("mse-mean-target-grad", reduction="mean", target_grad=True),
    _mse_case("mse-sum-target-grad", reduction="sum", target_grad=True),
    _mse_case("mse-none-target-grad", reduction="none", target_grad=True),
    _mse_case("mse-3d", (2, 3, 4), reduction="mean", target_grad=True),
    _mse_case("mse-transposed", reduction="mean", layout="transposed"),
    # torch's other options: class weights, label smoothing, K-dimensional and unbatched
    # logits, class probabilities; in-place ReLU; broadcast and weighted MSE
    *(
        _cross_entropy_options_case(f"ce-weight-{reduction}", reduction=reduction, weighted=True)
        for reduction in ("mean", "sum", "none")
    ),
    _cross_entropy_options_case(
        "ce-weight-ignore-mean", weighted=True, ignored=slice(0, 8, 3), reduction="mean"
    ),
    *(
        _cross_entropy_options_case(
            f"ce-smoothing-{reduction}", reduction=reduction, label_smoothing=0.2
        )
        for reduction in ("mean", "sum", "none")
    ),
    _cross_entropy_options_case(
        "ce-weight-smoothing-ignore-mean",
        weighted=True,
        label_smoothing=0.3,
        ignored=slice(1, 8, 3),
    ),
    _cross_entropy_options_case("ce-3d-mean", (4, 5, 6)),
    _cross_entropy_options_case(
        "ce-4d-weight-ignore-none",
        (2, 5, 3, 4),
        reduction="none",
        weighted=True,
        ignored=slice(0, 24, 5),
    ),
    _cross_entropy_options_case(
        "ce-5d-smoothing-sum", (2, 4, 3, 2, 2), reduction="sum", label_smoothing=0.1
    ),
    _cross_entropy_options_case("ce-unbatched", (7,)),
    _cross_entropy_options_case(
        "ce-unbatched-weight-smoothing", (7,), weighted=True, label_smoothing=0.4
    ),
    *(
        _cross_entropy_options_case(
            f"ce-probabilities-{reduction}", reduction=reduction, probabilities=True
        )
        for reduction in ("mean", "sum", "none")
    ),
    _cross_entropy_options_case(
        "ce-probabilities-weight-smoothing-mean",
        weighted=True,
        label_smoothing=0.2,
        probabilities=True,
    ),
    _cross_entropy_options_case(
        "ce-probabilities-4d-weight-none",
        (2, 5, 3, 4),
        reduction="none",
        weighted=True,
        probabilities=True,
    ),
    ParityCase(
        "relu-inplace",
        _in_place(MF.relu),
        _in_place(F.relu),
        lambda dtype, device, gen: (_randn((8, 6), dtype, device, gen),),
        exact_on_cpu=True,
    ),
    *(
        _mse_options_case(f"mse-broadcast-target-{reduction}", (6, 4), (4,), reduction=reduction)
        for reduction in ("mean", "sum", "none")
    ),
    _mse_options_case("mse-broadcast-input-mean", (3, 1), (2, 3, 4)),
    *(
        _mse_options_case(f"mse-weighted-{reduction}", reduction=reduction, weighted=True)
        for reduction in ("mean", "sum", "none")
    ),
    _mse_options_case("mse-weighted-broadcast-mean", (6, 4), (4,), weighted=True),
]


def run_case(
    case: ParityCase,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    *,
    exact: bool,
    tolerance: dict[str, float] | None = None,
) -> list[ParityRow]:
    """Generate the case's arguments and :func:`assert_parity` on them."""
    return assert_parity(
        case.manual,
        case.reference,
        case.args(dtype, device),
        case.kwargs,
        exact=exact,
        case=case.id,
        seed=_stable_seed(case.id),
        tolerance=tolerance,
    )


def parity_report(
    device: str | torch.device = "cpu",
    dtypes: Sequence[torch.dtype] = PARITY_DTYPES,
    tolerances: dict[torch.dtype, dict[str, float]] | None = None,
) -> list[ParityRow]:
    """Rows for every registry case and dtype on ``device`` (tolerance asserted, exactness
    only recorded)."""
    rows: list[ParityRow] = []
    for dtype in dtypes:
        tolerance = (tolerances or TOLERANCES)[dtype]
        for case in PARITY_CASES:
            rows.extend(run_case(case, dtype, device, exact=False, tolerance=tolerance))
    return rows


def format_report(rows: Sequence[ParityRow]) -> str:
    """The rows as a Markdown table, with a per-dtype summary of the inexact ones."""
    lines = [
        "| case | dtype | tensor | exact | max_abs | max_rel | max_ulp |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        dtype = str(r.dtype).removeprefix("torch.")
        lines.append(
            f"| {r.case} | {dtype} | {r.tensor} | {'yes' if r.exact else 'no'} | "
            f"{r.max_abs:.3g} | {r.max_rel:.3g} | {r.max_ulp:.3g} |"
        )
    lines.append("")
    for dtype in dict.fromkeys(r.dtype for r in rows):
        mine = [r for r in rows if r.dtype == dtype]
        inexact = [r for r in mine if not r.exact]
        summary = f"{str(dtype).removeprefix('torch.')}: {len(mine) - len(inexact)}/{len(mine)}"
        summary += " tensors bit-exact"
        if inexact:
            worst_abs = max(inexact, key=lambda r: r.max_abs)
            worst_ulp = max(inexact, key=lambda r: r.max_ulp)
            summary += (
                f"; largest error among the others: max_abs {worst_abs.max_abs:.3g} "
                f"({worst_abs.case} {worst_abs.tensor}), max_ulp {worst_ulp.max_ulp:.3g} "
                f"({worst_ulp.case} {worst_ulp.tensor})"
            )
        lines.append(summary)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the exactness table of every registry case on ``--device`` (default: cpu)."""
    parser = argparse.ArgumentParser(description="Manual vs torch, every Function, per tensor.")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    tolerances = CUDA_TOLERANCES if cuda else TOLERANCES
    print(format_report(parity_report(args.device, tolerances=tolerances)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

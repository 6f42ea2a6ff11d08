"""Convolution, pooling, normalization, dropout and softmax against torch: forward and every
input gradient, for every case of ``layer_cases.LAYER_CASES`` in float32 and float64.

The forward runs torch's own kernel, so it is bit-exact everywhere. The gradients are
handwritten: bit-exact where the case claims it (max pooling, non-overlapping average
pooling, dropout), elsewhere within :data:`layer_cases.MAX_REL` (normwise) of torch's, and
for the convolution's weight gradient, whose long sums torch orders its own way, no farther
from the float64 truth than torch's own float32 gradient is. ``pytest -s`` prints the table of
exactness and ulps (recorded in ``docs/results/layers.md``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_cases import ENTRYWISE, LAYER_CASES, MAX_REL, LayerCase, randn

import manualbp.functional as MF
from manualbp.compare import agreement
from manualbp.tools.parity import ParityRow, compare_with_reference, format_report

DTYPES = (torch.float32, torch.float64)


def parity_rows(case: LayerCase, dtype: torch.dtype) -> list[ParityRow]:
    """Output and input-gradient rows of ``case`` (entrywise closeness asserted)."""
    return compare_with_reference(
        lambda *args: case.call(case.manual, *args),
        lambda *args: case.call(case.reference, *args),
        case.args(dtype),
        case=case.id,
        tolerance=ENTRYWISE[dtype],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.id)
def test_matches_torch(case: LayerCase, dtype: torch.dtype) -> None:
    rows = parity_rows(case, dtype)
    assert rows[0].tensor == "output" and rows[0].exact, "the forward is torch's own kernel"
    assert len(rows) > 1, "every case differentiates at least one input"
    for row in rows[1:]:
        assert row.max_rel <= MAX_REL[dtype], row
        if case.exact:
            assert row.exact, row


def test_report_covers_every_case_and_prints_the_table() -> None:
    rows = [row for dtype in DTYPES for case in LAYER_CASES for row in parity_rows(case, dtype)]
    print("\n" + format_report(rows))
    assert {row.case for row in rows} == {case.id for case in LAYER_CASES}
    exact = sum(row.exact for row in rows)
    assert exact >= len(rows) // 2  # every forward, and the exact cases' gradients


@pytest.mark.parametrize(
    "input_shape, weight_shape, padding",
    [((16, 1, 28, 28), (6, 1, 5, 5), 2), ((16, 6, 14, 14), (16, 6, 5, 5), 0)],
    ids=["lenet-c1", "lenet-c3"],
)
def test_conv2d_gradients_are_as_accurate_as_torchs(input_shape, weight_shape, padding) -> None:
    """At LeNet's sizes the float32 weight gradient sums 12,544 or 1,600 products per entry
    per image. Against the float64 gradient (the truth, to float32 precision) manualbp's is no
    worse than torch's own: the differences between the two are round-off, not a formula."""
    gen = torch.Generator().manual_seed(0)
    x64 = randn(input_shape, torch.float64, gen)
    w64 = randn(weight_shape, torch.float64, gen, scale=0.3)
    upstream = torch.randn(F.conv2d(x64, w64, padding=padding).shape, generator=gen).double()

    def gradients(conv, dtype):
        x, w = (t.detach().to(dtype).requires_grad_() for t in (x64, w64))
        output = conv(x, w, None, 1, padding)
        return torch.autograd.grad(output, (x, w), upstream.to(dtype))

    truth = gradients(F.conv2d, torch.float64)
    torch32, manual32 = gradients(F.conv2d, torch.float32), gradients(MF.conv2d, torch.float32)
    for name, exact, t32, m32 in zip(("dx", "dW"), truth, torch32, manual32, strict=True):
        torch_error = float(agreement(t32.double(), exact)["max_rel"])
        manual_error = float(agreement(m32.double(), exact)["max_rel"])
        assert manual_error <= 2 * torch_error + 1e-7, (name, manual_error, torch_error)
    assert torch.equal(manual32[0], torch32[0])  # dx: the same transposed convolution

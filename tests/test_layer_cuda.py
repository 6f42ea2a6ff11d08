"""The layers beyond the MLP on a CUDA device (skipped without one).

Every case of ``layer_cases.LAYER_CASES`` runs on ``cuda`` against torch's op on the same
device, TF32 off. cuDNN chooses its own algorithms (and batch norm's forward is cuDNN's in
torch, ``native_batch_norm`` here), so agreement is asserted within a normwise bound, not bit
for bit. Dropout uses torch's fused CUDA kernel, so from the same seed the outputs and
gradients are identical. LeNet-5's gradients agree with its autograd twin's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from layer_cases import LAYER_CASES, LayerCase
from torch import nn

from manualbp.compare import compare_gradients
from manualbp.nn import CrossEntropyLoss, LeNet5, autograd_twin
from manualbp.tools.parity import compare_with_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = (torch.float32, torch.float64)
MAX_REL = {torch.float32: 1e-5, torch.float64: 1e-12}
ENTRYWISE = {
    torch.float32: {"rtol": 1e-3, "atol": 1e-4},
    torch.float64: {"rtol": 1e-9, "atol": 1e-11},
}


@pytest.fixture(autouse=True)
def full_float32_convolutions() -> Iterator[None]:
    """TF32 off for the test, then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on_cuda(args: tuple) -> tuple:
    return tuple(
        a.detach().to("cuda").requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda case: case.id)
def test_matches_torch_on_cuda(case: LayerCase, dtype: torch.dtype) -> None:
    rows = compare_with_reference(
        lambda *args: case.call(case.manual, *args),
        lambda *args: case.call(case.reference, *args),
        _on_cuda(case.args(dtype)),
        case=case.id,
        tolerance=ENTRYWISE[dtype],
    )
    for row in rows:
        assert row.max_rel <= MAX_REL[dtype], row
        if case.random:  # torch's own fused dropout kernel, forward and backward scale
            assert row.exact, row


def test_lenet5_gradients_agree_with_its_autograd_twin_on_cuda() -> None:
    torch.manual_seed(0)
    manual = LeNet5().cuda()
    twin = autograd_twin(manual)
    images = torch.randn(64, 1, 28, 28, device="cuda")
    labels = torch.arange(64, device="cuda") % 10
    report = compare_gradients(
        manual, twin, CrossEntropyLoss(), nn.CrossEntropyLoss(), images, labels
    )
    report.assert_close(rtol=1e-5)

"""The parity registry and the autocast dtype rules on a CUDA device.

Every case of ``helpers.PARITY_CASES`` runs on ``cuda`` against the same torch op on the same
device, with TF32 off. Bit-exactness is not asserted on CUDA (cuBLAS picks kernels by layout,
reductions run in parallel), only ``helpers.CUDA_TOLERANCES``. Under ``torch.autocast("cuda")``
with bfloat16 and float16 each op must give the builtin op's output dtype, and values and
gradients within the autocast dtype's precision. Skipped without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import manualbp.functional as MF
from manualbp.nn import MLP, autograd_twin
from manualbp.tools.parity import (
    CUDA_TOLERANCES,
    PARITY_CASES,
    PARITY_DTYPES,
    ParityCase,
    format_report,
    leaf_copy,
    parity_report,
    run_case,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def full_float32_matmuls() -> Iterator[None]:
    """TF32 off for the test (it would make float32 matmuls ~10-bit accurate), then restored."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=str)
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda case: case.id)
def test_matches_torch_on_cuda(case: ParityCase, dtype: torch.dtype) -> None:
    rows = run_case(case, dtype, DEVICE, exact=False, tolerance=CUDA_TOLERANCES[dtype])
    assert rows[0].dtype == dtype


def test_cuda_parity_report_prints_every_case() -> None:
    rows = parity_report(DEVICE, tolerances=CUDA_TOLERANCES)
    print("\n" + format_report(rows))
    assert {row.case for row in rows} == {case.id for case in PARITY_CASES}


def test_cross_entropy_out_of_range_target_fails_on_cuda() -> None:
    """On CUDA the range check is a device-side assert: it must fire at synchronisation,
    never produce a loss silently. (A device assert poisons the CUDA context, so it runs in
    a subprocess.)"""
    import subprocess
    import sys

    script = (
        "import torch, manualbp.functional as MF\n"
        "x = torch.randn(3, 4, device='cuda')\n"
        "loss = MF.cross_entropy(x, torch.tensor([0, 9, 1], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
        "print('no error', float(loss))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "no error" not in result.stdout
    assert "assert" in result.stderr.lower()  # the device-side assert, not some other failure


# --- autocast on CUDA -------------------------------------------------------------------

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _inputs(*shapes: tuple[int, ...], scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(shape, generator=generator) * scale).to(DEVICE).requires_grad_()
        for shape in shapes
    ]


def _target() -> torch.Tensor:
    return torch.tensor([0, 3, -100, 5, 1, 2, 4, 0], device=DEVICE)


# id, manual, torch op, args factory, kwargs, output dtype (None: autocast dtype; "input":
# the input's dtype), from float32 inputs
CUDA_AUTOCAST_CASES = [
    pytest.param(MF.linear, F.linear, lambda: _inputs((8, 6), (5, 6), (5,)), {}, None, id="linear"),
    pytest.param(
        MF.linear, F.linear, lambda: [*_inputs((2, 4, 6), (5, 6)), None], {}, None, id="linear-3d"
    ),
    pytest.param(
        MF.sigmoid, torch.sigmoid, lambda: _inputs((8, 6), scale=3), {}, "input", id="sigmoid"
    ),
    pytest.param(MF.tanh, torch.tanh, lambda: _inputs((8, 6), scale=3), {}, "input", id="tanh"),
    pytest.param(MF.relu, F.relu, lambda: _inputs((8, 6)), {}, "input", id="relu"),
    *(
        pytest.param(
            MF.cross_entropy,
            F.cross_entropy,
            lambda: [*_inputs((8, 6), scale=2), _target()],
            {"reduction": reduction},
            torch.float32,
            id=f"cross_entropy-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
    ),
    *(
        pytest.param(
            MF.mse_loss,
            F.mse_loss,
            lambda: _inputs((8, 6), (8, 6)),
            {"reduction": reduction},
            torch.float32,
            id=f"mse-{reduction}",
        )
        for reduction in ("mean", "sum", "none")
    ),
]


def _run_under_autocast(
    function: Callable, args: list, kwargs: dict, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Forward inside ``torch.autocast("cuda", dtype)``, backward outside it."""
    args = [leaf_copy(a) if isinstance(a, torch.Tensor) else a for a in args]
    with torch.autocast(DEVICE, dtype=dtype):
        output = function(*args, **kwargs)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(output.shape, generator=generator).to(output.dtype).to(DEVICE)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return output, torch.autograd.grad(output, leaves, upstream)


def _assert_within_precision(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """Within a few ulps of ``dtype`` at the tensor's own scale."""
    assert actual.dtype == expected.dtype, what
    scale = expected.detach().float().abs().max().clamp_min(1e-3)
    error = (actual.detach().float() - expected.detach().float()).abs().max()
    assert error <= 4 * torch.finfo(dtype).eps * scale, f"{what}: {error} vs scale {scale}"


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("manual, reference, make_args, kwargs, out_dtype", CUDA_AUTOCAST_CASES)
def test_cuda_autocast_matches_builtin(
    manual: Callable,
    reference: Callable,
    make_args: Callable,
    kwargs: dict,
    out_dtype: torch.dtype | str | None,
    autocast_dtype: torch.dtype,
) -> None:
    args = make_args()
    manual_out, manual_grads = _run_under_autocast(manual, args, kwargs, autocast_dtype)
    torch_out, torch_grads = _run_under_autocast(reference, args, kwargs, autocast_dtype)

    expected_dtype = {None: autocast_dtype, "input": args[0].dtype}.get(out_dtype, out_dtype)
    assert manual_out.dtype == torch_out.dtype == expected_dtype
    _assert_within_precision(manual_out, torch_out, autocast_dtype, "output")
    for i, (m, t) in enumerate(zip(manual_grads, torch_grads, strict=True)):
        _assert_within_precision(m, t, autocast_dtype, f"grad[{i}]")


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
def test_cuda_autocast_mlp_step_matches_autograd_twin(autocast_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = MLP([12, 16, 6], activation="relu", backend="manual").to(DEVICE)
    twin = autograd_twin(model)
    x = torch.randn(8, 12, device=DEVICE)
    target = _target()
    with torch.autocast(DEVICE, dtype=autocast_dtype):
        manual_logits, torch_logits = model(x), twin(x)
        manual_loss = MF.cross_entropy(manual_logits, target)
        torch_loss = F.cross_entropy(torch_logits, target)
    manual_loss.backward()
    torch_loss.backward()
    assert manual_logits.dtype == torch_logits.dtype == autocast_dtype
    assert manual_loss.dtype == torch_loss.dtype == torch.float32
    _assert_within_precision(manual_loss, torch_loss, autocast_dtype, "loss")
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad.dtype == q.grad.dtype == torch.float32, name
        _assert_within_precision(p.grad, q.grad, autocast_dtype, name)


def test_relu_backward_peaks_no_higher_than_torchs() -> None:
    """ReLU's CUDA backward is one kernel (``y <= 0 ? 0 : g``): no boolean mask beside the
    gradient, so the backward's peak memory is torch's."""
    x = torch.randn(512, 200, device=DEVICE, requires_grad=True)
    g = torch.randn(512, 200, device=DEVICE)

    def backward_peak(relu: Callable[[torch.Tensor], torch.Tensor]) -> tuple[int, torch.Tensor]:
        y = relu(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (grad,) = torch.autograd.grad(y, x, g)
        return torch.cuda.max_memory_allocated() - before, grad

    ours, our_grad = backward_peak(MF.relu)
    theirs, their_grad = backward_peak(F.relu)
    assert ours <= theirs
    assert torch.equal(our_grad, their_grad)


def test_relu_backward_on_cuda_under_double_backward_vmap_and_compile() -> None:
    """Where the single kernel cannot serve (the backward differentiated, vmapped or traced),
    the same rule runs as ``torch.where``; every route gives torch's gradient."""
    x = torch.randn(6, 5, device=DEVICE, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(MF.relu, (x,))

    def total(relu: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        return lambda row: (relu(row) * torch.arange(5.0, device=DEVICE)).sum()

    ours = torch.func.vmap(torch.func.grad(total(MF.relu)))(x.detach())
    assert torch.equal(ours, torch.func.vmap(torch.func.grad(total(F.relu)))(x.detach()))

    compiled = torch.compile(lambda t: MF.relu(t) * 3.0, fullgraph=True)
    (ours,) = torch.autograd.grad(compiled(x).sum(), x)
    (theirs,) = torch.autograd.grad((F.relu(x) * 3.0).sum(), x)
    assert torch.equal(ours, theirs)

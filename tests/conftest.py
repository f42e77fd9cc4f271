"""Devices, dtypes, layouts and the tolerance table shared by the tests."""
from __future__ import annotations

import math
import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be chosen before triton is imported (fusedact imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import fusedact  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and fusedact.build_info()["cuda"]
HAS_TRITON = fusedact.triton.available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device or CUDA kernels not built")),
]
# The fused backends, which every parity test runs. Triton runs CUDA tensors on a GPU,
# CPU tensors under the interpreter; the other pairings are skipped by the fixture below.
FUSED_BACKENDS = [
    "native",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")),
]


@pytest.fixture(autouse=True)
def _skip_backend_device_mismatch(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "triton":
        return
    device = callspec.params.get("device", "cpu")
    if device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (set where no GPU is present)")
    if device == "cuda" and TRITON_INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: Triton kernels run on the CPU only")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPS = ["swish", "mish", "hard_swish", "acon_c"]

# Elementwise tolerance per output dtype: torch.testing's defaults. Every kernel computes
# in float32 (float64 for float64) with a few ulp of error, then rounds once: the error
# is at most 0.5 ulp of the dtype plus a few float32 ulp. That is within rtol for
# float16 (0.5 ulp = 4.9e-4 < 1e-3) and bfloat16 (3.9e-3 < 1.6e-2), and float32's
# rtol of 1.3e-6 is 11 ulp; atol covers results that cancel to near zero (the backward
# of swish at x = -1.28, acon_c where d s + p2 = 0), where the error is a few ulp of the
# terms' size rather than of the result.
TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def opmath_eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def reduction_tol(terms_abs_sum: torch.Tensor, n_terms: int, x_dtype: torch.dtype, p_dtype: torch.dtype,
                  ref: torch.Tensor) -> torch.Tensor:
    """Bound on the error of a parameter gradient: a sum of n_terms products computed in
    opmath. Each term carries a few opmath ulp (8 allowed); rounding errors in a sum
    of n terms accumulate like a random walk, ~sqrt(n) ulp of the running magnitude,
    itself at most sum|terms|; the result is then rounded once to the parameter dtype.
    The float64 reference has its own error: eager autograd forms differences such as
    x - x h that cancel in float64 too, about one float64 ulp of the parts (8 eps64).
    The final rounding is half an ulp of the result, or of the subnormal spacing
    (tiny * eps) below the normal range.
    """
    eps = opmath_eps(x_dtype)
    eps64 = torch.finfo(torch.float64).eps
    fp = torch.finfo(p_dtype)
    rounding = fp.eps * torch.maximum(ref.abs(), torch.full_like(ref, fp.tiny))
    return (eps * (8 + math.sqrt(n_terms)) + 8 * eps64) * terms_abs_sum + rounding


def is_dense(x: torch.Tensor) -> bool:
    """x's elements fill one block of memory with no gaps or overlaps (any order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the given memory layout (a view or a copy; same values)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        return x.contiguous(memory_format=fmt) if fmt else x.contiguous()
    if layout == "transposed":  # dense but permuted: the last dim outermost
        if x.dim() < 2:
            return x
        perm = list(range(x.dim()))
        perm[0], perm[-1] = perm[-1], perm[0]
        return x.permute(perm).contiguous().permute(perm)
    if layout == "strided":  # not dense: every second element of a larger buffer
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device) if x.dim() else None
        if big is None:
            return x
        big.normal_()
        big[..., ::2] = x
        return big[..., ::2]
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "transposed", "strided"]


CPU_ISAS = ["avx512", "avx2", "baseline"]


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs a test with each CPU instruction set of the native loops; the ones this
    machine's CPU cannot run are skipped (`lscpu` says which it has)."""
    if request.param not in fusedact.build_info()["cpu_isa_available"]:
        pytest.skip(f"this CPU cannot run {request.param}")
    before = fusedact._C.cpu_isa()
    fusedact._C.set_cpu_isa(request.param)
    yield request.param
    fusedact._C.set_cpu_isa(before)

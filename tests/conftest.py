"""Devices, dtypes, layouts and the tolerance table shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be chosen before triton is imported (fusedact imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import fusedact  # noqa: E402
from fusedact._numerics import TOL, is_dense, opmath_eps, reduction_tol  # noqa: E402,F401  (shared with the selftest)

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
OPS = list(fusedact._opinfo.NAMES)  # fusedact/_opinfo.py


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


# ---- the `install` marker: the subset that .ci/install_paths.sh runs against torch 2.13
# (CPU only) after the whole suite has run on the main install. Whole files that touch
# every layer: the API and its argument checks, numerics (every float16/bfloat16 value),
# autograd, opcheck, double backward, torch.compile and its Inductor decompositions,
# conversion, fusedact.testing and the selftest; of the parity grid, the CPU native cases
# in contiguous and channels_last.
INSTALL_FILES = {
    "test_api.py",
    "test_numerics.py",
    "test_autograd_and_ops.py",
    "test_compile.py",
    "test_convert.py",
    "test_testing.py",
    "test_selftest.py",
    "test_inductor.py",
}


def _in_install_subset(item) -> bool:
    if item.path.name in INSTALL_FILES:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (
        item.path.name == "test_parity.py"
        and params.get("device") == "cpu"
        and params.get("backend") == "native"
        and params.get("layout", "contiguous") in ("contiguous", "channels_last")
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _in_install_subset(item):
            item.add_marker(pytest.mark.install)

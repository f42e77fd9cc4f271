"""fusedact: fused, memory-lean swish, mish, hard_swish and ACON-C for PyTorch.

import fusedact
y = fusedact.mish(x)                                  # functional
act = fusedact.nn.AconC(64)                           # modules
y = fusedact.acon_c(x, p1, p2, beta, channel_dim=1)   # ACON-C / Meta-ACON
model = fusedact.convert(model)                       # SiLU, Mish, Hardswish, ACON -> fused
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.fusedact.*)
from . import _ops  # noqa: F401  (fakes for torch.compile)
from . import _inductor, config
from . import onnx as _onnx
from .functions import register_autograd as _register_autograd
from . import nn, reference
from ._build_config import CUDA_ARCH_LIST as _CUDA_ARCH_LIST
from ._build_config import VERSION as __version__
from .conversion import convert
from .functional import BACKENDS, acon_c, batch_norm_act, hard_swish, mish, swish, sync_batch_norm_act
from . import triton  # noqa: E402  (never fails without triton)

_register_autograd("fusedact")  # torch.ops.fusedact.* differentiable by themselves
_onnx.install("fusedact")  # torch.onnx.export turns the ops into standard ONNX operators
_inductor.register("fusedact")  # torch.compile may fuse the ops (fusedact.config.compile)

__all__ = [
    "swish",
    "mish",
    "hard_swish",
    "acon_c",
    "batch_norm_act",
    "sync_batch_norm_act",
    "convert",
    "nn",
    "reference",
    "config",
    "build_info",
    "BACKENDS",
]


# Submodules loaded on first use, so that `import fusedact` stays as fast as it was:
# fusedact.testing (assert_parity) and fusedact.selftest.
_LAZY_SUBMODULES = ("testing", "selftest")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def build_info() -> dict:
    """How this fusedact was built: its version, the torch it was compiled against,
    whether the CUDA kernels are in the binary (and for which archs), and the CPU
    instruction set the CPU kernels run with."""
    info = dict(_C.build_info())
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fusedact::mish_forward", "CUDA")
    return {
        "version": __version__,
        "torch_version": info["torch_version"],
        "torch_version_runtime": torch.__version__,
        "cuda": bool(info["cuda"] and cuda),
        "cuda_arch_list": _CUDA_ARCH_LIST if info["cuda"] else "",
        "cpu_isa": info["cpu_isa"],
        "cpu_isa_available": list(info["cpu_isa_available"]),
        "triton": triton.available(),
    }

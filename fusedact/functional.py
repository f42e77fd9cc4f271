"""The functional API: swish, mish, hard_swish, acon_c.

``backend``: ``None`` or ``"native"`` runs the fused C++/CUDA kernels (torch.ops.fusedact),
``"triton"`` the Triton kernels (torch.ops.fusedact_triton; a clear error where triton
is missing), ``"eager"`` the reference implementations (fusedact.reference). Every
backend checks its arguments here, in Python (fusedact/checks.py), before any op runs,
so a bad argument raises a Python exception whatever the C++ build does with one
(docs/testing.md, "The SIGSEGV on the H100 machine"); the ops check again in C++ and in
their fakes, with the same messages. The call graph: docs/design.md.
"""

from __future__ import annotations

import torch

from . import _C, reference
from .checks import FLOAT32_OVERFLOW, FLOAT_DTYPES, check_acon_args, check_float_beta, check_swish_beta, check_x
from .functions import invoke, traced_as_declined
from .onnx import _DECOMPOSITIONS as _ONNX_FORMS
from .onnx import exporting as _onnx_exporting

__all__ = ["swish", "mish", "hard_swish", "acon_c", "batch_norm_act", "sync_batch_norm_act", "BACKENDS"]

BACKENDS = ("native", "triton", "eager")


def _backend(backend: str | None) -> str:
    if backend is None:
        return "native"
    if backend in BACKENDS:
        return backend
    raise ValueError(f"fusedact: unknown backend {backend!r}; choose one of {BACKENDS}")


_NATIVE = torch.ops.fusedact


def _ops(backend: str):
    """The op namespace of a fused backend ("native" or "triton"); its ops carry their
    own autograd (fusedact/functions.py)."""
    if backend == "triton":
        from . import triton

        return triton.namespace()
    return _NATIVE


def _run(backend: str, name: str, *args):
    """The fused op ``name`` of ``backend``, with its own autograd (fusedact/functions.py);
    while ``torch.onnx.export(..., dynamo=True)`` traces the model, the op's eager form
    instead (aten.mish, aten.hardswish, sigmoid and mul), which the exporter translates
    into ONNX operators (fusedact/onnx.py)."""
    if _onnx_exporting():
        return _ONNX_FORMS[name](*args)
    return invoke(_ops(backend), name, *args)


# The native ops' fast path (csrc/fast_path.cpp, _C.fast): the op below autograd when no
# gradient is wanted, else a C++ autograd Function; None where it does not apply (a
# torch.func transform, a forward-AD dual tensor, a FakeTensor, an argument Python must
# check), and the call goes the op's own way. Not taken under ONNX export, torch.compile
# (Dynamo traces _fast_path_traced in its place and records the op) or __torch_function__
# overrides. swish (float beta), mish and hard_swish check x in C++ and ask Python
# nothing. Why, in microseconds: benchmarks/NOTES.md, "The fast path's costs".
_fast = _C.fast
_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function


def _fast_path_allowed(tensors: tuple) -> bool:
    return not (_onnx_exporting() or _is_compiling() or _has_torch_function(tensors))


_fast_swish, _fast_mish, _fast_hard_swish = map(traced_as_declined, (_fast.swish, _fast.mish, _fast.hard_swish))


# ---- torch.fx.symbolic_trace

_Proxy = torch.fx.Proxy


def _fx_node(fn, args: tuple, kwargs: dict):
    """Under torch.fx.symbolic_trace (torchvision's create_feature_extractor, FX
    quantization, timm's FX feature extraction), the call as one call_function node of
    ``fn``, a leaf as torch.fx.wrap makes one: the traced GraphModule then calls the
    public function, with its own checks, fast path and autograd. None when no argument
    is a Proxy (the calls that are not traced). swish, mish and hard_swish ask only after
    their fast path declined the call, so it costs their fast calls nothing; acon_c,
    whose Python checks come first, asks before them (about 0.2 us a call)."""
    for a in args:
        if isinstance(a, _Proxy):
            return a.tracer.create_proxy("call_function", fn, args, kwargs)
    return None


def _kw(backend, **kwargs):
    if backend is not None:
        kwargs["backend"] = backend
    return kwargs


# ---- the API


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Swish-beta, ``x * sigmoid(beta * x)`` (SiLU at beta = 1).

    ``beta``: a Python float, or a one-element tensor, which then gets a gradient.
    """
    if backend is None or backend == "native":
        # not isinstance(beta, Tensor): 3x its cost; a beta float32 cannot hold goes the
        # long way, to its check
        if (type(beta) is float or type(beta) is int) and -FLOAT32_OVERFLOW < beta < FLOAT32_OVERFLOW:
            y = _fast_swish(x, beta)
            if y is not None:
                return y
        elif isinstance(beta, torch.Tensor) and isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES:
            check_swish_beta("fusedact.swish", beta, x)
            if _fast_path_allowed((x, beta)):
                y = _fast.swish_forward(x, 1.0, beta)
                if y is not None:
                    return y
    traced = _fx_node(swish, (x, beta), _kw(backend))
    if traced is not None:
        return traced
    backend = _backend(backend)
    check_x("fusedact.swish", x)
    if isinstance(beta, torch.Tensor):
        check_swish_beta("fusedact.swish", beta, x)
    else:
        beta = check_float_beta("fusedact.swish", beta, x)
    if backend == "eager":
        return reference.swish(x, beta)
    if isinstance(beta, torch.Tensor):
        return _run(backend, "swish_forward", x, 1.0, beta)
    return _run(backend, "swish_forward", x, beta, None)


def mish(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``."""
    if backend is None or backend == "native":
        y = _fast_mish(x)
        if y is not None:
            return y
    traced = _fx_node(mish, (x,), _kw(backend))
    if traced is not None:
        return traced
    backend = _backend(backend)
    check_x("fusedact.mish", x)
    if backend == "eager":
        return reference.mish(x)
    return _run(backend, "mish_forward", x)


def hard_swish(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Hard-Swish, ``x * relu6(x + 3) / 6`` (x itself for x >= 3)."""
    if backend is None or backend == "native":
        y = _fast_hard_swish(x)
        if y is not None:
            return y
    traced = _fx_node(hard_swish, (x,), _kw(backend))
    if traced is not None:
        return traced
    backend = _backend(backend)
    check_x("fusedact.hard_swish", x)
    if backend == "eager":
        return reference.hard_swish(x)
    return _run(backend, "hard_swish_forward", x)


def acon_c(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    beta: torch.Tensor,
    *,
    channel_dim: int = 1,
    backend: str | None = None,
) -> torch.Tensor:
    """ACON-C, ``(p1 - p2) x sigmoid(beta (p1 - p2) x) + p2 x``, per channel.

    p1, p2: shape (C,) or (1, C, 1, ...); beta the same (ACON-C) or per sample,
    (N, C) or (N, C, 1, ...) (Meta-ACON). ``channel_dim``: the axis of the C channels
    (1 for NCHW, -1 for (N, L, C)).
    """
    traced = _fx_node(acon_c, (x, p1, p2, beta), _kw(backend, channel_dim=channel_dim))
    if traced is not None:
        return traced
    backend = _backend(backend)
    check_acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim)
    if backend == "native" and _fast_path_allowed((x, p1, p2, beta)):
        y = _fast.acon_c_forward(x, p1, p2, beta, channel_dim)
        if y is not None:
            return y
    if backend == "eager":
        return reference.acon_c(x, p1, p2, beta, channel_dim=channel_dim)
    return _run(backend, "acon_c_forward", x, p1, p2, beta, channel_dim)


from .batch_norm import batch_norm_act, sync_batch_norm_act  # noqa: E402  (it calls the functions above)

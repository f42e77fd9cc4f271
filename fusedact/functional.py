"""The functional API: swish, mish, hard_swish, acon_c.

``backend``: ``None`` or ``"native"`` runs the fused C++/CUDA kernels (torch.ops.fusedact),
``"triton"`` the Triton kernels (torch.ops.fusedact_triton; a clear error where triton
is missing), ``"eager"`` the reference implementations (fusedact.reference). Every
backend checks its arguments here, in Python (fusedact/checks.py), before any op runs: a
user's bad argument then raises a RuntimeError whatever the C++ build does with an
exception (on one machine, torch 2.11 with its own compiler, the C++ checks' exceptions
crashed the process with SIGSEGV; `python -m fusedact.selftest` runs those calls in a
child process to tell). The ops check again in C++ (and in the fakes under
torch.compile), with the same messages. The Python checks cost a few microseconds a call
(more for acon_c's four tensors): safety first, where the two goals meet.
"""
from __future__ import annotations

import torch

from . import _C, reference
from .checks import FLOAT32_OVERFLOW, FLOAT_DTYPES, check_acon_args, check_float_beta, check_swish_beta, check_x
from .functions import invoke
from .onnx import _DECOMPOSITIONS as _ONNX_FORMS
from .onnx import exporting as _onnx_exporting

__all__ = ["swish", "mish", "hard_swish", "acon_c", "BACKENDS"]

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


# The native ops' short way (csrc/fast_path.cpp): the op below autograd when no gradient
# is wanted, else a C++ autograd Function, for the calls that make up a small tensor's
# cost (about 0.3 us a call here, against 3 us through torch.ops and 7-9 us more for a
# Python autograd.Function's forward and backward). Taken outside ONNX export,
# torch.compile (Dynamo records the op itself) and __torch_function__ overrides; it
# returns None inside a torch.func transform or for a forward-AD dual tensor, and the
# call goes the op's own way. Bad arguments go the long way, where Python checks them.
# swish (float beta), mish and hard_swish check x (a plain Tensor or Parameter of a
# floating dtype, no torch function mode) in C++ (_fast.swish/mish/hard_swish) and ask
# Python nothing: with caches cold after a large tensor, each Python check or call
# costs about 0.2 us (0.5% of a 2^20-element hard_swish). Dynamo traces _traced_lane
# in their place (torch.compiler.substitute_in_graph, below); torch.export without Dynamo
# (strict=False, what torch.onnx.export(dynamo=True) runs first) traces FakeTensors, a
# Tensor subclass, which C++ declines: those calls go the op's own way.
_fast = _C.fast
_is_compiling = torch.compiler.is_compiling
_has_torch_function = torch._C._has_torch_function


def _short_way(tensors: tuple) -> bool:
    return not (_onnx_exporting() or _is_compiling() or _has_torch_function(tensors))


# What Dynamo traces in place of the C++ lanes: None, the op's own way (torch.compile
# records the op). torch.export without Dynamo and the ONNX exporter trace FakeTensors,
# which the lanes decline themselves.
def _traced_lane(*args):
    return None


_lane_swish, _lane_mish, _lane_hard_swish = _fast.swish, _fast.mish, _fast.hard_swish
try:
    for _lane in (_lane_swish, _lane_mish, _lane_hard_swish):
        torch.compiler.substitute_in_graph(_lane, skip_signature_check=True)(_traced_lane)
except (AttributeError, TypeError):  # a torch without it: ask Dynamo in Python, a call more
    def _asking_dynamo(lane):
        return lambda *args: None if _is_compiling() else lane(*args)

    _lane_swish, _lane_mish, _lane_hard_swish = map(_asking_dynamo, (_lane_swish, _lane_mish, _lane_hard_swish))


# ---- torch.fx.symbolic_trace

_Proxy = torch.fx.Proxy


def _fx_node(fn, args: tuple, kwargs: dict):
    """Under torch.fx.symbolic_trace (torchvision's create_feature_extractor, FX
    quantization, timm's FX feature extraction), the call as one call_function node of
    ``fn``, a leaf as torch.fx.wrap makes one: the traced GraphModule then calls the
    public function, with its own checks, short way and autograd. None when no argument
    is a Proxy (the calls that are not traced). swish, mish and hard_swish ask only after
    their short way declined the call, so it costs their fast calls nothing; acon_c,
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
            y = _lane_swish(x, beta)
            if y is not None:
                return y
        elif isinstance(beta, torch.Tensor) and isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES:
            check_swish_beta("fusedact.swish", beta, x)
            if _short_way((x, beta)):
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
        y = _lane_mish(x)
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
        y = _lane_hard_swish(x)
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
    if backend == "native" and _short_way((x, p1, p2, beta)):
        y = _fast.acon_c_forward(x, p1, p2, beta, channel_dim)
        if y is not None:
            return y
    if backend == "eager":
        return reference.acon_c(x, p1, p2, beta, channel_dim=channel_dim)
    return _run(backend, "acon_c_forward", x, p1, p2, beta, channel_dim)

"""The functional API: swish, mish, hard_swish, acon_c.

``backend``: ``None`` or ``"native"`` runs the fused C++/CUDA kernels (torch.ops.fusedact),
``"triton"`` the Triton kernels (torch.ops.fusedact_triton; a clear error where triton
is missing), ``"eager"`` the reference implementations (fusedact.reference). Every
backend checks its arguments here, in Python, before any op runs: a user's bad argument
then raises a RuntimeError whatever the C++ build does with an exception (on one
machine, torch 2.11 with its own compiler, the C++ checks' exceptions crashed the
process with SIGSEGV; `python -m fusedact.selftest` runs those calls in a child process
to tell). The ops check again in C++ (and in the fakes under torch.compile), with the
same messages.
"""
from __future__ import annotations

import torch

from . import reference
from .functions import _native

__all__ = ["swish", "mish", "hard_swish", "acon_c", "BACKENDS"]

BACKENDS = ("native", "triton", "eager")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _backend(backend: str | None) -> str:
    if backend is None:
        return "native"
    if backend in BACKENDS:
        return backend
    raise ValueError(f"fusedact: unknown backend {backend!r}; choose one of {BACKENDS}")


def _functions(backend: str):
    """The autograd.Functions of a fused backend ("native" or "triton")."""
    if backend == "triton":
        from . import triton

        return triton.functions()
    return _native


# ---- argument checks (the same rules and messages as csrc/checks.h, channel_layout.h)


def _check(cond, message) -> None:
    """torch._check's RuntimeError, with the message built only on failure. Under
    torch.compile (the eager backend) a passing check is a guard, never a graph break:
    Dynamo cannot trace torch._check's message closures over tensors' dtypes and shapes."""
    if not cond:
        raise RuntimeError(message())


def check_x(op: str, x: torch.Tensor) -> None:
    _check(
        x.dtype in FLOAT_DTYPES,
        lambda: f"{op}: x must be a floating-point tensor (float32, float64, float16 or "
        f"bfloat16), got {x.dtype}",
    )


def check_param(op: str, name: str, p: torch.Tensor, x: torch.Tensor) -> None:
    _check(
        p.device == x.device,
        lambda: f"{op}: {name} is on {p.device} but x is on {x.device}; all tensors must be "
        "on one device",
    )
    half_x = x.dtype in (torch.float16, torch.bfloat16)
    _check(
        p.dtype == x.dtype or (half_x and p.dtype == torch.float32),
        lambda: f"{op}: {name} has dtype {p.dtype} but x has dtype {x.dtype}; parameters "
        "must have x's dtype, or float32 when x is float16 or bfloat16",
    )


def check_grad(op: str, grad: torch.Tensor, x: torch.Tensor) -> None:
    _check(grad.shape == x.shape, lambda: f"{op}: grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
    _check(grad.dtype == x.dtype, lambda: f"{op}: grad has dtype {grad.dtype} but x has dtype {x.dtype}")
    _check(grad.device == x.device, lambda: f"{op}: grad is on {grad.device} but x is on {x.device}")


def check_swish_beta(op: str, beta: torch.Tensor, x: torch.Tensor) -> None:
    check_param(op, "beta", beta, x)
    _check(
        beta.numel() == 1,
        lambda: f"{op}: beta must be a float or a tensor with one element, got shape {tuple(beta.shape)}",
    )


def _is_channel_shape(p: torch.Tensor, x: torch.Tensor, cd: int) -> bool:
    C = x.shape[cd]
    if p.dim() == 1:
        return p.shape[0] == C
    return p.dim() == x.dim() and all(p.shape[d] == (C if d == cd else 1) for d in range(x.dim()))


def _is_sample_shape(b: torch.Tensor, x: torch.Tensor, cd: int) -> bool:
    if cd == 0:
        return False
    N, C = x.shape[0], x.shape[cd]
    if b.dim() == 2 and x.dim() != 2:
        return tuple(b.shape) == (N, C)
    return b.dim() == x.dim() and all(
        b.shape[d] == (N if d == 0 else C if d == cd else 1) for d in range(x.dim())
    )


def check_acon_args(op, x, p1, p2, beta, channel_dim) -> tuple[int, bool]:
    """Checks acon_c's arguments; returns (channel_dim >= 0, beta is per sample)."""
    check_x(op, x)
    _check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension (the channels)")
    _check(
        -x.dim() <= channel_dim < x.dim(),
        lambda: f"{op}: channel_dim {channel_dim} is out of range for x with {x.dim()} dimensions",
    )
    cd = channel_dim % x.dim()
    C = x.shape[cd]
    for name, p in (("p1", p1), ("p2", p2), ("beta", beta)):
        _check(
            p.dtype in FLOAT_DTYPES,
            lambda: f"{op}: {name} must be a floating-point tensor (float32, float64, float16 "
            f"or bfloat16), got {p.dtype}",
        )
        check_param(op, name, p, x)
    _check(
        p1.dtype == p2.dtype == beta.dtype,
        lambda: f"{op}: p1, p2 and beta must share one dtype, got {p1.dtype}, {p2.dtype} and {beta.dtype}",
    )
    for name, p in (("p1", p1), ("p2", p2)):
        _check(
            _is_channel_shape(p, x, cd),
            lambda: f"{op}: {name} must have C = {C} elements (x.shape[{cd}]), shape (C,) or "
            f"x.dim() dimensions that are 1 except at channel_dim; got shape {tuple(p.shape)}",
        )
    per_sample = not _is_channel_shape(beta, x, cd)
    if per_sample:
        _check(
            _is_sample_shape(beta, x, cd),
            lambda: f"{op}: beta must have C = {C} elements (shape (C,) or 1 except at "
            "channel_dim) or N*C elements for per-sample beta (shape (N, C) or N at dim 0, C "
            f"at channel_dim, 1 elsewhere), with N = x.shape[0] and channel_dim != 0; got "
            f"shape {tuple(beta.shape)}",
        )
    return cd, per_sample


# ---- the API


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Swish-beta, ``x * sigmoid(beta * x)`` (SiLU at beta = 1).

    ``beta``: a Python float, or a one-element tensor, which then gets a gradient.
    """
    backend = _backend(backend)
    check_x("fusedact.swish", x)
    if isinstance(beta, torch.Tensor):
        check_swish_beta("fusedact.swish", beta, x)
    if backend == "eager":
        return reference.swish(x, beta)
    fn = _functions(backend).SwishFunction
    if isinstance(beta, torch.Tensor):
        return fn.apply(x, 1.0, beta)
    return fn.apply(x, float(beta), None)


def mish(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Mish, ``x * tanh(softplus(x))``."""
    backend = _backend(backend)
    check_x("fusedact.mish", x)
    if backend == "eager":
        return reference.mish(x)
    return _functions(backend).MishFunction.apply(x)


def hard_swish(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Hard-Swish, ``x * relu6(x + 3) / 6`` (x itself for x >= 3)."""
    backend = _backend(backend)
    check_x("fusedact.hard_swish", x)
    if backend == "eager":
        return reference.hard_swish(x)
    return _functions(backend).HardSwishFunction.apply(x)


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
    backend = _backend(backend)
    check_acon_args("fusedact.acon_c", x, p1, p2, beta, channel_dim)
    if backend == "eager":
        return reference.acon_c(x, p1, p2, beta, channel_dim=channel_dim)
    return _functions(backend).AconCFunction.apply(x, p1, p2, beta, channel_dim)

"""Argument checks of every op, with the rules and messages of csrc/checks.h and
channel_layout.h: the eager backend, the fakes (fusedact/_ops.py) and the Triton ops
(fusedact/triton/ops.py) use them; the native ops check in C++. They import nothing
from fusedact, so every module can import them."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check(cond, message) -> None:
    """torch._check's RuntimeError, with the message built only on failure. Under
    torch.compile (the eager backend) a passing check is a guard, never a graph break:
    Dynamo cannot trace torch._check's message closures over tensors' dtypes and shapes."""
    if not cond:
        raise RuntimeError(message())


def check_x(op: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a tensor, got {type(x).__name__}")
    _check(
        x.dtype in FLOAT_DTYPES,
        lambda: f"{op}: x must be a floating-point tensor (float32, float64, float16 or bfloat16), got {x.dtype}",
    )


# The smallest double that rounds to inf in float32 (2^128 - 2^103): csrc/checks.h's bound.
FLOAT32_OVERFLOW = float.fromhex("0x1.ffffffp+127")


def check_float_beta(op: str, beta, x: torch.Tensor) -> float:
    """swish's beta as a float: a TypeError for anything but a real number, a ValueError
    where x's opmath (float32, for every dtype but float64) cannot hold it: there it
    would round to inf and give NaN in dx, and in y at x = 0."""
    if isinstance(beta, (torch.SymFloat, torch.SymInt)):  # traced with a symbolic beta: not a constant to check
        return beta
    if not isinstance(beta, numbers.Real):
        raise TypeError(f"{op}: beta must be a float or a tensor with one element, got {type(beta).__name__}")
    try:
        b = float(beta)
    except OverflowError:  # an int beyond float64
        raise ValueError(f"{op}: beta = {beta} is outside float64's range") from None
    if x.dtype != torch.float64 and FLOAT32_OVERFLOW <= abs(b) < float("inf"):
        raise ValueError(
            f"{op}: beta = {b!r} is outside float32's range, in which the kernels compute for "
            f"{x.dtype} x (it would round to inf and give NaN); use a smaller beta or float64 x"
        )
    return b


def check_channel_dim(op: str, channel_dim) -> None:
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, (int, torch.SymInt)):
        raise TypeError(f"{op}: channel_dim must be an int, got {type(channel_dim).__name__}")


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")


def check_param(op: str, name: str, p: torch.Tensor, x: torch.Tensor) -> None:
    _check(
        p.device == x.device,
        lambda: f"{op}: {name} is on {p.device} but x is on {x.device}; all tensors must be on one device",
    )
    half_x = x.dtype in (torch.float16, torch.bfloat16)
    _check(
        p.dtype == x.dtype or (half_x and p.dtype == torch.float32),
        lambda: (
            f"{op}: {name} has dtype {p.dtype} but x has dtype {x.dtype}; parameters "
            "must have x's dtype, or float32 when x is float16 or bfloat16"
        ),
    )


def check_grad(op: str, grad: torch.Tensor, x: torch.Tensor) -> None:
    _check(grad.shape == x.shape, lambda: f"{op}: grad has shape {tuple(grad.shape)} but x has shape {tuple(x.shape)}")
    _check(grad.dtype == x.dtype, lambda: f"{op}: grad has dtype {grad.dtype} but x has dtype {x.dtype}")
    _check(grad.device == x.device, lambda: f"{op}: grad is on {grad.device} but x is on {x.device}")


def check_swish_beta(op: str, beta: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(op, "beta", beta)
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
    return b.dim() == x.dim() and all(b.shape[d] == (N if d == 0 else C if d == cd else 1) for d in range(x.dim()))


def check_acon_args(op, x, p1, p2, beta, channel_dim) -> tuple[int, bool]:
    """Checks acon_c's arguments; returns (channel_dim >= 0, beta is per sample)."""
    check_x(op, x)
    for name, p in (("p1", p1), ("p2", p2), ("beta", beta)):
        check_tensor(op, name, p)
    check_channel_dim(op, channel_dim)
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
            lambda: (
                f"{op}: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {p.dtype}"
            ),
        )
        check_param(op, name, p, x)
    _check(
        p1.dtype == p2.dtype == beta.dtype,
        lambda: f"{op}: p1, p2 and beta must share one dtype, got {p1.dtype}, {p2.dtype} and {beta.dtype}",
    )
    for name, p in (("p1", p1), ("p2", p2)):
        _check(
            _is_channel_shape(p, x, cd),
            lambda: (
                f"{op}: {name} must have C = {C} elements (x.shape[{cd}]), shape (C,) or "
                f"x.dim() dimensions that are 1 except at channel_dim; got shape {tuple(p.shape)}"
            ),
        )
    per_sample = not _is_channel_shape(beta, x, cd)
    if per_sample:
        _check(
            _is_sample_shape(beta, x, cd),
            lambda: (
                f"{op}: beta must have C = {C} elements (shape (C,) or 1 except at "
                "channel_dim) or N*C elements for per-sample beta (shape (N, C) or N at dim 0, C "
                f"at channel_dim, 1 elsewhere), with N = x.shape[0] and channel_dim != 0; got "
                f"shape {tuple(beta.shape)}"
            ),
        )
    return cd, per_sample

"""The Triton kernels as operators: torch.ops.fusedact_triton.*, with the schemas of
torch.ops.fusedact.* (csrc/ops.cpp). On a GPU they are ``torch.library.triton_op``s:
torch.compile traces into them (no graph break, and inductor sees the kernels), and
their fake implementations come from running them on fake tensors.

Under TRITON_INTERPRET=1 (CPU tensors, CI) the interpreter's kernels are not ones
torch's Triton tracing recognizes (it would run them on fake tensors), so there the ops
are plain ``custom_op``s, opaque to torch.compile but still one graph, whose fake
implementation is the same function with the launches skipped.

Argument checks, layouts and outputs are those of the native ops: the same messages,
the output in x's memory format (a dense copy for non-dense x), and acon_c's channel
geometry [N][R][C][inner] over x's memory.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import Optional

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import custom_op, triton_op, wrap_triton

from .. import _inductor
from .._opinfo import OPS, batch_blocked, is_dense
from ..checks import check_acon_args, check_float_beta, check_grad, check_swish_beta, check_x
from . import kernels as k

__all__ = []

# Elements per program of the flat elementwise kernels, at Triton's default 4 warps
# (128 threads): two 16-byte packs in flight per thread, as the CUDA kernels' kFlatPacks.
# 1024 for 4-byte dtypes (8 elements a thread), 2048 for 2-byte ones (16 a thread: 1024
# gave bfloat16/float16 one pack a thread); float64 keeps 1024 (four packs). A
# prediction from bytes in flight (benchmarks/NOTES.md), not yet measured on a GPU.
BLOCK = 1024
BLOCK_2BYTE = 2048
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fusing(fn, name: str):
    """fn, but Inductor's decomposition (fusedact/_inductor.py) where AOT autograd traces
    the op into its body and fusedact.config.compile chooses "fuse": a triton_op is
    decomposed there (FunctionalTensorMode), before Inductor's table is asked."""
    decomposition = _inductor.DECOMPOSITIONS[name]
    op = _inductor.op_of(name)

    @functools.wraps(fn)
    def body(*args):
        if isinstance(args[0], FunctionalTensor) and _inductor.mode_for(op, args[0].device) == "fuse":
            return decomposition(*args)
        return fn(*args)

    return body


def _op(name: str):
    """Registers fn as the op fusedact_triton::name (see the module's docstring)."""

    def register(fn):
        if not INTERPRET:
            body = _fusing(fn, name) if name in _inductor.DECOMPOSITIONS else fn  # bn_*: no decomposition
            return triton_op(f"fusedact_triton::{name}", body, mutates_args=())
        op = custom_op(f"fusedact_triton::{name}", fn, mutates_args=())
        op.register_fake(fn)
        return op

    return register


def _launch(kernel, grid, *args, **meta) -> None:
    if not INTERPRET:
        wrap_triton(kernel)[grid](*args, **meta)
    elif not any(isinstance(a, FakeTensor) or (isinstance(a, torch.Tensor) and a.is_meta) for a in args):
        kernel[grid](*args, **meta)  # a fake or meta run only wants the outputs


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense, else a dense copy in the memory format x suggests."""
    if is_dense(x):
        return x
    out = torch.empty_like(x)
    out.copy_(x)
    return out


def _with_layout_of(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t with ref's strides, so that both can be walked flat together."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref)
    out.copy_(t)
    return out


def _opmath_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _beta_hi_lo(beta: float) -> tuple[float, float]:
    """A Python float as two float32s: hi is its float32 value, hi + lo its value to 48
    bits, which the float64 kernels rebuild (Triton passes float arguments as float32)."""
    hi = struct.unpack("f", struct.pack("f", beta))[0]
    lo = struct.unpack("f", struct.pack("f", beta - hi))[0]
    return hi, lo


def _block(x: torch.Tensor) -> int:
    return BLOCK_2BYTE if x.element_size() == 2 else BLOCK


def _grid(n: int, block: int):
    return (triton.cdiv(n, block),)


def _runs_per_program(block: int) -> int:
    """Units (runs' chunks) in one program of the acon_c rows backward: a tile of up to
    BLOCK elements (16 runs of a 7x7 map, 4 of a 14x14). Not capped by the number of
    units (the last program masks what it lacks): a cap would make torch.compile guard
    on the tensor's size and recompile for every shape."""
    return max(1, BLOCK // block)


def _sum_partials(partial: torch.Tensor, B: int, M: int, K: int) -> torch.Tensor:
    """out[b][k] = sum over m of partial[b][m][k], in a fixed order."""
    out = partial.new_empty((B, K))
    block_k = min(128, triton.next_power_of_2(K))
    k_blocks = triton.cdiv(K, block_k)
    _launch(k._sum_partials_kernel, (B * k_blocks,), partial, out, M, K, k_blocks, BLOCK_M=64, BLOCK_K=block_k)
    return out


# ---- swish


@_op("swish_forward")
def swish_forward(x: torch.Tensor, beta: float, beta_tensor: Optional[torch.Tensor]) -> torch.Tensor:
    check_x("fusedact.swish", x)
    if beta_tensor is not None:
        check_swish_beta("fusedact.swish", beta_tensor, x)
    else:
        check_float_beta("fusedact.swish", beta, x)
    x = _dense(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        hi, lo = _beta_hi_lo(beta)
        bt = beta_tensor if beta_tensor is not None else x
        block = _block(x)
        _launch(
            k._swish_fwd_kernel,
            _grid(n, block),
            x,
            y,
            bt,
            hi,
            lo,
            n,
            HAS_BETA_TENSOR=beta_tensor is not None,
            BLOCK=block,
        )
    return y


@_op("swish_backward")
def swish_backward(
    grad: torch.Tensor, x: torch.Tensor, beta: float, beta_tensor: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    check_x("fusedact.swish_backward", x)
    check_grad("fusedact.swish_backward", grad, x)
    if beta_tensor is not None:
        check_swish_beta("fusedact.swish_backward", beta_tensor, x)
    else:
        check_float_beta("fusedact.swish_backward", beta, x)
    x = _dense(x)
    g = _with_layout_of(grad, x)
    dx = torch.empty_like(x)
    n = x.numel()
    block = _block(x)
    programs = triton.cdiv(n, block)
    has_bt = beta_tensor is not None
    partial = x.new_empty((programs if has_bt else 0,), dtype=_opmath_dtype(x))
    if n:
        hi, lo = _beta_hi_lo(beta)
        _launch(
            k._swish_bwd_kernel,
            (programs,),
            g,
            x,
            dx,
            beta_tensor if has_bt else x,
            hi,
            lo,
            partial,
            n,
            HAS_BETA_TENSOR=has_bt,
            BLOCK=block,
        )
    if not has_bt:
        return dx, x.new_empty((0,))
    if n == 0:
        return dx, torch.zeros_like(beta_tensor)
    dbeta = _sum_partials(partial, 1, programs, 1)
    return dx, dbeta.reshape(beta_tensor.shape).to(beta_tensor.dtype)


# ---- mish and hard_swish


def _unary(name: str, fwd_kernel, bwd_kernel) -> None:
    @_op(f"{name}_forward")
    def forward(x: torch.Tensor) -> torch.Tensor:
        check_x(f"fusedact.{name}", x)
        x = _dense(x)
        y = torch.empty_like(x)
        n = x.numel()
        if n:
            block = _block(x)
            _launch(fwd_kernel, _grid(n, block), x, y, n, BLOCK=block)
        return y

    @_op(f"{name}_backward")
    def backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        check_x(f"fusedact.{name}_backward", x)
        check_grad(f"fusedact.{name}_backward", grad, x)
        x = _dense(x)
        g = _with_layout_of(grad, x)
        dx = torch.empty_like(x)
        n = x.numel()
        if n:
            block = _block(x)
            _launch(bwd_kernel, _grid(n, block), g, x, dx, n, BLOCK=block)
        return dx


for _info in OPS:  # fusedact/_opinfo.py
    if _info.unary:
        _unary(_info.name, getattr(k, f"_{_info.name}_fwd_kernel"), getattr(k, f"_{_info.name}_bwd_kernel"))


# ---- acon_c


def _acon_geometry(op, x, p1, p2, beta, channel_dim):
    """Checks; returns (dense x, N, R, C, inner, per_sample) as csrc/channel_layout.h."""
    cd, per_sample = check_acon_args(op, x, p1, p2, beta, channel_dim)
    N = x.shape[0] if per_sample else 1
    xd = _dense(x)
    n = xd.numel()
    if per_sample and not batch_blocked(xd):  # the layout rule: fusedact/_opinfo.py
        xd = x.contiguous()
    C = x.shape[cd]
    if n == 0:
        return xd, N, 0, C, 1, per_sample
    inner = xd.stride(cd) if C > 1 else n // N
    R = n // (N * C * inner)
    return xd, N, R, C, inner, per_sample


@_op("acon_c_forward")
def acon_c_forward(
    x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, channel_dim: int
) -> torch.Tensor:
    xd, N, R, C, inner, per_sample = _acon_geometry("fusedact.acon_c", x, p1, p2, beta, channel_dim)
    y = torch.empty_like(xd)
    n = xd.numel()
    if n:
        block = _block(xd)
        _launch(
            k._acon_c_fwd_kernel,
            _grid(n, block),
            xd,
            y,
            p1.contiguous(),
            p2.contiguous(),
            beta.contiguous(),
            n,
            inner,
            C,
            R * C * inner,
            BETA_PER_SAMPLE=per_sample,
            BLOCK=block,
        )
    return y


@_op("acon_c_backward")
def acon_c_backward(
    grad: torch.Tensor, x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, beta: torch.Tensor, channel_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "fusedact.acon_c_backward"
    xd, N, R, C, inner, per_sample = _acon_geometry(op, x, p1, p2, beta, channel_dim)
    check_grad(op, grad, x)
    g = _with_layout_of(grad, xd)
    dx = torch.empty_like(xd)
    if xd.numel() == 0:
        return dx, torch.zeros_like(p1), torch.zeros_like(p2), torch.zeros_like(beta)
    params = (p1.contiguous(), p2.contiguous(), beta.contiguous())
    acc = _opmath_dtype(xd)
    if inner > 1:
        # runs of `inner` elements, one channel each, cut into chunks of at most BLOCK;
        # short runs (one chunk) several to a program, a tile of about BLOCK elements
        block = max(16, min(BLOCK, triton.next_power_of_2(inner)))
        chunks = triton.cdiv(inner, block)
        units = N * R * C * chunks
        runs = _runs_per_program(block)
        partial = xd.new_empty((units * 3,), dtype=acc)
        _launch(
            k._acon_c_bwd_rows_kernel,
            (triton.cdiv(units, runs),),
            g,
            xd,
            dx,
            *params,
            partial,
            inner,
            C,
            R,
            chunks,
            units,
            BETA_PER_SAMPLE=per_sample,
            RUNS=runs,
            BLOCK=block,
        )
        sums = _sum_partials(partial, N * C, R * chunks, 3)  # [N C][3]
    else:
        # rows of C channels: tiles of rows x channels, several tiles per program
        block_c = min(64, triton.next_power_of_2(C))
        rows = max(1, 2048 // block_c)
        col_blocks = triton.cdiv(C, block_c)
        row_blocks = triton.cdiv(R, rows)
        partial = xd.new_empty((N * row_blocks * C * 3,), dtype=acc)
        _launch(
            k._acon_c_bwd_channels_kernel,
            (N * row_blocks * col_blocks,),
            g,
            xd,
            dx,
            *params,
            partial,
            C,
            R,
            row_blocks,
            col_blocks,
            BETA_PER_SAMPLE=per_sample,
            ROWS=rows,
            BLOCK_C=block_c,
        )
        sums = _sum_partials(partial, N, row_blocks, C * 3)  # [N][C 3]
    sums = sums.reshape(N, C, 3)
    dbeta = sums[:, :, 2]
    if N > 1:  # p1 and p2 are shared by the samples: add theirs up, in order
        sums = _sum_partials(sums, 1, N, C * 3).reshape(1, C, 3)
    grads = [sums[0, :, 0], sums[0, :, 1], dbeta]
    # copies: an op's outputs may not alias one another
    return (dx,) + tuple(gr.reshape(p.shape).to(p.dtype, copy=True) for gr, p in zip(grads, (p1, p2, beta)))


# ---- batch_norm_act's passes: the schemas of torch.ops.fusedact.bn_* (csrc/ops.cpp).
# params: opmath tensors, (C,) or (N, C) for a per-sample beta; [mean, a, b, act's...]
# for bn_act_*, [k1, k2, mean, c] for bn_dx.

_BN_ACTS = {"identity": 0, "silu": 1, "swish": 2, "mish": 3, "hard_swish": 4, "acon_c": 5}


def _bn_geometry(op: str, x: torch.Tensor):
    """(dense x with its samples outermost, N, R, C, inner): a sample is [R][C][inner]."""
    check_x(op, x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (N, C, ...), got {x.dim()} dimension(s)")
    xd = _dense(x)
    if not batch_blocked(xd):
        xd = x.contiguous()
    N, C = x.shape[0], x.shape[1]
    sample = xd.numel() // N if N else 0
    inner = xd.stride(1) if C > 1 else sample
    R = sample // (C * inner) if sample else 0
    return xd, N, R, C, max(inner, 1)


def _bn_tiles(R: int, inner: int) -> tuple[int, int]:
    """(ROWS, BLOCK) of the per-(sample, channel) kernels: about 1024 elements a tile."""
    block = min(1024, triton.next_power_of_2(inner))
    return max(1, min(triton.next_power_of_2(max(R, 1)), 1024 // block)), block


def _bn_act_code(op: str, act: str, params, nparams: int) -> int:
    if act not in _BN_ACTS:
        raise ValueError(f"{op}: unknown act '{act}' ({', '.join(_BN_ACTS)})")
    if len(params) != nparams:
        raise ValueError(f"{op}: act '{act}' takes {nparams} parameter tensors, got {len(params)}")
    return _BN_ACTS[act]


def _bn_param_ptrs(x, params):
    """mean, a, b and three activation pointers (x itself where the activation has none:
    the kernels do not read them)."""
    acts = list(params[3:]) + [x] * (6 - len(params))
    return [p.contiguous() for p in params[:3]] + [p.contiguous() for p in acts]


def _nparams(act: str) -> int:
    return 3 + {"swish": 1, "acon_c": 3}.get(act, 0)


@_op("bn_stats")
def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    op = "fusedact.bn_stats"
    xd, N, R, C, inner = _bn_geometry(op, x)
    M = xd.numel() // C if C else 0
    if M == 0:
        raise ValueError(f"{op}: x has no elements per channel")
    rows, block = _bn_tiles(R, inner)
    acc = _opmath_dtype(xd)

    def sums(shift):  # [C][2] in float64: the samples' partials added in order
        part = xd.new_empty((N * C * 2,), dtype=torch.float64)
        _launch(k._bn_sums_kernel, (N * C,), xd, shift, part, R, C, inner, ROWS=rows, BLOCK=block)
        return part.reshape(N, C, 2).sum(0)

    shift = (sums(xd.new_zeros((C,), dtype=acc))[:, 0] / M).to(acc)
    s = sums(shift)
    d = s[:, 0] / M  # the residual of the shift (NaN about an infinite mean)
    mean = torch.where(torch.isfinite(d), shift.double() + d, shift.double())
    var = (s[:, 1] / M - d * d).clamp_min(0.0)
    return mean.to(acc), var.to(acc)


@_op("bn_act_forward")
def bn_act_forward(x: torch.Tensor, params: list[torch.Tensor], act: str) -> torch.Tensor:
    op = "fusedact.bn_act_forward"
    code = _bn_act_code(op, act, params, _nparams(act))
    xd, N, R, C, inner = _bn_geometry(op, x)
    y = torch.empty_like(xd)
    n = xd.numel()
    if n:
        per_sample = code == 5 and params[5].dim() == 2
        block = _block(xd)
        _launch(
            k._bn_act_fwd_kernel,
            _grid(n, block),
            xd,
            y,
            *_bn_param_ptrs(xd, params),
            n,
            inner,
            C,
            R * C * inner,
            ACT=code,
            BETA_PER_SAMPLE=per_sample,
            BLOCK=block,
        )
    return y


@_op("bn_act_backward")
def bn_act_backward(
    grad: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor], act: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    op = "fusedact.bn_act_backward"
    code = _bn_act_code(op, act, params, _nparams(act))
    xd, N, R, C, inner = _bn_geometry(op, x)
    check_grad(op, grad, x)
    g = _with_layout_of(grad, xd)
    dz = torch.empty_like(xd)
    acc = _opmath_dtype(xd)
    per_sample = code == 5 and params[5].dim() == 2
    part = xd.new_zeros((N * C * 5,), dtype=torch.float64)
    if xd.numel():
        rows, block = _bn_tiles(R, inner)
        ptrs = _bn_param_ptrs(xd, params)
        _launch(
            k._bn_act_bwd_kernel,
            (N * C,),
            g,
            xd,
            dz,
            *ptrs,
            part,
            R,
            C,
            inner,
            ACT=code,
            BETA_PER_SAMPLE=per_sample,
            ROWS=rows,
            BLOCK=block,
        )
    part = part.reshape(N, C, 5)
    total = part.sum(0).to(acc)  # the samples' partials added in order
    sums = [total[:, 0], total[:, 1], torch.zeros_like(total[:, 0])]
    for j in range(len(params) - 3):
        sums.append(part[:, :, 4].reshape(-1).to(acc) if j == 2 and per_sample else total[:, 2 + j])  # (N C,) flat
    return dz, [t.clone() for t in sums]  # an op's outputs may not alias one another


@_op("bn_dx")
def bn_dx(dz: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    op = "fusedact.bn_dx"
    if len(params) != 4:
        raise ValueError(f"{op}: takes 4 parameter tensors (k1, k2, mean, c), got {len(params)}")
    xd, N, R, C, inner = _bn_geometry(op, x)
    check_grad(op, dz, x)
    d = _with_layout_of(dz, xd)
    dx = torch.empty_like(xd)
    n = xd.numel()
    if n:
        block = _block(xd)
        _launch(
            k._bn_dx_kernel, _grid(n, block), d, xd, dx, *[p.contiguous() for p in params], n, inner, C, BLOCK=block
        )
    return dx

"""The Triton kernels: forward and backward of swish, mish, hard_swish and acon_c.

They compute docs/SPEC.md's functions with the same opmath and the same numerical forms as
csrc/activation_math.h (float32 for float32/float16/bfloat16 inputs, float64 for
float64, the same exp polynomial, the same guards where the sigmoid saturates), so the
two backends agree to a few float32 ulp.

Grids are flat and 1-D with int64 offsets. Parameter gradients are deterministic: each
program writes its partial sums (in opmath) to its own slot and _sum_partials_kernel
adds them in a fixed order; no atomics.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tensors, TRITON_INTERPRET=1) converts float32 to bfloat16 by
# truncation, and mishandles float32 subnormals; a GPU's conversion rounds to nearest
# even. Under the interpreter the kernels round to bfloat16 themselves, from the bits.
_EMULATE_BF16_RTNE = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

# ---- per-element math (activation_math.h, line for line)


@triton.jit
def _exp_f32(x):
    # Cody-Waite x = k ln2 + r, the Cephes polynomial for 2 e^r, times 2^(k-1) built
    # from the bits; 0 below e^-86.9, +inf above FLT_MAX, NaN stays NaN.
    xc = tl.where(x > 88.8, 88.8, x)
    xc = tl.where(xc < -86.9, -86.9, xc)
    v = xc * 1.44269504088896341 + 12582912.0
    kf = v - 12582912.0
    r = xc - kf * 0.693145751953125
    r = r - kf * 1.428606765330187045e-06
    p = 3.9751383000e-4
    p = p * r + 2.7963999014e-3
    p = p * r + 1.6666903815e-2
    p = p * r + 8.3331591788e-2
    p = p * r + 3.3333330918e-1
    p = p * r + 1.0000000240e0
    two_er = (p * r) * r + (r + r) + 2.0
    k_minus_1 = v.to(tl.int32, bitcast=True) - 0x4B400000 - 1
    scale = ((k_minus_1 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x < -86.9, 0.0, two_er * scale)


@triton.jit
def _exp(x):
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return _exp_f32(x)


@triton.jit
def _opmath(x):
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _to_out(v, PTR):
    """v (opmath) rounded once to the element type of PTR."""
    if PTR.dtype.element_ty == tl.bfloat16 and _EMULATE_BF16_RTNE:
        b = v.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # round to nearest even; inf stays inf
        r = tl.where(v != v, (b >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(PTR.dtype.element_ty)


@triton.jit
def _saturation(z):
    # |z| beyond which s(z) and 1 - s(z) are exactly 0 or 1 in opmath
    if z.dtype == tl.float64:
        return 1024.0
    else:
        return 128.0


@triton.jit
def _sigmoid_pair(z):
    # s(z) and 1 - s(z), the latter as e s where s >= 1/2 (no cancellation)
    e = _exp(-z)
    s = 1.0 / (1.0 + e)
    sc = tl.where(s < 0.5, 1.0 - s, e * s)
    return s, sc


@triton.jit
def _swish_fwd(x, beta):
    # y = x s(beta x) = x / (1 + e^-beta x)
    return x / (1.0 + _exp(-(beta * x)))


@triton.jit
def _swish_bwd(g, x, beta):
    # dy/dx = s + beta x s (1 - s), dy/dbeta = x^2 s (1 - s); products grouped so that
    # each factor is bounded by |x| or |beta| (0, not inf * 0, where s saturates)
    s, sc = _sigmoid_pair(beta * x)
    xs = x * s
    dx = g * (s + xs * (beta * sc))
    dbeta = g * (xs * (x * sc))
    return dx, dbeta


@triton.jit
def _mish_fwd(x):
    # y = x t, t = tanh(softplus(x)) = n / (n + 2), n = e (e + 2), e = e^x; t = 1 above
    # the threshold (e^2x would overflow float from x = 44.4)
    if x.dtype == tl.float64:
        big = x >= 40.0
    else:
        big = x >= 20.0
    e = _exp(tl.where(big, 0.0, x))
    n = e * (e + 2.0)
    t = tl.where(big, 1.0, n / (n + 2.0))
    return x * t


@triton.jit
def _mish_bwd(g, x):
    # dy/dx = t + x (1 - t^2) s(x), 1 - t^2 = 2 (q + n) / q^2 with q = n + 2; one
    # division, r = 1 / ((1 + e) q), for 1 / q = (1 + e) r and s = e / (1 + e) = e q r
    # (activation_math.h's Mish::backward)
    if x.dtype == tl.float64:
        big = x >= 40.0
    else:
        big = x >= 20.0
    e = _exp(tl.where(big, 0.0, x))
    n = e * (e + 2.0)
    q = n + 2.0
    p = 1.0 + e
    r = 1.0 / (p * q)
    inv_q = p * r
    t = tl.where(big, 1.0, n * inv_q)
    one_minus_t2 = tl.where(big, 0.0, (2.0 * (q + n) * inv_q) * inv_q)
    s = e * (q * r)
    return g * (t + x * one_minus_t2 * s)


@triton.jit
def _hard_swish_fwd(x):
    # 0 (-0.0) for x <= -3, x (x + 3) / 6 between, x itself from 3 on
    return tl.where(x <= -3.0, -0.0, tl.where(x >= 3.0, x, x * (x + 3.0) / 6.0))


@triton.jit
def _hard_swish_bwd(g, x):
    # 0, x / 3 + 1/2, 1: PyTorch's convention at the kinks
    return tl.where(x <= -3.0, 0.0, tl.where(x >= 3.0, g, g * (x / 3.0 + 0.5)))


@triton.jit
def _acon_c_fwd(x, p1, p2, beta):
    # y = x (d s(beta d x) + p2), d = p1 - p2: finite where d x overflows
    d = p1 - p2
    return x * (d * (1.0 / (1.0 + _exp(-(beta * (d * x))))) + p2)


@triton.jit
def _acon_c_bwd(g, x, p1, p2, beta):
    # h = s (1 + z (1 - s)), z = beta u, u = d x: dx = g (d h + p2), dp1 = g x h,
    # dp2 = g x (1 - h) with 1 - h = (1 - s)(1 - z s), dbeta = g u^2 s (1 - s);
    # z clamped where s saturates so that z (1 - s) is 0, not inf * 0
    d = p1 - p2
    u = d * x
    z = beta * u
    s, sc = _sigmoid_pair(z)
    k = _saturation(z)
    zc = tl.where(z > k, k, tl.where(z < -k, -k, z))
    h = s * (1.0 + zc * sc)
    gx = g * x
    dp1 = gx * h
    dp2 = gx * (sc * (1.0 - zc * s))
    saturated = (z >= k) | (z <= -k)
    dbeta = g * tl.where(saturated, 0.0, (u * s) * (u * sc))
    dx = g * (d * h + p2)
    return dx, dp1, dp2, dbeta


# ---- elementwise kernels: flat 1-D grid, BLOCK elements per program


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _load_beta(BETA, beta_hi, beta_lo, x, HAS_BETA_TENSOR: tl.constexpr):
    # beta from a one-element tensor, or a Python float passed as float32 hi + lo
    # (exact to 48 bits in float64; hi alone is the float32 value)
    if HAS_BETA_TENSOR:
        beta = _opmath(tl.load(BETA))
    elif x.dtype == tl.float64:
        beta = tl.cast(beta_hi, tl.float64) + tl.cast(beta_lo, tl.float64)
    else:
        beta = beta_hi
    return beta


@triton.jit
def _swish_fwd_kernel(X, Y, BETA, beta_hi, beta_lo, n, HAS_BETA_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    beta = _load_beta(BETA, beta_hi, beta_lo, x, HAS_BETA_TENSOR)
    tl.store(Y + offs, _to_out(_swish_fwd(x, beta), Y), mask=mask)


@triton.jit
def _swish_bwd_kernel(G, X, DX, BETA, beta_hi, beta_lo, PARTIAL, n, HAS_BETA_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    g = _opmath(tl.load(G + offs, mask=mask))
    beta = _load_beta(BETA, beta_hi, beta_lo, x, HAS_BETA_TENSOR)
    dx, dbeta = _swish_bwd(g, x, beta)
    tl.store(DX + offs, _to_out(dx, DX), mask=mask)
    if HAS_BETA_TENSOR:
        # this program's share of dL/dbeta (masked lanes have g = 0, so add 0)
        tl.store(PARTIAL + tl.program_id(0), tl.sum(tl.where(mask, dbeta, 0.0), axis=0))


@triton.jit
def _mish_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    tl.store(Y + offs, _to_out(_mish_fwd(x), Y), mask=mask)


@triton.jit
def _mish_bwd_kernel(G, X, DX, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    g = _opmath(tl.load(G + offs, mask=mask))
    tl.store(DX + offs, _to_out(_mish_bwd(g, x), DX), mask=mask)


@triton.jit
def _hard_swish_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    tl.store(Y + offs, _to_out(_hard_swish_fwd(x), Y), mask=mask)


@triton.jit
def _hard_swish_bwd_kernel(G, X, DX, n, BLOCK: tl.constexpr):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    g = _opmath(tl.load(G + offs, mask=mask))
    tl.store(DX + offs, _to_out(_hard_swish_bwd(g, x), DX), mask=mask)


# ---- acon_c. Memory is seen as [N][R][C][inner] (csrc/channel_layout.h): the element
# at flat offset i has channel (i // inner) % C and sample i // (R C inner). N > 1 only
# when beta is per sample (Meta-ACON): beta of (n, c) is BETA[n C + c].


@triton.jit
def _acon_c_params(P1, P2, BETA, offs, mask, inner, C, sample_size, BETA_PER_SAMPLE: tl.constexpr):
    # parameters are x's dtype or float32 (beside float16/bfloat16 x): both give opmath
    c = (offs // inner) % C
    p1 = _opmath(tl.load(P1 + c, mask=mask, other=0.0))
    p2 = _opmath(tl.load(P2 + c, mask=mask, other=0.0))
    if BETA_PER_SAMPLE:
        b = (offs // sample_size) * C + c
    else:
        b = c
    beta = _opmath(tl.load(BETA + b, mask=mask, other=0.0))
    return p1, p2, beta


@triton.jit
def _acon_c_fwd_kernel(
    X, Y, P1, P2, BETA, n, inner, C, sample_size, BETA_PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr
):
    offs, mask = _offsets(n, BLOCK)
    x = _opmath(tl.load(X + offs, mask=mask))
    p1, p2, beta = _acon_c_params(P1, P2, BETA, offs, mask, inner, C, sample_size, BETA_PER_SAMPLE)
    tl.store(Y + offs, _to_out(_acon_c_fwd(x, p1, p2, beta), Y), mask=mask)


@triton.jit
def _acon_c_bwd_rows_kernel(
    G,
    X,
    DX,
    P1,
    P2,
    BETA,
    PARTIAL,
    inner,
    C,
    R,
    chunks,
    units,
    BETA_PER_SAMPLE: tl.constexpr,
    RUNS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """inner > 1 (NCHW-like): each run of `inner` elements has one channel, cut into
    `chunks` chunks of at most BLOCK; a unit is one chunk of one run (units = runs *
    chunks). Program p takes units p * RUNS .. + RUNS - 1 as a RUNS x BLOCK tile (RUNS > 1
    only for short runs, one chunk each: a 7x7 map is 16 runs a program, not one 64-wide
    program a run) and writes each unit's 3 partial sums to PARTIAL[n][c][r][chunk][3],
    so that the partials of one (sample, channel) are adjacent for the finish."""
    pid = tl.program_id(0).to(tl.int64)
    unit = pid * RUNS + tl.arange(0, RUNS)  # [RUNS]
    live = unit < units
    run = unit // chunks
    chunk = unit % chunks
    c = run % C
    nr = run // C  # n R + r
    idx = chunk[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [RUNS, BLOCK]
    mask = live[:, None] & (idx < inner)
    offs = run[:, None] * inner + idx
    x = _opmath(tl.load(X + offs, mask=mask))
    g = _opmath(tl.load(G + offs, mask=mask))
    p1 = _opmath(tl.load(P1 + c, mask=live))
    p2 = _opmath(tl.load(P2 + c, mask=live))
    if BETA_PER_SAMPLE:
        beta = _opmath(tl.load(BETA + (nr // R) * C + c, mask=live))
    else:
        beta = _opmath(tl.load(BETA + c, mask=live))
    dx, dp1, dp2, dbeta = _acon_c_bwd(g, x, p1[:, None], p2[:, None], beta[:, None])
    tl.store(DX + offs, _to_out(dx, DX), mask=mask)
    n_idx = nr // R
    r = nr % R
    slot = (((n_idx * C + c) * R + r) * chunks + chunk) * 3
    tl.store(PARTIAL + slot, tl.sum(tl.where(mask, dp1, 0.0), axis=1), mask=live)
    tl.store(PARTIAL + slot + 1, tl.sum(tl.where(mask, dp2, 0.0), axis=1), mask=live)
    tl.store(PARTIAL + slot + 2, tl.sum(tl.where(mask, dbeta, 0.0), axis=1), mask=live)


@triton.jit
def _acon_c_bwd_channels_kernel(
    G,
    X,
    DX,
    P1,
    P2,
    BETA,
    PARTIAL,
    C,
    R,
    row_blocks,
    col_blocks,
    BETA_PER_SAMPLE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """inner == 1 (channels_last, (N, L, C)): memory is N R rows of C channels. Program
    p takes a ROWS x BLOCK_C tile (rows of one sample) and writes its column sums to
    PARTIAL[n][row_block][c][3]."""
    pid = tl.program_id(0).to(tl.int64)
    cb = pid % col_blocks
    nrb = pid // col_blocks  # n row_blocks + row_block
    n_idx = nrb // row_blocks
    rb = nrb % row_blocks
    rows = rb * ROWS + tl.arange(0, ROWS)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    offs = (n_idx * R + rows)[:, None] * C + cols[None, :]
    x = _opmath(tl.load(X + offs, mask=mask))
    g = _opmath(tl.load(G + offs, mask=mask))
    p1 = _opmath(tl.load(P1 + cols, mask=col_ok, other=0.0))
    p2 = _opmath(tl.load(P2 + cols, mask=col_ok, other=0.0))
    if BETA_PER_SAMPLE:
        beta = _opmath(tl.load(BETA + n_idx * C + cols, mask=col_ok, other=0.0))
    else:
        beta = _opmath(tl.load(BETA + cols, mask=col_ok, other=0.0))
    dx, dp1, dp2, dbeta = _acon_c_bwd(g, x, p1[None, :], p2[None, :], beta[None, :])
    tl.store(DX + offs, _to_out(dx, DX), mask=mask)
    slot = ((n_idx * row_blocks + rb) * C + cols) * 3
    tl.store(PARTIAL + slot, tl.sum(tl.where(mask, dp1, 0.0), axis=0), mask=col_ok)
    tl.store(PARTIAL + slot + 1, tl.sum(tl.where(mask, dp2, 0.0), axis=0), mask=col_ok)
    tl.store(PARTIAL + slot + 2, tl.sum(tl.where(mask, dbeta, 0.0), axis=0), mask=col_ok)


# ---- the finish: OUT[b][k] = sum over m of PARTIAL[b][m][k], always in the same order


@triton.jit
def _sum_partials_kernel(PARTIAL, OUT, M, K, k_blocks, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // k_blocks
    ks = (pid % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    base = PARTIAL + b * M * K
    acc = tl.zeros((BLOCK_K,), dtype=PARTIAL.dtype.element_ty)
    for m0 in range(0, M, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        mask = (ms < M)[:, None] & k_ok[None, :]
        tile = tl.load(base + ms.to(tl.int64)[:, None] * K + ks[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + b * K + ks, acc.to(OUT.dtype.element_ty), mask=k_ok)


# ---- batch_norm_act's passes (fusedact/batch_norm.py). A sample of dense x is
# [R][C][inner] (NCHW: R = 1; channels_last: inner = 1); per-(sample, channel) kernels
# take one (n, c) a program and walk its R x inner elements in tiles of ROWS x BLOCK.
# ACT: 0 identity, 1 silu, 2 swish (beta per channel in P1), 3 mish, 4 hard_swish,
# 5 acon_c (P1, P2, P3 = p1, p2, beta; beta per sample when BETA_PER_SAMPLE).


@triton.jit
def _bn_act_params(P1, P2, P3, c, n_idx, C, mask, ACT: tl.constexpr, BETA_PER_SAMPLE: tl.constexpr):
    # the activation's parameters (opmath), read only where it has them
    p1 = 0.0
    p2 = 0.0
    p3 = 0.0
    if ACT == 2 or ACT == 5:
        p1 = tl.load(P1 + c, mask=mask, other=0.0)
    if ACT == 5:
        p2 = tl.load(P2 + c, mask=mask, other=0.0)
        if BETA_PER_SAMPLE:
            p3 = tl.load(P3 + n_idx * C + c, mask=mask, other=0.0)
        else:
            p3 = tl.load(P3 + c, mask=mask, other=0.0)
    return p1, p2, p3


@triton.jit
def _act_fwd(z, p1, p2, p3, ACT: tl.constexpr):
    if ACT == 0:
        y = z
    elif ACT == 1:
        y = _swish_fwd(z, 1.0)
    elif ACT == 2:
        y = _swish_fwd(z, p1)
    elif ACT == 3:
        y = _mish_fwd(z)
    elif ACT == 4:
        y = _hard_swish_fwd(z)
    else:
        y = _acon_c_fwd(z, p1, p2, p3)
    return y


@triton.jit
def _act_bwd(g, z, p1, p2, p3, ACT: tl.constexpr):
    """(dz, the activation's three parameter gradients: 0 where it has none)."""
    zero = g * 0.0
    if ACT == 0:
        dz, d1, d2, d3 = g, zero, zero, zero
    elif ACT == 1:
        dz, d1 = _swish_bwd(g, z, 1.0)
        d1, d2, d3 = zero, zero, zero
    elif ACT == 2:
        dz, d1 = _swish_bwd(g, z, p1)
        d2, d3 = zero, zero
    elif ACT == 3:
        dz, d1, d2, d3 = _mish_bwd(g, z), zero, zero, zero
    elif ACT == 4:
        dz, d1, d2, d3 = _hard_swish_bwd(g, z), zero, zero, zero
    else:
        dz, d1, d2, d3 = _acon_c_bwd(g, z, p1, p2, p3)
    return dz, d1, d2, d3


@triton.jit
def _bn_tile(pid, R, C, inner, r0, i0, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The offsets and mask of one ROWS x BLOCK tile of sample n, channel c (pid = n C + c)."""
    n_idx = pid // C
    c = pid % C
    rows = r0 + tl.arange(0, ROWS)
    idx = i0 + tl.arange(0, BLOCK)
    mask = (rows < R)[:, None] & (idx < inner)[None, :]
    offs = ((n_idx * R + rows.to(tl.int64)) * C + c)[:, None] * inner + idx[None, :]
    return offs, mask


@triton.jit
def _bn_sums_kernel(X, SHIFT, OUT, R, C, inner, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[n C + c] = (sum (x - shift), sum (x - shift)^2) over sample n, channel c, in float64."""
    pid = tl.program_id(0).to(tl.int64)
    shift = tl.load(SHIFT + pid % C).to(tl.float64)
    s1 = tl.zeros((ROWS, BLOCK), dtype=tl.float64)
    s2 = tl.zeros((ROWS, BLOCK), dtype=tl.float64)
    for r0 in range(0, R, ROWS):
        for i0 in range(0, inner, BLOCK):
            offs, mask = _bn_tile(pid, R, C, inner, r0, i0, ROWS, BLOCK)
            d = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float64) - shift, 0.0)
            s1 += d
            s2 += d * d
    tl.store(OUT + pid * 2, tl.sum(tl.sum(s1, axis=1), axis=0))
    tl.store(OUT + pid * 2 + 1, tl.sum(tl.sum(s2, axis=1), axis=0))


@triton.jit
def _bn_act_fwd_kernel(
    X,
    Y,
    MEAN,
    A,
    B,
    P1,
    P2,
    P3,
    n,
    inner,
    C,
    sample_size,
    ACT: tl.constexpr,
    BETA_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = act((x - mean) a + b), flat over dense x."""
    offs, mask = _offsets(n, BLOCK)
    c = (offs // inner) % C
    x = _opmath(tl.load(X + offs, mask=mask))
    mean = tl.load(MEAN + c, mask=mask, other=0.0)
    a = tl.load(A + c, mask=mask, other=0.0)
    b = tl.load(B + c, mask=mask, other=0.0)
    p1, p2, p3 = _bn_act_params(P1, P2, P3, c, offs // sample_size, C, mask, ACT, BETA_PER_SAMPLE)
    tl.store(Y + offs, _to_out(_act_fwd((x - mean) * a + b, p1, p2, p3, ACT), Y), mask=mask)


@triton.jit
def _bn_act_bwd_kernel(
    G,
    X,
    DZ,
    MEAN,
    A,
    B,
    P1,
    P2,
    P3,
    OUT,
    R,
    C,
    inner,
    ACT: tl.constexpr,
    BETA_PER_SAMPLE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dz = act'(z) g for sample n, channel c (pid = n C + c), and its sums
    OUT[pid][0:5] = (dz (x - mean), dz, and the activation's three parameter gradients)."""
    pid = tl.program_id(0).to(tl.int64)
    c = pid % C
    n_idx = pid // C
    mean = tl.load(MEAN + c)
    a = tl.load(A + c)
    b = tl.load(B + c)
    p1, p2, p3 = _bn_act_params(P1, P2, P3, c, n_idx, C, True, ACT, BETA_PER_SAMPLE)
    zero = tl.zeros((ROWS, BLOCK), dtype=mean.dtype)
    s_xm, s_dz, s1, s2, s3 = zero, zero, zero, zero, zero
    for r0 in range(0, R, ROWS):
        for i0 in range(0, inner, BLOCK):
            offs, mask = _bn_tile(pid, R, C, inner, r0, i0, ROWS, BLOCK)
            x = _opmath(tl.load(X + offs, mask=mask, other=0.0))
            g = _opmath(tl.load(G + offs, mask=mask, other=0.0))
            xm = x - mean
            dz, d1, d2, d3 = _act_bwd(g, xm * a + b, p1, p2, p3, ACT)
            tl.store(DZ + offs, _to_out(dz, DZ), mask=mask)
            s_xm += tl.where(mask, dz * xm, 0.0)
            s_dz += tl.where(mask, dz, 0.0)
            s1 += tl.where(mask, d1, 0.0)
            s2 += tl.where(mask, d2, 0.0)
            s3 += tl.where(mask, d3, 0.0)
    base = OUT + pid * 5
    tl.store(base, tl.sum(tl.sum(s_xm, axis=1), axis=0).to(tl.float64))
    tl.store(base + 1, tl.sum(tl.sum(s_dz, axis=1), axis=0).to(tl.float64))
    tl.store(base + 2, tl.sum(tl.sum(s1, axis=1), axis=0).to(tl.float64))
    tl.store(base + 3, tl.sum(tl.sum(s2, axis=1), axis=0).to(tl.float64))
    tl.store(base + 4, tl.sum(tl.sum(s3, axis=1), axis=0).to(tl.float64))


@triton.jit
def _bn_dx_kernel(DZ, X, DX, K1, K2, MEAN, CC, n, inner, C, BLOCK: tl.constexpr):
    """dx = k1 dz + (k2 (x - mean) + c) per channel, flat over dense x."""
    offs, mask = _offsets(n, BLOCK)
    c = (offs // inner) % C
    x = _opmath(tl.load(X + offs, mask=mask))
    dz = _opmath(tl.load(DZ + offs, mask=mask))
    k1 = tl.load(K1 + c, mask=mask, other=0.0)
    k2 = tl.load(K2 + c, mask=mask, other=0.0)
    mean = tl.load(MEAN + c, mask=mask, other=0.0)
    cc = tl.load(CC + c, mask=mask, other=0.0)
    tl.store(DX + offs, _to_out(k1 * dz + (k2 * (x - mean) + cc), DX), mask=mask)

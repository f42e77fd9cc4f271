"""The GPU's Lowp math for float16/bfloat16 data, proven on the CPU.

On the GPU, the forward of every op for float16 and bfloat16 data, and the backward of
swish, SiLU and mish (dx only) for bfloat16, compute exp as ex2.approx.ftz(x log2 e) and
a / b as a * rcp.approx.ftz(b) (csrc/activation_math.h, Lowp). The CPU cannot run those instructions, but their
error is documented: about 2 ulp for ex2.approx and 1 ulp for rcp.approx, with results
below float's normal range flushed to zero. tests/cpp/lowp_sim.cpp runs the header's
own op code with each approximation replaced by the exact value times (1 + error), and
this test runs every finite float16 and bfloat16 value through it at each corner of the
error box (both signs, at 4-8 ulp: twice the documented bound or more), then checks SPEC's
bar as tests/test_numerics.py does for the real kernels: within 2 ulp of the correctly
rounded float64 result, or flushed where that is below 1e-33. The outputs are smooth
in each approximated value, so over so small a box their extremes lie at its corners.
nvcc contracts a * b + c into FMAs, so the simulation is built both without and (where
the CPU has FMA) with contraction. NaN and infinities must come out where the Precise
math (the CPU's) puts them. A sabotaged model (errors of 2^-5) must fail. The backward
that sums parameter gradients takes the reciprocal alone (LowpRcp): its per-element
terms are held to the sums' tolerance instead (test_parameter_gradient_terms_...).
"""

from __future__ import annotations

import functools
import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fusedact
from fusedact import _numerics
from helpers import ref_fn
from test_numerics import ACON_PARAMS, all_finite_values, ordered

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "tests" / "cpp" / "lowp_sim.cpp"
GXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(GXX is None, reason="no g++")

# Relative error bounds of the model: 2^-21 is 4 float32 ulp at the top of a binade, 8
# at the bottom; the documented bounds are about 2 ulp (ex2.approx) and 1 ulp (rcp.approx).
ERROR = 2.0**-21
CORNERS = list(itertools.product((-ERROR, 0.0, ERROR), repeat=2))
# (op, direction, params): the Lowp paths of the CUDA kernels (backward: bfloat16 only)
CASES = [
    ("swish", "fwd", (1.7,)),
    ("swish", "bwd", (1.7,)),
    ("swish", "fwd", (0.3,)),
    ("silu", "fwd", ()),
    ("silu", "bwd", ()),
    ("mish", "fwd", ()),
    ("mish", "bwd", ()),
    ("acon_c", "fwd", ACON_PARAMS),
]
LOWP_DTYPES = {"fwd": (torch.float16, torch.bfloat16), "bwd": (torch.bfloat16,)}


def _has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


BUILDS = ["no-contraction"] + (["fma-contraction"] if _has_fma() else [])


@functools.lru_cache(maxsize=None)
def build(kind: str, out_dir: str) -> Path:
    out = Path(out_dir) / f"lowp_sim-{kind}"
    flags = (
        ["-O2", "-std=c++17", "-ffp-contract=off"]
        if kind == "no-contraction"
        else ["-O2", "-std=c++17", "-mfma", "-ffp-contract=fast"]
    )
    subprocess.run(
        [GXX, *flags, "-I", str(ROOT / "csrc"), str(SIM), "-o", str(out)], check=True, capture_output=True, text=True
    )
    return out


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lowp"))


def simulate(sim: Path, x: torch.Tensor, op: str, direction: str, params, errors) -> torch.Tensor:
    args = ["precise", "-"] if errors == "precise" else [repr(e) for e in errors]
    data = x.float().numpy().astype("<f4").tobytes()
    r = subprocess.run(
        [str(sim), *args, op, direction, *map(repr, params)], input=data, capture_output=True, check=True
    )
    return torch.from_numpy(np.frombuffer(r.stdout, dtype="<f4").copy())


@functools.lru_cache(maxsize=None)
def reference(op: str, direction: str, params, dtype: torch.dtype) -> torch.Tensor:
    x64 = all_finite_values(dtype).double()
    if op == "acon_c":
        p = [torch.tensor([v], dtype=torch.float64) for v in params]
        return fusedact.reference.acon_c(x64.reshape(-1, 1), *p).reshape(-1)
    if op == "silu":
        f = lambda t: fusedact.reference.swish(t, 1.0)  # noqa: E731
    elif op == "swish":
        f = lambda t: fusedact.reference.swish(t, params[0])  # noqa: E731
    else:
        f = ref_fn(op)
    if direction == "fwd":
        return f(x64)
    xg = x64.clone().requires_grad_()
    (d,) = torch.autograd.grad(f(xg), xg, torch.ones_like(xg))
    return d


def violations(y32: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where y (float32, before the kernel's rounding to dtype) misses SPEC's bar."""
    y = y32.to(dtype)
    expected = ref64.to(dtype)
    finite = torch.isfinite(expected)
    dist = (ordered(y) - ordered(expected)).abs()
    flushed = (ref64.abs() < 1e-33) & (y == 0)
    return (dist > 2) & ~flushed & finite


# float16's backward runs Precise on the GPU (test_float16_backward_needs_precise)
LOWP_CASES = [(dt, *case) for case in CASES for dt in LOWP_DTYPES[case[1]]]


@pytest.mark.parametrize("build_kind", BUILDS)
@pytest.mark.parametrize(
    "dtype,op,direction,params", LOWP_CASES, ids=[f"{str(dt)[6:]}-{o}-{d}-{p}" for dt, o, d, p in LOWP_CASES]
)
def test_every_half_value_within_2ulp_at_every_corner(sim_dir, build_kind, dtype, op, direction, params):
    sim = build(build_kind, sim_dir)
    x = all_finite_values(dtype)
    ref64 = reference(op, direction, params, dtype)
    for errors in CORNERS:
        y = simulate(sim, x, op, direction, params, errors)
        bad = violations(y, ref64, dtype)
        assert not bad.any(), (
            f"errors {errors}: {int(bad.sum())} values off by more than 2 ulp, e.g. "
            f"x={x[bad][:4].tolist()} got {y[bad][:4].to(dtype).tolist()} "
            f"want {ref64[bad][:4].to(dtype).tolist()}"
        )


@pytest.mark.parametrize("op,direction,params", CASES, ids=[f"{o}-{d}-{p}" for o, d, p in CASES])
def test_nan_and_inf_where_precise_has_them(sim_dir, op, direction, params):
    sim = build("no-contraction", sim_dir)
    x = torch.cat(
        [
            all_finite_values(torch.bfloat16).float(),
            torch.tensor([float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38]),
        ]
    )
    precise = simulate(sim, x, op, direction, params, "precise")
    for errors in CORNERS:
        y = simulate(sim, x, op, direction, params, errors)
        assert torch.equal(torch.isnan(y), torch.isnan(precise)), errors
        assert torch.equal(torch.isinf(y), torch.isinf(precise)), errors
        inf = torch.isinf(y)
        assert torch.equal(y[inf], precise[inf]), errors


def test_float16_backward_needs_precise(sim_dir):
    """Why float16's dx is Precise on the GPU: near the zero of mish's slope (x = -1.19)
    its two terms cancel, and errors of 2 float32 ulp (2^-22) in exp and the reciprocal
    already move float16's result past 2 ulp. bfloat16's 8 bits keep a margin of 2^6."""
    sim = build("no-contraction", sim_dir)
    x = all_finite_values(torch.float16)
    ref64 = reference("mish", "bwd", (), torch.float16)
    bad = sum(
        int(violations(simulate(sim, x, "mish", "bwd", (), c), ref64, torch.float16).sum())
        for c in itertools.product((-(2.0**-22), 0.0, 2.0**-22), repeat=2)
    )
    assert bad > 0
    xb = all_finite_values(torch.bfloat16)
    ref_b = reference("mish", "bwd", (), torch.bfloat16)
    for c in itertools.product((-(2.0**-16), 0.0, 2.0**-16), repeat=2):
        assert not violations(simulate(sim, xb, "mish", "bwd", (), c), ref_b, torch.bfloat16).any()


def test_the_check_fails_on_a_sabotaged_model(sim_dir):
    """Errors of 2^-5 (the model of a far worse exp and reciprocal) must break the bar."""
    sim = build("no-contraction", sim_dir)
    for dtype in (torch.float16, torch.bfloat16):
        x = all_finite_values(dtype)
        failed = []
        for dt, op, direction, params in LOWP_CASES:
            if dt != dtype:
                continue
            ref64 = reference(op, direction, params, dtype)
            y = simulate(sim, x, op, direction, params, (2.0**-5, -(2.0**-5)))
            failed.append(bool(violations(y, ref64, dtype).any()))
        assert all(failed), f"{dtype}: the check passed a sabotaged model for {failed}"


def test_kernels_use_lowp_only_for_16_bit_data():
    """What the proof covers is what the kernels run: Lowp for 2-byte scalar types
    (float16's backward excepted), LowpRcp for their backward that sums parameter
    gradients, Precise for float32/float64."""
    src = (ROOT / "csrc" / "cuda" / "activations_cuda.cu").read_text()
    flat = " ".join(src.split())  # the text up to whitespace (clang-format may rewrap it)
    assert (
        "using MathFor = std::conditional_t<sizeof(scalar_t) == 2 && "
        "!(kBackward && std::is_same_v<scalar_t, c10::Half>), math::Lowp, math::Precise>;"
    ) in flat
    assert "using M = MathFor<scalar_t, kBackward>;" in flat
    # the parameter-gradient backward (three arguments) never takes an M
    assert "op.template backward<M>(static_cast<T>(gv[k].v[v]), static_cast<T>(xv[k].v[v]))" in flat
    # the row and channels kernels: their backward (with dp) takes LowpRcp for 2-byte data
    assert "using SumsMathFor = std::conditional_t<sizeof(scalar_t) == 2, math::LowpRcp, math::Precise>;" in flat
    channel_kernels = src.split("row_kernel(")[1].split("finish_kernel(")[0]
    assert channel_kernels.count("op.template backward<SumsMathFor<scalar_t>>(") == 2
    assert "op.backward(" not in channel_kernels


# ---- the backward that sums parameter gradients: LowpRcp (the reciprocal alone)

SUM_CASES = [("swish", (1.7,)), ("acon_c", ACON_PARAMS)]


def per_element_reference(op, params, x64):
    """dx and each dy/dparam at g = 1, per element, in float64, and each term's
    magnitude as fusedact.testing.param_terms_abs measures it (its tolerance's scale)."""
    n = x64.numel()
    if op == "swish":
        b = torch.full((n,), params[0], dtype=torch.float64, requires_grad=True)
        x = x64.clone().requires_grad_()
        y = x * torch.sigmoid(b * x)
        dx, db = torch.autograd.grad(y, (x, b), torch.ones_like(y))
        z = params[0] * x64
        terms = [(x64 * x64).abs() * (torch.sigmoid(z) * torch.sigmoid(-z) * (1 + z.abs()) + 1)]
        return dx, [db], terms
    ps = [torch.full((n,), v, dtype=torch.float64, requires_grad=True) for v in params]
    x = x64.reshape(1, n).clone().requires_grad_()  # each element its own channel
    y = fusedact.reference.acon_c(x, *ps)
    dx, *dps = torch.autograd.grad(y, [x] + ps, torch.ones_like(y))
    terms = _numerics.param_terms_abs(
        "acon_c", x64.reshape(1, n), torch.ones(1, n, dtype=torch.float64), [p.detach() for p in ps], 1
    )
    return dx.reshape(-1), dps, terms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,params", SUM_CASES, ids=[o for o, _ in SUM_CASES])
def test_parameter_gradient_terms_within_their_tolerance(sim_dir, dtype, op, params):
    """With rcp.approx (LowpRcp), for every finite half x: dx within SPEC's 2 ulp, and
    each per-element term of a parameter gradient within 8 float32 ulp of its magnitude
    (fusedact.testing.reduction_tol allows 8 + sqrt(n) per term of a sum of n), at every
    corner of the reciprocal's error box. Precise meets the same bound (the bound's check)."""
    sim = build("no-contraction", sim_dir)
    x = all_finite_values(dtype)
    x64 = x.double()
    dx64, dps64, terms = per_element_reference(op, params, x64)
    k = 1 + len(dps64)
    eps = 2.0**-23
    for errors in [(0.0, -ERROR), (0.0, 0.0), (0.0, ERROR), "precise"]:
        out = simulate(sim, x, op, "bwdp", params, errors).reshape(-1, k)
        bad = violations(out[:, 0], dx64, dtype)
        assert not bad.any(), f"{errors}: dx of x={x[bad][:4].tolist()}"
        for j, (dp64, t) in enumerate(zip(dps64, terms)):
            got = out[:, 1 + j].double()
            # + float32's rounding below its normal range, as reduction_tol's (x^2 of a
            # subnormal x underflows in float32, in either math)
            ok = (got - dp64).abs() <= 8 * eps * t + eps * torch.finfo(torch.float32).tiny
            ok |= ~torch.isfinite(dp64)
            assert bool(ok.all()), (
                f"{errors}: param {j}, x={x[~ok][:4].tolist()} got {got[~ok][:4].tolist()} "
                f"want {dp64[~ok][:4].tolist()}"
            )
    # the check's own test: a reciprocal 32 ulp off (2^-18) breaks the terms' bound
    out = simulate(sim, x, op, "bwdp", params, (0.0, 2.0**-18)).reshape(-1, k)
    assert any(
        bool(((out[:, 1 + j].double() - dp64).abs() > 8 * eps * t + eps * torch.finfo(torch.float32).tiny).any())
        for j, (dp64, t) in enumerate(zip(dps64, terms))
    )

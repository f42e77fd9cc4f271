"""The registry of fusedact's ops: one entry per activation, read by everything else.

Each ``OpInfo`` says what the rest of the library would otherwise branch on the op's
name for (PyTorch's OpInfo, ``common_methods_invocations.py``): its parameters and their
shapes, how the public function's arguments map onto the forward op's, the reference,
the ONNX form, which modules ``convert`` replaces with it, the layout rule, the sample
parameters and gradcheck cases of the tests, and the scale of its parameter gradients'
rounding error. Autograd (functions.py), ONNX (onnx.py), the vmap and fake
registrations, ``convert``, the selftest, ``fusedact.testing``, the tests and the
benchmarks iterate over ``OPS``. Adding an activation: docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import reference

__all__ = [
    "OpInfo",
    "ParamInfo",
    "GradcheckCase",
    "OPS",
    "NAMES",
    "get",
    "is_dense",
    "per_sample",
    "batch_blocked",
    "output_like",
]


@dataclass(frozen=True)
class ParamInfo:
    """A parameter after x. ``shapes``: what it may be, for the docs and error messages;
    ``float_ok``: a Python float is accepted (swish's beta), a tensor then gets a gradient."""

    name: str
    shapes: str
    float_ok: bool = False


@dataclass(frozen=True)
class GradcheckCase:
    """One float64 gradcheck/gradgradcheck case: x's layout, the channel axis, β per sample,
    parameters in the modules' (1, C, 1, ...) shape, a tensor β for swish."""

    name: str
    layout: str = "contiguous"
    channel_dim: int = 1
    per_sample: bool = False
    module_layout: bool = False
    learnable: bool = True


@dataclass(frozen=True)
class OpInfo:
    """One activation. ``op_args(x, params, channel_dim)``: the forward op's arguments
    from the public function's; ``slots``: the positions in them of the tensors that get
    a gradient (x first), in the order the backward op returns them;
    ``reference_of(op_args)``: the eager forward as a function of the tensors at those
    slots; ``onnx_form(*op_args)``: the eager ops the ONNX exporter translates."""

    name: str
    formula: str
    params: tuple[ParamInfo, ...]
    slots: tuple[int, ...]
    op_args: Callable
    reference_of: Callable
    onnx_form: Callable
    module: tuple[str, ...]  # the fusedact.nn classes; convert puts the first in place of `replaces`
    replaces: tuple[tuple[str, str], ...] = ()  # (module, class) that convert swaps for `module`
    channel_dim: bool = False  # takes channel_dim; per-channel parameters follow the layout rule
    sample_params: Callable = None  # (x, rnd, *, cd, per_sample, module_layout, learnable) -> list
    gradcheck: tuple[GradcheckCase, ...] = ()
    param_error_scale: Callable | None = None  # see fusedact.testing.param_terms_abs
    default_params: tuple = ()  # what the suite's op_fn passes when given no parameters
    eager: Callable | None = None  # the eager PyTorch users write (the benchmarks' baseline)

    @property
    def unary(self) -> bool:
        """x is the only argument (mish, hard_swish): the ops are (x) and (grad, x)."""
        return not self.params

    @property
    def forward(self) -> str:
        return f"{self.name}_forward"

    @property
    def backward(self) -> str:
        return f"{self.name}_backward"

    def function(self):
        """The public function, fusedact.<name>."""
        from . import functional

        return getattr(functional, self.name)

    def call(self, fn: Callable, x, params, *, channel_dim: int = 1, **kwargs):
        """fn(x, *params, ...) with the keyword arguments this op takes."""
        if self.channel_dim:
            kwargs["channel_dim"] = channel_dim
        return fn(x, *params, **kwargs)


# ---- swish


def _swish_op_args(x, params, channel_dim=1):
    beta = params[0] if params else 1.0
    return (x, 1.0, beta) if isinstance(beta, torch.Tensor) else (x, float(beta), None)


def _swish_reference_of(args):
    beta = args[1]
    return lambda x, beta_tensor=None: reference.swish(x, beta if beta_tensor is None else beta_tensor)


def _swish_onnx(x, beta, beta_tensor):
    return reference.swish(x, beta if beta_tensor is None else beta_tensor)


def _swish_params(x, rnd, *, cd, per_sample, module_layout, learnable):
    return [rnd((), scale=0.3, offset=1.2)] if learnable else [1.7]


def _swish_error_scale(x64, g64, params64, channel_dim):
    b = params64[0]
    z = b * x64
    s = torch.sigmoid(z)
    t = (g64 * x64 * x64).abs() * (s * torch.sigmoid(-z) * (1 + z.abs()) + 1)
    return [t.sum().reshape(b.shape)]


# ---- mish, hard_swish


def _unary_op_args(x, params, channel_dim=1):
    return (x,)


def _no_params(x, rnd, **kwargs):
    return []


# ---- acon_c


def _acon_c_op_args(x, params, channel_dim=1):
    return (x, *params, channel_dim)


def _acon_c_reference_of(args):
    cd = args[4]
    return lambda x, p1, p2, beta: reference.acon_c(x, p1, p2, beta, channel_dim=cd)


def _acon_c_onnx(x, p1, p2, beta, channel_dim):
    return reference.acon_c(x, p1, p2, beta, channel_dim=channel_dim)


def _acon_c_eager(x, p1, p2, beta):
    """The ACON-C module of the paper's code and YOLOv5 (parameters (1, C, 1, 1))."""
    dpx = (p1 - p2) * x
    return (dpx * torch.sigmoid(beta * dpx) + p2 * x).to(x.dtype)


def _acon_c_params(x, rnd, *, cd, per_sample, module_layout, learnable):
    C = x.shape[cd]
    shape = [C]
    if module_layout:
        shape = [1] * x.dim()
        shape[cd] = C
    p1, p2 = rnd(shape), rnd(shape)
    if per_sample:
        bshape = (
            [x.shape[0], C]
            if not module_layout
            else [x.shape[0] if d == 0 else (C if d == cd else 1) for d in range(x.dim())]
        )
        beta = rnd(bshape, scale=0.5, offset=1.0)
    else:
        beta = rnd(shape, scale=0.5, offset=1.0)
    return [p1, p2, beta]


def _acon_c_error_scale(x64, g64, params64, channel_dim):
    """The factors of g dy/dp for p1, p2, beta, each scaled by 1 + |beta u| (the sigmoid's
    argument carries a few ulp that s and 1 - s amplify up to |z| times), plus the parts
    the float64 reference subtracts (x - x h for p1, p2; s (1 - s) for beta)."""
    cd = channel_dim % x64.dim()
    p1, p2, beta = params64
    v1 = reference.channel_view(p1, x64, cd, False)
    v2 = reference.channel_view(p2, x64, cd, False)
    vb = reference.channel_view(beta, x64, cd, per_sample(x64, beta, cd))
    u = (v1 - v2) * x64
    bu = vb * u
    s, sc = torch.sigmoid(bu), torch.sigmoid(-bu)
    gx = (g64 * x64).abs()
    cond = 1 + bu.abs()
    terms = [gx * s * (1 + (bu * sc).abs()), gx * sc * (1 + (bu * s).abs()), (g64 * u * u * s * sc).abs()]
    parts = [gx, gx, (g64 * u * u).abs()]
    out = []
    for t, part, v, p in zip(terms, parts, (v1, v2, vb), params64):
        t = t * cond + part
        dims = [d for d in range(x64.dim()) if v.shape[d] == 1 and x64.shape[d] != 1]
        out.append((t.sum(dim=dims, keepdim=True) if dims else t).reshape(p.shape))
    return out


_TORCH = "torch.nn.modules.activation"
_TIMM, _TIMM_ME = "timm.layers.activations", "timm.layers.activations_me"

OPS: tuple[OpInfo, ...] = (
    OpInfo(
        "swish",
        "x sigmoid(beta x); SiLU at beta = 1",
        (ParamInfo("beta", "a float, or a one-element tensor (learnable)", float_ok=True),),
        slots=(0, 2),
        op_args=_swish_op_args,
        reference_of=_swish_reference_of,
        onnx_form=_swish_onnx,
        module=("Swish",),
        replaces=((_TORCH, "SiLU"), (_TIMM, "Swish"), (_TIMM_ME, "SwishMe")),
        sample_params=_swish_params,
        param_error_scale=_swish_error_scale,
        default_params=(1.7,),  # off 1: the general Swish-beta loop, not SiLU's
        eager=F.silu,
        gradcheck=(
            GradcheckCase("swish-float-beta", learnable=False),
            GradcheckCase("swish-learnable-beta", "channels_last"),
        ),
    ),
    OpInfo(
        "mish",
        "x tanh(softplus(x))",
        (),
        slots=(0,),
        op_args=_unary_op_args,
        reference_of=lambda args: reference.mish,
        onnx_form=F.mish,
        eager=F.mish,
        module=("Mish",),
        replaces=((_TORCH, "Mish"), (_TIMM, "Mish"), (_TIMM_ME, "MishMe")),
        sample_params=_no_params,
        gradcheck=(GradcheckCase("mish", "strided"),),
    ),
    OpInfo(
        "hard_swish",
        "x relu6(x + 3) / 6; x itself from 3 on",
        (),
        slots=(0,),
        op_args=_unary_op_args,
        reference_of=lambda args: reference.hard_swish,
        onnx_form=F.hardswish,
        eager=F.hardswish,
        module=("HardSwish",),
        replaces=((_TORCH, "Hardswish"), (_TIMM, "HardSwish"), (_TIMM_ME, "HardSwishMe")),
        sample_params=_no_params,
        gradcheck=(GradcheckCase("hard_swish", "transposed"),),
    ),
    OpInfo(
        "acon_c",
        "(p1 - p2) x sigmoid(beta (p1 - p2) x) + p2 x, per channel",
        (
            ParamInfo("p1", "(C,) or (1, C, 1, ...)"),
            ParamInfo("p2", "(C,) or (1, C, 1, ...)"),
            ParamInfo("beta", "as p1 (ACON-C), or per sample: (N, C) or (N, C, 1, ...) (Meta-ACON)"),
        ),
        slots=(0, 1, 2, 3),
        op_args=_acon_c_op_args,
        reference_of=_acon_c_reference_of,
        onnx_form=_acon_c_onnx,
        module=("AconC", "MetaAconC"),
        channel_dim=True,
        eager=_acon_c_eager,
        sample_params=_acon_c_params,
        param_error_scale=_acon_c_error_scale,
        gradcheck=(
            GradcheckCase("acon_c-nchw"),
            GradcheckCase("acon_c-channels_last", "channels_last", module_layout=True),
            GradcheckCase("acon_c-per-sample", per_sample=True),
            GradcheckCase("acon_c-per-sample-cl", "channels_last", per_sample=True, module_layout=True),
            GradcheckCase("acon_c-nlc", channel_dim=-1),
            GradcheckCase("acon_c-nlc-per-sample", channel_dim=-1, per_sample=True),
            GradcheckCase("acon_c-strided", "strided", per_sample=True),
        ),
    ),
)

NAMES: tuple[str, ...] = tuple(op.name for op in OPS)
_BY_NAME = {op.name: op for op in OPS}


def get(name: str) -> OpInfo:
    """The entry of an activation ("mish") or of one of its ops ("mish_backward")."""
    for suffix in ("_forward", "_backward"):
        if name.endswith(suffix) and name[: -len(suffix)] in _BY_NAME:
            return _BY_NAME[name[: -len(suffix)]]
    return _BY_NAME[name]


def sample_params(
    op: OpInfo | str,
    x: torch.Tensor,
    *,
    channel_dim=1,
    per_sample=False,
    module_layout=False,
    param_dtype=None,
    learnable_beta=True,
    seed=1,
) -> list:
    """Random parameters of op for x, reproducible by seed (empty for mish, hard_swish)."""
    op = get(op) if isinstance(op, str) else op
    gen = torch.Generator().manual_seed(seed)
    pd = param_dtype or x.dtype

    def rnd(shape, scale=1.0, offset=0.0):
        return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + offset).to(pd).to(x.device)

    return op.sample_params(
        x,
        rnd,
        cd=channel_dim % max(1, x.dim()),
        per_sample=per_sample,
        module_layout=module_layout,
        learnable=learnable_beta,
    )


# ---- the layout rule, Python's one home (csrc/channel_layout.h is the kernels' side):
# an op writes into x's layout when x is one dense block, else into a dense copy in x's
# suggested memory format (torch.empty_like does both); acon_c with a per-sample beta
# needs each sample to be one block (dim 0 outermost), else it computes in a
# contiguous copy.


def is_dense(x: torch.Tensor) -> bool:
    """x's elements fill one block of memory with no gaps or overlaps (any order)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def per_sample(x: torch.Tensor, beta: torch.Tensor, channel_dim: int) -> bool:
    """beta holds one value per (sample, channel) (Meta-ACON), not one per channel."""
    return beta.numel() != x.shape[channel_dim % x.dim()]


def batch_blocked(t: torch.Tensor) -> bool:
    """Each sample of t is one block of memory (dim 0 outermost)."""
    N = t.shape[0] if t.dim() else 1
    return N <= 1 or t.numel() == 0 or t.stride(0) * N == t.numel()


def output_like(x: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """The uninitialized output the kernels write for x (the fakes return it too)."""
    out = torch.empty_like(x)
    if per_sample and not batch_blocked(out):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out

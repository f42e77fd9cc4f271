"""Inductor's decompositions of the fused ops, so that torch.compile can fuse them.

An opaque op costs a compiled graph more than its own kernel: Inductor realizes every
input of a fallback kernel, never fuses one with a neighbour, and the min-cut
partitioner may only recompute aten ops, so the activation's input is always saved.
Each forward and backward op of ``torch.ops.fusedact`` and ``torch.ops.fusedact_triton``
has here a decomposition into aten ops, registered in Inductor's own table (as
pytorch/ao's ``_register_custom_op`` does), never in ``torch._decomp``'s global one,
which export and the ONNX exporter read too (and which Inductor refuses under ``CI``
next to a fallback). Each decomposition first asks ``fusedact.config.compile``: for
``"kernel"`` it returns NotImplemented, and the op stays in the graph as our kernel.

Where an aten op computes docs/SPEC.md's function with our edge conventions and no
formula of ours measured faster (SiLU), the decomposition is that op, so a converted
model compiles to the graph the original compiles to. mish is activation_math.h's one
exp and one division (aten's is exp, log1p and tanh), written without selects against
a scalar, which made the partitioner save more (benchmarks/NOTES.md).
hard_swish's forward keeps SPEC's ends around aten's form (x itself from 3, -0.0 to
-3, through a clamp: a second select made the partitioner save 11 MB more in
MobileNetV3); its backward is aten's, whose dx at x = NaN is g (not NaN). Elsewhere
the math is activation_math.h's, op for op (the same grouping, saturation guards and
selects), except acon_c's backward, which takes s from aten.sigmoid and 1 - s (its
comment says why; the guards stay), in float32 for 16-bit data, rounded once to x's dtype; parameter gradients
are float32 (float64) sums returned in the parameter's dtype.
"""

from __future__ import annotations

import zlib

import torch

from . import config
from .reference import channel_view

__all__ = ["AUTO", "AUTO_BLOCKS", "DECOMPOSITIONS", "mode_for", "op_of", "register"]

# "auto": per device type and op, "fuse" or "kernel", whichever runs a compiled training
# step faster (benchmarks/models.py, benchmarks/NOTES.md "Under torch.compile"); an op
# or device not in the table keeps the kernel. On the CPU every op fuses: level or
# faster than our kernel in every model, and never saving more (our kernel makes the
# partitioner save the activation's input). CUDA: not measured yet (no GPU lent); fused
# by the same reasoning, Inductor's elementwise kernels being at the bandwidth bound.
AUTO = {
    "cpu": {"swish": "fuse", "mish": "fuse", "hard_swish": "fuse", "acon_c": "fuse"},
    "cuda": {"swish": "fuse", "mish": "fuse", "hard_swish": "fuse", "acon_c": "fuse"},
}

# The fused blocks (fusedact.batch_norm_act): "fuse" hands Inductor the eager form
# (F.batch_norm, then the activation) to fuse with its neighbours, "kernel" keeps our op.
# CPU: "fuse". Our block alone ran 1.3-3.1x torch.compile of the eager block (bench.py
# --block), but in a compiled YOLO11n step the kept kernel ran 0.93x the compiled
# original and saved 105.8 MB against its 99.5 MB (benchmarks/README.md, 2026-12-03).
# CUDA: "fuse" as well; its passes (fusedact.config.cuda_bn_passes) have not run on a GPU.
AUTO_BLOCKS = {"cpu": {"batch_norm_act": "fuse"}, "cuda": {"batch_norm_act": "fuse"}}

_HALF = (torch.float16, torch.bfloat16)
_SATURATION = {torch.float32: 128.0, torch.float64: 1024.0}  # activation_math.h's SigmoidSaturation
_MISH_THRESHOLD = {torch.float32: 20.0, torch.float64: 40.0}  # activation_math.h's MishThreshold


def mode_for(op: str, device: torch.device) -> str:
    """ "fuse" or "kernel": what config.compile means for ``op`` on ``device``."""
    mode = config.compile
    if mode == "auto":
        table = AUTO_BLOCKS if op in AUTO_BLOCKS["cpu"] else AUTO
        return table.get(device.type, {}).get(op, "kernel")
    return mode


def _opmath(*ts: torch.Tensor):
    return tuple(t.float() if t.dtype in _HALF else t for t in ts)


def _sigmoid_halves(z):
    """s(|z|) and 1 - s(|z|), both from e^-|z|, which never overflows."""
    a = torch.exp(-z.abs())
    r = 1 / (1 + a)
    return r, a * r


def _sigmoid_slope(z):
    """s(z) and s (1 - s) (activation_math.h's sigmoid_slope)."""
    r, ar = _sigmoid_halves(z)
    return torch.where(z >= 0, r, ar), r * ar


def _sum_to(t: torch.Tensor, p: torch.Tensor, keep: tuple[int, ...]) -> torch.Tensor:
    """t summed over every axis not in ``keep``, in p's shape and dtype."""
    axes = [d for d in range(t.dim()) if d not in keep]
    s = t.sum(axes) if axes else t
    return s.reshape(p.shape).to(p.dtype)


def _swish_beta(xf, beta, beta_tensor):
    return beta if beta_tensor is None else beta_tensor.reshape(()).to(xf.dtype)


def swish_forward(x, beta, beta_tensor):
    if beta_tensor is None and beta == 1.0:
        return torch.ops.aten.silu(x)
    (xf,) = _opmath(x)
    b = _swish_beta(xf, beta, beta_tensor)
    return (xf / (1 + torch.exp(-(b * xf)))).to(x.dtype)


def swish_backward(grad, x, beta, beta_tensor):
    if beta_tensor is None and beta == 1.0:
        return torch.ops.aten.silu_backward(grad, x), x.new_empty((0,))
    gf, xf = _opmath(grad, x)
    b = _swish_beta(xf, beta, beta_tensor)
    s, ds = _sigmoid_slope(b * xf)
    xds = xf * ds
    dx = (gf * (s + b * xds)).to(x.dtype)
    if beta_tensor is None:
        return dx, x.new_empty((0,))
    return dx, _sum_to(gf * (xf * xds), beta_tensor, ())


def _mish_parts(xf):
    """e = exp(x) with x clamped at activation_math.h's MishThreshold, and n = e (e + 2).
    The kernel's select (e of 0 where x is big) is a clamp here: at the threshold n / (n + 2)
    is 1 exactly in float32 and float64, as the kernel's t. No select against a scalar: AOT
    makes its 0.0 one `full` node that every block shares, and the partitioner then saves a
    select of each block instead of recomputing it ("used above/below fusible"; +12.8 MB
    in four conv-BN-Mish blocks, benchmarks/NOTES.md)."""
    e = torch.exp(xf.clamp(max=_MISH_THRESHOLD[xf.dtype]))
    return e, e * (e + 2)


def mish_forward(x):
    # activation_math.h's one exp and one division, not aten's tanh(softplus(x)) (exp,
    # log1p and tanh on the CPU): a compiled resnet26-Mish step ran about 1.2x faster
    (xf,) = _opmath(x)
    _, n = _mish_parts(xf)
    return (xf * (n / (n + 2))).to(x.dtype)


def mish_backward(grad, x):
    gf, xf = _opmath(grad, x)
    e, n = _mish_parts(xf)
    q = n + 2
    p = 1 + e
    r = 1 / (p * q)
    inv_q = p * r
    t = n * inv_q  # 1 (float64: 1 - 2^-53) from the threshold, where the kernel's select gives 1
    # 1 - t^2, zeroed from the threshold by a mask (x * 0 keeps the kernel's NaN at x = inf)
    one_minus_t2 = ((2 * (q + n) * inv_q) * inv_q) * (xf < _MISH_THRESHOLD[xf.dtype])
    s = e * (q * r)
    return (gf * (t + xf * one_minus_t2 * s)).to(x.dtype)


def hard_swish_forward(x):
    # x itself from 3 (x (x + 3) overflows from 5.6e37); x clamped at -3, where aten's
    # form is -0.0 (-inf * 0 is NaN)
    return torch.where(x >= 3, x, torch.ops.aten.hardswish(x.clamp(min=-3)))


def hard_swish_backward(grad, x):
    # aten's form, which gives g, not NaN, at x = NaN (as compiled F.hardswish does):
    # our formula, or a select keeping the NaN, made the partitioner save more in timm's
    # MobileNetV3 (297 against 285 MB, benchmarks/NOTES.md)
    return torch.ops.aten.hardswish_backward(grad, x)


def _acon_params(x, xf, p1, p2, beta, channel_dim):
    cd = channel_dim % x.dim()
    per_sample = beta.numel() != x.shape[cd]  # N * C values: Meta-ACON
    views = [channel_view(p, x, cd, False).to(xf.dtype) for p in (p1, p2)]
    views.append(channel_view(beta, x, cd, per_sample).to(xf.dtype))
    return cd, per_sample, views


def acon_c_forward(x, p1, p2, beta, channel_dim):
    (xf,) = _opmath(x)
    _, _, (a, b, bt) = _acon_params(x, xf, p1, p2, beta, channel_dim)
    d = a - b
    return (xf * (d / (1 + torch.exp(-(bt * (d * xf)))) + b)).to(x.dtype)


def acon_c_backward(grad, x, p1, p2, beta, channel_dim):
    # g h formed once, read by dx and the p1 sum, and s from aten.sigmoid with 1 - s: in
    # activation_math.h's form (sigmoid_pair's selects, h and g x apart) Inductor realized
    # NCHW intermediates of a channels_last x and transposed them, and a compiled
    # BN + AconC step took 2.2x the original's (benchmarks/NOTES.md, "ACON under compile")
    gf, xf = _opmath(grad, x)
    cd, per_sample, (a, b, bt) = _acon_params(x, xf, p1, p2, beta, channel_dim)
    d = a - b
    u = d * xf
    z = bt * u
    s = torch.sigmoid(z)
    sc = 1 - s  # sigmoid(-z) is exact for large z, but brought the transposes back
    k = _SATURATION[xf.dtype]
    zc = z.clamp(-k, k)  # z = +-inf: h = s (not inf * 0)
    gh = gf * (s + zc * (s * sc))
    dbeta = gf * torch.where(z.abs() >= k, 0.0, (u * u) * (s * sc))
    beta_axes = (0, cd) if per_sample else (cd,)
    return (
        (gh * d + gf * b).to(x.dtype),
        _sum_to(gh * xf, p1, (cd,)),
        _sum_to((gf * xf) * (sc * (1 - zc * s)), p2, (cd,)),
        _sum_to(dbeta, beta, beta_axes),
    )


# What a compiled graph depends on besides the setting: this file (the decompositions,
# the AUTO table).
with open(__file__, "rb") as _f:
    _SOURCE_KEY = zlib.crc32(_f.read() + repr(sorted(AUTO.items())).encode())
del _f


def tag_caches() -> None:
    """Puts config.compile (and this file's decompositions and AUTO table) into the key of
    torch.compile's caches (torch.compiler.config.cache_key_tag, beside the user's own
    tag), which key on the traced graph: a graph compiled in one mode is not served in
    another, in this process or a later one."""
    try:
        from torch.compiler import config as compiler_config

        tag = compiler_config.cache_key_tag
    except (ImportError, AttributeError):  # pragma: no cover  (an older torch: no such key)
        return
    ours = f"fusedact.compile={config.compile}:{_SOURCE_KEY:08x}"
    kept = [t for t in tag.split("|") if t and not t.startswith("fusedact.compile=")]
    compiler_config.cache_key_tag = "|".join(kept + [ours])


def _device_of(args) -> torch.device:
    return next(a for a in args if isinstance(a, torch.Tensor)).device


def _deciding(op: str, fn, overloads: list):
    """fn when config.compile chooses "fuse" for op on the call's device, else
    NotImplemented: the op stays a fallback kernel (registered then, when Inductor is
    compiling and its lowerings are imported anyway)."""

    def decomposition(*args, **kwargs):
        if mode_for(op, _device_of(args)) == "kernel":
            _register_fallbacks(overloads)
            return NotImplemented
        return fn(*args, **kwargs)

    decomposition.__name__ = fn.__name__
    return decomposition


DECOMPOSITIONS = {
    "swish_forward": swish_forward,
    "swish_backward": swish_backward,
    "mish_forward": mish_forward,
    "mish_backward": mish_backward,
    "hard_swish_forward": hard_swish_forward,
    "hard_swish_backward": hard_swish_backward,
    "acon_c_forward": acon_c_forward,
    "acon_c_backward": acon_c_backward,
}


def op_of(name: str) -> str:
    """The activation of an op name: "hard_swish" of "hard_swish_backward"."""
    return name.rsplit("_", 1)[0]


def _register_fallbacks(overloads) -> None:
    """Our kernels as Inductor fallbacks, for the ops "kernel" leaves in the graph:
    Inductor's implicit fallback refuses an op that its decomposition table holds.
    The layout constraint is the one the implicit fallback would choose."""
    from torch._inductor import lowering

    for overload in overloads:
        if overload in lowering.lowerings:
            continue
        try:
            tag = lowering.get_layout_constraint_tag(overload, with_default=True)
            constraint = lowering.tag_to_layout_constraint(tag)
        except AttributeError:  # an older torch: its default
            constraint = None
        lowering.make_fallback(overload, layout_constraint=constraint, override_decomp=True)


def register(namespace: str) -> bool:
    """Registers the decompositions of ``torch.ops.<namespace>``'s ops in Inductor's
    table; False where this torch has no such table."""
    try:
        from torch._inductor import decomposition as inductor_decomposition
    except (ImportError, AttributeError):  # e.g. a triton too old for torch's Dynamo: no compile here
        return False
    ops = getattr(torch.ops, namespace)
    overloads = [getattr(ops, name).default for name in DECOMPOSITIONS]
    for overload, (name, fn) in zip(overloads, DECOMPOSITIONS.items()):
        if overload not in inductor_decomposition.decompositions:
            inductor_decomposition.register_decomposition([overload])(_deciding(op_of(name), fn, overloads))
    # select_decomp_table() returns a cached copy of the table: drop it, in case a graph
    # was compiled before this registration
    cached = getattr(inductor_decomposition, "fast_random_decomps", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    tag_caches()
    return True

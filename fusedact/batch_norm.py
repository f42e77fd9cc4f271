"""BatchNorm + activation in one op: ``fusedact.batch_norm_act``.

The normalization is the activation's prologue (docs/design.md): with a = weight *
invstd per channel, z = (x - mean) a + bias and y = act(z).
- Training: the per-channel mean and biased variance of x in two read-only passes
  (``bn_stats``: opmath partials per fixed block, added in double in a fixed order), the
  running statistics updated as nn.BatchNorm2d does, then one pass writes y. Saved: x,
  the mean and invstd, the parameters; never z or y.
- Backward: one pass recomputes z and writes dz = act'(z) g while it sums, per channel,
  dz (x - mean) and dz (dweight / invstd and dbias) and the activation's parameter
  gradients; one more pass writes dx = a (dz - mean(dz) - xhat mean(dz xhat)).
- Inference: the running statistics, one pass.
The passes are ``torch.ops.fusedact.bn_stats`` / ``bn_act_forward`` / ``bn_act_backward``
/ ``bn_dx``. On the CPU the native backend calls them through ``bn_batch_stats`` /
``bn_act_apply`` / ``bn_act_grad``, which do the per-channel arithmetic around them
(running statistics, affine, dx coefficients) in the same C++ call: at small shapes those
~20 ATen calls cost more than the passes. On CUDA (with ``fusedact.config.cuda_bn_passes``,
off until measured on a GPU; otherwise the unfused path) the statistics come from two
``bn_moments`` passes and the arithmetic is composed here from tensor ops on the device.
Users' graphs hold ``torch.ops.fusedact.batch_norm_stats`` (which updates the running
statistics) and ``batch_norm_act`` (differentiable; backward ``batch_norm_act_backward``). Their eager
form, F.batch_norm then the activation's function, is what ONNX export and, under
torch.compile, Inductor see (rule 5 of issue 20: Inductor fuses the block itself).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import _C, _inductor, _opinfo, config, reference
from .checks import FLOAT_DTYPES, check_float_beta, check_tensor, check_x
from .functions import traced_as_declined
from .onnx import exporting as _onnx_exporting

__all__ = ["batch_norm_act", "sync_batch_norm_act", "ACTS"]

ACTS = ("identity", "swish", "mish", "hard_swish", "acon_c")


def _opmath(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(op: str, x, running_mean, running_var, weight, bias, training, act, act_params) -> None:
    check_x(op, x)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (N, C, ...), got {x.dim()} dimension(s)")
    C = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, name, t)
        if t.numel() != C or t.dim() != 1:
            raise ValueError(f"{op}: {name} must have shape ({C},) (x.shape[1]), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError(f"{op}: training=False needs running_mean and running_var")
    if not isinstance(act, str) or act not in ACTS:
        raise ValueError(f"{op}: act must be one of {ACTS}, got {act!r}")
    n = {"swish": (0, 1), "acon_c": (3, 3)}.get(act, (0, 0))
    if not n[0] <= len(act_params) <= n[1]:
        want = n[0] if n[0] == n[1] else f"{n[0]} to {n[1]}"
        raise TypeError(f"{op}: act={act!r} takes {want} parameter(s), got {len(act_params)}")
    if act == "acon_c":
        for name, p in zip(("p1", "p2", "beta"), act_params):
            check_tensor(op, name, p)
            per_sample = name == "beta" and p.numel() == x.shape[0] * C and p.numel() != C
            if p.numel() != C and not per_sample:
                raise ValueError(
                    f"{op}: acon_c's {name} must have C = {C} elements (or N*C for beta), got shape {tuple(p.shape)}"
                )
            if p.device != x.device:
                raise ValueError(f"{op}: {name} is on {p.device}, x on {x.device}")
    if act == "swish" and act_params and isinstance(act_params[0], Tensor):
        b = act_params[0]
        if b.numel() != 1:
            raise ValueError(f"{op}: swish's beta must be a float or a one-element tensor, got shape {tuple(b.shape)}")
        if b.device != x.device:
            raise ValueError(f"{op}: beta is on {b.device}, x on {x.device}")
    elif act == "swish" and act_params:
        check_float_beta(op, act_params[0], x)
    if training:
        torch.nn.functional._verify_batch_size(x.size())  # nn.BatchNorm2d's own check and message


# ---- the kernels' arguments


def _kernel_act(act: str, beta: float, act_beta: Optional[Tensor]) -> str:
    """The activation the kernels run: SiLU's own loop for swish at a float beta of 1."""
    if act == "swish" and act_beta is None and beta == 1.0:
        return "silu"
    return act


def _act_tensors(x: Tensor, act: str, beta: float, p1, p2, act_beta) -> list[Tensor]:
    """The activation's parameters as the kernels take them: opmath-typed, (C,), or (N, C)
    for a per-sample beta; swish's beta repeated per channel."""
    pt, C = _opmath(x), x.shape[1]
    if act == "acon_c":
        out = [p1.reshape(-1), p2.reshape(-1), act_beta.reshape(-1)]
        out[2] = out[2].reshape(x.shape[0], C) if out[2].numel() != C else out[2]
        return [p.to(pt).contiguous() for p in out]
    if act == "swish" and act_beta is not None:
        return [act_beta.reshape(1).to(pt).expand(C).contiguous()]
    if act == "swish" and beta != 1.0:
        return [torch.full((C,), beta, dtype=pt, device=x.device)]
    return []


def _passes(backend: str):
    """The namespace of the passes: torch.ops.fusedact (C++), or fusedact_triton's."""
    if backend == "triton":
        from . import triton

        return triton.namespace()
    return torch.ops.fusedact


def _one_call(x: Tensor, backend: str) -> bool:
    """The native backend on the CPU: the passes with their per-channel arithmetic in one
    C++ op each (bn_batch_stats, bn_act_apply, bn_act_grad: host loops). On a GPU the same
    work is composed here from the passes and small tensor ops, all on the device."""
    return backend == "native" and x.device.type == "cpu"


def _moment_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel in opmath from two bn_moments passes, reduced
    on x's device: the sums give the mean, then the squares about it (no cancellation:
    the CPU's bn_stats does the same with its sums in double)."""
    ops = torch.ops.fusedact
    C = x.shape[1]
    M = x.numel() // C if C else 0
    if M == 0:
        raise RuntimeError("fusedact.bn_stats: x has no elements per channel")
    s1, _ = ops.bn_moments(x, x.new_zeros((C,), dtype=_opmath(x)))
    shift = s1 / M
    d, s2 = ops.bn_moments(x, shift)
    d = d / M  # the residual of the shift, tiny (NaN about an infinite mean)
    mean = torch.where(torch.isfinite(d), shift + d, shift)
    return mean, (s2 / M - d * d).clamp_min(0)


def _local_stats(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) of this x's channels: the backend's bn_stats, or on a GPU
    with the native backend _moment_stats."""
    if backend == "native" and x.device.type != "cpu":
        return _moment_stats(x)
    return _passes(backend).bn_stats(x)


def _stats(x, running_mean, running_var, training, momentum, eps, backend="native"):
    """(mean, invstd) per channel in opmath; in training, x's batch statistics (two
    read-only passes, csrc/cpu/bn_stats.h) and the running statistics updated as
    nn.BatchNorm2d updates them (the unbiased variance, momentum)."""
    if _one_call(x, backend):  # the same, in one C++ call (csrc/ops_impl.h)
        return torch.ops.fusedact.bn_batch_stats(x, running_mean, running_var, training, momentum, eps)
    pt = _opmath(x)
    if training:
        mean, var = _local_stats(x, backend)
        _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum)
    else:
        mean, var = running_mean.to(pt, copy=True), running_var.to(pt)
    return mean, torch.rsqrt(var + eps)


def _update_running(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update from the batch mean and biased variance of ``count``
    elements per channel (the running variance takes the unbiased one); None: no update."""
    if running_mean is None:
        return
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (count / max(count - 1, 1))).to(running_var.dtype), alpha=momentum)


def _forward_pass(x, mean, invstd, weight, bias, act, beta, p1, p2, act_beta, backend):
    """y = act((x - mean) invstd weight + bias): the one forward pass."""
    act_params = _act_tensors(x, act, beta, p1, p2, act_beta)
    kernel_act = _kernel_act(act, beta, act_beta)
    if _one_call(x, backend):  # the affine and the pass in one C++ call
        return torch.ops.fusedact.bn_act_apply(x, mean, invstd, weight, bias, act_params, kernel_act)
    a, b = _affine(x, weight, bias, invstd)
    return _passes(backend).bn_act_forward(x, [mean, a, b, *act_params], kernel_act)


def _affine(x, weight, bias, invstd):
    pt = _opmath(x)
    a = invstd if weight is None else weight.to(pt) * invstd
    b = torch.zeros_like(invstd) if bias is None else bias.to(pt)
    return a, b


# ---- the ops users' graphs hold: the statistics (which update the running ones in
# place, with no gradient: their effect on dx is in the backward's formula), then the
# normalization and activation, differentiable


@torch.library.custom_op("fusedact::batch_norm_stats", mutates_args=("running_mean", "running_var"))
def _batch_norm_stats(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(mean, invstd) per channel in opmath; in training the running statistics are updated.
    backend: "native" or "triton", the passes' (as for the two ops below)."""
    return _stats(x, running_mean, running_var, training, momentum, eps, backend)


@_batch_norm_stats.register_fake
def _(x, running_mean, running_var, training, momentum, eps, backend):
    stat = x.new_empty((x.shape[1],), dtype=_opmath(x))
    return stat, torch.empty_like(stat)


@torch.library.custom_op("fusedact::batch_norm_act", mutates_args=())
def _batch_norm_act(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    eps: float,
    act: str,
    beta: float,
    p1: Optional[Tensor],
    p2: Optional[Tensor],
    act_beta: Optional[Tensor],
    backend: str,
) -> Tensor:
    """act((x - mean) invstd weight + bias); training: mean and invstd are x's own batch
    statistics (the backward differentiates through them); eps only for the second
    derivative, which recomputes them."""
    return _forward_pass(x, mean, invstd, weight, bias, act, beta, p1, p2, act_beta, backend)


@_batch_norm_act.register_fake
def _(x, mean, invstd, weight, bias, training, eps, act, beta, p1, p2, act_beta, backend):
    return _opinfo.output_like(x, act_beta is not None and act_beta.numel() != x.shape[1])


@torch.library.custom_op("fusedact::batch_norm_act_backward", mutates_args=())
def _batch_norm_act_backward(
    grad: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    act: str,
    beta: float,
    p1: Optional[Tensor],
    p2: Optional[Tensor],
    act_beta: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dp1, dp2, dbeta); an empty tensor where the argument is None."""
    return _backward_passes(grad, x, weight, bias, mean, invstd, training, act, beta, p1, p2, act_beta, backend)


def _backward_passes(
    grad, x, weight, bias, mean, invstd, training, act, beta, p1, p2, act_beta, backend="native", reduce=None
):
    """The backward's two passes; ``reduce`` (the synced form): the per-channel sums dx
    needs, (sum dz (x - mean), sum dz), summed over the process group, and its element count,
    in place of this x's; dweight, dbias and the activation's gradients stay local."""
    act_params = _act_tensors(x, act, beta, p1, p2, act_beta)
    kernel_act = _kernel_act(act, beta, act_beta)

    def empty():
        return x.new_empty((0,))  # one each: a custom op's outputs may not alias

    if _one_call(x, backend) and reduce is None:  # both passes and the per-channel arithmetic in C++
        dx, dweight, dbias, act_sums = torch.ops.fusedact.bn_act_grad(
            grad, x, weight, bias, mean, invstd, training, act_params, kernel_act
        )
    else:
        dx, dweight, dbias, act_sums = _backward_composed(
            grad, x, weight, bias, mean, invstd, training, act_params, kernel_act, backend, reduce
        )
        dweight = dweight if weight is not None else empty()
        dbias = dbias if bias is not None else empty()
    dp = [empty(), empty(), empty()]
    if act == "acon_c":
        dp = [s.reshape(p.shape).to(p.dtype) for s, p in zip(act_sums, (p1, p2, act_beta))]
    elif act == "swish" and act_beta is not None:
        dp[2] = act_sums[0].sum().reshape(act_beta.shape).to(act_beta.dtype)
    return dx, dweight, dbias, dp[0], dp[1], dp[2]


def _backward_composed(grad, x, weight, bias, mean, invstd, training, act_params, kernel_act, backend, reduce):
    """bn_act_grad's work from the passes (Triton's, or the synced form's with ``reduce``):
    (dx, dweight, dbias, the activation's sums); dweight, dbias None where the parameter is."""
    a, b = _affine(x, weight, bias, invstd)
    passes = _passes(backend)
    dz, sums = passes.bn_act_backward(grad, x, [mean, a, b, *act_params], kernel_act)
    s_xm, s_dz = sums[0], sums[1]
    if training:
        M = x.numel() // x.shape[1]
        t_xm, t_dz = s_xm, s_dz
        if reduce is not None:
            t_xm, t_dz, M = reduce(s_xm, s_dz)
        k2 = -a * invstd * invstd * t_xm / M
        c = -a * t_dz / M
    else:
        k2 = c = torch.zeros_like(a)
    dx = passes.bn_dx(dz, x, [a, k2, mean, c])
    dweight = (s_xm * invstd).to(weight.dtype) if weight is not None else None
    dbias = s_dz.to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, sums[3:]


@_batch_norm_act_backward.register_fake
def _(grad, x, weight, bias, mean, invstd, training, act, beta, p1, p2, act_beta, backend):
    def like(p):
        return torch.empty_like(p) if p is not None else x.new_empty((0,))

    return torch.empty_like(x), like(weight), like(bias), like(p1), like(p2), like(act_beta)


def _save(ctx, x, mean, invstd, weight, bias, training, eps, act, beta, p1, p2, act_beta, backend):
    """What every backward of the block needs: x, the statistics, the parameters."""
    ctx.save_for_backward(x, weight, bias, mean, invstd, p1, p2, act_beta)
    ctx.training, ctx.eps, ctx.act, ctx.beta, ctx.backend = training, eps, act, beta, backend


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs)


def _gradients(ctx, grad, backward):
    """(dx, dweight, dbias, dp1, dp2, dbeta) from what _save kept, and the saved tensors:
    ``backward`` (the backward op or its passes) or, under create_graph=True, the eager
    form's VJP, differentiable again."""
    saved = ctx.saved_tensors
    x, weight, bias, mean, invstd, p1, p2, act_beta = saved
    if torch.is_grad_enabled():
        return _eager_vjp(ctx, grad, x, weight, bias, mean, invstd, p1, p2, act_beta), saved
    outs = backward(grad, x, weight, bias, mean, invstd, ctx.training, ctx.act, ctx.beta, p1, p2, act_beta, ctx.backend)
    return outs, saved


def _needed(outs, inputs, needs_input_grad) -> list:
    """outs where the input is a tensor that needs its gradient, else None."""
    return [g if need and t is not None else None for g, t, need in zip(outs, inputs, needs_input_grad)]


def _backward(ctx, grad):
    outs, (x, weight, bias, mean, invstd, p1, p2, act_beta) = _gradients(ctx, grad, _batch_norm_act_backward)
    dx, dw, db, dp1, dp2, dbeta = outs
    need = ctx.needs_input_grad
    pick = [
        dx if need[0] else None,
        None,
        None,
        dw if need[3] and weight is not None else None,
        db if need[4] and bias is not None else None,
        None,
        None,
        None,
        None,
        dp1 if need[9] and p1 is not None else None,
        dp2 if need[10] and p2 is not None else None,
        dbeta if need[11] and act_beta is not None else None,
        None,
    ]
    return tuple(pick)


def _eager_vjp(ctx, grad, x, weight, bias, mean, invstd, p1, p2, act_beta):
    """The backward as the VJP of the eager form with the batch statistics recomputed
    from x (training) or fixed (inference), for second derivatives."""

    def f(x, weight, bias, p1, p2, act_beta):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if ctx.training:
            m = x.mean(dims, keepdim=True)  # the batch statistics as functions of x
            istd = torch.rsqrt(((x - m) ** 2).mean(dims, keepdim=True) + ctx.eps)
        else:
            m, istd = mean.to(x.dtype).reshape(shape), invstd.to(x.dtype).reshape(shape)
        z = (x - m) * istd
        if weight is not None:
            z = z * weight.reshape(shape)
        if bias is not None:
            z = z + bias.reshape(shape)
        return reference.activation(z, ctx.act, ctx.beta, p1, p2, act_beta)

    primals = (x, weight, bias, p1, p2, act_beta)
    live = [i for i, p in enumerate(primals) if p is not None]
    _, vjp = torch.func.vjp(lambda *ps: f(*_fill(primals, live, ps)), *[primals[i] for i in live])
    grads = vjp(grad)
    out = [x.new_empty((0,))] * 6
    for i, g in zip(live, grads):
        out[i] = g
    return out


def _vjp_for_cpp(grad, x, weight, bias, mean, invstd, p1, p2, act_beta, training, eps, kernel_act, beta):
    """_eager_vjp for the C++ Function's double backward (csrc/fast_path.cpp)."""
    act = "swish" if kernel_act == "silu" else kernel_act
    ctx = types.SimpleNamespace(training=training, eps=eps, act=act, beta=beta)
    return _eager_vjp(ctx, grad, x, weight, bias, mean, invstd, p1, p2, act_beta)


_C.fast.set_batch_norm_act_vjp(_vjp_for_cpp)


def _fill(primals, live, values):
    out = list(primals)
    for i, v in zip(live, values):
        out[i] = v
    return out


torch.library.register_autograd("fusedact::batch_norm_act", _backward, setup_context=_setup_context)


# ---- the public function


def _inductor_compiling() -> bool:
    """Under torch.compile (Inductor fuses the eager form), not torch.export (which keeps the ops)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() and not exporting()


def _plain_eager(*args) -> bool:
    """Plain eager tensors, no mode or tracer (torch.func transforms went to _unfused
    before this is asked): the two graph ops' work can be done by one autograd.Function
    without their dispatch (about 0.1-0.2 ms a call in torch.library's Python layer,
    most of a small block's step; benchmarks/NOTES.md).
    Not under a torch.jit.trace that may be differentiated (_traced_for_grad): the
    trace would record the Function's inner ops, which have no autograd (its backward
    would lose every gradient before the BatchNorm, with PyTorch's "autograd kernel was
    not registered" warning)."""
    return (
        not torch.compiler.is_compiling()
        and not (torch.jit.is_tracing() and _traced_for_grad(args))
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and all(a is None or type(a) in (Tensor, torch.nn.Parameter) for a in args if not isinstance(a, float))
        and args[0].device.type != "meta"
    )


def _traced_for_grad(args) -> bool:
    """Under torch.jit.trace, whether the trace records the differentiable graph ops: a
    parameter (args[1:]: weight, bias, the activation's) requires grad, or grad is on
    and x requires it. Not grad mode alone: torch.jit.trace checks a trace by tracing it
    again under no_grad, and the two must record the same ops (a grad-mode rule failed
    that check for every trace made with grad on). A frozen BatchNorm (parameters
    without grad, as ultralytics' export leaves them) traced for inference records the
    C++ passes; one with trainable parameters stays trainable in its trace."""
    return any(isinstance(a, Tensor) and a.requires_grad for a in args[1:]) or (
        torch.is_grad_enabled() and args[0].requires_grad
    )


class _EagerBatchNormAct(torch.autograd.Function):
    """batch_norm_stats then batch_norm_act, as those ops compute them (the same passes and
    backward), in one Function for plain eager calls."""

    @staticmethod
    def forward(
        ctx, x, weight, bias, p1, p2, act_beta, running_mean, running_var, training, momentum, eps, act, beta, backend
    ):
        if training and _one_call(x, backend):  # the statistics and the pass in one C++ call
            act_params = _act_tensors(x, act, beta, p1, p2, act_beta)
            y, mean, invstd = torch.ops.fusedact.bn_act_train(
                x, running_mean, running_var, weight, bias, act_params, _kernel_act(act, beta, act_beta), momentum, eps
            )
        else:
            mean, invstd = _stats(x, running_mean, running_var, training, momentum, eps, backend)
            y = _forward_pass(x, mean, invstd, weight, bias, act, beta, p1, p2, act_beta, backend)
        _save(ctx, x, mean, invstd, weight, bias, training, eps, act, beta, p1, p2, act_beta, backend)
        return y

    @staticmethod
    def backward(ctx, grad):
        outs, (x, weight, bias, _, _, p1, p2, act_beta) = _gradients(ctx, grad, _backward_passes)
        grads = _needed(outs, (x, weight, bias, p1, p2, act_beta), ctx.needs_input_grad)
        return (*grads, None, None, None, None, None, None, None, None)


def batch_norm_act(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "swish",
    *act_params,
    backend: str | None = None,
) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
    eps))`` in one op that saves only x, the statistics and the parameters.

    ``act``: "swish" (``act_params``: nothing for SiLU, a float beta or a one-element
    tensor), "mish", "hard_swish", "acon_c" (p1, p2, beta: C elements each, beta N*C
    for Meta-ACON) or "identity". ``backend``: None/"native" (the C++ passes: the CPU's,
    and CUDA's with fusedact.config.cuda_bn_passes on, else F.batch_norm then the
    activation), "triton" (the Triton passes) or "eager" (the eager form).
    """
    op = "fusedact.batch_norm_act"
    if isinstance(x, Tensor) and x.numel() == 0:
        # ATen's batch_norm of an empty x (a batch of none, or maps of no pixels): an
        # empty y that stays in the graph (x * weight[0] + bias[0]), the running
        # statistics untouched; the kernels need at least one value a channel
        _check(op, x, running_mean, running_var, weight, bias, training, act, act_params)
        return reference.batch_norm_act(
            x, running_mean, running_var, weight, bias, training, momentum, eps, act, *act_params
        )
    if (backend is None or backend == "native") and not _onnx_exporting():
        # the CPU's plain eager call with its checks in C++ (csrc/fast_path.cpp): about
        # 10 us less than the checks below; None where anything is unusual
        y = _fast_checked(x, running_mean, running_var, weight, bias, training, momentum, eps, act, act_params)
        if y is not None:
            return y
    _check(op, x, running_mean, running_var, weight, bias, training, act, act_params)
    beta, p1, p2, act_beta = reference.split_act_params(act, act_params)
    if (
        backend == "eager"
        or torch.onnx.is_in_onnx_export()  # either exporter: no symbolic for these ops
        or (_inductor_compiling() and _inductor.mode_for("batch_norm_act", x.device) == "fuse")
        or (backend != "triton" and not _native_passes_on(x))
        # torch.func (grad, vjp, jvp, vmap, ...) and forward AD: the graph ops' generated
        # Functions take no transform and have no jvp, and the ops no vmap rule (jvp gave
        # wrong tangents); F.batch_norm takes them all, as in nn.BatchNorm2d
        or torch._C._are_functorch_transforms_active()
        or _forward_ad._current_level >= 0
    ):
        return _unfused(x, running_mean, running_var, weight, bias, training, momentum, eps, act, act_params, backend)
    if backend not in (None, "native", "triton"):
        raise ValueError(f"{op}: unknown backend {backend!r}: native (default), triton or eager")
    passes = backend or "native"
    if _plain_eager(x, weight, bias, running_mean, running_var, *act_params):
        if _one_call(x, passes):  # the same ops from a C++ Function (csrc/fast_path.cpp)
            kernel_act = _kernel_act(act, beta, act_beta)
            y = _C.fast.batch_norm_act(
                x, running_mean, running_var, weight, bias, training, momentum, eps, kernel_act, beta, p1, p2, act_beta
            )
            if y is not None:
                return y
        return _EagerBatchNormAct.apply(
            x, weight, bias, p1, p2, act_beta, running_mean, running_var, training, momentum, eps, act, beta, passes
        )
    mean, invstd = _batch_norm_stats(x.detach(), running_mean, running_var, training, momentum, eps, passes)
    return _batch_norm_act(x, mean, invstd, weight, bias, training, eps, act, beta, p1, p2, act_beta, passes)


_fast_checked = traced_as_declined(_C.fast.batch_norm_act_checked)


_CUDA_BUILT = bool(_C.build_info()["cuda"])


def _native_passes_on(x: Tensor) -> bool:
    """Whether the native passes run x: on the CPU; on CUDA when built with it and
    fusedact.config.cuda_bn_passes is set (off until measured on a GPU)."""
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and _CUDA_BUILT and config.cuda_bn_passes


def _unfused(x, running_mean, running_var, weight, bias, training, momentum, eps, act, act_params, backend):
    """F.batch_norm, then the activation's function: what ONNX export translates
    (BatchNormalization, then the activation's ONNX form) and what Inductor fuses under
    torch.compile; backend="eager": the reference."""
    from . import functional

    z = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    kw = {} if backend is None else {"backend": backend}
    if act == "identity":
        return z
    if act == "acon_c":
        p1, p2, b = act_params
        b = b.reshape(-1) if b.numel() == x.shape[1] else b.reshape(x.shape[0], x.shape[1])
        return functional.acon_c(z, p1.reshape(-1), p2.reshape(-1), b, channel_dim=1, **kw)
    return getattr(functional, act)(z, *act_params, **kw)


# ---- the synced form (nn.SyncBatchNorm + activation): statistics over a process group


def _gathered_stats(x, group):
    """(mean, biased var, count) of x's channels over the process group: each rank's
    (mean, var, count) all-gathered in float64 and combined in rank order (the same
    result on every rank)."""
    import torch.distributed as dist

    C = x.shape[1]
    if x.numel() == 0:  # an empty local batch counts 0, as nn.SyncBatchNorm's, and still joins the gather
        mean = var = x.new_zeros((C,), dtype=_opmath(x))
    else:
        mean, var = _local_stats(x, "native")
    local = torch.cat([mean.double(), var.double(), mean.new_full((1,), x.numel() // C, dtype=torch.float64)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    g = torch.stack(parts)
    n = g[:, -1:]
    total = n.sum()
    m = (n * g[:, :C]).sum(0) / total
    v = (n * (g[:, C : 2 * C] + (g[:, :C] - m) ** 2)).sum(0) / total
    return m.to(mean.dtype), v.to(var.dtype), int(total.item())


class _SyncBatchNormAct(torch.autograd.Function):
    """The fused op with the statistics of the whole process group (nn.SyncBatchNorm's
    sync_batch_norm): the forward all-gathers the per-rank statistics, the backward
    all-reduces the two per-channel sums dx needs. First derivatives only, as there."""

    @staticmethod
    def forward(ctx, x, weight, bias, p1, p2, act_beta, running_mean, running_var, momentum, eps, act, beta, group):
        mean, var, total = _gathered_stats(x, group)
        ctx.group, ctx.total = group, total
        if total == 0:  # every rank's batch empty: as nn.BatchNorm2d's on one, nothing moves
            ctx.save_for_backward(x, weight, bias, p1, p2, act_beta)
            return x.new_empty(x.shape)
        _update_running(running_mean, running_var, mean, var, total, momentum)
        invstd = torch.rsqrt(var + eps)
        _save(ctx, x, mean, invstd, weight, bias, True, eps, act, beta, p1, p2, act_beta, "native")
        return _forward_pass(x, mean, invstd, weight, bias, act, beta, p1, p2, act_beta, "native")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        import torch.distributed as dist

        if ctx.total == 0:  # the same on every rank: no collective; zero gradients, dx empty
            inputs = ctx.saved_tensors
            zeros = [None if t is None else torch.zeros_like(t) for t in inputs]
            return (*_needed(zeros, inputs, ctx.needs_input_grad), None, None, None, None, None, None, None)

        def reduce(s_xm, s_dz):
            both = torch.cat([s_xm, s_dz])
            dist.all_reduce(both, group=ctx.group)
            return both[: s_xm.numel()], both[s_xm.numel() :], ctx.total

        def synced(*args):
            return _backward_passes(*args, reduce=reduce)

        outs, (x, weight, bias, _, _, p1, p2, act_beta) = _gradients(ctx, grad, synced)
        grads = _needed(outs, (x, weight, bias, p1, p2, act_beta), ctx.needs_input_grad)
        return (*grads, None, None, None, None, None, None, None)


def sync_batch_norm_act(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: float,
    eps: float,
    act: str,
    *act_params,
    group=None,
) -> Tensor:
    """batch_norm_act in training with the statistics of the process group ``group``
    (default: the world), as nn.SyncBatchNorm then the activation: the running statistics
    get the group's mean and unbiased variance, and dx sums over the group. The fused
    passes are CPU kernels: x on another device takes F.batch_norm's synced path."""
    op = "fusedact.sync_batch_norm_act"
    _check(op, x, running_mean, running_var, weight, bias, True, act, act_params)
    if x.device.type != "cpu":
        raise ValueError(f"{op}: the fused synced passes are CPU kernels; use nn.SyncBatchNorm for {x.device}")
    beta, p1, p2, act_beta = reference.split_act_params(act, act_params)
    return _SyncBatchNormAct.apply(
        x, weight, bias, p1, p2, act_beta, running_mean, running_var, momentum, eps, act, beta, group
    )

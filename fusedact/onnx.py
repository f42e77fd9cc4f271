"""ONNX export of the fused ops as standard ONNX operators, installed by ``import fusedact``.

- ``torch.onnx.export(..., dynamo=True)``: while the exporter traces the model
  (``exporting()``), fusedact's functions and modules run their eager forms
  (fusedact.reference: aten.mish, aten.hardswish, sigmoid and mul), which the exporter's
  own translations turn into ONNX's Mish (opset 18+), HardSwish, Sigmoid, Mul, Sub, Add.
  A graph that already holds the fused ops (an ExportedProgram from torch.export, or
  direct ``torch.ops.fusedact.*`` calls) is decomposed first:
  ``ep.run_decompositions(fusedact.onnx.decompositions())``.
  Nothing goes into ``torch._decomp.decomposition_table``: Inductor refuses, under a
  ``CI`` environment variable (GitHub Actions sets it), to compile an op that has a
  global decomposition but no lowering ("make_fallback(...): a decomposition exists").
- ``dynamo=False`` (TorchScript): symbolic functions for every forward op, for opset
  9 and later (Mish from opset 18, HardSwish from 14, their eager forms below that).
ACON-C's parameters become initializers (or graph inputs' arithmetic, for Meta-ACON's
computed beta), reshaped to broadcast against x.
"""

from __future__ import annotations

import torch
import torch.onnx

from ._opinfo import OPS

__all__ = ["install", "decompositions", "exporting"]

try:  # the flag torch.onnx.export(dynamo=True) sets while it runs; a module attribute read
    from torch.onnx._internal.exporter import _flags as _export_flags
except ImportError:  # pragma: no cover  (a torch without it: the public, slower question)
    _export_flags = None


def exporting() -> bool:
    """Whether ``torch.onnx.export(..., dynamo=True)`` is running. (The public
    ``torch.onnx.is_in_onnx_export()`` costs about 0.9 us a call, a quarter of an op
    call; this reads the flag it reads.)"""
    if _export_flags is None:
        return torch.onnx.is_in_onnx_export()
    return _export_flags._is_onnx_exporting


# ---- dynamo=True: decompositions into the eager ops


_DECOMPOSITIONS = {op.forward: op.onnx_form for op in OPS}  # fusedact/_opinfo.py


# ---- dynamo=False: TorchScript symbolic functions


def _opset() -> int:
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    return GLOBALS.export_onnx_opset_version


def _const(g, value: float, like):
    """A scalar constant of like's ONNX element type."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    dtype = symbolic_helper._try_get_scalar_type(like)
    tensor = torch.tensor(value, dtype=dtype.dtype() if dtype is not None else torch.float32)
    return g.op("Constant", value_t=tensor)


def _swish_symbolic(g, x, beta, beta_tensor):
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    if symbolic_helper._is_none(beta_tensor):
        b = _const(g, symbolic_helper._parse_arg(beta, "f"), x)
    else:
        b = g.op("Cast", beta_tensor, to_i=_onnx_type(x))
    return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", b, x)))


def _onnx_type(x) -> int:
    from torch.onnx._internal.torchscript_exporter import _type_utils

    return _type_utils.JitScalarType.from_value(x).onnx_type()


def _mish_symbolic(g, x):
    if _opset() >= 18:
        return g.op("Mish", x)
    return g.op("Mul", x, g.op("Tanh", g.op("Softplus", x)))


def _hard_swish_symbolic(g, x):
    if _opset() >= 14:
        return g.op("HardSwish", x)
    return g.op("Mul", x, g.op("HardSigmoid", x, alpha_f=1.0 / 6, beta_f=0.5))


def _channel_axes(g, p, rank: int, keep: tuple[int, ...]):
    """p unsqueezed to ``rank`` dimensions, its own at the axes ``keep``."""
    axes = [d for d in range(rank) if d not in keep]
    if not axes:
        return p
    if _opset() >= 13:
        return g.op("Unsqueeze", p, g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64)))
    return g.op("Unsqueeze", p, axes_i=axes)


def _acon_c_symbolic(g, x, p1, p2, beta, channel_dim):
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(x)
    if rank is None:
        raise RuntimeError("fusedact.acon_c: ONNX export needs x's rank to be known")
    cd = symbolic_helper._parse_arg(channel_dim, "i") % rank

    def per_channel(p):
        return _channel_axes(g, p, rank, (cd,)) if symbolic_helper._get_tensor_rank(p) == 1 else p

    b_rank = symbolic_helper._get_tensor_rank(beta)
    b = _channel_axes(g, beta, rank, (0, cd)) if (b_rank == 2 and rank != 2) else per_channel(beta)
    t = _onnx_type(x)
    p1, p2, b = (g.op("Cast", v, to_i=t) for v in (per_channel(p1), per_channel(p2), b))
    d = g.op("Sub", p1, p2)
    s = g.op("Sigmoid", g.op("Mul", b, g.op("Mul", d, x)))
    return g.op("Mul", x, g.op("Add", g.op("Mul", d, s), p2))


_SYMBOLICS = {
    "swish_forward": _swish_symbolic,
    "mish_forward": _mish_symbolic,
    "hard_swish_forward": _hard_swish_symbolic,
    "acon_c_forward": _acon_c_symbolic,
}


def decompositions(namespace: str = "fusedact") -> dict:
    """``{op overload: eager form}`` for ``namespace``'s forward ops ("fusedact", or
    "fusedact_triton"), for ``ExportedProgram.run_decompositions`` before
    ``torch.onnx.export`` of a graph that holds the fused ops."""
    ops = getattr(torch.ops, namespace)
    return {getattr(ops, name).default: form for name, form in _DECOMPOSITIONS.items()}


def install(namespace: str) -> None:
    """Registers the TorchScript exporter's symbolic functions of ``namespace``'s forward ops."""
    for name in _DECOMPOSITIONS:
        torch.onnx.register_custom_op_symbolic(f"{namespace}::{name}", _SYMBOLICS[name], 9)

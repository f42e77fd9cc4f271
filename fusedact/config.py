"""Run-time settings of fusedact.

``fusedact.config.compile`` (env ``FUSEDACT_COMPILE``): what Inductor does with the fused
ops when ``torch.compile`` compiles a graph that holds them.

- ``"fuse"``: Inductor decomposes each op into aten ops (docs/SPEC.md's math, the kernels'
  edge conventions) and fuses them with their neighbours; the min-cut partitioner may
  then recompute the activation's input instead of saving it.
- ``"kernel"``: our kernels stay opaque calls in the compiled graph.
- ``"auto"`` (the default): per op and device type, whichever of the two measured
  faster (``fusedact._inductor.AUTO``; benchmarks/NOTES.md has the numbers).

``fusedact.config.cuda_bn_passes`` (env ``FUSEDACT_CUDA_BN_PASSES=1``): whether
``batch_norm_act`` on a CUDA tensor with the native backend runs the fused passes
(``torch.ops.fusedact.bn_moments`` / ``bn_act_forward`` / ``bn_act_backward`` / ``bn_dx``,
the statistics and per-channel arithmetic composed on the device). False, the default
until they have been measured on a GPU: F.batch_norm then the activation's kernel.

The compile choice is made when a graph is compiled: a function already compiled keeps its
choice until ``torch._dynamo.reset()``. The setting is part of the key of torch.compile's
caches (``torch.compiler.config.cache_key_tag`` gets ``fusedact.compile=<mode>`` beside
any tag of the user's), so no cached graph of another mode is served. Both choices
compute the same function; only speed and memory differ. Eager mode, torch.export and
ONNX export never read it.
"""

from __future__ import annotations

import os
import sys
import types

COMPILE_MODES = ("auto", "fuse", "kernel")


def _checked_mode(value, where: str) -> str:
    if value not in COMPILE_MODES:
        raise ValueError(f"fusedact.config.compile: {where} must be one of {COMPILE_MODES}, got {value!r}")
    return value


class _Config(types.ModuleType):
    """The module itself, so that an assignment is checked when it is made."""

    def __setattr__(self, name, value):
        if name == "compile":
            value = _checked_mode(value, "compile")
        super().__setattr__(name, value)
        inductor = sys.modules.get("fusedact._inductor")
        if name == "compile" and inductor is not None:
            inductor.tag_caches()


compile = _checked_mode(os.environ.get("FUSEDACT_COMPILE", "auto"), "FUSEDACT_COMPILE")
cuda_bn_passes = os.environ.get("FUSEDACT_CUDA_BN_PASSES", "0") == "1"

sys.modules[__name__].__class__ = _Config

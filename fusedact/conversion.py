"""fusedact.convert: swap a model's activation modules for fusedact's, in place.

What is replaced, and by what:
- ``torch.nn.SiLU`` -> ``fusedact.nn.Swish()`` (beta = 1), ``torch.nn.Mish`` ->
  ``Mish``, ``torch.nn.Hardswish`` -> ``HardSwish``; timm's own ``Swish``, ``Mish``,
  ``HardSwish`` and their ``...Me`` variants likewise. Exact classes only: a subclass
  may compute something else.
- ACON-C modules (the ACON paper's and YOLOv5's ``AconC``): a class whose name contains
  "acon", with exactly the parameters ``p1``, ``p2`` and ``beta``, all of one shape with
  C elements along a single axis: (1, C, 1, 1) for NCHW, (1, 1, C) for (N, L, C) input.
  -> ``fusedact.nn.AconC`` over the same Parameter objects.
- Meta-ACON modules (their ``MetaAconC``): a class whose name contains "acon", with
  exactly the parameters ``p1`` and ``p2`` of shape (1, C, 1, ...), 1x1 convolutions
  ``fc1`` and ``fc2`` (Conv1d or Conv2d), optionally BatchNorms ``bn1`` and ``bn2``,
  and no other child with parameters (an ``nn.Sigmoid`` is fine). -> ``fusedact.nn.MetaAconC``
  over the same p1, p2 and the same fc1, bn1, fc2, bn2 modules:
  beta = sigmoid(bn2(fc2(bn1(fc1(spatial mean of x))))).

A module whose class name contains "acon" and which has a parameter p1 or p2 but not
one of these shapes is left as it is, with a warning. Parameters are the same objects after conversion, so
an optimizer built before it still holds them, and state_dict keys do not change.
In-place activations (``inplace=True``) become out-of-place ones: the output is the
same tensor values; only code that reads the input after the call would see a
difference. A module with hooks (forward, backward or state_dict hooks registered on it)
is left as it is, with a warning, and is not fused with its neighbour: the new module
would not run them, or not with the values they saw.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import nn as fnn
from ._opinfo import OPS
from .functional import _backend

__all__ = ["convert"]

# (module, class name) of the plain activations, by what replaces them: each entry's
# ``replaces`` and ``module`` (fusedact/_opinfo.py)
_PLAIN = {where: getattr(fnn, op.module[0]) for op in OPS for where in op.replaces}
_FUSEDACT = (fnn.Swish, fnn.Mish, fnn.HardSwish, fnn.AconC, fnn.MetaAconC)


def _channel_axis(shape) -> int | None:
    """The one axis of a parameter shape that is not 1 (1 when every axis is 1)."""
    axes = [d for d, n in enumerate(shape) if n != 1]
    if len(axes) > 1 or not shape:
        return None
    return axes[0] if axes else min(1, len(shape) - 1)


def _own_params(m: nn.Module) -> dict:
    return dict(m.named_parameters(recurse=False))


def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def _as_acon_c(m: nn.Module, backend) -> nn.Module | str:
    params = _own_params(m)
    p1, p2, beta = params["p1"], params["p2"], params["beta"]
    if not (p1.shape == p2.shape == beta.shape):
        return f"p1, p2 and beta have different shapes ({tuple(p1.shape)}, {tuple(p2.shape)}, {tuple(beta.shape)})"
    axis = _channel_axis(p1.shape)
    if axis is None:
        return f"its parameters' shape {tuple(p1.shape)} has more than one axis that is not 1"
    if any(_has_params(c) for c in m.children()):
        return "it has child modules with parameters"
    channel_dim = 1 if axis == 1 else axis - p1.dim()  # (1, 1, C): the last axis of x
    return _adopt(fnn.AconC(p1.numel(), channel_dim=channel_dim, backend=backend), m, ("p1", "p2", "beta"))


def _adopt(new: nn.Module, old: nn.Module, names) -> nn.Module:
    """new with old's parameters and child modules of these names (the same objects), in
    old's registration order: model.parameters() keeps its order, which an optimizer
    state_dict loaded by position depends on."""
    for name in names:
        if hasattr(new, name):
            delattr(new, name)
    for registry in (old._parameters, old._modules):
        for name, value in registry.items():
            if name in names:
                setattr(new, name, value)
    for name in names:
        if not hasattr(new, name):  # bn1, bn2 that old does not have
            setattr(new, name, None)
    return new


def _is_1x1_conv(c) -> bool:
    return isinstance(c, (nn.Conv1d, nn.Conv2d)) and all(k == 1 for k in c.kernel_size) and c.groups == 1


def _as_meta_acon_c(m: nn.Module, backend) -> nn.Module | str:
    params = _own_params(m)
    p1, p2 = params["p1"], params["p2"]
    children = dict(m.named_children())
    if p1.shape != p2.shape or _channel_axis(p1.shape) != 1:
        return f"p1 and p2 must share a shape (1, C, 1, ...), got {tuple(p1.shape)} and {tuple(p2.shape)}"
    fc1, fc2 = children.get("fc1"), children.get("fc2")
    if not (_is_1x1_conv(fc1) and _is_1x1_conv(fc2) and type(fc1) is type(fc2)):
        return "fc1 and fc2 are not 1x1 convolutions of one kind"
    bns = {name: children.get(name) for name in ("bn1", "bn2")}
    if any(bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm) for bn in bns.values()):
        return "bn1 or bn2 is not a BatchNorm"
    others = [name for name, c in children.items() if name not in ("fc1", "fc2", "bn1", "bn2") and _has_params(c)]
    if others:
        return f"it has other child modules with parameters: {others}"
    C = p1.numel()
    if fc1.in_channels != C or fc2.out_channels != C:
        return f"fc1/fc2 do not map {C} channels to {C}"
    return _adopt(fnn.MetaAconC(C, backend=backend), m, ("p1", "p2", "fc1", "bn1", "fc2", "bn2"))


_HOOKS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _hooks(m) -> list[str]:
    """The kinds of hook registered on module m itself (empty for None)."""
    return [name.strip("_") for name in _HOOKS if getattr(m, name, None)]


def _global_hooks() -> list[str]:
    """The kinds of global module hook registered (torch.nn.modules.module's
    register_module_forward_hook and friends), which run on every module."""
    mod = nn.modules.module
    kinds = ("forward_pre", "forward", "backward_pre", "backward")
    return [f"global_{k}_hooks" for k in kinds if getattr(mod, f"_global_{k}_hooks", None)]


def _fused_pair(m: nn.Module) -> bool:
    """Whether m is a fusedact BatchNormAct whose op runs its activation (not "identity",
    nor an activation it calls after the op as a module, whose hooks still run)."""
    return isinstance(m, fnn._BatchNormActMixin) and fnn._act_call(m.act)[0] != "identity"


def _unhooked(m, warned: set | None = None) -> bool:
    """Whether m has no hooks; warns (once for each module in ``warned``) where it has:
    a replacement, or a pair fused into one op, would drop them or run them on other
    values."""
    kinds = _hooks(m)
    if kinds and (warned is None or id(m) not in warned):
        if warned is not None:
            warned.add(id(m))
        t = type(m)
        warnings.warn(
            f"fusedact.convert: left {t.__module__}.{t.__qualname__} as it is: it has hooks ({', '.join(kinds)})",
            stacklevel=2,
        )
    return not kinds


def _replacement(m: nn.Module, backend) -> nn.Module | None:
    """What replaces m, or None to keep it (and look inside it)."""
    t = type(m)
    plain = _PLAIN.get((t.__module__, t.__name__))
    if plain is not None:
        return plain(backend=backend) if _unhooked(m) else None
    if "acon" not in t.__name__.lower():
        return None
    names = set(_own_params(m))
    if not names & {"p1", "p2"}:
        return None  # a container named so (an "AconNet"): look inside
    if not _unhooked(m):
        return None
    if names == {"p1", "p2", "beta"}:
        new = _as_acon_c(m, backend)
    elif names == {"p1", "p2"}:
        new = _as_meta_acon_c(m, backend)
    else:
        new = f"its parameters are {sorted(names)}, not p1, p2, beta (ACON-C) or p1, p2 with fc1, fc2 (Meta-ACON)"
    if isinstance(new, str):
        warnings.warn(f"fusedact.convert: left {t.__module__}.{t.__qualname__} as it is: {new}", stacklevel=3)
        return None
    return new.train(m.training)


def _fusible(act, learnable: bool = False) -> bool:
    """An activation batch_norm_act runs in its pass, with the native backend: with no
    parameters, or (``learnable``: where its parameters keep their state_dict keys)
    ACON-C over the channels. Meta-ACON's beta comes from the activation's input, which
    the fused op never forms: it stays apart."""
    if type(act) is fnn.AconC:
        return learnable and act.channel_dim == 1 and act.backend in (None, "native")
    return (
        type(act) in (fnn.Swish, fnn.Mish, fnn.HardSwish)
        and next(act.parameters(), None) is None
        and act.backend in (None, "native")
    )


def _fusible_in_place(act) -> bool:
    """_fusible with learnable ACON-C, or nn.Identity: where the pair is one module whose
    keys stay (ultralytics' Conv with act=False, timm's BatchNormAct2d with
    apply_act=False), a BatchNorm alone runs as batch_norm_act's "identity", whose passes
    ran 1.3-2.5x nn.BatchNorm2d's training step at MobileNetV3's projection shapes
    (0.9x at (8, 160, 7, 7); benchmarks/NOTES.md)."""
    return type(act) is nn.Identity or _fusible(act, learnable=True)


def _is_bn(m, dims=(1, 2)) -> bool:
    return (
        (type(m) is nn.BatchNorm2d and 2 in dims)
        or (type(m) is nn.BatchNorm1d and 1 in dims)
        or type(m) is nn.SyncBatchNorm
    )


def _bn_act(bn, act, own_act: bool = True):
    cls = {nn.BatchNorm2d: fnn.BatchNormAct2d, nn.BatchNorm1d: fnn.BatchNormAct1d}.get(type(bn), fnn.SyncBatchNormAct)
    return cls.from_modules(bn, act, own_act=own_act)


def _conv_bn_act(m, x):
    """ultralytics' Conv.forward, act(bn(conv(x))), with bn a BatchNormAct2d holding act."""
    return m.bn(m.conv(x))


_FUSED_CONV: dict[type, type] = {}


def _fused_conv_class(base: type) -> type:
    """``base`` (an ultralytics Conv class) with a class-level forward bn(conv(x)), of the
    same name so the model prints as before. Class-level, not an instance ``m.forward``:
    Dynamo guards the hook dicts of every module with an instance forward (1.4 vs 1.0 ms of
    guards a compiled YOLO11n step, benchmarks/NOTES.md)."""
    cls = _FUSED_CONV.get(base)
    if cls is None:
        attrs = {"forward": _conv_bn_act, "__reduce_ex__": _reduce_fused_conv, "_fusedact_base": base}
        cls = _FUSED_CONV[base] = type(base.__name__, (base,), {"__module__": __name__, **attrs})
    return cls


def _new_fused_conv(base: type) -> nn.Module:
    cls = _fused_conv_class(base)
    return cls.__new__(cls)


def _reduce_fused_conv(self, protocol):
    # pickle and deepcopy rebuild the class from its base: it is not importable by name
    return _new_fused_conv, (type(self)._fusedact_base,), self.__getstate__()


def _ultralytics_conv_forward():
    import sys

    mod = sys.modules.get("ultralytics.nn.modules.conv")
    return getattr(getattr(mod, "Conv", None), "forward", None)


def _fuse_bn(model: nn.Module) -> nn.Module:
    """BatchNorm directly followed by an activation, as one BatchNormAct: in an
    nn.Sequential; ultralytics' Conv family (a class whose forward is Conv.forward,
    act(bn(conv(x)))), whose class becomes a subclass with forward bn(conv(x)) and the act
    inside bn, so that ultralytics' fuse() (which folds bn into conv and sets the instance
    forward to act(conv(x))) stays right and isinstance checks hold; timm's
    BatchNormAct2d without dropout, whatever its act (one outside batch_norm_act's, e.g.
    nn.ReLU, runs after the op's "identity"). Every other nn.BatchNorm2d (exact class)
    becomes a BatchNormAct2d "identity", whatever follows it: the op's statistics and
    normalization ran 1.4-2.7x nn.BatchNorm2d's training step at ResNet's shapes, and in
    eval it calls F.batch_norm as nn.BatchNorm2d does. State_dict keys do not change.
    A module with hooks is left as it is (_unhooked), and its pair is not fused."""
    conv_forward = _ultralytics_conv_forward()
    seen = set()
    lone: dict[int, nn.Module] = {}
    warned: set[int] = set()  # modules with hooks, left apart (_unhooked)

    def visit(m):
        if id(m) in seen or isinstance(m, _FUSEDACT):  # MetaAconC's BatchNorms see (N, C, 1, 1)
            return m
        seen.add(id(m))
        t = type(m)
        if (
            (t.__module__, t.__name__) == ("timm.layers.norm_act", "BatchNormAct2d")
            and type(m.drop) is nn.Identity
            # m.act's keys are act.* here and there; one outside the op runs after it
            and (_fusible_in_place(m.act) or fnn._act_runs_after(m.act))
            and not isinstance(m, fnn.BatchNormAct2d)
            and _unhooked(m, warned)
            and (fnn._act_runs_after(m.act) or _unhooked(m.act, warned))  # one after runs as a module
        ):
            return fnn.BatchNormAct2d.from_modules(m, m.act)
        if (
            conv_forward is not None
            and getattr(t, "forward", None) is conv_forward
            and _is_bn(getattr(m, "bn", None), (2,))
            and _fusible_in_place(getattr(m, "act", None))
            and _unhooked(m.bn, warned)
            and _unhooked(m.act, warned)
        ):
            m.bn = _bn_act(m.bn, m.act, own_act=False)  # m.act stays m's child: the same keys
            m.__class__ = _fused_conv_class(t)
        if isinstance(m, nn.Sequential):
            keys = list(m._modules)
            for a, b in zip(keys, keys[1:]):
                if (
                    _is_bn(m._modules[a])
                    and _fusible(m._modules[b])
                    and _unhooked(m._modules[a], warned)
                    and _unhooked(m._modules[b], warned)
                ):
                    m._modules[a] = _bn_act(m._modules[a], m._modules[b])
                    m._modules[b] = nn.Identity()
        for name, child in list(m._modules.items()):
            if type(child) is nn.BatchNorm2d and _unhooked(child, warned):  # any other: in the op's identity pass
                if id(child) not in lone:  # a module shared in several places stays shared
                    lone[id(child)] = _bn_act(child, nn.Identity())
                setattr(m, name, lone[id(child)])
            elif child is not None:
                new = visit(child)
                if new is not child:
                    setattr(m, name, new)
        return m

    return visit(model)


def convert(model: nn.Module, *, backend: str | None = None, fuse_bn: bool = True) -> nn.Module:
    """Replaces, in place, every SiLU, Mish, Hardswish and ACON-C / Meta-ACON module in
    ``model`` by its fusedact module (see this module's docstring for the exact rules),
    keeping their parameters, and returns the model. ``backend`` is that of the new
    modules, and is given to the fusedact modules already there when it is not None.
    ``fuse_bn``: a BatchNorm directly followed by a parameter-free activation (or ACON-C
    in ultralytics' Conv and timm's BatchNormAct2d) becomes one
    fusedact.nn.BatchNormAct2d/1d, and every other nn.BatchNorm2d a BatchNormAct2d
    "identity" (its statistics and normalization in the op; see _fuse_bn); False keeps
    every BatchNorm as it is.

    Only modules are converted: activations called as functions inside a forward
    (``F.silu(x)``) stay as they are. When ``model`` itself is such a module, the
    replacement is returned (and ``model`` is unchanged).
    """
    if backend is not None:
        _backend(backend)  # a clear error for an unknown name, before anything changes
    memo: dict[int, nn.Module] = {}  # a module shared in several places stays shared

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if isinstance(m, _FUSEDACT):
            if backend is not None:
                m.backend = backend
            memo[id(m)] = m
            return m
        new = _replacement(m, backend)
        if new is not None:
            memo[id(m)] = new
            return new
        memo[id(m)] = m
        for name, child in list(m._modules.items()):  # named_children() skips repeats
            if child is None:
                continue
            replaced = visit(child)
            if replaced is not child:
                setattr(m, name, replaced)
        return m

    model = visit(model)
    if not fuse_bn:
        return model
    global_hooks = _global_hooks()
    if not global_hooks:
        return _fuse_bn(model)
    before = set(model.modules())  # the modules themselves: a freed one's id may come back
    model = _fuse_bn(model)
    if any(_fused_pair(m) and m not in before for m in model.modules()):
        warnings.warn(  # they now run on the fused modules instead of the pairs
            f"fusedact.convert: global module hooks are registered ({', '.join(global_hooks)}); after "
            "convert they run on each fused BatchNormAct2d (the activation's output) where they ran on "
            "the BatchNorm and its activation apart (fuse_bn=False keeps the pairs)",
            stacklevel=2,
        )
    return model

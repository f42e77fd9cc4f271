"""Autograd of the fused ops, registered on the ops themselves.

Every ``<ns>::<act>_forward`` and ``<act>_backward`` op (ns: ``fusedact`` for the
C++/CUDA kernels, ``fusedact_triton`` for Triton) gets an Autograd kernel that applies
an ``autograd.Function`` when a gradient is wanted and otherwise goes straight to the
backend kernel. So ``torch.ops.fusedact.*`` are differentiable by themselves, and the
functional API, the modules, opcheck, torch.compile, torch.export and the torch.func
transforms all go through one path.

- The forward Functions save their inputs only (x and the parameters); their backward
  is the fused backward op, which recomputes what it needs.
- The backward ops are differentiable too (second derivatives, ``create_graph=True``):
  their Function's backward is the vector-Jacobian product of the eager reference's
  first derivatives, taken with ``torch.func`` (partial derivatives, so a parameter
  computed from x, as in Meta-ACON, is handled), itself differentiable again. Without
  ``create_graph`` the backward op runs the kernel and records nothing.
- torch.func: the Functions define ``setup_context`` and a ``vmap`` rule
  (fusedact/_vmap.py) that runs the fused kernels on the batched tensor; the same
  rules are the ops' own (``torch.library.register_vmap``). Inside a transform,
  fusedact applies the Functions from Python (``invoke``).
- Forward-mode AD (``jvp``): an elementwise op's Jacobian in x is diagonal, so its JVP
  in x is the fused backward op applied to the tangent; the parameters' part (few
  values, reduced in the backward) is the JVP of the eager reference in the
  parameters alone. The backward ops' JVP (forward-over-reverse, e.g. ``hessian``) is
  the reference's.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.autograd import Function, forward_ad

from . import config
from ._opinfo import OPS, OpInfo


def _fast_path_traced(*args):
    """What Dynamo traces in place of a C++ fast-path entry: None, the op's own way
    (torch.compile records the op). torch.export without Dynamo and the ONNX exporter
    trace FakeTensors, which the entry points decline themselves."""
    return None


def traced_as_declined(entry: Callable) -> Callable:
    """A C++ fast-path entry of csrc/fast_path.cpp (``_C.fast.*``) that Dynamo traces as
    declined (_fast_path_traced); with a torch without substitute_in_graph, a wrapper
    that asks Dynamo in Python, a call more."""
    try:
        torch.compiler.substitute_in_graph(entry, skip_signature_check=True)(_fast_path_traced)
        return entry
    except (AttributeError, TypeError):
        return lambda *args: None if torch.compiler.is_compiling() else entry(*args)


__all__ = ["ForwardOpFunction", "BackwardOpFunction", "register_autograd", "invoke"]

_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad
_functorch_active = torch._C._are_functorch_transforms_active


def _differentiating(args) -> bool:
    """A gradient is wanted: backward (grad mode and an input that requires grad), or
    forward AD (a dual level is open: its dual tensors do not require grad)."""
    return (torch.is_grad_enabled() and _any_requires_grad(*args)) or forward_ad._current_level >= 0


_TENSOR = object()


def _fill(template: list, tensors) -> list:
    """The tensors put back where ``template`` has a _TENSOR mark (see _save)."""
    it = iter(tensors)
    return [next(it) if a is _TENSOR else a for a in template]


def _save(ctx, args: tuple) -> None:
    """Saves the tensors of args (for backward and forward AD) and the rest as they are."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ctx.template = [_TENSOR if isinstance(a, torch.Tensor) else a for a in args]
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


def _saved_args(ctx) -> list:
    return _fill(ctx.template, ctx.saved_tensors)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _reference_second_order(ref: Callable, grad: torch.Tensor, primals: tuple, cotangents: tuple) -> tuple:
    """The VJP, at ``cotangents``, of first(grad, *primals) = the VJP of ``ref`` at
    ``primals`` with ``grad``: the gradients of (grad, *primals) in a double backward."""
    _, vjp = torch.func.vjp(_first_order(ref), grad, *primals)
    return vjp(tuple(cotangents))


def _first_order(ref: Callable) -> Callable:
    def first(g, *p):
        _, vjp = torch.func.vjp(ref, *p)
        return vjp(g)

    return first


def _jvp(fn: Callable, primals: tuple, tangents: tuple):
    """The JVP of the eager ``fn`` at ``primals``: torch.func.jvp inside a transform;
    outside one (torch.autograd.forward_ad, whose dual level is open and cannot nest)
    the double-VJP: the VJP at u is linear in u, and its gradient in u along the
    tangents is the JVP."""
    if _functorch_active():
        return torch.func.jvp(fn, primals, tangents)[1]
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in primals]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        us = [torch.zeros_like(o, requires_grad=True) for o in outs]
        vjps = torch.autograd.grad(outs, leaves, us, create_graph=True, allow_unused=True)
        used = [(v, t) for v, t in zip(vjps, tangents) if v is not None]
        jvps = torch.autograd.grad([v for v, _ in used], us, [t for _, t in used], allow_unused=True)
    jvps = tuple(j if j is not None else torch.zeros_like(o) for j, o in zip(jvps, outs))
    return jvps if isinstance(out, tuple) else jvps[0]


def _present(spec: OpInfo, args) -> list[int]:
    """The slots holding a tensor in this call (swish's beta_tensor may be None)."""
    return [s for s in spec.slots if args[s] is not None]


def _per_slot(spec: OpInfo, args, values, grad: torch.Tensor):
    """The backward op's outputs (or their tangents) from ``values``, one per present slot
    of args in order: one output per slot, an empty tensor where swish's beta_tensor is
    None (as the op returns), the single output of a one-slot op bare."""
    it = iter(values)
    outs = [next(it) if args[slot] is not None else grad.new_empty((0,)) for slot in spec.slots]
    return outs[0] if len(outs) == 1 else tuple(outs)


class _OpFunction(Function):
    """The common part of the ops' Functions. A per-op subclass (made by
    register_autograd from the registry) sets ``spec``, ``ops`` and ``op``; its
    ``forward``, ``setup_context``, ``backward`` and ``jvp`` are then this class's
    ``_forward`` ... with the subclass bound first (torch calls them as staticmethods).
    It also gets ``.plain``: the same Function in the older form, ``forward(ctx, *args)``,
    for plain autograd. Applying a Function with ``setup_context`` binds its arguments
    with inspect.signature on every call (about 15 us here); the older form does not."""

    spec: OpInfo  # the op's registry entry (fusedact/_opinfo.py)
    ops = None  # torch.ops.<namespace>
    op = None  # the OpOverload this Function applies

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "spec" not in cls.__dict__:  # ForwardOpFunction, BackwardOpFunction
            return
        methods = {name: functools.partial(getattr(cls, f"_{name}"), cls) for name in _METHODS}
        for name, method in methods.items():
            setattr(cls, name, staticmethod(method))

        def plain_forward(ctx, *args):
            methods["setup_context"](ctx, args, None)  # saves the inputs only: the output is not used
            return methods["forward"](*args)

        plain = {"forward": plain_forward, "backward": methods["backward"], "jvp": methods["jvp"]}
        cls.plain = type(
            cls.__name__,
            (Function,),
            {"__doc__": cls.__doc__, "__module__": __name__, **{k: staticmethod(v) for k, v in plain.items()}},
        )

    def _forward(cls, *args):
        with _below_autograd():  # what the op's Autograd kernel would do here, minus the round trip
            return cls.op(*args)

    def _setup_context(cls, ctx, inputs, output):
        _save(ctx, inputs)


_METHODS = ("forward", "setup_context", "backward", "jvp")


class ForwardOpFunction(_OpFunction):
    """A forward op with autograd: saves its inputs; its backward is the fused backward op."""

    def _fused_backward(cls, *args):
        return _as_tuple(invoke(cls.ops, f"{cls.spec.name}_backward", *args))

    def _backward(cls, ctx, grad):
        args = _saved_args(ctx)
        outs = ForwardOpFunction._fused_backward(cls, grad, *args)
        grads = [None] * len(args)
        for slot, g in zip(cls.spec.slots, outs):
            if args[slot] is not None:
                grads[slot] = g
        return tuple(grads)

    def _jvp(cls, ctx, *tangents):
        spec, args = cls.spec, _saved_args(ctx)
        x = args[0]
        out = None
        if tangents[0] is not None:
            out = ForwardOpFunction._fused_backward(cls, tangents[0], *args)[0]
        params = [s for s in _present(spec, args) if s != 0]
        if any(tangents[s] is not None for s in params):
            ref = spec.reference_of(args)
            primals = tuple(args[s] for s in params)
            dirs = tuple(tangents[s] if tangents[s] is not None else torch.zeros_like(args[s]) for s in params)
            part = _jvp(lambda *p: ref(x.detach(), *p), primals, dirs)
            out = part if out is None else out + part
        return out if out is not None else torch.zeros_like(x)


class BackwardOpFunction(_OpFunction):
    """A backward op, differentiable: its second derivative follows the eager reference."""

    def _primals(cls, args):
        present = _present(cls.spec, args)
        return present, tuple(args[s] for s in present)

    def _backward(cls, ctx, *cotangents):
        grad, *args = _saved_args(ctx)
        present, primals = BackwardOpFunction._primals(cls, args)
        cots = tuple(c for slot, c in zip(cls.spec.slots, cotangents) if args[slot] is not None)
        ggrad, *gprimals = _reference_second_order(cls.spec.reference_of(args), grad, primals, cots)
        grads = [None] * len(args)
        for slot, g in zip(present, gprimals):
            grads[slot] = g
        return (ggrad, *grads)

    def _jvp(cls, ctx, grad_t, *tangents):
        grad, *args = _saved_args(ctx)
        present, primals = BackwardOpFunction._primals(cls, args)
        dirs = tuple(
            t if t is not None else torch.zeros_like(p)
            for t, p in zip([grad_t] + [tangents[s] for s in present], (grad, *primals))
        )
        # forward AD's dual tensors may not overlap themselves: a stride-0 grad (of a
        # sum) or tangent is made dense first
        dense = tuple(t.contiguous() for t in (grad, *primals)), tuple(t.contiguous() for t in dirs)
        return _per_slot(cls.spec, args, _jvp(_first_order(cls.spec.reference_of(args)), *dense), grad)


_FUNCTORCH_KEYS = (
    torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)
    | torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchVmapMode)
)


def _in_jvp() -> bool:
    """A torch.func jvp (torch.func.jvp, jacfwd, hessian's forward-over-reverse) is on
    the transform stack."""
    jvp = torch._C._functorch.TransformType.Jvp
    return any(i.key() == jvp for i in (torch._C._functorch.get_interpreter_stack() or ()))


def _reference_call(spec: OpInfo, backward: bool, args):
    """The op's eager form at args: the forward op's output, or the backward op's
    (the VJP of the reference, one output per slot, empty for swish's absent beta)."""
    if not backward:
        return spec.reference_of(args)(*[args[s] for s in _present(spec, args)])
    grad, *rest = args
    values = _first_order(spec.reference_of(rest))(grad, *[rest[s] for s in _present(spec, rest)])
    return _per_slot(spec, rest, values, grad)


def _autograd_kernel(function: type, op, spec: OpInfo, backward: bool) -> Callable:
    """The op's Autograd kernel: the Function when a gradient is wanted, else the kernel."""
    after_autograd = torch._C._after_autograd_keyset

    def kernel(keyset, *args):
        if _functorch_active():
            if _in_jvp():
                # A direct call under a torch.func jvp: applying the Function from here
                # re-enters the Jvp interpreter, which fails a functorch internal assert
                # (jvp, jacfwd), or crashes the process (jvp over vjp, with a parameter
                # from outside the transforms). The op's eager form instead: its aten
                # ops carry every transform's rules (same function, same derivatives).
                return _reference_call(spec, backward, args)
            # A user's direct call of the op inside a torch.func transform: the
            # dispatcher reaches this kernel from inside the transform's layer, which has
            # excluded the functorch keys, where applying the Function fails. It is
            # applied with them included again, as if called from Python: enough for
            # grad, vjp, jacrev and vmap; fusedact's own calls go through invoke().
            with torch._C._ForceDispatchKeyGuard(
                torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set() - _FUNCTORCH_KEYS
            ):
                return function.apply(*args)
        if _differentiating(args):
            return function.plain.apply(*args)
        with _below_autograd():
            return op.redispatch(keyset & after_autograd, *args)

    return kernel


def _op_function(base: type, name: str, spec: OpInfo, ops, op, vmap) -> type:
    """The subclass of ``base`` for one op, its methods bound to it (_OpFunction)."""
    attrs = {"spec": spec, "ops": ops, "op": op, "vmap": staticmethod(vmap), "__module__": __name__}
    return type(name, (base,), {"__doc__": f"{spec.name}: {base.__doc__}", **attrs})


_LIBRARIES = []  # the registrations live as long as these do
_FUNCTIONS: dict[str, dict[str, tuple]] = {}  # namespace -> op name -> (OpOverload, Function)


def invoke(ops, op: str, *args):
    """``torch.ops.<ns>.<op>(*args)``, for fusedact's own calls (the functional API, the
    Functions' backward and jvp, the vmap rules), by the shortest way to the same result:
    - under torch.compile, the op itself (Dynamo records it; AOT autograd reaches its
      Autograd kernel);
    - inside a torch.func transform, or when a gradient is wanted, the op's Function,
      applied from Python: a transform sees it whole there (the Autograd kernel is
      reached from inside the transform's layer, see _autograd_kernel), and it skips
      the round trip through the dispatcher into the Python Autograd kernel;
    - otherwise the kernel below autograd, which the Autograd kernel would pick anyway.
    """
    overload, function = _FUNCTIONS[ops.name][op]
    if torch.compiler.is_compiling():
        # Dynamo guards on the value compared here: a compiled function recompiles when
        # fusedact.config.compile changes, which Inductor reads as it compiles the graph
        if config.compile == "kernel":
            return overload(*args)
        return overload(*args)
    if _functorch_active():
        return function.apply(*args)
    if _differentiating(args):
        return function.plain.apply(*args)
    with _below_autograd():
        return overload(*args)


def register_autograd(namespace: str, prefix: str = "") -> dict[str, type]:
    """Registers the Autograd kernels of every op in ``torch.ops.<namespace>``; returns
    their Functions by name (``MishOpFunction``, ``MishOpBackwardFunction``, ...),
    subclasses of ForwardOpFunction and BackwardOpFunction."""
    from ._vmap import vmap_rules

    ops = getattr(torch.ops, namespace)
    rules = vmap_rules(ops, invoke)
    op_rules = vmap_rules(ops, lambda ops, name, *args: getattr(ops, name)(*args))
    lib = torch.library.Library(namespace, "FRAGMENT")
    functions = {}
    for spec in OPS:  # fusedact/_opinfo.py
        forward_op = getattr(ops, f"{spec.name}_forward").default
        backward_op = getattr(ops, f"{spec.name}_backward").default
        camel = prefix + "".join(part.capitalize() for part in spec.name.split("_"))
        fwd = _op_function(
            ForwardOpFunction, f"{camel}OpFunction", spec, ops, forward_op, rules[f"{spec.name}_forward"]
        )
        bwd = _op_function(
            BackwardOpFunction, f"{camel}OpBackwardFunction", spec, ops, backward_op, rules[f"{spec.name}_backward"]
        )
        lib.impl(f"{spec.name}_forward", _autograd_kernel(fwd, forward_op, spec, False), "Autograd", with_keyset=True)
        lib.impl(f"{spec.name}_backward", _autograd_kernel(bwd, backward_op, spec, True), "Autograd", with_keyset=True)
        for op in (f"{spec.name}_forward", f"{spec.name}_backward"):  # the ops called directly under vmap
            torch.library.register_vmap(f"{namespace}::{op}", op_rules[op], lib=lib)
        functions[fwd.__name__] = fwd
        functions[bwd.__name__] = bwd
        _FUNCTIONS.setdefault(namespace, {}).update(
            {f"{spec.name}_forward": (forward_op, fwd), f"{spec.name}_backward": (backward_op, bwd)}
        )
    _LIBRARIES.append(lib)
    return functions

"""Gradient parity for your own test suite: prove that your model, converted with
``fusedact.convert``, gives the outputs and gradients the eager model gives, on your
torch, your device, your build.

    from fusedact.testing import assert_parity

    def test_my_model_fused_gradients():
        model = MyModel().train()
        assert_parity(model, torch.randn(8, 3, 64, 64))

``assert_parity`` deep-copies the model three times: the copy under test (converted),
the eager copy (as it is) and a float64 copy of the eager model (the truth). It runs
each forward and backward once, and compares every output, every input gradient and
every parameter gradient against the truth. The rule (the one fusedact's own tests
use): the relative error (2-norm) of the fused tensor is at most twice the eager
model's own relative error in the same dtype, plus half an ulp of float16/bfloat16 (the
error of rounding a float32 result once, which no implementation in that dtype can
avoid) or 4 ulp of float32/float64 (the kernels compute in that dtype, within a few ulp).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


__all__ = [
    "assert_parity",
    "ParityError",
    "ParityRow",
    "ParityReport",
    "check_no_less_accurate",
    "relative_error",
    "slack_for",
]


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """||actual - truth|| / ||truth|| in float64 (2-norms; NaN where actual has a NaN or
    inf that truth has not)."""
    truth = truth.detach().double()
    diff = actual.detach().double() - truth
    scale = truth.norm().clamp_min(1e-300)
    return (diff.norm() / scale).item()


@dataclass
class ParityRow:
    """One compared tensor. ``err`` and ``err_eager``: relative errors (2-norm) against
    the float64 truth; ``bound`` = 2 * err_eager + slack; ``max_abs``: the largest
    elementwise error; ``max_rel``: max_abs over the truth's largest magnitude."""

    name: str
    shape: tuple
    dtype: str
    err: float
    err_eager: float
    bound: float
    max_abs: float
    max_rel: float

    @property
    def judged(self) -> bool:
        """False when the eager model itself has no correct digit (relative error >= 1):
        the true value is below the dtype's rounding noise, as for the gradient of a bias
        followed by training-mode BatchNorm, which is exactly zero. Such a tensor is
        reported, and only required to be finite where the eager one is."""
        return self.err_eager < 1

    @property
    def ok(self) -> bool:
        if not self.judged:
            return math.isfinite(self.err) or not math.isfinite(self.err_eager)
        return self.err <= self.bound  # False for NaN

    @property
    def ratio(self) -> float:
        """err / bound: over 1 fails; NaN counts as the worst."""
        if not self.ok:
            return math.inf if math.isnan(self.err) or not self.judged else self.err / self.bound
        if not self.judged:
            return 0.0
        return self.err / self.bound if self.bound > 0 else (math.inf if self.err > 0 else 0.0)


class ParityReport(list):
    """The ParityRows of one comparison, printable as a table."""

    def worst(self, k: int = 5) -> list[ParityRow]:
        return sorted(self, key=lambda r: r.ratio, reverse=True)[:k]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self)

    def as_dicts(self) -> list[dict]:
        return [dict(asdict(r), ok=r.ok, judged=r.judged) for r in self]

    def table(self, rows: Iterable[ParityRow] | None = None) -> str:
        rows = list(self if rows is None else rows)
        width = max([len("tensor")] + [len(r.name) for r in rows])
        lines = [f"{'tensor':<{width}}  {'rel err':>9}  {'eager':>9}  {'bound':>9}  {'max abs':>9}  {'max rel':>9}  ok"]
        for r in rows:
            lines.append(
                f"{r.name:<{width}}  {r.err:9.3g}  {r.err_eager:9.3g}  {r.bound:9.3g}  "
                f"{r.max_abs:9.3g}  {r.max_rel:9.3g}  {('yes' if r.judged else 'noise') if r.ok else 'NO'}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _row(
    name: str, actual: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor, slack: float, eager_scale: float = 1.0
) -> ParityRow:
    truth = truth.detach().double()
    diff = (actual.detach().double() - truth).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    top = truth.abs().max().item() if truth.numel() else 0.0
    # float64: the float32 run's error scaled by eps64 / eps32 (errors linear in the unit
    # roundoff), but only while that run has a correct digit: below float32's noise (an
    # exact zero, whose float64 value is noise as well) noise against noise is about 1 in
    # any precision, and the scaled figure would judge noise by a coin flip near 1
    err_baseline = relative_error(baseline, truth)
    err_eager = err_baseline * eager_scale if err_baseline < 1 else err_baseline
    return ParityRow(
        name=name,
        shape=tuple(actual.shape),
        dtype=str(actual.dtype).replace("torch.", ""),
        err=relative_error(actual, truth),
        err_eager=err_eager,
        bound=2 * err_eager + slack,
        max_abs=max_abs,
        max_rel=max_abs / top if top > 0 else (0.0 if max_abs == 0 else math.inf),
    )


class ParityError(AssertionError):
    """A failed parity check; ``.report`` holds every compared tensor's row."""

    def __init__(self, message: str, report: ParityReport):
        super().__init__(message)
        self.report = report


def _raise_on_failure(report: ParityReport, what: str) -> None:
    failed = [r for r in report if not r.ok]
    if failed:
        raise ParityError(
            f"{what}: {len(failed)} of {len(report)} tensors are less accurate than allowed "
            "(relative error, 2-norm, against float64, at most 2 x the eager model's own + the "
            "dtype's slack); the worst:\n" + report.table(report.worst(5)),
            report,
        )


def check_no_less_accurate(named: Sequence[tuple], slack: float) -> ParityReport:
    """For each (name, actual, baseline, truth64): the relative error (2-norm) of actual
    against the float64 truth is at most twice the baseline's, plus ``slack``. Raises an
    AssertionError naming the worst tensors; returns the report."""
    report = ParityReport(_row(name, a, b, t, slack) for name, a, b, t in named)
    _raise_on_failure(report, "parity")
    return report


def slack_for(dtype: torch.dtype) -> float:
    """What a fused tensor may add to twice the eager error, relative: float16 and
    bfloat16 kernels compute in float32 and round once, half an ulp of the dtype
    (docs/SPEC.md); float32 and float64 kernels compute in the dtype itself, within a few ulp
    of it (docs/SPEC.md: "float32 within a few ulp"), taken as 4 ulp, the bound fusedact's
    conversion tests have always used."""
    eps = torch.finfo(dtype).eps
    return eps / 2 if dtype in (torch.float16, torch.bfloat16) else 4 * eps


# ---- model-level parity


def _leaves(obj, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """The floating-point tensors of a model output: a tensor, or tuples, lists and dicts
    of them (nested), each named by its path."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, f"{prefix}[{i}]")]
    return []


def _model_dtype(model: nn.Module, inputs: Sequence) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()) + [i for i in inputs if isinstance(i, torch.Tensor)]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _set_backend(model: nn.Module, backend: str) -> int:
    """Gives every fusedact module in model the backend; returns how many there are."""
    from .conversion import _FUSEDACT

    mods = [m for m in model.modules() if isinstance(m, _FUSEDACT)]
    for m in mods:
        m.backend = backend
    return len(mods)


def _run(model: nn.Module, inputs: Sequence, dtype: torch.dtype, loss_fn: Callable | None, seed: int):
    """Outputs and gradients [(name, tensor)] of one forward and backward of model in dtype."""
    model = model.to(dtype)
    args = []
    grad_inputs = []
    for i, a in enumerate(inputs):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).clone().requires_grad_(True)
            grad_inputs.append((f"input[{i}].grad", a))
        args.append(a)
    params = [(f"{n}.grad", p) for n, p in model.named_parameters() if p.requires_grad]
    cuda = sorted({t.device.index or 0 for t in list(model.parameters()) + [a for _, a in grad_inputs] if t.is_cuda})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)  # the same dropout masks (where the dtype draws alike)
        out = model(*args)
    outputs = _leaves(out, "output")
    if not outputs:
        raise TypeError("assert_parity: the model returned no floating-point tensor")
    if loss_fn is not None:
        loss = loss_fn(out)
    else:
        # A fixed random projection of every output: every element's gradient matters.
        # Its weights are drawn in float64 and rounded to the output's dtype, so every
        # run (float64 truth included) gets the same cotangent.
        gen = torch.Generator().manual_seed(seed + 1)
        loss = 0
        for name, y in outputs:
            w = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
            loss = loss + (y * w).sum().double()
    wrt = grad_inputs + params
    grads = torch.autograd.grad(loss, [t for _, t in wrt], allow_unused=True) if wrt else []
    result = [(name, y.detach()) for name, y in outputs]
    result += [(name, g) for (name, _), g in zip(wrt, grads)]
    return result


def assert_parity(
    model: nn.Module,
    *example_inputs,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    loss_fn: Callable | None = None,
    seed: int = 0,
    require_conversion: bool = True,
) -> ParityReport:
    """Checks that ``fusedact.convert(model)`` computes what ``model`` computes, forward
    and backward, to the accuracy of the model's own arithmetic. ``model`` is not changed.

    - ``example_inputs``: the positional arguments of ``model``; floating-point tensors
      among them get gradients, which are compared too. Keep them on the model's device.
    - ``backend``: the fused backend ("native", the default, or "triton").
    - ``dtype``: run the copies in this dtype (default: the model's own).
    - ``loss_fn(output) -> scalar``: the loss to differentiate; default, a fixed random
      projection of every output element. It gets float64 outputs for the truth.
    - ``require_conversion``: fail when the model has no module fusedact converts (a
      parity proof of an unchanged model proves nothing).

    Works on CPU and CUDA, in train and eval mode (each copy runs one forward, so
    BatchNorm statistics start and end alike), for outputs that are tensors, or tuples,
    lists and dicts of them. Dropout must be off or deterministic: the masks of a
    float64 run are not those of a float32 run.

    The rule, per tensor: its relative error (2-norm) against the float64 truth is at
    most twice the eager model's in the same dtype, plus ``slack_for(dtype)``: half an
    ulp of float16/bfloat16 (one rounding from float32), 4 ulp of float32/float64 (the
    kernels' own arithmetic). In float64 the eager copy *is* the truth, so its error is
    estimated from a float32 run: rounding errors are first-order linear in the unit
    roundoff, so a model's float64 error is its float32 error times eps64 / eps32. A
    tensor that the eager model gets no digit of right is reported, not judged
    (``ParityRow.judged``).

    Returns the ParityReport (one row per tensor) on success; on failure raises an
    AssertionError with the worst tensors (name, errors, bound).
    """
    from . import convert
    from .functional import _backend

    backend = _backend(backend)
    if backend == "eager":
        raise ValueError("assert_parity: backend must be a fused one ('native' or 'triton')")
    dtype = dtype or _model_dtype(model, example_inputs)
    if not dtype.is_floating_point:
        raise TypeError(f"assert_parity: dtype must be a floating-point dtype, got {dtype}")

    def eager_copy():
        m = copy.deepcopy(model)
        _set_backend(m, "eager")  # fusedact modules already in the model: their reference
        return m

    fused_model = convert(copy.deepcopy(model), backend=backend)
    n_fused = _set_backend(fused_model, backend)
    if require_conversion and n_fused == 0:
        raise AssertionError(
            "assert_parity: the model has no module fusedact.convert replaces "
            "(SiLU, Mish, Hardswish, ACON-C, Meta-ACON): there is nothing to compare"
        )

    run = lambda m, dt: _run(m, example_inputs, dt, loss_fn, seed)  # noqa: E731
    fused = run(fused_model, dtype)
    truth = run(eager_copy(), torch.float64)
    if dtype == torch.float64:
        baseline = run(eager_copy(), torch.float32)
        eager_scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    else:
        baseline = run(eager_copy(), dtype)
        eager_scale = 1.0
    slack = slack_for(dtype)

    baseline, truth = dict(baseline), dict(truth)
    report = ParityReport()
    for name, a in fused:
        b, t = baseline.get(name), truth.get(name)
        if a is None or b is None or t is None:
            if not (a is None and t is None):
                raise AssertionError(
                    f"assert_parity: {name} is None in one model only (fused: {a is None}, float64 eager: {t is None})"
                )
            continue
        if a.shape != t.shape:
            raise AssertionError(f"assert_parity: {name} has shape {tuple(a.shape)} fused, {tuple(t.shape)} eager")
        report.append(_row(name, a, b, t, slack, eager_scale))
    _raise_on_failure(
        report, f"fusedact parity ({backend}, {str(dtype).replace('torch.', '')}, {n_fused} fused modules)"
    )
    return report

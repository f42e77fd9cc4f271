"""The Triton variant of every kernel: ``backend="triton"`` of the functional API and
the modules. Importing fusedact never needs triton: where it is missing or older than
MIN_TRITON, ``backend="triton"`` raises a RuntimeError that says so.

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), which is how CI tests them.
"""

from __future__ import annotations

MIN_TRITON = (3, 0)

_ops = None
_error: str | None = None


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _load() -> None:
    global _ops, _error
    try:
        import triton
    except ImportError as e:
        _error = f"triton is not installed ({e}); install triton >= {'.'.join(map(str, MIN_TRITON))}"
        return
    if _version_tuple(triton.__version__) < MIN_TRITON:
        _error = (
            f"triton {triton.__version__} is too old; fusedact's Triton kernels need "
            f"triton >= {'.'.join(map(str, MIN_TRITON))}"
        )
        return
    try:
        import torch
        from torch.library import triton_op  # noqa: F401  (torch >= 2.6)

        from ..functions import register_autograd
        from . import ops  # noqa: F401  (registers torch.ops.fusedact_triton.*)
    except (ImportError, AttributeError) as e:
        _error = f"the Triton kernels could not be loaded: {e}"
        return
    register_autograd("fusedact_triton", prefix="Triton")
    from .. import _inductor, onnx

    onnx.install("fusedact_triton")
    _inductor.register("fusedact_triton")
    _ops = torch.ops.fusedact_triton


def available() -> bool:
    """Whether backend="triton" can run here."""
    return _ops is not None


def namespace():
    """torch.ops.fusedact_triton; a clear error when triton is unusable."""
    if _ops is None:
        raise RuntimeError(f"fusedact: backend='triton' is unavailable: {_error}")
    return _ops


_load()

"""Does this fusedact install work here?  ``python -m fusedact.selftest [--json]``

For every device (the CPU; CUDA when a GPU and the CUDA kernels are there) and fused
backend (native; triton where it can run: on a GPU, or on the CPU under Triton's
interpreter), each op forward and backward in float32, bfloat16, float16 and float64
against the float64 reference (the test suite's own checks, fusedact/_numerics.py), and
gradcheck in float64. Then the bad-argument calls that must raise a RuntimeError, run
in a child process so that a crash (SIGSEGV) is reported, not fatal. Prints a table,
the build info and a one-line verdict; exit status 0 when everything passed, 1 if not.
``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import torch

import fusedact
from fusedact import _numerics
from fusedact._opinfo import NAMES as OPS

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _pairs() -> tuple[list[tuple[str, str]], list[dict]]:
    """The (device, backend) pairs that can run here, and rows for those that cannot."""
    info = fusedact.build_info()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    gpu = torch.cuda.is_available()
    pairs, skipped = [("cpu", "native")], []
    if gpu and info["cuda"]:
        pairs.append(("cuda", "native"))
    elif gpu:
        skipped.append(
            dict(
                device="cuda",
                backend="native",
                check="all",
                dtype="",
                status="skip",
                detail="a GPU is present but this build has no CUDA kernels",
            )
        )
    if not info["triton"]:
        skipped.append(dict(device="", backend="triton", check="all", dtype="", status="skip", detail=_triton_error()))
    elif interpret:
        pairs.append(("cpu", "triton"))
    elif gpu:
        pairs.append(("cuda", "triton"))
    return pairs, skipped


def _triton_error() -> str:
    try:
        fusedact.triton.namespace()  # raises, saying why, where the Triton backend cannot run
    except RuntimeError as e:
        return str(e)
    return ""


def _row(device, backend, check, dtype, fn) -> dict:
    row = dict(device=device, backend=backend, check=check, dtype=SHORT.get(dtype, str(dtype)), status="ok", detail="")
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (every failure is a result to report)
        row["status"] = "FAIL"
        row["detail"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return row


def _parity(op, dtype, device, backend):
    x = _numerics.rand_x((2, 3, 5), dtype, device)
    params = _numerics.make_params(op, x)
    _numerics.check_forward_backward(op, x, params, backend=backend)


def _gradcheck(op, device, backend):
    x = _numerics.rand_x((2, 3, 2), torch.float64, device, scale=2.0).requires_grad_()
    params = [p.requires_grad_() if isinstance(p, torch.Tensor) else p for p in _numerics.make_params(op, x.detach())]
    f = _numerics.op_fn(op, backend)
    if not torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4):
        raise AssertionError("gradcheck returned False")


# ---- bad arguments: each must raise a RuntimeError (or ValueError), in a child process


def _bad_calls(device: str) -> list[tuple[str, object]]:
    d = torch.device(device)
    ops = torch.ops.fusedact
    x4, x3, good = torch.randn(2, 4, 3, 3, device=d), torch.randn(2, 4, 3, device=d), torch.randn(4, device=d)
    beta64 = torch.tensor(1.0, dtype=torch.float64, device=d)
    return [
        # the four that crashed with SIGSEGV on the H100 machine (torch 2.11), by the
        # public API and by the op itself (the C++ checks)
        ("acon_c: p1 of the wrong size", lambda: fusedact.acon_c(x4, torch.randn(5, device=d), good, good)),
        (
            "op acon_c_forward: p1 of the wrong size",
            lambda: ops.acon_c_forward(x4, torch.randn(5, device=d), good, good, 1),
        ),
        ("acon_c: channel_dim out of range", lambda: fusedact.acon_c(x3, good, good, good, channel_dim=3)),
        ("op acon_c_forward: channel_dim out of range", lambda: ops.acon_c_forward(x3, good, good, good, 3)),
        (
            "op mish_backward: grad of the wrong shape",
            lambda: ops.mish_backward(torch.randn(3, 2, device=d), torch.randn(2, 3, device=d)),
        ),
        (
            "op acon_c_backward: grad of the wrong shape",
            lambda: ops.acon_c_backward(torch.randn(2, 4, device=d), x3, good, good, good, 1),
        ),
        ("swish: beta of the wrong dtype", lambda: fusedact.swish(x3, beta64)),
        ("op swish_forward: beta of the wrong dtype", lambda: ops.swish_forward(x3, 1.0, beta64)),
        ("acon_c: p2 of the wrong dtype", lambda: fusedact.acon_c(x3, good, good.double(), good)),
        # and the ones that raised there
        ("mish: integer x", lambda: fusedact.mish(torch.ones(3, dtype=torch.int32, device=d))),
        (
            "op hard_swish_forward: integer x",
            lambda: ops.hard_swish_forward(torch.ones(3, dtype=torch.int64, device=d)),
        ),
    ]


def _bad_calls_child(device: str) -> None:
    """Runs the bad calls, one line before and one after each, flushed: a crash leaves
    the name of the call it died in as the last line."""
    for name, call in _bad_calls(device):
        print(f"CALL\t{name}", flush=True)
        try:
            call()
            print("DONE\tno error raised", flush=True)
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"DONE\traised {type(e).__name__}: {first[:200]}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"DONE\tunexpected {type(e).__name__}: {e}", flush=True)


def _bad_call_rows(device: str, timeout: float = 120, cmd: list[str] | None = None) -> list[dict]:
    """The bad calls' rows: each must have raised; a crash of the child is a FAIL naming
    the call it died in. ``cmd``: the child's command (tests give a crashing one)."""
    cmd = cmd or [sys.executable, "-m", "fusedact.selftest", "--bad-calls-child", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
    rows, name = [], None
    for line in out.splitlines():
        kind, _, text = line.partition("\t")
        if kind == "CALL":
            name = text
        elif kind == "DONE" and name:
            ok = text.startswith("raised ")
            rows.append(
                dict(
                    device=device,
                    backend="native",
                    check=f"bad args: {name}",
                    dtype="",
                    status="ok" if ok else "FAIL",
                    detail=text,
                )
            )
            name = None
    if rc != 0:
        if isinstance(rc, int) and rc < 0:
            what = f"CRASHED: killed by {signal.Signals(-rc).name}"
        else:
            what = f"CRASHED: child exited with {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        rows.append(
            dict(
                device=device,
                backend="native",
                check=f"bad args: {name or '(before the first call)'}",
                dtype="",
                status="FAIL",
                detail=what,
            )
        )
    elif len(rows) != len(_bad_calls(device)):
        rows.append(
            dict(
                device=device,
                backend="native",
                check="bad args: all",
                dtype="",
                status="FAIL",
                detail=f"the child ran {len(rows)} of {len(_bad_calls(device))} calls",
            )
        )
    return rows


def run() -> dict:
    start = time.perf_counter()
    pairs, rows = _pairs()
    for device, backend in pairs:
        for op in OPS:
            for dtype in DTYPES:
                rows.append(
                    _row(
                        device, backend, f"{op} fwd+bwd vs float64", dtype, lambda: _parity(op, dtype, device, backend)
                    )
                )
            rows.append(
                _row(device, backend, f"{op} gradcheck", torch.float64, lambda: _gradcheck(op, device, backend))
            )
    for device in sorted({d for d, _ in pairs}):
        rows.extend(_bad_call_rows(device))
    failed = [r for r in rows if r["status"] == "FAIL"]
    return dict(
        ok=not failed,
        seconds=round(time.perf_counter() - start, 2),
        build_info=fusedact.build_info(),
        fusedact_file=os.path.dirname(fusedact.__file__),
        torch=torch.__version__,
        python=sys.version.split()[0],
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
        checks=rows,
        passed=sum(r["status"] == "ok" for r in rows),
        failed=len(failed),
        skipped=sum(r["status"] == "skip" for r in rows),
    )


def _table(result: dict) -> str:
    """One line per (device, backend, check) with the dtypes side by side; bad-argument
    calls and skips one per line."""
    lines = []
    grouped: dict[tuple, dict] = {}
    for r in result["checks"]:
        if r["check"].endswith("vs float64"):
            key = (r["device"], r["backend"], r["check"].split()[0])
            grouped.setdefault(key, {})[r["dtype"]] = r
    gradchecks = {
        (r["device"], r["backend"], r["check"].split()[0]): r
        for r in result["checks"]
        if r["check"].endswith("gradcheck")
    }
    head = f"{'device':<6} {'backend':<7} {'op':<10} " + " ".join(f"{SHORT[d]:<5}" for d in DTYPES) + " gradcheck"
    lines += [head, "-" * len(head)]
    for key, by_dtype in grouped.items():
        cells = " ".join(f"{by_dtype.get(SHORT[d], {}).get('status', '-'):<5}" for d in DTYPES)
        lines.append(f"{key[0]:<6} {key[1]:<7} {key[2]:<10} {cells} {gradchecks.get(key, {}).get('status', '-')}")
    lines.append("")
    for r in result["checks"]:
        if r["check"].startswith("bad args"):
            detail = r["detail"] if len(r["detail"]) <= 80 else r["detail"][:77] + "..."
            lines.append(f"{r['device']:<6} {r['status']:<5} {r['check'][len('bad args: ') :]:<44} {detail}")
    for r in result["checks"]:
        if r["status"] == "skip":
            lines.append(f"skipped: {r['device'] or 'any'} {r['backend']}: {r['detail']}")
    failures = [r for r in result["checks"] if r["status"] == "FAIL" and not r["check"].startswith("bad args")]
    if failures:
        lines.append("")
        lines += [f"FAIL {r['device']} {r['backend']} {r['check']} {r['dtype']}: {r['detail']}" for r in failures]
    info = result["build_info"]
    lines += [
        "",
        f"fusedact {info['version']} at {result['fusedact_file']}",
        f"built against torch {info['torch_version']}, running torch {result['torch']}, "
        f"Python {result['python']}; CUDA kernels: {info['cuda']} {info['cuda_arch_list']}; "
        f"CPU ISA: {info['cpu_isa']}; triton: {info['triton']}"
        + (" (interpreter)" if result["triton_interpret"] else ""),
    ]
    return "\n".join(lines)


def verdict(result: dict) -> str:
    word = "PASS" if result["ok"] else "FAIL"
    return (
        f"fusedact selftest: {word}: {result['passed']} passed, {result['failed']} failed, "
        f"{result['skipped']} skipped in {result['seconds']} s"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedact.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--bad-calls-child", metavar="DEVICE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bad_calls_child:
        _bad_calls_child(args.bad_calls_child)
        return 0
    # Without a GPU, Triton runs CPU tensors only under its interpreter, which must be
    # chosen before triton is imported (by `import fusedact`): start again with it on.
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") is None and fusedact.triton.available():
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call(
            [sys.executable, "-m", "fusedact.selftest", *(argv if argv is not None else sys.argv[1:])], env=env
        )
    result = run()
    if args.json:
        print(json.dumps(dict(result, verdict=verdict(result)), indent=1, default=str))
    else:
        print(_table(result))
        print(verdict(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

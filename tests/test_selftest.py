"""python -m fusedact.selftest: passes here, and reports (not dies of) what goes wrong:
a wrong kernel, a bad-argument call that crashes the process or raises nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import fusedact
from fusedact import reference, selftest

ROOT = Path(__file__).resolve().parents[1]


def test_selftest_passes_and_prints_json(tmp_path):
    """As a user runs it: a child process in another directory (this checkout on its
    path, as an install would be)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the selftest turns the interpreter on itself
    proc = subprocess.run(
        [sys.executable, "-m", "fusedact.selftest", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ok"] and result["failed"] == 0 and result["verdict"].startswith("fusedact selftest: PASS")
    assert Path(result["fusedact_file"]) == Path(fusedact.__file__).parent  # the fusedact under test
    checks = result["checks"]
    for op in selftest.OPS:
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            assert any(
                c["check"] == f"{op} fwd+bwd vs float64"
                and c["dtype"] == dtype
                and c["device"] == "cpu"
                and c["backend"] == "native"
                and c["status"] == "ok"
                for c in checks
            )
        assert any(c["check"] == f"{op} gradcheck" and c["status"] == "ok" for c in checks)
    bad = [c for c in checks if c["check"].startswith("bad args")]
    assert len(bad) == len(selftest._bad_calls("cpu")) and all(c["detail"].startswith("raised") for c in bad)
    if fusedact.triton.available() and not torch.cuda.is_available():
        assert any(c["backend"] == "triton" and c["device"] == "cpu" for c in checks)


def test_a_wrong_kernel_fails_the_verdict(monkeypatch, capsys):
    """The reference's mish off by 1e-3: the native mish disagrees with it in every dtype."""
    real = reference.mish
    monkeypatch.setattr(reference, "mish", lambda x: real(x) * (1 + 1e-3))
    monkeypatch.setattr(selftest, "_bad_call_rows", lambda device: [])
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    assert "fusedact selftest: FAIL" in out.splitlines()[-1]
    assert "FAIL cpu native mish fwd+bwd vs float64 fp32" in out
    assert "FAIL cpu native swish" not in out


def fake_child(tmp_path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_a_crashing_bad_call_is_reported_not_fatal(tmp_path):
    cmd = fake_child(
        tmp_path,
        """
        import ctypes
        print("CALL\\tfirst", flush=True)
        print("DONE\\traised RuntimeError: fine", flush=True)
        print("CALL\\tacon_c: p1 of the wrong size", flush=True)
        ctypes.string_at(0)  # a real SIGSEGV
    """,
    )
    rows = selftest._bad_call_rows("cpu", cmd=cmd)
    assert [r["status"] for r in rows] == ["ok", "FAIL"]
    assert rows[1]["check"] == "bad args: acon_c: p1 of the wrong size"
    assert rows[1]["detail"] == "CRASHED: killed by SIGSEGV"


def test_a_bad_call_that_raises_nothing_fails(tmp_path):
    cmd = fake_child(
        tmp_path,
        """
        print("CALL\\tmish: integer x", flush=True)
        print("DONE\\tno error raised", flush=True)
    """,
    )
    rows = selftest._bad_call_rows("cpu", cmd=cmd)
    assert [r["status"] for r in rows] == ["FAIL", "FAIL"]  # the call, and 1 of 11 calls run
    assert rows[0]["detail"] == "no error raised"


def test_public_api_rejects_bad_arguments_before_any_op_runs():
    """The bad calls of the public API raise in Python, before a fused op is dispatched,
    so no C++ exception is involved (the H100 machine's SIGSEGV came from those)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    public = [(name, call) for name, call in selftest._bad_calls("cpu") if not name.startswith("op ")]
    assert len(public) == 5
    for name, call in public:
        with Record() as rec:
            try:
                call()
            except RuntimeError:
                pass
            else:
                raise AssertionError(f"{name}: no error")
        assert not [op for op in rec.ops if "fusedact" in op], (name, rec.ops)
    with Record() as rec:  # the recorder does see the fused ops of a good call
        fusedact.mish(torch.randn(3))
    assert any("fusedact" in op for op in rec.ops), rec.ops


def test_without_triton_the_triton_rows_say_why(monkeypatch):
    """Where triton cannot run (torch 2.13's CPU venv in CI has none), the selftest skips
    the Triton backend with the reason fusedact.triton gives, and runs the rest."""
    monkeypatch.setattr(fusedact.triton, "_ops", None)
    monkeypatch.setattr(fusedact.triton, "_error", "triton is not installed (test)")
    pairs, skipped = selftest._pairs()
    assert all(backend != "triton" for _, backend in pairs)
    assert any(r["backend"] == "triton" and "triton is not installed (test)" in r["detail"] for r in skipped)

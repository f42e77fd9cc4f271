"""The training example runs end to end (shortened) and its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_digits_example(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "digits.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_digits.py"),
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("first 10 steps", "epoch mean losses", "test accuracy", "fused vs eager"):
        assert line in proc.stdout, proc.stdout
    assert "OUT OF TOLERANCE" not in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The supported torch range: setup.py refuses an older torch than the oldest tested,
with a message that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_setup_with_torch(tmp_path, version: str, **env):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"__version__ = {version!r}\n")
    environ = dict(os.environ, PYTHONPATH=str(tmp_path), **env)
    return subprocess.run(
        [sys.executable, str(ROOT / "setup.py"), "--version"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_refuses_torch_older_than_the_floor(tmp_path):
    out = run_setup_with_torch(tmp_path, "2.12.1+cu128")
    assert out.returncode != 0
    assert "fusedact needs torch >= 2.13" in out.stderr and "torch 2.12.1+cu128" in out.stderr
    assert "FUSEDACT_ALLOW_UNTESTED_TORCH=1" in out.stderr


def test_the_floor_matches_the_metadata_and_the_readme():
    setup = (ROOT / "setup.py").read_text()
    assert "TORCH_MIN = (2, 13)" in setup
    assert "torch >= 2.13" in (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in (ROOT / ".ci" / "install_paths.sh").read_text()

#!/usr/bin/env bash
# CI, after `make test`: every other way of installing fusedact, each from a copy of the
# source tree (git's tracked and unignored files), so that nothing is built into or
# imported from the checkout.
#
#  1. wheel: `pip wheel --no-build-isolation --no-deps` with the CI venv's torch (and
#     its CUDA settings), installed into a fresh venv that sees that torch and triton but
#     no source tree; `python -m fusedact.selftest` from an empty directory. Proves the
#     wheel holds the package, the _C extension and the Triton files, and that the
#     installed package runs.
#  2. torch 2.13.0, CPU-only wheel (the oldest torch supported, from local disk): the
#     CPU-only build path (FUSEDACT_CUDA unset, no CUDA torch, no triton), the selftest,
#     and the test subset marked `install` (tests/conftest.py says which), whose CUDA
#     and Triton cases must skip cleanly.
#
# Usage: .ci/install_paths.sh [wheel] [torch213]   (both when none is given)
# Env: PYTHON (the CI venv's python, default .venv/bin/python), TORCH_OLD (torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
TORCH_OLD=${TORCH_OLD:-torch==2.13.0}
STEPS=${*:-wheel torch213}
WORK=$(mktemp -d /tmp/fusedact-install.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

step() { echo; echo "==== install paths: $* ($(date -u +%H:%M:%S))"; }
elapsed() { echo "==== $1 took $(( $(date +%s) - $2 )) s"; }

# A copy of the sources, as a fresh clone has them (no build products, no .venv).
copy_sources() {
  mkdir -p "$1"
  git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$1"
}

# The selftest from an empty directory, in a venv that must not see the source tree.
selftest_outside() {
  local venv=$1 dir
  dir=$(mktemp -d "$WORK/run.XXXX")
  (cd "$dir" && env -u PYTHONPATH "$venv/bin/python" - <<'PY'
import fusedact, os, sys, torch
where = os.path.dirname(os.path.abspath(fusedact.__file__))
print("fusedact imported from", where, "with torch", torch.__version__)
assert where.startswith(sys.prefix), f"fusedact came from {where}, not from this venv ({sys.prefix})"
PY
  )
  (cd "$dir" && env -u PYTHONPATH "$venv/bin/python" -m fusedact.selftest)
}

if [[ " $STEPS " == *" wheel "* ]]; then
  t0=$(date +%s)
  step "wheel with $("$PY" -c 'import torch; print("torch", torch.__version__)')"
  copy_sources "$WORK/src-wheel"
  (cd "$WORK/src-wheel" && "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
  wheel=$(ls "$WORK"/dist/fusedact-*.whl)
  echo "built $(basename "$wheel")"
  # What the wheel must hold: the extension, the Python package, the Triton kernels.
  "$PY" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["fusedact/__init__.py", "fusedact/_build_config.py", "fusedact/selftest.py", "fusedact/testing.py",
        "fusedact/triton/__init__.py", "fusedact/triton/kernels.py", "fusedact/triton/ops.py"]
missing = [n for n in need if n not in names]
so = [n for n in names if n.startswith("fusedact/_C") and n.endswith(".so")]
assert not missing and so, f"the wheel lacks {missing or 'fusedact/_C*.so'}"
assert not any(n.startswith(("tests/", "csrc/", "benchmarks/")) for n in names), "the wheel holds non-package files"
print(f"wheel contents: {len(names)} files, {so[0]} and the Triton kernels among them")
PY
  # A fresh venv. It needs the torch the wheel was built against (its ABI), and triton:
  # they are borrowed from the CI venv by a .pth line (a plain path: the .pth files
  # there, among them the editable install of the checkout, are not run), rather than
  # downloading torch's CUDA build again. The wheel goes into the fresh venv's own
  # site-packages, which comes first on sys.path.
  python3 -m venv "$WORK/venv-wheel"
  "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
    > "$("$WORK/venv-wheel/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/borrowed-torch.pth"
  "$WORK/venv-wheel/bin/pip" install -q --no-deps "$wheel"
  rm -rf "$WORK/src-wheel"  # nothing left to import from
  selftest_outside "$WORK/venv-wheel"
  elapsed "wheel" "$t0"
fi

if [[ " $STEPS " == *" torch213 "* ]]; then
  t0=$(date +%s)
  step "$TORCH_OLD, CPU only"
  copy_sources "$WORK/src-old"
  python3 -m venv "$WORK/venv-old"
  "$WORK/venv-old/bin/pip" install -q "$TORCH_OLD" numpy pytest pytest-xdist expecttest setuptools wheel ninja pybind11
  "$WORK/venv-old/bin/python" -c 'import torch; assert torch.version.cuda is None, "expected a CPU-only torch"; print("torch", torch.__version__)'
  # The CPU-only build path: FUSEDACT_CUDA unset, no CUDA torch (nvcc may be there).
  (cd "$WORK/src-old" && env -u FUSEDACT_CUDA -u FUSEDACT_EXPECT_CUDA \
     "$WORK/venv-old/bin/pip" install -q --no-build-isolation --no-deps .)
  selftest_outside "$WORK/venv-old"
  # The marked subset of the suite, against the installed package (tests/ on its own:
  # the copy's fusedact/ has no _C, so importing it from there would fail loudly).
  rm -rf "$WORK/src-old/fusedact"
  (cd "$WORK/src-old" && env -u FUSEDACT_CUDA -u FUSEDACT_EXPECT_CUDA -u PYTHONPATH \
     "$WORK/venv-old/bin/python" -m pytest -q -n 2 -m install -p no:cacheprovider tests)
  elapsed "$TORCH_OLD" "$t0"
fi

"""The public API: bad input, the backend switch, the modules, build_info."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedact
from conftest import DEVICES, FUSED_BACKENDS, HAS_CUDA, HAS_TRITON, TRITON_INTERPRET
from helpers import check_close, rand_x

# The argument checks run on CPU tensors: Triton's only where its interpreter is on.
BACKENDS = [None, "eager"] + (["triton"] if HAS_TRITON and TRITON_INTERPRET else [])


# ---- bad input fails fast, naming the argument


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("op", ["swish", "mish", "hard_swish", "acon_c"])
def test_rejects_integer_and_bool(op, dtype, backend):
    x = torch.ones(2, 3, 4, dtype=dtype)
    args = [torch.ones(3), torch.ones(3), torch.ones(3)] if op == "acon_c" else []
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        getattr(fusedact, op)(x, *args, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_acon_c_rejects_wrong_parameter_sizes(backend):
    x = torch.randn(2, 4, 3, 3)
    good = torch.randn(4)
    with pytest.raises(RuntimeError, match="p1 must have C = 4 elements"):
        fusedact.acon_c(x, torch.randn(5), good, good, backend=backend)
    with pytest.raises(RuntimeError, match="p2 must have C = 4 elements"):
        fusedact.acon_c(x, good, torch.randn(1, 4, 2, 1), good, backend=backend)
    with pytest.raises(RuntimeError, match="beta must have C = 4 elements"):
        fusedact.acon_c(x, good, good, torch.randn(3, 4), backend=backend)  # N is 2
    with pytest.raises(RuntimeError, match="p1 must have C = 4 elements"):
        fusedact.acon_c(x, torch.randn(4, 1), good, good, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_channel_dim_out_of_range(backend):
    x = torch.randn(2, 4, 3)
    p = torch.randn(4)
    for cd in (3, -4):
        with pytest.raises(RuntimeError, match=f"channel_dim {cd} is out of range"):
            fusedact.acon_c(x, p, p, p, channel_dim=cd, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_parameter_dtypes(backend):
    x = torch.randn(2, 4, 3)
    p = torch.randn(4)
    with pytest.raises(RuntimeError, match="p2 has dtype (torch.float64|Double) but x has dtype"):
        fusedact.acon_c(x, p, p.double(), p, backend=backend)
    with pytest.raises(RuntimeError, match="beta has dtype"):
        fusedact.swish(x, torch.tensor(1.0, dtype=torch.float64), backend=backend)
    with pytest.raises(RuntimeError, match="beta must be a float or a tensor with one element"):
        fusedact.swish(x, torch.ones(2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejects_tensors_on_different_devices(backend):
    """A parameter on another device (meta stands in for a GPU on a CPU-only machine;
    with a GPU, CUDA parameters beside a CPU x are checked too)."""
    x = torch.randn(2, 4, 3)
    p = torch.randn(4)
    others = [torch.device("meta")] + ([torch.device("cuda")] if HAS_CUDA else [])
    for dev in others:
        with pytest.raises(RuntimeError, match=r"p1 is on .* but x is on cpu"):
            fusedact.acon_c(x, p.to(dev), p, p, backend=backend)
        with pytest.raises(RuntimeError, match=r"beta is on .* but x is on cpu"):
            fusedact.swish(x, torch.tensor(1.0, device=dev), backend=backend)


def test_backward_op_checks_grad():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="grad has shape"):
        torch.ops.fusedact.mish_backward(torch.randn(3, 2), x)
    with pytest.raises(RuntimeError, match="grad has dtype"):
        torch.ops.fusedact.mish_backward(torch.randn(2, 3, dtype=torch.float64), x)


def test_backend_switch():
    x = torch.randn(5)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fusedact.mish(x, backend="cuda")
    assert fusedact.BACKENDS == ("native", "triton", "eager")
    torch.testing.assert_close(fusedact.mish(x, backend="native"), fusedact.mish(x))
    assert fusedact.build_info()["triton"] == fusedact.triton.available()


FAKE_TRITONS = {
    "missing": "raise ImportError('No module named triton (test stand-in)')",
    "too old": "__version__ = '2.1.0'",
}


@pytest.mark.parametrize("kind", list(FAKE_TRITONS))
def test_unusable_triton_is_a_clear_error_not_an_import_failure(kind, tmp_path):
    """With triton missing or too old, `import fusedact` works, the other backends run,
    and backend="triton" raises a RuntimeError that says why."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(FAKE_TRITONS[kind] + "\n")
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import torch, fusedact
        assert fusedact.build_info()["triton"] is False
        x = torch.randn(4)
        fusedact.mish(x); fusedact.mish(x, backend="eager")
        try:
            fusedact.mish(x, backend="triton")
        except RuntimeError as e:
            print("ERROR:", e)
        else:
            raise SystemExit("backend='triton' did not raise")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "is not installed" if kind == "missing" else "is too old"
    assert "backend='triton' is unavailable" in out.stdout and expected in out.stdout, out.stdout


# ---- modules


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_modules_match_functional(device, backend):
    x = rand_x((2, 32, 5, 5), torch.float32, device)
    torch.manual_seed(0)
    for module, fn in [
        (fusedact.nn.Swish(1.5, backend=backend), lambda t: fusedact.swish(t, 1.5, backend=backend)),
        (fusedact.nn.Mish(backend=backend), lambda t: fusedact.mish(t, backend=backend)),
        (fusedact.nn.HardSwish(backend=backend), lambda t: fusedact.hard_swish(t, backend=backend)),
    ]:
        torch.testing.assert_close(module.to(device)(x), fn(x))
    sw = fusedact.nn.Swish(0.7, learnable=True, backend=backend).to(device)
    assert isinstance(sw.beta, torch.nn.Parameter) and sw.beta.shape == (1,)  # (1,): FSDP2 shards no 0-dim parameter
    sw(x).sum().backward()
    assert sw.beta.grad is not None


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_acon_c_module_layout_and_grads(device, backend):
    torch.manual_seed(0)
    m = fusedact.nn.AconC(16, backend=backend).to(device)
    ref = fusedact.nn.AconC(16, backend="eager").to(device)
    ref.load_state_dict(m.state_dict())
    assert m.p1.shape == (1, 16, 1, 1) and torch.equal(m.beta, torch.ones_like(m.beta))
    for shape in [(4, 16, 7, 7), (4, 16, 9)]:  # 4-D and 3-D inputs
        x = rand_x(shape, torch.float32, device)
        y, yr = m(x), ref(x)
        check_close(y, yr.double())
        y.square().sum().backward()
        yr.square().sum().backward()
        for a, b in zip(m.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
            a.grad = b.grad = None


@pytest.mark.parametrize("device", DEVICES)
def test_acon_c_module_channel_dim_last(device):
    """AconC(channel_dim=-1) on (N, H, W, C) and (N, L, C) inputs: the (1, C, 1, 1)
    parameters index the last axis, and get gradients in their own shape."""
    torch.manual_seed(0)
    m = fusedact.nn.AconC(6, channel_dim=-1).to(device)
    for shape in [(2, 3, 4, 6), (2, 5, 6)]:
        x = rand_x(shape, torch.float32, device)
        expected = fusedact.reference.acon_c(x, m.p1.reshape(-1), m.p2.reshape(-1), m.beta.reshape(-1), channel_dim=-1)
        y = m(x)
        check_close(y, expected.detach().double())
        y.sum().backward()
        assert m.p1.grad.shape == (1, 6, 1, 1)
        m.zero_grad()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_meta_acon_c_module(device, backend):
    torch.manual_seed(0)
    m = fusedact.nn.MetaAconC(32, r=16, backend=backend).to(device)
    assert m.fc1.out_channels == 16 and not any(isinstance(s, torch.nn.BatchNorm2d) for s in m.modules())
    ref = fusedact.nn.MetaAconC(32, r=16, backend="eager").to(device)
    ref.load_state_dict(m.state_dict())
    x = rand_x((3, 32, 6, 6), torch.float32, device)
    y, yr = m(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    yr.sum().backward()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    m(x[:1]).sum().backward()  # batch size 1 works (no BatchNorm)


def test_meta_acon_c_matches_yolov5_formula():
    """Against YOLOv5's MetaAconC forward (without its BatchNorm), written out."""
    torch.manual_seed(1)
    m = fusedact.nn.MetaAconC(48, r=16)
    x = torch.randn(2, 48, 5, 5)
    y = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    beta = torch.sigmoid(m.fc2(m.fc1(y)))
    dpx = (m.p1 - m.p2) * x
    expected = dpx * torch.sigmoid(beta * dpx) + m.p2 * x
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


# ---- build information


def test_build_info():
    info = fusedact.build_info()
    assert info["version"] == fusedact.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in info["cpu_isa_available"]
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_arch_list"]
    # CI builds with the CUDA kernels and says so; a plain checkout need not.
    if os.environ.get("FUSEDACT_EXPECT_CUDA") == "1":
        assert info["cuda"], "the CUDA kernels were expected to be compiled in"


# ---- the CPU instruction set


def cpuinfo_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def isa_subprocess(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("FUSEDACT_CPU_ISA", None)
    if env_value is not None:
        env["FUSEDACT_CPU_ISA"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", "import fusedact; print(fusedact.build_info()['cpu_isa'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(cpuinfo_flags() is None or os.uname().machine != "x86_64", reason="needs /proc/cpuinfo on x86-64")
def test_cpu_isa_detection_matches_cpuinfo():
    """The run-time choice offers exactly what the CPU has (/proc/cpuinfo's flags, as
    lscpu shows them): AVX2 needs avx2 and fma; AVX-512 needs F, BW, DQ and VL, the
    instruction sets of ATen's own AVX512 kernels."""
    flags = cpuinfo_flags()
    want = ["baseline"]
    if {"avx2", "fma"} <= flags:
        want.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            want.append("avx512")
    info = fusedact.build_info()
    assert info["cpu_isa_available"] == want
    # the default is the best of them, unless FUSEDACT_CPU_ISA picked another
    assert isa_subprocess(None) == want[-1]


def test_cpu_isa_environment_variable():
    available = fusedact.build_info()["cpu_isa_available"]
    for isa in available:
        assert isa_subprocess(isa) == isa
    # an unknown name, or one this CPU cannot run, leaves the best one
    assert isa_subprocess("sse9") == available[-1]
    if "avx512" not in available:
        assert isa_subprocess("avx512") == available[-1]


def test_set_cpu_isa():
    before = fusedact._C.cpu_isa()
    try:
        for isa in fusedact.build_info()["cpu_isa_available"]:
            fusedact._C.set_cpu_isa(isa)
            assert fusedact._C.cpu_isa() == isa == fusedact.build_info()["cpu_isa"]
        with pytest.raises(RuntimeError, match="must be 'avx512', 'avx2' or 'baseline'"):
            fusedact._C.set_cpu_isa("avx1024")
        for isa in {"avx2", "avx512"} - set(fusedact.build_info()["cpu_isa_available"]):
            with pytest.raises(RuntimeError, match="this CPU cannot run"):
                fusedact._C.set_cpu_isa(isa)
    finally:
        fusedact._C.set_cpu_isa(before)


def _bad_calls():
    x, x3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    p = torch.randn(3)
    return [
        (
            "acon_c beta list",
            lambda: fusedact.acon_c(x3, p, p, [1.0]),
            TypeError,
            "fusedact.acon_c: beta must be a tensor, got list",
        ),
        (
            "acon_c p1 float",
            lambda: fusedact.acon_c(x3, 1.0, p, p),
            TypeError,
            "fusedact.acon_c: p1 must be a tensor, got float",
        ),
        (
            "acon_c p2 None",
            lambda: fusedact.acon_c(x3, p, None, p),
            TypeError,
            "fusedact.acon_c: p2 must be a tensor, got NoneType",
        ),
        (
            "acon_c beta str",
            lambda: fusedact.acon_c(x3, p, p, "b"),
            TypeError,
            "fusedact.acon_c: beta must be a tensor, got str",
        ),
        (
            "acon_c channel_dim float",
            lambda: fusedact.acon_c(x3, p, p, p, channel_dim=1.5),
            TypeError,
            "fusedact.acon_c: channel_dim must be an int, got float",
        ),
        (
            "AconC module channel_dim",
            lambda: fusedact.acon_c(x3, p, p, p, channel_dim="1"),
            TypeError,
            "channel_dim must be an int, got str",
        ),
        (
            "swish beta str",
            lambda: fusedact.swish(x, "a"),
            TypeError,
            "fusedact.swish: beta must be a float or a tensor with one element, got str",
        ),
        (
            "swish beta None",
            lambda: fusedact.swish(x, None),
            TypeError,
            "fusedact.swish: beta must be a float .* got NoneType",
        ),
        (
            "swish beta list",
            lambda: fusedact.swish(x, [1.0]),
            TypeError,
            "fusedact.swish: beta must be a float .* got list",
        ),
        (
            "swish beta 1e39",
            lambda: fusedact.swish(x, 1e39),
            ValueError,
            "fusedact.swish: beta = 1e\\+39 is outside float32's range",
        ),
        ("swish beta -1e300", lambda: fusedact.swish(x, -1e300), ValueError, "outside float32's range"),
        ("swish beta 10**39 (int)", lambda: fusedact.swish(x, 10**39), ValueError, "outside float32's range"),
        (
            "swish beta 10**400 (int)",
            lambda: fusedact.swish(x.double(), 10**400),
            ValueError,
            "outside float64's range",
        ),
        ("swish bf16 beta 1e39", lambda: fusedact.swish(x.bfloat16(), 1e39), ValueError, "for torch.bfloat16 x"),
        (
            "swish beta rounding to inf",
            lambda: fusedact.swish(x, float.fromhex("0x1.ffffffp+127")),
            ValueError,
            "outside float32's range",
        ),
        ("Swish module beta 1e39", lambda: fusedact.nn.Swish(1e39)(x), ValueError, "outside float32's range"),
        (
            "swish eager beta 1e39",
            lambda: fusedact.swish(x, 1e39, backend="eager"),
            ValueError,
            "outside float32's range",
        ),
        (
            "op swish_forward beta 1e39",
            lambda: torch.ops.fusedact.swish_forward(x, 1e39, None),
            RuntimeError,
            "fusedact.swish: beta = 1e\\+39 is outside float32's range",
        ),
        (
            "op swish_backward beta 1e39",
            lambda: torch.ops.fusedact.swish_backward(x, x, 1e39, None),
            RuntimeError,
            "fusedact.swish_backward: beta = 1e\\+39 is outside float32's range",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_name_the_argument(case):
    """Bad parameters raise a TypeError or ValueError that names the argument (not an
    AttributeError from deep inside, or a bare float() error), and a Python beta that
    float32 cannot hold is an error, not NaN, for every x but float64."""
    _, call, exc, message = _bad_calls()[case]
    with pytest.raises(exc, match=message):
        call()


def test_large_float_beta_is_fine_where_it_fits():
    """float64 x computes with any finite beta; float32 x with the largest beta float32
    holds (and the largest double that rounds to it)."""
    x = torch.tensor([-1.0, 0.0, 1e-40, 2.0], dtype=torch.float64)
    torch.testing.assert_close(fusedact.swish(x, 1e39), fusedact.reference.swish(x, 1e39))
    for beta in (3.4028234663852886e38, float.fromhex("0x1.fffffefffffffp+127")):
        y = fusedact.swish(x.float(), beta)
        assert not y.isnan().any(), y


SHARED_SPEC = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"


@pytest.mark.skipif(not SHARED_SPEC.exists(), reason="no ../shared/SPEC.md beside this checkout")
def test_docs_spec_is_the_shared_spec():
    """docs/SPEC.md, the copy users read, is the project's math contract word for word."""
    ours = Path(__file__).resolve().parents[1] / "docs" / "SPEC.md"
    assert ours.read_text() == SHARED_SPEC.read_text(), "docs/SPEC.md differs from ../shared/SPEC.md: copy it again"


DOCS = ("README.md", "docs/integrations.md", "docs/testing.md", "docs/design.md", "benchmarks/README.md")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    import re

    out = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_doc_links_resolve(doc):
    """Every relative link of the README and the docs points to a file in the repository,
    and every #anchor to a heading of that file."""
    import re

    root = Path(__file__).resolve().parents[1]
    path = root / doc
    text = path.read_text()
    bad = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if "://" in target:
            continue
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            bad.append(f"{target}#{anchor}")
    assert not bad, bad


def test_readme_is_short():
    """The README is for users: at most 250 lines, the rest in docs/ (issue 21)."""
    root = Path(__file__).resolve().parents[1]
    assert len((root / "README.md").read_text().splitlines()) <= 250

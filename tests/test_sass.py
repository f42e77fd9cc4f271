"""tools/sass_report.py reads the machine code of the CUDA kernels without a GPU. Its
--check (run by .ci/run on the built extension) must pass on our kernels and fail on
kernels sabotaged the two ways it guards against: packs that are not 16-byte aligned
(so the loads become scalar) and a register cap that forces spills."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import sass_report  # noqa: E402

import fusedact  # noqa: E402

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # torch guesses /usr/local otherwise
NVCC = Path(os.environ["CUDA_HOME"], "bin", "nvcc")


def _have(tool: str) -> bool:
    try:
        sass_report.find_tool(tool)
        return True
    except SystemExit:
        return False


needs_cuobjdump = pytest.mark.skipif(
    not _have("cuobjdump"), reason="cuobjdump not installed (pip install nvidia-cuda-cuobjdump)"
)


def compile_cubin(src: Path, out: Path, *extra: str) -> Path:
    """One .cu to an sm_90 cubin with the flags setup.py gives nvcc (no GPU needed)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    incs = [f"-I{p}" for p in include_paths("cuda") + [sysconfig.get_paths()["include"]]]
    cmd = [
        str(NVCC),
        "-cubin",
        "-arch=sm_90",
        "-O3",
        "-lineinfo",
        "-std=c++20",
        "-DFUSEDACT_WITH_CUDA",
        "--expt-relaxed-constexpr",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{src.parent.parent}",
        *incs,
        *extra,
        str(src),
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@needs_cuobjdump
@pytest.mark.skipif(not fusedact.build_info()["cuda"], reason="the CUDA kernels are not built in")
def test_check_passes_on_the_built_extension():
    so = fusedact._C.__file__
    kernels = sass_report.read_kernels(so, "sm_90")
    assert sass_report.check(kernels) == []
    pack = [k for k in kernels if k.should_stream_packs()]
    # every flat op has a 16-byte kernel for each dtype, direction and index type
    flat = {k.op() for k in kernels if k.family == "elementwise_kernel"}
    assert {"swish", "mish", "hard_swish"} <= flat
    have = {(k.op(), k.scalar(), k.backward(), k.args[3]) for k in pack if k.family == "elementwise_kernel"}
    for op in flat:
        for dtype in sass_report.SCALAR_BYTES:
            for bwd in (False, True):
                for index in ("int", "long"):
                    assert (op, dtype, bwd, index) in have, (op, dtype, bwd, index)
    for k in pack:
        if any(op in k.name for op in sass_report.SUMS_ONLY_OPS):  # stores no elements
            continue
        ipe = k.instructions_per_element()
        assert ipe is not None and 3 < ipe[0] < 400, (k.short(), ipe)


def test_allowed_spills_are_batch_norm_act_passes_only():
    """ALLOWED_SPILL lets the math::BnAct kernels (off by default on CUDA) keep up to 16 B
    of stack; nothing else, no local memory, no more stack."""
    name = "fusedact::{anon}::row_kernel<fusedact::math::BnAct<fusedact::math::Swish>::Op, float, float, 4, true>"
    assert sass_report.allowed_spill(sass_report.Kernel("m", name=name, stack=16))
    assert not sass_report.allowed_spill(sass_report.Kernel("m", name=name, stack=24))
    assert not sass_report.allowed_spill(sass_report.Kernel("m", name=name, stack=8, local=4))
    other = name.replace("math::BnAct<fusedact::math::Swish>::Op", "math::Swish<float>")
    assert not sass_report.allowed_spill(sass_report.Kernel("m", name=other, stack=8))


@needs_cuobjdump
@pytest.mark.skipif(not NVCC.exists(), reason="no nvcc")
def test_check_fails_on_sabotaged_kernels(tmp_path):
    """The real source, built wrong two ways at once: Pack without alignas (the compiler
    must then load its members one by one) and launch bounds asking for 8 resident
    blocks of 256 threads per SM, a 32-register cap (ptxas spills the wide kernels)."""
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    cu = tmp_path / "csrc" / "cuda" / "activations_cuda.cu"
    text = cu.read_text()
    aligned = "struct alignas(sizeof(scalar_t) * VEC) Pack"
    assert aligned in text, "the sabotage no longer applies: update this test"
    bounds = "__launch_bounds__(kThreads)"
    assert text.count(bounds) >= 4, "the sabotage no longer applies: update this test"
    cu.write_text(text.replace(aligned, "struct Pack").replace(bounds, "__launch_bounds__(kThreads, 8)"))
    cubin = compile_cubin(cu, tmp_path / "sabotaged.cubin")
    problems = sass_report.check(sass_report.read_kernels(str(cubin), "sm_90"))
    narrow = [p for p in problems if "no 128-bit pack" in p]
    spills = [p for p in problems if "a spill" in p]
    # every pack kernel turns scalar; at least one kernel spills under the cap
    assert any("elementwise mish bf16 vec8 i32 bwd" in p for p in narrow), problems
    assert any("row acon_c bf16" in p for p in narrow), problems
    assert spills, problems
    # and the command line exits 1
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "sass_report.py"),
            str(cubin),
            "--check",
            "--markdown",
            str(tmp_path / "r.md"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "SASS CHECK FAILED" in r.stderr


def test_instruction_counting_on_a_known_listing():
    """The parser on a hand-written listing: a loop of 6 instructions (NOP excluded)
    storing one 16-byte pack of 4 floats, a slow-path subroutine with a register save."""
    k = sass_report.Kernel(
        "k", family="elementwise_kernel", args=["fusedact::math::Mish<float>", "float", "4", "int", "false"]
    )
    listing = """
        /*0000*/  S2R R0, SR_TID.X ;
        /*0010*/  LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/  FMUL R4, R4, R4 ;
        /*0030*/  NOP ;
        /*0040*/  CALL.REL.NOINC 0x0090 ;
        /*0050*/  STG.E.128 desc[UR4][R8.64], R4 ;
        /*0060*/  @P0 BRA 0x10 ;
        /*0070*/  EXIT ;
        /*0080*/  BRA 0x80;
        /*0090*/  STL.64 [R1], R4 ;
        /*00a0*/  LDL.LU.64 R4, [R1] ;
        /*00b0*/  RET.REL.NODEC R20 0x0 ;
    """
    import re

    for line in listing.strip().splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        k.insts.append((int(m.group(1), 16), m.group(2)))
    assert k.body() == (0x10, 0x60, True)
    assert k.instructions_per_element() == (5 / 4, 5, 4)
    assert k.body_widths() == ({128}, {128})
    assert k.spill_code() == (0, 2)
    assert k.should_stream_packs()
    assert sass_report.check([k]) == [
        "no row_kernel in the binary (renamed? update tools/sass_report.py)",
        "no finish_kernel in the binary (renamed? update tools/sass_report.py)",
    ]
    # a narrow store in the loop and a local store in the kernel's own code both fail
    k.insts[5] = (0x50, "STG.E desc[UR4][R8.64], R4")
    k.insts[3] = (0x40, "STL [R1], R4")
    problems = sass_report.check([k])
    assert any("stores 32-bit, no 128-bit pack" in p for p in problems) and any("a spill" in p for p in problems)

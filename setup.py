"""Builds fusedact._C: the CUDA kernels when nvcc and a CUDA build of torch are there,
the CPU kernels alone otherwise.

  FUSEDACT_CUDA=0   CPU only
  FUSEDACT_CUDA=1   CUDA required: fail when it cannot be built
  TORCH_CUDA_ARCH_LIST  the GPU architectures (e.g. "8.0;9.0"); else every arch torch knows

Build with the torch you will run:  pip install --no-build-isolation .
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"

# The nvcc on PATH may be a wrapper outside the toolkit (/usr/local/bin/nvcc), from
# which torch would guess CUDA_HOME=/usr/local; prefer the standard toolkit location.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402

# The supported torch range: from the oldest torch CI tests (.ci/install_paths.sh) on.
# FUSEDACT_ALLOW_UNTESTED_TORCH=1 builds against an older one anyway (e.g. to reproduce
# a problem seen there).
TORCH_MIN = (2, 13)
_torch_version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if _torch_version < TORCH_MIN and os.environ.get("FUSEDACT_ALLOW_UNTESTED_TORCH") != "1":
    raise RuntimeError(
        f"fusedact needs torch >= {'.'.join(map(str, TORCH_MIN))} (the oldest torch it is tested "
        f"with); this build would use torch {torch.__version__} from {os.path.dirname(torch.__file__)}. "
        "Install a newer torch, or set FUSEDACT_ALLOW_UNTESTED_TORCH=1 to build anyway."
    )

from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def use_cuda() -> bool:
    flag = os.environ.get("FUSEDACT_CUDA", "")
    nvcc = CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()
    available = nvcc and torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1" and not available:
        raise RuntimeError(
            "FUSEDACT_CUDA=1 but the CUDA kernels cannot be built: "
            f"CUDA_HOME={CUDA_HOME!r} (nvcc found: {nvcc}), "
            f"torch {torch.__version__} CUDA build: {torch.version.cuda is not None}"
        )
    return available


with_cuda = use_cuda()
sources = ["csrc/ops.cpp", "csrc/module.cpp", "csrc/fast_path.cpp", "csrc/cpu/activations_cpu.cpp"]
# -fopenmp: at::parallel_for is inline OpenMP in the ATen headers, serial without it
#   (the libgomp.so.1 it links is the one torch has already loaded).
# -fno-trapping-math: lets the compiler if-convert the selects (x <= -3 ? ...) and so
#   vectorize the loops; it changes no computed value (no reassociation, no
#   approximation). No fast-math anywhere: it would break parity with the reference.
cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
if with_cuda:
    sources.append("csrc/cuda/activations_cuda.cu")
    extension = CUDAExtension
    extra = {"cxx": cxx_flags + ["-DFUSEDACT_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo", "-DFUSEDACT_WITH_CUDA"]}
else:
    extension = CppExtension
    extra = {"cxx": cxx_flags}

# What build_info() reports beside what the binary knows of itself.
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "all (torch default)") if with_cuda else ""
(ROOT / "fusedact" / "_build_config.py").write_text(
    f"# Written by setup.py at build time.\nVERSION = {VERSION!r}\nCUDA_ARCH_LIST = {arch_list!r}\n"
)

setup(
    name="fusedact",
    version=VERSION,
    description="Fused, memory-lean swish, mish, hard_swish and ACON-C kernels for PyTorch",
    packages=find_packages(include=["fusedact", "fusedact.*"]),
    ext_modules=[
        extension(
            "fusedact._C",
            sources,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            include_dirs=[str(ROOT / "csrc")],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=[f"torch>={'.'.join(map(str, TORCH_MIN))}"],
    zip_safe=False,
)

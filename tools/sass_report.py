#!/usr/bin/env python3
"""The machine code of every CUDA kernel in fusedact's _C extension, read without a GPU.

For each kernel instantiation in the sm_90 cubin (cuobjdump -sass / -res-usage) it
lists: registers, local memory and stack (spills), shared memory, the widths of its
global loads and stores (LDG.E.128 is a 16-byte pack, LDG.E.U16 one half), and the
static instruction count per element of its streaming body.

  python tools/sass_report.py [FILE] [--arch sm_90] [--markdown OUT.md] [--check]

FILE is the extension (fusedact/_C*.so, the default) or a cubin. --check exits 1,
naming the kernels, when a kernel that should stream 16-byte packs has no 128-bit load
or no 128-bit store (narrow ones beside them are its scalar head and tail, its path for
misaligned tensors and its parameter loads), or when any kernel uses local memory or a
stack (a register spill).

Instructions per element: the streaming body is the loop (a backward branch) holding
the kernel's widest global stores, or, for a kernel without such a loop (one tile per
block), the code from its first 16-byte load to its last widest store, less any loop
inside (a scalar fallback path). Its static instruction count (NOPs excluded) divided
by the elements it stores: every element is stored once, so this is the work per
element of one pass. Index setup before the first load is not counted, as it was not
in a grid-stride loop's body. Out-of-line subroutines (the slow path of an
IEEE division, taken only for denormal or huge operands) are not counted; the
branches that skip code for saturated inputs are counted as if taken never, i.e. both
sides are in the count. It is a static figure: a floor of the issue cost, read at
2 us per instruction per element for 2^26 elements on an H100 (benchmarks/NOTES.md).

cuobjdump (and the nvdisasm it runs) come from PATH, $CUDA_HOME/bin, or the pip packages
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
(the CUDA toolkit's headers-only install on the CI machine has none); c++filt from
binutils demangles.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCALAR_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2}
SCALAR_NAME = {"float": "fp32", "double": "fp64", "c10::Half": "fp16", "c10::BFloat16": "bf16"}
OP_NAME = {"Swish": "swish", "Silu": "silu", "Mish": "mish", "HardSwish": "hard_swish", "AconC": "acon_c"}


def find_tool(name: str) -> str:
    """name on PATH, in $CUDA_HOME/bin, or in a pip nvidia-* package beside this Python."""
    hit = shutil.which(name)
    if hit:
        return hit
    cands = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    for sp in {p for p in sys.path if p.endswith("site-packages")}:
        cands += [Path(p) for p in sorted(glob.glob(f"{sp}/nvidia/*/bin/{name}"))]
        cands += [Path(p) for p in sorted(glob.glob(f"{sp}/nvidia/cuda_*/bin/{name}"))]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    sys.exit(f"sass_report: {name} not found (pip install nvidia-cuda-{name}, or put the CUDA toolkit's bin on PATH)")


def cuobjdump_env() -> dict:
    """The environment for cuobjdump: its -sass runs nvdisasm, which it looks for on PATH
    (the pip package nvidia-cuda-nvdisasm puts it in site-packages, not on PATH)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(find_tool("nvdisasm")) + os.pathsep + env.get("PATH", "")
    return env


def default_input() -> str:
    hits = sorted(glob.glob(str(ROOT / "fusedact" / "_C*.so")))
    if not hits:
        sys.exit("sass_report: no fusedact/_C*.so: build the extension first (make build)")
    return hits[0]


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(
        [find_tool("c++filt")], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return out


def split_template_args(s: str) -> list[str]:
    """'a<b, c>, d' -> ['a<b, c>', 'd']: commas at bracket depth 0."""
    args, depth, cur = [], 0, ""
    for ch in s:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        args.append(cur.strip())
    return args


@dataclass
class Kernel:
    mangled: str
    name: str = ""  # demangled, without the parameter list
    family: str = ""  # elementwise_kernel, row_kernel, ...
    args: list = field(default_factory=list)
    regs: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    insts: list = field(default_factory=list)  # (address, text)

    # ---- what the template arguments say
    def scalar(self) -> str | None:
        for a in self.args:
            if a in SCALAR_BYTES:
                return a
        return None

    def op(self) -> str:
        for a in self.args:
            m = re.search(r"math::(\w+)", a)
            if m:
                return OP_NAME.get(m.group(1), m.group(1))
        return "-"

    def backward(self) -> bool | None:
        if self.args and self.args[-1] in ("true", "false"):
            return self.args[-1] == "true"
        return None

    def vec(self) -> int | None:
        """VEC, the elements per pack, for the kernels that take it as an argument."""
        if self.family == "elementwise_kernel":
            return int(self.args[2])
        if self.family == "channels_kernel" and len(self.args) == 6:
            return int(self.args[4])
        return None

    def short(self) -> str:
        fam = self.family.replace("_kernel", "")
        parts = [fam, self.op()]
        s = self.scalar()
        if s:
            parts.append(SCALAR_NAME[s])
        if self.family == "finish_kernel":
            parts = [fam, {"float": "fp32", "double": "fp64"}[self.args[0]], f"NP={self.args[1]}"]
            return " ".join(parts)
        # parameter type of the channel kernels (scalar_t, or float beside a half x)
        if self.family in ("row_kernel", "channels_kernel"):
            p = self.args[2]
            parts.append("p=" + SCALAR_NAME.get(p, p))
        v = self.vec()
        if v is not None:
            parts.append(f"vec{v}")
            if self.family == "elementwise_kernel":
                parts.append({"int": "i32", "long": "i64"}.get(self.args[3], self.args[3]))
        b = self.backward()
        if b is not None:
            parts.append("bwd" if b else "fwd")
        return " ".join(parts)

    def should_stream_packs(self) -> bool:
        """The kernels whose streaming body must move 16-byte packs."""
        s = self.scalar()
        if self.family in ("elementwise_kernel", "channels_kernel") and self.vec() is not None:
            return self.vec() * SCALAR_BYTES[s] == 16
        return self.family == "row_kernel"

    # ---- the code
    def mem_ops(self, lo: int = 0, hi: int | None = None):
        """(kind, width in bits) of the global loads/stores with lo <= address <= hi."""
        out = []
        for addr, text in self.insts:
            if addr < lo or (hi is not None and addr > hi):
                continue
            m = re.search(r"\b(LDG|STG)(\.[A-Z0-9.]+)?\s", text + " ")
            if m:
                out.append((m.group(1), width_bits(m.group(2) or "")))
        return out

    def loops(self):
        """(start, end) address ranges closed by a backward branch."""
        out = []
        for addr, text in self.insts:
            m = re.search(r"\bBRA(\.\w+)*\s+(?:`\(.*?\)\s*)?0x([0-9a-f]+)", text)
            if m:
                tgt = int(m.group(2), 16)
                if tgt < addr:
                    out.append((tgt, addr))
        return out

    def body(self):
        """The streaming body (lo, hi, loop) or None when the kernel stores nothing: the
        loop holding its widest stores, else (a kernel that handles its packs without
        a loop) the code from its first widest load to its last widest store."""
        stores = [(a, w) for a, w in self._stores()]
        if not stores:
            return None
        widest = max(w for _, w in stores)
        best = None
        for lo, hi in self.loops():
            inside = [w for a, w in stores if lo <= a <= hi]
            if widest in inside:
                nbytes = sum(inside)
                if best is None or nbytes > best[0] or (nbytes == best[0] and hi - lo < best[2] - best[1]):
                    best = (nbytes, lo, hi)
        if best:
            return best[1], best[2], True
        loads = [a for a, t in self.insts if re.search(r"\bLDG\S*\.128", t)] if widest == 128 else []
        last = max(a for a, w in stores if w == widest)
        first = min(loads) if loads and min(loads) < last else 0
        return first, last, False

    def _stores(self):
        """The element stores: every global store, less the 32-bit ones of a float16 or
        bfloat16 kernel, which are its float32 partial sums, not elements."""
        half = SCALAR_BYTES.get(self.scalar() or "", 0) == 2
        for addr, text in self.insts:
            m = re.search(r"\bSTG(\.[A-Z0-9.]+)?\s", text + " ")
            if m:
                w = width_bits(m.group(1) or "")
                if not (half and w == 32):
                    yield addr, w

    def instructions_per_element(self) -> tuple[float, int, int] | None:
        """(instructions / element, instructions, elements) of the streaming body. In a
        body without a loop, loops inside it (a scalar fallback) are left out, and only
        the widest stores count as elements."""
        s = self.scalar()
        if s is None or self.family == "finish_kernel":
            return None
        b = self.body()
        if b is None:
            return None
        lo, hi, is_loop = b
        skip = [] if is_loop else [(a, z) for a, z in self.loops() if lo <= a and z <= hi]
        n = sum(
            1
            for a, t in self.insts
            if lo <= a <= hi and not any(x <= a <= z for x, z in skip) and not re.match(r"(@!?U?P\w+\s+)?NOP\b", t)
        )
        stores = [w for a, w in self._stores() if lo <= a <= hi]
        if not is_loop and stores:
            stores = [w for w in stores if w == max(stores)]
        elements = sum(stores) // (8 * SCALAR_BYTES[s])
        if elements == 0:
            return None
        return n / elements, n, elements

    def subroutines(self):
        """(start, end) of the out-of-line subroutines (CALL.REL targets up to their RET)."""
        out = []
        addrs = [a for a, _ in self.insts]
        for _, text in self.insts:
            m = re.search(r"\bCALL\.REL(\.\w+)*\s+0x([0-9a-f]+)", text)
            if m:
                lo = int(m.group(2), 16)
                rets = [a for a, t in self.insts if a >= lo and re.search(r"\bRET\b", t)]
                out.append((lo, rets[0] if rets else addrs[-1]))
        return out

    def spill_code(self) -> tuple[int, int]:
        """Local loads/stores (LDL/STL): (in the kernel's own code, in its subroutines).
        The first are spills; the second, in sm_90 code from nvcc 13, are the callee
        register saves of the IEEE division's slow path, run only for operands it cannot
        divide with its fast sequence."""
        subs = self.subroutines()
        own = sub = 0
        for a, t in self.insts:
            if re.search(r"\b(LDL|STL)\b", t):
                if any(lo <= a <= hi for lo, hi in subs):
                    sub += 1
                else:
                    own += 1
        return own, sub

    def body_widths(self) -> tuple[set, set]:
        b = self.body()
        if b is None:
            return set(), set()
        ops = self.mem_ops(b[0], b[1])
        return {w for k, w in ops if k == "LDG"}, {w for k, w in ops if k == "STG"}


def width_bits(suffix: str) -> int:
    for tag, w in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if tag in suffix:
            return w
    return 32


def read_kernels(path: str, arch: str) -> list[Kernel]:
    cuobjdump = find_tool("cuobjdump")
    env = cuobjdump_env()
    sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, path], capture_output=True, text=True, env=env)
    if sass.returncode != 0 or "Function :" not in sass.stdout:
        sys.exit(f"sass_report: no {arch} SASS in {path}: {sass.stderr.strip()[:400]}")
    kernels: dict[str, Kernel] = {}
    cur = None
    for line in sass.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.insts.append((int(m.group(1), 16), m.group(2)))
    res = subprocess.run(
        [cuobjdump, "-res-usage", "-arch", arch, path], capture_output=True, text=True, check=True, env=env
    ).stdout
    fn = None
    for line in res.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn in kernels:
            k = kernels[fn]
            k.regs, k.stack, k.shared, k.local = map(int, m.groups())
    names = demangle(list(kernels))
    for k, dem in zip(kernels.values(), names):
        dem = dem.replace("(anonymous namespace)", "{anon}").removeprefix("void ")
        k.name = dem[: dem.rfind("(")] if dem.endswith(")") else dem
        m = re.match(r"(?:[\w:{}]+::)?(\w+)<(.*)>$", k.name)
        if m:
            k.family, k.args = m.group(1), split_template_args(m.group(2))
        else:
            k.family = k.name.rsplit("::", 1)[-1]
    return sorted(kernels.values(), key=lambda k: (k.family, k.op(), k.short()))


def fmt_widths(ws: set) -> str:
    return "/".join(str(w) for w in sorted(ws, reverse=True)) if ws else "-"


def fmt_counts(ops: list, kind: str) -> str:
    """'128x2 16x1': how many loads (stores) of each width the kernel has."""
    ws = [w for k, w in ops if k == kind]
    return " ".join(f"{w}x{ws.count(w)}" for w in sorted(set(ws), reverse=True)) or "-"


def report(kernels: list[Kernel], path: str, arch: str) -> str:
    rows = [
        f"# SASS report: {Path(path).name}, {arch}",
        "",
        f"{len(kernels)} kernels. Registers per thread, stack and local bytes (spills), "
        "static shared bytes; the global loads (LDG) and stores (STG) of the kernel by "
        "width in bits (static counts: a pack path, its scalar head/tail and fallback); instructions per element of that body "  # noqa: E501
        "(static count / elements stored; see tools/sass_report.py for the definition).",
        "",
        "| kernel | regs | stack | local | spill LDL/STL | shared | LDG bits x count | STG bits x count | insts/elem | body insts / elems | 16 B expected |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in kernels:
        ops = k.mem_ops()
        ld, st = fmt_counts(ops, "LDG"), fmt_counts(ops, "STG")
        ipe = k.instructions_per_element()
        ipe_s = f"{ipe[0]:.1f}" if ipe else "-"
        body = f"{ipe[1]} / {ipe[2]}" if ipe else "-"
        own, sub = k.spill_code()
        spill = f"{own}" + (f" (+{sub} in a slow-path subroutine)" if sub else "")
        rows.append(
            f"| {k.short()} | {k.regs} | {k.stack} | {k.local} | {spill} | {k.shared} | "
            f"{ld} | {st} | {ipe_s} | {body} | "
            f"{'yes' if k.should_stream_packs() else ''} |"
        )
    return "\n".join(rows) + "\n"


# Ops whose backward kernel only sums (math::kWrites is false): its pack path loads
# 16-byte packs and stores nothing but its partial sums.
SUMS_ONLY_OPS = ("math::BnMoments",)

# Spills reported but not failed on, with why. batch_norm_act's CUDA passes
# (math::BnAct) keep up to 16 B of stack in 6 instantiations: ptxas's own trade for
# occupancy (with __launch_bounds__(kThreads, 1) they spill nothing but take 43-74
# registers instead of 40-64, 1-3 resident blocks fewer per SM; benchmarks/NOTES.md). They
# run only with fusedact.config.cuda_bn_passes on, off until measured on a GPU, which is
# to say which is faster. Any other kernel, or more than 16 B, still fails.
ALLOWED_SPILL = {"math::BnAct<": 16}


def spilled(k: Kernel) -> bool:
    """Local memory, or local loads/stores in the kernel's own code (not its slow-path
    subroutines' register saves)."""
    return bool(k.local or k.spill_code()[0])


def allowed_spill(k: Kernel) -> bool:
    return k.local == 0 and any(tag in k.name and k.stack <= b for tag, b in ALLOWED_SPILL.items())


def check(kernels: list[Kernel]) -> list[str]:
    problems = []
    if not kernels:
        problems.append("no kernels found")
    families = {k.family for k in kernels}
    for fam in ("elementwise_kernel", "row_kernel", "finish_kernel"):
        if fam not in families:
            problems.append(f"no {fam} in the binary (renamed? update tools/sass_report.py)")
    for k in kernels:
        if spilled(k) and allowed_spill(k):
            print(f"sass_report: allowed spill (ALLOWED_SPILL): {k.short()}, stack {k.stack} B [{k.name}]")
        elif spilled(k):
            own, _ = k.spill_code()
            problems.append(
                f"{k.short()}: local memory {k.local} B, {own} local loads/stores "
                f"in its own code (a spill; stack {k.stack} B) [{k.name}]"
            )
        if k.should_stream_packs():
            # The pack path must be there; narrow accesses beside it are the head and tail
            # scalars, the misaligned fallback and the parameter loads.
            ops = k.mem_ops()
            ld = {w for kind, w in ops if kind == "LDG"}
            st = {w for kind, w in ops if kind == "STG"}
            sums_only = any(op in k.name for op in SUMS_ONLY_OPS)
            if 128 not in ld or (128 not in st and not sums_only):
                problems.append(
                    f"{k.short()}: loads {fmt_widths(ld)}-bit and stores "
                    f"{fmt_widths(st)}-bit, no 128-bit pack [{k.name}]"
                )
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", help="the _C extension (default) or a cubin")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--markdown", help="write the report here")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 when a pack kernel is not 16-byte wide or any kernel spills"
    )
    a = ap.parse_args(argv)
    path = a.file or default_input()
    kernels = read_kernels(path, a.arch)
    text = report(kernels, path, a.arch)
    if a.markdown:
        Path(a.markdown).parent.mkdir(parents=True, exist_ok=True)  # build/ is not there on a clean clone
        Path(a.markdown).write_text(text)
    if not a.check or not a.markdown:
        print(text, end="")
    if a.check:
        problems = check(kernels)
        for p in problems:
            print("SASS CHECK FAILED:", p, file=sys.stderr)
        if problems:
            return 1
        print(
            f"SASS check passed: {len(kernels)} kernels, no spills "
            f"(but {sum(spilled(k) and allowed_spill(k) for k in kernels)} allowed, ALLOWED_SPILL), "
            f"{sum(k.should_stream_packs() for k in kernels)} pack kernels all 16-byte wide"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""First look at the CUDA kernels' speed: large tensors, native vs eager vs copy.
(Produced benchmarks/results/h100-2026-11-23/probe.log; benchmarks/bench.py is the
full benchmark.)"""

import torch
import torch.nn.functional as F
import triton.testing as tt

N = 1 << 26
x32 = torch.randn(N, device="cuda")
cp = torch.empty_like(x32)
t_copy = tt.do_bench(lambda: cp.copy_(x32), return_mode="median")
bw = 2 * N * 4 / t_copy / 1e6
print(f"copy fp32 2^26: {t_copy:.4f} ms = {bw:.0f} GB/s")
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(N, device="cuda", dtype=dt)
    g = torch.randn_like(x)
    es = x.element_size()
    ops = {
        "swish": (
            lambda: torch.ops.fusedact.swish_forward(x, 1.0, None),
            lambda: F.silu(x),
            lambda: torch.ops.fusedact.swish_backward(g, x, 1.0, None),
            lambda: torch.ops.aten.silu_backward(g, x),
        ),
        "mish": (
            lambda: torch.ops.fusedact.mish_forward(x),
            lambda: F.mish(x),
            lambda: torch.ops.fusedact.mish_backward(g, x),
            lambda: torch.ops.aten.mish_backward(g, x),
        ),
        "hard_swish": (
            lambda: torch.ops.fusedact.hard_swish_forward(x),
            lambda: F.hardswish(x),
            lambda: torch.ops.fusedact.hard_swish_backward(g, x),
            lambda: torch.ops.aten.hardswish_backward(g, x),
        ),
    }
    for name, (f, fe, b, be) in ops.items():
        tf, tfe, tb, tbe = (tt.do_bench(fn, return_mode="median") for fn in (f, fe, b, be))
        print(
            f"{name:10s} {str(dt):15s} fwd {tf:.4f} ms ({2 * N * es / tf / 1e6 / bw * 100:.0f}% copy) eager {tfe:.4f} | "  # noqa: E501
            f"bwd {tb:.4f} ms ({3 * N * es / tb / 1e6 / bw * 100:.0f}% copy) eager {tbe:.4f}"
        )
    # acon_c NCHW and channels_last
    for fmt in (torch.contiguous_format, torch.channels_last):
        xa = torch.randn(64, 256, 64, 64, device="cuda", dtype=dt).contiguous(memory_format=fmt)
        ga = torch.randn_like(xa)
        C = 256
        p1 = torch.randn(C, device="cuda")
        p2 = torch.randn(C, device="cuda")
        bt = torch.randn(C, device="cuda")
        if dt != torch.float32:
            pass
        ta = tt.do_bench(lambda: torch.ops.fusedact.acon_c_forward(xa, p1, p2, bt, 1), return_mode="median")
        tab = tt.do_bench(lambda: torch.ops.fusedact.acon_c_backward(ga, xa, p1, p2, bt, 1), return_mode="median")
        Na = xa.numel()
        print(
            f"acon_c {str(fmt):25s} {str(dt):15s} fwd {ta:.4f} ms ({2 * Na * es / ta / 1e6 / bw * 100:.0f}%) bwd {tab:.4f} ms ({3 * Na * es / tab / 1e6 / bw * 100:.0f}%)"  # noqa: E501
        )

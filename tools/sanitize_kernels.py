"""Runs every CUDA kernel of fusedact once, forward and backward, on small tensors that
take each path: packs and scalar heads/tails (views starting at element 1, x and g
misaligned differently), int32 flat tiles, NCHW rows (7x7, 14x14, 64x64 maps, runs
longer than a segment), channels innermost with 16-byte packs (C % 8 == 0) and without
(C = 13), per-sample beta, (N, L, C), swish's learnable beta, every dtype and mixed
precision. Meant to run under compute-sanitizer (tools/device_check.sh sanitize):

  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python tools/sanitize_kernels.py

(without the caching allocator, an access past a tensor's end is past its allocation,
where memcheck sees it). Exits 0 after a synchronize; the sanitizer reports the errors.
"""

from __future__ import annotations

import torch

import fusedact

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def views(shape, dtype, offset):
    n = 1
    for s in shape:
        n *= s
    buf = torch.randn(n + offset, device="cuda").to(dtype)
    return buf[offset:].view(shape)


def run(x, params, op, channel_dim=1, g_offset=0):
    x = x.detach().requires_grad_()
    leaves = [x] + [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    if op == "swish":
        y = fusedact.swish(x, params[0])
    elif op == "acon_c":
        y = fusedact.acon_c(x, *params, channel_dim=channel_dim)
    else:
        y = getattr(fusedact, op)(x)
    g = views(tuple(x.shape), x.dtype, g_offset)
    if x.stride() != g.stride():
        g = g.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else g
    torch.autograd.grad(y, leaves, g)


def run_batch_norm_act(x):
    """batch_norm_act's CUDA passes (fusedact.config.cuda_bn_passes): bn_moments twice,
    bn_act_forward, bn_act_backward and bn_dx, training, each act; float32 parameters
    for 16-bit x (as under autocast)."""
    pd = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = x.shape[1]
    fusedact.config.cuda_bn_passes = True
    try:
        for act, params in (
            ("identity", []),
            ("swish", []),
            ("swish", [torch.tensor([1.3], device="cuda", dtype=pd, requires_grad=True)]),
            ("mish", []),
            ("hard_swish", []),
            ("acon_c", [torch.randn(C, device="cuda", dtype=pd, requires_grad=True) for _ in range(3)]),
        ):
            w = torch.rand(C, device="cuda", dtype=pd, requires_grad=True)
            b = torch.randn(C, device="cuda", dtype=pd, requires_grad=True)
            rm, rv = torch.zeros(C, device="cuda", dtype=pd), torch.ones(C, device="cuda", dtype=pd)
            xr = x.detach().requires_grad_()
            y = fusedact.batch_norm_act(xr, rm, rv, w, b, True, 0.1, 1e-5, act, *params)
            torch.autograd.grad(y, [xr, w, b, *params], torch.randn_like(y))
    finally:
        fusedact.config.cuda_bn_passes = False
    return 6


def main():
    assert fusedact.build_info()["cuda"], "the CUDA kernels are not built in"
    count = 0
    for dtype in DTYPES:
        pdts = [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
        for op in ("swish", "mish", "hard_swish"):
            for n in (1, 7, 4096 * 3 + 5, 70001):
                for off, g_off in ((0, 0), (1, 1), (1, 2)):
                    x = views((n,), dtype, off)
                    for pd in pdts:
                        beta = torch.tensor(1.3, device="cuda", dtype=pd, requires_grad=True)
                        params = [1.7] if op == "swish" and pd is dtype else ([beta] if op == "swish" else [])
                        if op != "swish" and pd is not dtype:
                            continue
                        run(x, params, op, g_offset=g_off)
                        count += 1
        shapes = [  # (shape, channel_dim, memory format)
            # short maps: several runs a block (the last block partly idle), groups of 1 and 2 warps
            ((2, 8, 7, 7), 1, None),
            ((2, 8, 14, 14), 1, None),
            ((3, 11, 7, 7), 1, None),
            ((2, 5, 28, 28), 1, None),
            ((2, 3, 64, 64), 1, None),
            ((1, 2, 91, 91), 1, None),
            ((2, 16, 7, 9), 1, torch.channels_last),
            ((2, 13, 5, 5), 1, torch.channels_last),
            ((3, 37, 24), -1, None),
            ((3, 37, 13), -1, None),
        ]
        for shape, cd, fmt in shapes:
            for off in (0, 1):
                x = views(shape, dtype, off)
                if fmt is not None:
                    x = x.contiguous(memory_format=fmt)
                C = shape[cd]
                for pd in pdts:
                    for per_sample in (False, True):
                        p1 = torch.randn(C, device="cuda", dtype=pd, requires_grad=True)
                        p2 = torch.randn(C, device="cuda", dtype=pd, requires_grad=True)
                        bshape = (shape[0], C) if per_sample else (C,)
                        beta = (torch.rand(bshape, device="cuda") + 0.5).to(pd).requires_grad_()
                        run(x, [p1, p2, beta], "acon_c", channel_dim=cd)
                        count += 1
                    b = torch.tensor(0.8, device="cuda", dtype=pd, requires_grad=True)
                    run(x, [b], "swish")
                    count += 1
                if cd == 1:
                    count += run_batch_norm_act(x)
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {count} forward+backward calls done")


if __name__ == "__main__":
    main()

"""Train a small CNN on scikit-learn's handwritten digits twice, side by side: once
with fusedact's fused activations and once with the same activations in eager PyTorch
(fusedact's reference implementations, backend="eager"). Same initial weights, same
batches, trained in lockstep, one epoch of each in turn.

It prints a progress bar, then per model: time per epoch, memory, final test accuracy,
and how far apart the two loss curves are; it saves a PNG of the loss curves. It uses
the GPU when there is one.

    python examples/train_digits.py                 # about a minute on 2 CPU cores
    python examples/train_digits.py --epochs 2 --out /tmp/digits.png

Exit status 1 when the runs disagree beyond the tolerances (--tol-start, --tol-epoch,
--tol-acc): the first steps' losses, the epoch mean losses, the final test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fusedact


def make_model(backend: str) -> nn.Module:
    """A CNN for the digits (upsampled to 16x16) with one of each fusedact activation."""

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]

    return nn.Sequential(
        *conv(1, 32),
        fusedact.nn.AconC(32, backend=backend),
        *conv(32, 64),
        fusedact.nn.MetaAconC(64, r=8, backend=backend),
        nn.MaxPool2d(2),  # 8x8
        *conv(64, 64),
        fusedact.nn.Swish(1.0, learnable=True, backend=backend),
        *conv(64, 64),
        fusedact.nn.Mish(backend=backend),
        nn.MaxPool2d(2),  # 4x4
        *conv(64, 128),
        fusedact.nn.HardSwish(backend=backend),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def load_digits(device, seed: int):
    """scikit-learn's 1797 8x8 digits (they ship inside the package), upsampled to 16x16:
    80% train, 20% test."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # 16x16
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done, self.start = total, width, 0, time.perf_counter()

    def step(self, text: str = "") -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:5.1f}s eta {eta:4.0f}s {text}  ")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes the autograd graph keeps for the backward of one training step (each
    storage counted once, parameters excluded): the activation memory of training."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backend", default="native", choices=["native", "triton"], help="the fused backend")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tol-start",
        type=float,
        default=1e-3,
        help="largest |fused - eager| loss over the first 10 steps (default 1e-3; 2e-7 "
        "measured on a CPU, where the runs differ in float32 rounding only; GPUs "
        "run the convolutions in TF32, 10-bit inputs, which amplifies that)",
    )
    ap.add_argument(
        "--tol-epoch",
        type=float,
        default=0.25,
        help="largest relative difference of the epoch mean losses (default 0.25)",
    )
    ap.add_argument(
        "--tol-acc",
        type=float,
        default=0.02,
        help="largest difference of the final test accuracies (default 0.02, 7 of 360 digits)",
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "digits_loss.png"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_digits(device, args.seed)
    fused = make_model(args.backend).to(device)
    eager = make_model("eager").to(device)
    eager.load_state_dict(fused.state_dict())
    runs = {
        "fused": dict(model=fused, losses=[], times=[], peak=0),
        "eager": dict(model=eager, losses=[], times=[], peak=0),
    }
    for r in runs.values():
        r["opt"] = torch.optim.Adam(r["model"].parameters(), lr=args.lr)
        r["saved"] = saved_bytes(r["model"], xtr[: args.batch_size], ytr[: args.batch_size])

    steps_per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    print(
        f"fusedact {fusedact.__version__}, torch {torch.__version__}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"backend {args.backend}; {len(xtr)} train / {len(xte)} test digits, "
        f"{args.epochs} epochs of {steps_per_epoch} steps"
    )
    progress = Progress(args.epochs * 2)
    for epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        # one epoch of each, the first alternating, so that neither always runs on a
        # warmer machine
        for name in ("fused", "eager") if epoch % 2 == 0 else ("eager", "fused"):
            r = runs[name]
            model, opt = r["model"], r["opt"]
            model.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            losses = []
            for i in range(0, len(xtr), args.batch_size):
                idx = order[i : i + args.batch_size].to(device)
                loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            sync(device)
            r["times"].append(time.perf_counter() - start)
            r["losses"] += [float(v) for v in losses]
            if device.type == "cuda":
                r["peak"] = max(r["peak"], torch.cuda.max_memory_allocated(device))
            progress.step(f"epoch {epoch + 1} {name} loss {r['losses'][-1]:.4f}")

    for r in runs.values():
        r["model"].eval()
        with torch.no_grad():
            r["accuracy"] = (r["model"](xte).argmax(1) == yte).float().mean().item()

    f, e = runs["fused"], runs["eager"]
    print(f"{'':8}{'s/epoch':>10}{'saved for backward':>20}{'GPU peak':>11}{'last epoch loss':>17}{'test acc':>10}")
    for name, r in runs.items():
        t = sorted(r["times"][1:] or r["times"])  # the first epoch carries one-time setup
        r["per_epoch"] = t[len(t) // 2]
        r["epoch_loss"] = [
            sum(r["losses"][k : k + steps_per_epoch]) / steps_per_epoch
            for k in range(0, len(r["losses"]), steps_per_epoch)
        ]
        peak = f"{r['peak'] / 2**20:.1f} MiB" if device.type == "cuda" else "-"
        print(
            f"{name:8}{r['per_epoch']:>10.3f}{r['saved'] / 2**10:>17.0f} KiB{peak:>11}"
            f"{r['epoch_loss'][-1]:>17.4f}{r['accuracy']:>10.3f}"
        )
    print(
        f"fused vs eager: {e['per_epoch'] / f['per_epoch']:.2f}x speed, "
        f"{f['saved'] / e['saved']:.2f}x the saved activation memory"
        + (f", {f['peak'] / e['peak']:.2f}x the GPU peak" if device.type == "cuda" else "")
    )

    # The two runs compute the same functions to float32 rounding, so their curves start
    # on top of each other; training then amplifies the rounding differences (the two
    # trajectories drift apart like any two runs that differ in the last bits), so
    # later steps are compared through their epoch means, and the end through accuracy.
    diffs = [abs(a - b) for a, b in zip(f["losses"], e["losses"])]
    first = max(diffs[:10])
    epoch_rel = max(abs(a - b) / max(a, b) for a, b in zip(f["epoch_loss"], e["epoch_loss"]))
    acc_gap = abs(f["accuracy"] - e["accuracy"])
    checks = [
        (f"first 10 steps: largest |fused - eager| loss {first:.1e}", first <= args.tol_start),
        (f"epoch mean losses: largest relative difference {epoch_rel:.1%}", epoch_rel <= args.tol_epoch),
        (f"test accuracy: {f['accuracy']:.3f} fused, {e['accuracy']:.3f} eager", acc_gap <= args.tol_acc),
    ]
    for text, passed in checks:
        print(f"{text}: {'ok' if passed else 'OUT OF TOLERANCE'}")
    ok = all(passed for _, passed in checks)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_d) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    steps = range(1, len(diffs) + 1)
    ax.plot(
        steps,
        e["losses"],
        label=f"eager (test acc {e['accuracy']:.3f}, {e['per_epoch']:.2f} s/epoch)",
        lw=2.5,
        alpha=0.6,
    )
    ax.plot(
        steps,
        f["losses"],
        label=f"fused {args.backend} (test acc {f['accuracy']:.3f}, {f['per_epoch']:.2f} s/epoch)",
        lw=1,
    )
    ends = [steps_per_epoch * (k + 1) for k in range(len(e["epoch_loss"]))]
    ax.plot(ends, e["epoch_loss"], "o", color="C0", label="eager, epoch mean")
    ax.plot(ends, f["epoch_loss"], "x", color="C1", label="fused, epoch mean")
    ax.set_yscale("log")
    ax.set_ylabel("training loss")
    ax.set_title(f"sklearn digits, CNN with AconC, MetaAconC, Swish, Mish, HardSwish ({device.type})")
    ax.legend()
    ax_d.plot(steps, [max(d, 1e-9) for d in diffs], color="k", lw=1)
    ax_d.set_yscale("log")
    ax_d.set_ylabel("|fused - eager|")
    ax_d.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"loss curves: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

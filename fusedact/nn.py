"""Modules: Swish, Mish, HardSwish, AconC, MetaAconC.

AconC and MetaAconC keep the parameter layout of the ACON paper's code and YOLOv5
(p1, p2 ~ randn and beta = 1, shape (1, C, 1, 1)), so their state dicts load as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as F

__all__ = ["Swish", "Mish", "HardSwish", "AconC", "MetaAconC"]


class Swish(nn.Module):
    """Swish-beta; ``learnable=True`` makes beta a parameter of shape (1,): one dimension,
    because FSDP2's fully_shard cannot shard a 0-dim parameter. A state dict saved with
    the earlier 0-dim beta still loads."""

    def __init__(self, beta: float = 1.0, learnable: bool = False, *, backend: str | None = None):
        super().__init__()
        self.backend = backend
        if learnable:
            self.beta = nn.Parameter(torch.tensor([float(beta)]))
        else:
            self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without the keyword when it is the default: it costs 0.5 us with cold caches
        if self.backend is None:
            return F.swish(x, self.beta)
        return F.swish(x, self.beta, backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "beta"
        if isinstance(self.beta, torch.Tensor) and key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        learnable = isinstance(self.beta, torch.Tensor)
        beta = self.beta.detach().item() if learnable else self.beta
        return f"beta={beta:g}, learnable={learnable}"


class Mish(nn.Module):
    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return F.mish(x)
        return F.mish(x, backend=self.backend)


class HardSwish(nn.Module):
    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return F.hard_swish(x)
        return F.hard_swish(x, backend=self.backend)


def _per_channel(p: torch.Tensor) -> torch.Tensor:
    """A (1, C, 1, 1) parameter as (C,), valid for any x and channel_dim (a view: its
    gradient reaches the parameter in its own shape)."""
    return p.reshape(-1)


class AconC(nn.Module):
    """ACON-C: ``(p1 - p2) x sigmoid(beta (p1 - p2) x) + p2 x`` with learnable p1, p2, beta
    per channel (Ma et al., CVPR 2021). Channels at ``channel_dim`` (1: NCHW)."""

    def __init__(self, channels: int, *, channel_dim: int = 1, backend: str | None = None):
        super().__init__()
        self.channel_dim = channel_dim
        self.backend = backend
        self.p1 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.acon_c(
            x, _per_channel(self.p1), _per_channel(self.p2), _per_channel(self.beta),
            channel_dim=self.channel_dim, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"channels={self.p1.numel()}, channel_dim={self.channel_dim}"


def _spatial_mean(x: torch.Tensor, conv_dims: int) -> torch.Tensor:
    """x's mean over its spatial dims (2 and after), one dimension at a time, as (N, C)
    followed by conv_dims ones: the 1x1 convolutions' input."""
    pooled = x
    for d in range(2, x.dim()):
        pooled = pooled.mean(dim=d, keepdim=True)
    return pooled.reshape(x.shape[0], x.shape[1], *([1] * conv_dims))


# A leaf under torch.fx.symbolic_trace: its loop runs over x's rank, which a Proxy has not.
torch.fx.wrap("_spatial_mean")


class MetaAconC(nn.Module):
    """Meta-ACON: beta = sigmoid(fc2(fc1(mean of x over the spatial dims))) per sample
    and channel, fc1 and fc2 1x1 convolutions of width max(r, C // r). x is
    (N, C, *spatial).

    ``bn=True`` puts a BatchNorm after each convolution, as the ACON paper's code does;
    the default leaves them out, as YOLOv5 does (BatchNorm there fails at batch size 1).
    The spatial mean is taken one dimension at a time, as both codes do, so a module
    converted from theirs (``fusedact.convert``) computes the same beta bit for bit.
    The 1x1 convolutions may be Conv1d (x of shape (N, C, L)) where a converted module
    had them."""

    def __init__(self, channels: int, r: int = 16, *, bn: bool = False, backend: str | None = None):
        super().__init__()
        hidden = max(r, channels // r)
        self.backend = backend
        self.p1 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else None
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.bn2 = nn.BatchNorm2d(channels) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[0], x.shape[1]
        conv_dims = len(self.fc1.kernel_size)  # 2 for Conv2d, 1 for Conv1d
        h = self.fc1(_spatial_mean(x, conv_dims).to(self.fc1.weight.dtype))
        if self.bn1 is not None:
            h = self.bn1(h)
        h = self.fc2(h)
        if self.bn2 is not None:
            h = self.bn2(h)
        # Under autocast fc2 gives float16/bfloat16 while p1, p2 stay float32: beta takes
        # the parameters' dtype, which acon_c needs for all three.
        beta = torch.sigmoid(h).to(self.p1.dtype)
        return F.acon_c(
            x, _per_channel(self.p1), _per_channel(self.p2), beta.reshape(N, C),
            channel_dim=1, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"channels={self.p1.numel()}, hidden={self.fc1.out_channels}, bn={self.bn1 is not None}"

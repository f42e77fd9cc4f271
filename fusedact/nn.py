"""Modules: Swish, Mish, HardSwish, AconC, MetaAconC, BatchNormAct2d, BatchNormAct1d.

AconC and MetaAconC keep the parameter layout of the ACON paper's code and YOLOv5
(p1, p2 ~ randn and beta = 1, shape (1, C, 1, 1)), so their state dicts load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F

__all__ = ["Swish", "Mish", "HardSwish", "AconC", "MetaAconC", "BatchNormAct2d", "BatchNormAct1d", "SyncBatchNormAct"]


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
            x,
            _per_channel(self.p1),
            _per_channel(self.p2),
            _per_channel(self.beta),
            channel_dim=self.channel_dim,
            backend=self.backend,
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
            x,
            _per_channel(self.p1),
            _per_channel(self.p2),
            beta.reshape(N, C),
            channel_dim=1,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"channels={self.p1.numel()}, hidden={self.fc1.out_channels}, bn={self.bn1 is not None}"


# ---- BatchNorm + activation


def _act_call(act: nn.Module):
    """(act name, act_params, backend) for batch_norm_act from an activation module
    ("identity" for one that runs after the op)."""
    if type(act) is nn.Identity:  # first: a module's getattr of a missing name raises inside
        return "identity", (), None
    backend = getattr(act, "backend", None)
    if isinstance(act, Swish):
        return "swish", ((act.beta,) if isinstance(act.beta, torch.Tensor) or act.beta != 1.0 else ()), backend
    if isinstance(act, Mish):
        return "mish", (), backend
    if isinstance(act, HardSwish):
        return "hard_swish", (), backend
    if isinstance(act, AconC) and act.channel_dim == 1:
        return "acon_c", (act.p1.reshape(-1), act.p2.reshape(-1), act.beta.reshape(-1)), backend
    return "identity", (), None


def _act_runs_after(act: nn.Module) -> bool:
    """Whether act is outside batch_norm_act's activations (any module but Swish, Mish,
    HardSwish, AconC over dim 1 and nn.Identity: nn.ReLU, nn.GELU, MetaAconC, ...): the
    BatchNorm then runs as the op's "identity" and act runs after it, as its own module."""
    return _runs_after(act, _act_call(act)[0])


def _runs_after(act: nn.Module, name: str) -> bool:
    """_act_runs_after from act's name in _act_call, where that is known."""
    return name == "identity" and type(act) is not nn.Identity


def _make_act(act, num_features: int, backend) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    kw = {} if backend is None else {"backend": backend}
    makers = {
        "swish": lambda: Swish(**kw),
        "silu": lambda: Swish(**kw),
        "mish": lambda: Mish(**kw),
        "hard_swish": lambda: HardSwish(**kw),
        "acon_c": lambda: AconC(num_features, **kw),
        "identity": nn.Identity,
    }
    if act not in makers:
        raise ValueError(
            f"fusedact.nn.BatchNormAct: unknown act {act!r}; choose one of {sorted(makers)} or pass a module"
        )
    return makers[act]()


def _fx_leaf(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """Under torch.fx.symbolic_trace, a call_module node of the module, as fx makes of
    torch.nn's nn.BatchNorm2d (a leaf): the GraphModule calls the module, its running
    statistics and momentum rules included, and a node keeps the BatchNorm's path
    (torchvision's create_feature_extractor names nodes by it)."""
    return x.tracer.create_proxy("call_module", x.tracer.path_of_module(module), (x,), {})


class _BatchNormActMixin:
    """nn.BatchNorm's state (weight, bias, running_mean, running_var, num_batches_tracked:
    the same state_dict keys) and its momentum rules, then the activation, in one op. An
    activation module outside the op's (nn.ReLU, nn.GELU, ...) runs after the op's
    "identity", which still saves only x and the statistics and beats nn.BatchNorm2d's
    training step at MobileNetV3's BatchNorm + ReLU shapes (benchmarks/NOTES.md)."""

    def __init__(
        self,
        num_features: int,
        act="swish",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act = _make_act(act, num_features, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        return self._bn_act_forward(x)

    def _momentum_factor(self) -> float:
        """nn.BatchNorm's own rules: counts the batch; momentum=None is the cumulative average."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return factor

    def _bn_act_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = self._momentum_factor()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        name, params, backend = _act_call(self.act)
        after = _runs_after(self.act, name)
        if (
            name == "identity"
            and not bn_training
            and not torch.compiler.is_compiling()  # first: no guard on x's shape there
            and x.numel() <= 64 * x.shape[1]
        ):
            # eval with nothing to fuse and at most 64 values a channel: nn.BatchNorm2d's
            # own call, one aten kernel; ours are two, 2-8 us more at (1, C, 7, 7) and
            # level to 1.8x faster at larger maps (benchmarks/NOTES.md)
            y = torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, factor, self.eps
            )
            return self.act(y) if after else y
        kw = {} if backend is None else {"backend": backend}
        y = F.batch_norm_act(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
            name,
            *params,
            **kw,
        )
        return self.act(y) if after else y

    @classmethod
    def from_modules(cls, bn: nn.modules.batchnorm._BatchNorm, act: nn.Module, *, own_act: bool = True):
        """A BatchNormAct over bn's own Parameter and buffer objects (an optimizer built
        before keeps them) and the activation module ``act`` (a fusedact activation,
        nn.Identity, or any other module, which runs after the op). ``own_act=False``:
        act stays registered where it was (its parameters keep their state_dict keys
        there) and is only used here, not held as a submodule (ultralytics' Conv, whose
        ``act`` is its own child)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(new, attr, getattr(bn, attr))
        for name, p in bn._parameters.items():
            new._parameters[name] = p
        for name, b in bn._buffers.items():
            new._buffers[name] = b
        new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
        act = _make_act(act, bn.num_features, None)
        if own_act:
            new.act = act
        else:
            object.__setattr__(new, "act", act)  # an attribute, not a submodule
        new.train(bn.training)  # after act: a child made here takes bn's mode too
        return new


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(nn.BatchNorm2d(x))`` in one op (fusedact.batch_norm_act): saves x and the
    statistics, never the BatchNorm output. ``act``: "swish", "mish", "hard_swish",
    "acon_c", "identity" or a module: a fusedact activation runs in the op, any other
    (nn.ReLU, ...) after the op's "identity"; its parameters are under ``act.``."""


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """BatchNormAct2d for (N, C) and (N, C, L) input."""


class SyncBatchNormAct(_BatchNormActMixin, nn.modules.batchnorm._BatchNorm):
    """``act(nn.SyncBatchNorm(x))``: in training under torch.distributed, the statistics
    of the whole process group (fusedact.sync_batch_norm_act on the CPU; on other
    devices nn.SyncBatchNorm's own synced path, then the activation); otherwise
    BatchNormAct2d's one op. nn.SyncBatchNorm's state_dict keys and ``process_group``
    (an attribute, set after construction). Not a subclass of nn.SyncBatchNorm: DDP refuses those on the CPU."""

    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    process_group = None  # nn.SyncBatchNorm's: None is the world; from_modules copies bn's

    @classmethod
    def from_modules(cls, bn: nn.modules.batchnorm._BatchNorm, act: nn.Module, *, own_act: bool = True):
        """As BatchNormAct2d.from_modules; the process group is bn's (nn.SyncBatchNorm) or the world."""
        new = super().from_modules(bn, act, own_act=own_act)
        new.process_group = getattr(bn, "process_group", None)
        return new

    def _group(self):
        """The process group to sync over, or None where nn.SyncBatchNorm would not sync."""
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _fx_leaf(self, x)
        group = self._group()
        if group is None:
            return self._bn_act_forward(x)
        name, params, backend = _act_call(self.act)
        if x.device.type != "cpu" or backend not in (None, "native"):
            return self.act(nn.SyncBatchNorm.forward(self, x))
        self._check_input_dim(x)
        factor = self._momentum_factor()
        track = self.track_running_stats
        y = F.sync_batch_norm_act(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            factor,
            self.eps,
            name,
            *params,
            group=group,
        )
        return self.act(y) if _runs_after(self.act, name) else y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """nn.SyncBatchNorm.convert_sync_batchnorm that keeps fusedact's fused blocks:
        a BatchNormAct2d/1d becomes a SyncBatchNormAct over the same Parameters, buffers
        and activation; other BatchNorms become nn.SyncBatchNorm as there. (torch's own
        function turns a BatchNormAct into a plain nn.SyncBatchNorm, which drops the
        activation.)"""
        if isinstance(module, (BatchNormAct2d, BatchNormAct1d)):
            own = "act" in module._modules
            new = cls.from_modules(module, module.act, own_act=own)
            new.process_group = process_group
            return new
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
        for name, child in list(module._modules.items()):
            if child is not None:
                new = cls.convert_sync_batchnorm(child, process_group)
                if new is not child:
                    setattr(module, name, new)
        return module

"""Deployment, exact stage, the modules: the layers a masked SG layer becomes (section 3.6,
Eq. 17). Filters are permuted so each group is contiguous (Q), the input channels each group reads
are gathered (P: reused channels duplicated, ignored ones dropped), and each group is a dense
convolution over its own channels. Outputs equal the masked model's to float32 rounding.

A GatheredBatchNorm2d is a BN that first selects the channels its SG conv reads. How a layer runs
in eval mode (its execution plan) is sgdet.deploy.plans' business; a layer only carries it out."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import SGConv2d, SGLinear
from . import native, plans


def _group_layout(layer: nn.Module, in_map: torch.Tensor | None):
    """Permutation and per-group input indices of an SG layer.

    Returns (order, out_order, in_index, group_out, group_in, per_group): ``order`` lists filters
    group by group, ``out_order`` restores the original channel order, ``in_index`` concatenates
    the input channels of each group (``per_group``; remapped through ``in_map`` when the input
    was gathered)."""
    group, keep = layer.group.cpu(), layer.group_keep().cpu()
    order = torch.argsort(group, stable=True)
    out_order = torch.argsort(order)
    group_out = torch.bincount(group, minlength=keep.shape[0]).tolist()
    per_group = [torch.nonzero(row).flatten() for row in keep]
    in_index = torch.cat(per_group) if per_group else torch.zeros(0, dtype=torch.long)
    if in_map is not None:
        in_index = in_map[in_index]
    return order, out_order, in_index, group_out, [int(p.numel()) for p in per_group], per_group


def select_channels(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(dim, index), keeping a channels_last feature map channels_last (index_select
    would return it in NCHW, and every following conv would convert it back)."""
    if dim == 1 and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(dim, index)


class _DiverseGroup(nn.Module):
    """Shared state of deployed layers: the gather index, group sizes and the output order."""

    def _init_groups(self, out_features: int, group_out: list[int], group_in: list[int],
                     kernel: tuple[int, ...], bias: bool, source_in: int,
                     source_out: int | None = None, plan: dict | None = None) -> None:
        self.source_in = int(source_in)   # input width of the dense layer this one came from
        # output width of that dense layer: the dead-channel pass (optimize) may drop filters
        self.source_out = int(source_out if source_out is not None else out_features)
        self._plan = plans.normalize(plan)
        self._exec: list[tuple] = []       # fast-path pieces, rebuilt by refresh()
        self._native: dict | None = None   # the native kernel's packed tensors (a native plan)
        object.__setattr__(self, "_folded_bn", None)   # a FoldedBatchNorm2d (not a submodule)
        self._exec_out_name: str | None = None
        self._synced: tuple = ()
        self._reorder = True
        self.group_out = [int(v) for v in group_out]
        self.group_in = [int(v) for v in group_in]
        self.out_features_total = out_features
        self.register_buffer("in_index", torch.zeros(sum(self.group_in), dtype=torch.long))
        self.register_buffer("out_order", torch.arange(out_features, dtype=torch.long))
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(o, i, *kernel)) for o, i in zip(self.group_out, self.group_in)])
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    def _fill(self, layer: nn.Module, in_map: torch.Tensor | None) -> None:
        order, out_order, in_index, _, _, per_group = _group_layout(layer, in_map)
        weight = layer.masked_weight().detach()
        with torch.no_grad():
            self.in_index.copy_(in_index)
            self.out_order.copy_(out_order)
            start = 0
            for param, size, channels in zip(self.weights, self.group_out, per_group):
                filters = order[start:start + size]
                param.copy_(weight[filters.view(-1, 1), channels.view(1, -1)])   # no full-row copies
                start += size
            if self.bias is not None:
                self.bias.copy_(layer.bias.detach()[order])
        self.refresh()

    def _bias_slice(self, start: int, size: int):
        return None if self.bias is None else self.bias[start:start + size]

    def structure(self) -> dict:
        return {"group_out": self.group_out, "group_in": self.group_in,
                "bias": self.bias is not None, "source_in": self.source_in,
                "source_out": self.source_out, "plan": self.plan}

    def pruned_fraction(self) -> float:
        kept = sum(o * i for o, i in zip(self.group_out, self.group_in))
        return 1.0 - kept / (self.source_out * self.source_in)

    # --- plan execution (sgdet.deploy.plans builds the tensors; here they are only run) ---------
    # The parameters stay the per-group weights (the deployed count). A plan's tensors are
    # derived buffers, not state: rebuilt from the weights on load and whenever they change.

    @property
    def plan(self) -> dict | None:
        """The execution plan run in eval mode without autograd (None: the per-group form)."""
        return self._plan

    def set_plan(self, plan: dict | None) -> None:
        """Run ``plan`` from now on (None: the exact per-group form)."""
        self._plan = plans.normalize(plan)
        self.refresh()

    @property
    def reorders_output(self) -> bool:
        """Whether the per-group form ends with a reorder of its output channels."""
        return self._reorder

    @property
    def plan_reorders_output(self) -> bool:
        """Whether the plan's pieces end with a reorder of their concatenated outputs."""
        return self._exec_out_name is not None

    @property
    def plan_weights(self) -> list[torch.Tensor]:
        """The weights the plan runs (zero-filled where buckets merge groups)."""
        return [weight for _, weight, _, _, _ in self._exec_tensors]

    def _versions(self) -> tuple:
        # cached parameter list: walking ParameterList per call costs more than a small conv
        return tuple(p._version for p in self._param_refs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the output-reorder flag and the plan's execution tensors from the weights."""
        self._reorder = not torch.equal(self.out_order.cpu(), torch.arange(self.out_order.numel()))
        for name in [n for n in self._buffers if n.startswith("_x")]:
            del self._buffers[name]
        self._exec, self._exec_out_name, self._native = [], None, None
        if plans.is_native(self._plan):
            # packed from the weights as they are now; a layer no native kernel can run (a
            # device or dtype it lacks, kernel missing at load) runs its per-group form instead
            if plans.native_applies(self):
                self._native = plans.compile_native(self)
        elif self._plan is not None:
            pieces, exec_out = plans.compile_plan(self, self._plan)
            for i, (chans, weight, bias, size_in) in enumerate(pieces):
                self.register_buffer(f"_xi{i}", chans, persistent=False)
                self.register_buffer(f"_xw{i}", weight, persistent=False)
                self.register_buffer(f"_xb{i}", bias, persistent=False)
                self._exec.append((f"_xi{i}", f"_xw{i}", f"_xb{i}", int(weight.shape[0]), size_in))
            if exec_out is not None:
                self.register_buffer("_xo", exec_out, persistent=False)
                self._exec_out_name = "_xo"
        self._param_refs = self._tracked()
        self._cache_exec()
        self._synced = self._versions()

    def _tracked(self) -> tuple:
        """The tensors the plan is built from: own parameters and those of a folded BN."""
        extra = () if self._folded_bn is None else self._folded_bn.tracked()
        return tuple(self.parameters(recurse=False)) + tuple(self.weights) + extra

    def folds(self, bn: nn.Module) -> bool:
        """Whether this call of the layer applies ``bn`` (its native kernel runs it at the store)."""
        return self._folded_bn is bn and self._native is not None and self._fast_active()

    def _cache_exec(self) -> None:
        """Resolve the plan's buffers once, so a call does no attribute lookups."""
        self._exec_tensors = tuple((getattr(self, i), getattr(self, w), getattr(self, b), size_out, size_in)
                                   for i, w, b, size_out, size_in in self._exec)
        self._exec_out = None if self._exec_out_name is None else getattr(self, self._exec_out_name)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() replace buffers: re-resolve the cached ones
        result = super()._apply(fn, recurse)
        if hasattr(self, "_exec_tensors"):
            self._param_refs = self._tracked()
            self._cache_exec()
            self._synced = self._versions()
            if plans.is_native(self._plan):
                self.refresh()            # repack, or drop the packing off the CPU / float32
        return result

    def _fast_active(self) -> bool:
        """The plan runs in eval mode without autograd; training and gradients use the exact
        per-group form, whose parameters are the ones an optimiser updates."""
        return self._plan is not None and not self.training and not torch.is_grad_enabled()

    def _sync(self) -> None:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return
        if self._versions() != self._synced:
            self.refresh()

    def _run_fast(self, x: torch.Tensor, dim: int, op, **fused) -> torch.Tensor:
        self._sync()
        if self._native is not None:
            return self._run_native(x, **fused)
        if plans.is_native(self._plan):
            return self._run_groups(x, dim, op)
        pieces = self._exec_tensors
        if len(pieces) == 1 and self._exec_out is None:
            index, weight, bias, size_out, size_in = pieces[0]
            if size_in:     # the common case (one dense or merged piece): a single kernel call
                return op(x if index is None else select_channels(x, dim, index), weight, bias)
        outputs = []
        for index, weight, bias, size_out, size_in in pieces:
            if size_in == 0:
                outputs.append(self._constant_output(x, size_out, bias))
                continue
            outputs.append(op(x if index is None else select_channels(x, dim, index), weight, bias))
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim)
        if self._exec_out is not None:
            y = select_channels(y, dim, self._exec_out)
        return y

    def _run_groups(self, x: torch.Tensor, dim: int, op) -> torch.Tensor:
        """The exact per-group form: each group's ``op`` over its own gathered channels."""
        gathered = select_channels(x, dim, self.in_index)
        outputs, start_in, start_out = [], 0, 0
        for weight, size_out, size_in in zip(self.weights, self.group_out, self.group_in):
            bias = self._bias_slice(start_out, size_out)
            if size_in == 0:
                y = self._constant_output(x, size_out, bias)
            elif size_out == 0:
                start_in += size_in
                continue
            else:
                end = start_in + size_in
                y = op(gathered[:, start_in:end] if dim == 1 else gathered[..., start_in:end], weight, bias)
            outputs.append(y)
            start_in += size_in
            start_out += size_out
        y = torch.cat(outputs, dim)
        return select_channels(y, dim, self.out_order) if self._reorder else y

    def exec_macs_per_position(self) -> int:
        """Multiply-accumulates per output position of what actually runs now."""
        if self._fast_active() and not plans.is_native(self._plan):
            return sum(getattr(self, w).numel() for _, w, _, _, size_in in self._exec if size_in)
        return sum(w.numel() for w in self.weights)      # the native kernel runs only these


class DiverseGroupConv2d(_DiverseGroup):
    """A diverse group convolution: groups of unequal size, each over its own input channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, group_out=(), group_in=(), bias: bool = True,
                 source_in: int | None = None, source_out: int | None = None,
                 plan: dict | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self._init_groups(out_channels, list(group_out), list(group_in), self.kernel_size, bias,
                          source_in or in_channels, source_out, plan)
        self.refresh()

    supports_grouped = True              # plans may run all groups as one grouped convolution
    folds_batchnorm = True               # a FoldedBatchNorm2d may name it as its producer

    @property
    def input_width(self) -> int:
        return self.in_channels

    def _constant_output(self, x: torch.Tensor, size: int, bias) -> torch.Tensor:
        y = self._empty_output(x, size)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        groups = x.shape[1] // weight.shape[1]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    @classmethod
    def from_sg(cls, layer: SGConv2d, in_map: torch.Tensor | None = None,
                in_channels: int | None = None) -> "DiverseGroupConv2d":
        _, _, _, group_out, group_in, _ = _group_layout(layer, in_map)
        new = cls(in_channels or layer.in_channels, layer.out_channels, layer.kernel_size,
                  layer.stride, layer.padding, layer.dilation, group_out, group_in,
                  layer.bias is not None, layer.in_channels).to(layer.weight.device, layer.weight.dtype)
        if not layer.weight.is_contiguous() and layer.weight.is_contiguous(memory_format=torch.channels_last):
            new = new.to(memory_format=torch.channels_last)   # NCHW weights would convert on every call
        new._fill(layer, in_map)
        return new

    def structure(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), **super().structure()}

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.padding == "same":
            return height, width
        padding = (0, 0) if self.padding == "valid" else self.padding
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((height, width), padding, self.dilation, self.kernel_size, self.stride))

    def _empty_output(self, x: torch.Tensor, size: int) -> torch.Tensor:
        # a group that kept no input channel emits its bias only: no arithmetic is spent on it
        return x.new_zeros(x.shape[0], size, *self._output_size(*x.shape[2:]))

    def _run_native(self, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type == "cpu":      # the C++ kernel reads NCHW planes; Triton takes any strides
            if not x.is_contiguous():
                x = x.contiguous()
            if residual is not None and not residual.is_contiguous():
                residual = residual.contiguous()
        return native.conv2d(x, self._native, self.stride, self._native_padding(x), self.dilation,
                             out_channels=self.out_channels, relu=relu, residual=residual,
                             variant=self._plan["variant"])

    def _native_padding(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0, 0)
        # "same" (stride 1): torch pads the extra pixel at the end; the kernel pads symmetrically
        total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even kernel extent has no native form")
        return tuple(t // 2 for t in total)

    def forward(self, x: torch.Tensor, relu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution; ``relu(conv(x) + residual)`` when asked (fused blocks ask, and then
        the native kernel applies both at its store, after a folded BN)."""
        if self._fast_active():
            if self._native is not None:
                return self._run_fast(x, 1, self._conv, relu=relu, residual=residual)
            y = self._run_fast(x, 1, self._conv)
        else:
            y = self._run_groups(x, 1, self._conv)
            if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                y = y.contiguous(memory_format=torch.channels_last)    # convs of channel slices emit NCHW
        if residual is not None:
            y = y + residual
        return y.relu() if relu else y

    def sg_macs(self, x: torch.Tensor, output: torch.Tensor) -> int:
        spatial = output.shape[0] * output[0, 0].numel()
        return spatial * self.exec_macs_per_position()


class DiverseGroupLinear(_DiverseGroup):
    """The fully-connected form (Eq. 4 with diverse groups)."""

    def __init__(self, in_features: int, out_features: int, group_out=(), group_in=(),
                 bias: bool = True, source_in: int | None = None, source_out: int | None = None,
                 plan: dict | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_groups(out_features, list(group_out), list(group_in), (), bias,
                          source_in or in_features, source_out, plan)
        self.refresh()

    supports_grouped = False

    @property
    def input_width(self) -> int:
        return self.in_features

    def _constant_output(self, x: torch.Tensor, size: int, bias) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], size)
        return y if bias is None else y + bias

    @classmethod
    def from_sg(cls, layer: SGLinear, in_map: torch.Tensor | None = None,
                in_channels: int | None = None) -> "DiverseGroupLinear":
        _, _, _, group_out, group_in, _ = _group_layout(layer, in_map)
        new = cls(in_channels or layer.in_features, layer.out_features, group_out, group_in,
                  layer.bias is not None, layer.in_features).to(layer.weight.device, layer.weight.dtype)
        new._fill(layer, in_map)
        return new

    def structure(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **super().structure()}

    def _run_native(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return native.linear(flat.contiguous(), self._native).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_active():
            return self._run_fast(x, -1, F.linear)
        return self._run_groups(x, -1, F.linear)

    def sg_macs(self, x: torch.Tensor, output: torch.Tensor) -> int:
        return (output.numel() // self.out_features) * self.exec_macs_per_position()


class GatheredBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d over a subset of its input's channels: selects them, then normalises them.
    Used where a BN feeds an SG conv directly and some channels are read by no group."""

    def __init__(self, in_channels: int, num_features: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.in_channels = in_channels
        self.register_buffer("channel_index", torch.arange(num_features, dtype=torch.long))
        # after the dead-channel pass a BN may select every channel of its (shrunk) input in order
        self._identity = in_channels == num_features
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh())

    @property
    def gathers(self) -> bool:
        """False where it selects every channel of its input in order (a plain BN)."""
        return not self._identity

    def refresh(self) -> None:
        self._identity = self.in_channels == self.num_features and torch.equal(
            self.channel_index.cpu(), torch.arange(self.num_features))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, channels: torch.Tensor) -> "GatheredBatchNorm2d":
        reference = next(iter(bn.parameters()), None)
        if reference is None:
            reference = bn.running_mean
        new = cls(bn.num_features, int(channels.numel()), bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats)
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)   # int buffers stay int
        new.train(bn.training)
        idx = channels.to(new.channel_index.device)
        with torch.no_grad():
            new.channel_index.copy_(idx)
            if bn.affine:
                new.weight.copy_(bn.weight[idx])
                new.bias.copy_(bn.bias[idx])
            if bn.track_running_stats:
                new.running_mean.copy_(bn.running_mean[idx])
                new.running_var.copy_(bn.running_var[idx])
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.refresh()
        return new

    def structure(self) -> dict:
        return {"in_channels": self.in_channels, "num_features": self.num_features,
                "eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x if self._identity else select_channels(x, 1, self.channel_index))


def is_gathering(bn: nn.Module | None) -> bool:
    """Whether ``bn`` is a GatheredBatchNorm2d that really selects channels."""
    return isinstance(bn, GatheredBatchNorm2d) and bn.gathers


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose inference affine map the conv before it applies (``producer``, that
    conv's module name): a deployed conv's native kernel at its store, or a dense_parts.FoldedConv2d
    through folded weights. When that conv folds it (eval mode, no autograd, kernel built) this BN
    passes its input through; otherwise it normalises as any BN does, so training and every other
    form stay exact. Same state-dict keys as a BN."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, producer: str = "") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.producer = producer
        object.__setattr__(self, "_conv", None)           # linked by link_folded_norms

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, producer: str) -> "FoldedBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, producer)
        reference = bn.running_mean if bn.running_mean is not None else bn.weight
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)
        own = new.state_dict()        # a non-gathering GatheredBatchNorm2d also has channel_index
        new.load_state_dict({k: v for k, v in bn.state_dict().items() if k in own})
        new.train(bn.training)
        return new

    def structure(self) -> dict:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats,
                "producer": self.producer}

    def inference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the eval-mode map y = scale * x + shift, for the producer to fold."""
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return scale, shift

    def tracked(self) -> tuple:
        """The tensors a folded copy of this BN is built from; a producer rebuilds it when one's
        version changes. Running stats change inside the BN kernel without a version bump; the
        batch counter it increments in Python does bump, so it flags a training step."""
        return tuple(t for t in (self.weight, self.bias, self.running_mean, self.running_var,
                                 self.num_batches_tracked) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._conv
        if conv is not None and conv.folds(self):
            return x
        return super().forward(x)


def link_folded_norms(model: nn.Module) -> int:
    """Point every FoldedBatchNorm2d of ``model`` and its producer conv at each other (after a
    checkpoint load or a module swap); a BN whose producer is missing stays a plain BN. Returns
    how many were linked."""
    linked = 0
    for bn in model.modules():
        if not isinstance(bn, FoldedBatchNorm2d):
            continue
        try:
            conv = model.get_submodule(bn.producer)
        except AttributeError:
            conv = None
        if not getattr(conv, "folds_batchnorm", False):     # DiverseGroupConv2d, dense_parts.FoldedConv2d
            object.__setattr__(bn, "_conv", None)
            continue
        object.__setattr__(bn, "_conv", conv)
        object.__setattr__(conv, "_folded_bn", bn)
        conv.refresh()
        linked += 1
    return linked

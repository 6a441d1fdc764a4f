"""Deployment, block patterns: where in a model one layer's output reaches another only through
a BatchNorm and element-wise ops. The exact stage gathers such a BN with the SG conv it feeds;
the fast stage folds permutations and drops dead channels along conv -> BN -> conv chains and
un-gathers BNs. Module classes declare their patterns in registries (torchvision's blocks are
built in, by class name); nn.Sequential is walked generically."""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..layers import SGConv2d
from .modules import DiverseGroupConv2d, GatheredBatchNorm2d, is_gathering

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity,
                nn.Dropout)

# Modules whose forward applies BN (then an element-wise activation) straight into a conv:
# {module class: [(bn attribute, conv attribute), ...]}.
BN_CONV_PAIRS: dict[type, list[tuple[str, str]]] = {}

# {module class: [(producer conv, batch norm, consumer conv), ...]} where producer's output
# reaches consumer only through the BN and element-wise ops, and nothing else reads it.
CONV_BN_CONV_CHAINS: dict[type, list[tuple[str, str, str]]] = {}

# {module class: [(conv, batch norm), ...]} where the conv's output goes straight into the BN and
# nowhere else: the native kernel may then apply the BN's inference affine map at its store.
CONV_BN_PAIRS: dict[type, list[tuple[str, str]]] = {}

# {module class: [(conv, max-pool), ...]}: stems where conv -> BN -> element-wise ops -> max-pool
# and nothing else reads the conv's or BN's output.
STEM_POOLS: dict[type, list[tuple[str, str]]] = {}


def register_bn_conv_pairs(cls: type, pairs: Iterable[tuple[str, str]]) -> None:
    """Declare that in ``cls.forward`` BN attribute a feeds conv attribute b through element-wise
    ops only, and nothing else reads a's output; deploy() may then gather the BN too."""
    BN_CONV_PAIRS[cls] = list(pairs)


def register_conv_bn_conv(cls: type, chains: Iterable[tuple[str, str, str]]) -> None:
    """Declare that in ``cls.forward`` conv a -> BN b -> (element-wise) -> conv c, and nothing
    else reads a's or b's output: optimize() may then permute and shrink a and b freely."""
    CONV_BN_CONV_CHAINS[cls] = list(chains)


def register_conv_bn(cls: type, pairs: Iterable[tuple[str, str]]) -> None:
    """Declare that in ``cls.forward`` conv attribute a feeds BN attribute b directly and
    nothing else reads a's output; optimize() may then fold b into a's native kernel."""
    CONV_BN_PAIRS[cls] = list(pairs)


def register_stem_pool(cls: type, pairs: Iterable[tuple[str, str]]) -> None:
    """Declare that in ``cls.forward`` conv a -> BN -> element-wise ops -> max-pool b, and nothing
    else reads the conv's or BN's output: optimize() may run that stretch in channels_last."""
    STEM_POOLS[cls] = list(pairs)


# torchvision's blocks, keyed by qualified class name so that sgdet never has to import
# torchvision (whose package import loads its detection models) to know them. Consulted after
# the user tables, so a user's registration adds to the built-ins and may override one.
_BUILTIN_BN_CONV_PAIRS = {
    "torchvision.models.densenet._DenseLayer": [("norm1", "conv1"), ("norm2", "conv2")],
}
_BUILTIN_CONV_BN_CONV_CHAINS = {
    "torchvision.models.resnet.BasicBlock": [("conv1", "bn1", "conv2")],
    "torchvision.models.resnet.Bottleneck": [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")],
    "torchvision.models.densenet._DenseLayer": [("conv1", "norm2", "conv2")],
}
_BUILTIN_CONV_BN_PAIRS = {
    "torchvision.models.resnet.ResNet": [("conv1", "bn1")],                    # the stem
    "torchvision.models.resnet.BasicBlock": [("conv1", "bn1"), ("conv2", "bn2")],
    "torchvision.models.resnet.Bottleneck": [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")],
    "torchvision.models.densenet._DenseLayer": [("conv1", "norm2")],
}
_BUILTIN_STEM_POOLS = {
    "torchvision.models.resnet.ResNet": [("conv1", "maxpool")],       # conv1 -> bn1 -> relu -> maxpool
}
_BUILTINS = {id(STEM_POOLS): _BUILTIN_STEM_POOLS, id(BN_CONV_PAIRS): _BUILTIN_BN_CONV_PAIRS,
             id(CONV_BN_CONV_CHAINS): _BUILTIN_CONV_BN_CONV_CHAINS,
             id(CONV_BN_PAIRS): _BUILTIN_CONV_BN_PAIRS}


def registered(table: dict, cls: type) -> list[tuple[str, ...]] | None:
    """The entries ``cls`` has in ``table`` (a user registration) or in its built-ins."""
    if cls in table:
        return table[cls]
    return _BUILTINS.get(id(table), {}).get(f"{cls.__module__}.{cls.__qualname__}")


Predicate = Callable[[nn.Module], bool]


def match_sequential(seq: nn.Sequential, *steps: Predicate) -> list[tuple[str, ...]]:
    """Names of the runs of ``seq``'s modules that satisfy ``steps`` one after another: all but
    the last step match adjacent modules, element-wise ops may stand before the last."""
    names, mods = list(seq._modules), list(seq._modules.values())
    *adjacent, last = steps
    found = []
    for i in range(len(mods)):
        j = i + len(adjacent)
        if j > len(mods) or not all(step(m) for step, m in zip(adjacent, mods[i:j])):
            continue
        while j < len(mods) and isinstance(mods[j], _ELEMENTWISE):
            j += 1
        if j < len(mods) and last(mods[j]):
            found.append((*names[i:i + len(adjacent)], names[j]))
    return found


def _find(model: nn.Module, table: dict, steps: tuple[Predicate, ...],
          accept: Callable[..., bool]) -> list[tuple[str, ...]]:
    """Fully-qualified names of the registered (``table``) or nn.Sequential (``steps``) runs of
    modules that ``accept`` takes."""
    found = []
    for prefix, module in model.named_modules():
        entries = registered(table, type(module))
        if entries is None and isinstance(module, nn.Sequential):
            entries = match_sequential(module, *steps)
        join = (prefix + ".") if prefix else ""
        for names in entries or ():
            if accept(*(getattr(module, n, None) for n in names)):
                found.append(tuple(join + n for n in names))
    return found


def bn_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(bn, conv) names of a masked model where the BN may be gathered with the SG conv."""
    plain_bn = lambda m: type(m) is nn.BatchNorm2d                     # noqa: E731
    sg_conv = lambda m: isinstance(m, SGConv2d)                        # noqa: E731
    return _find(model, BN_CONV_PAIRS, (plain_bn, sg_conv),
                 lambda bn, conv: plain_bn(bn) and sg_conv(conv) and bn.num_features == conv.in_channels)


def conv_bn_conv_chains(model: nn.Module) -> list[tuple[str, str, str]]:
    """(producer, bn, consumer) names of a deployed model where both convs are deployed."""
    conv = lambda m: isinstance(m, DiverseGroupConv2d)                 # noqa: E731
    bn = lambda m: isinstance(m, nn.BatchNorm2d)                       # noqa: E731
    return _find(model, CONV_BN_CONV_CHAINS, (conv, bn, conv),
                 lambda p, b, q: conv(p) and conv(q) and bn(b)
                 and getattr(b, "in_channels", b.num_features) == p.out_channels)


def gathered_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(BN, conv) names where a gathering BN feeds a deployed conv through element-wise ops only
    (the pairs deploy() gathered, e.g. DenseNet's norm1 -> conv1)."""
    conv = lambda m: isinstance(m, DiverseGroupConv2d)                 # noqa: E731
    return _find(model, BN_CONV_PAIRS, (lambda m: isinstance(m, GatheredBatchNorm2d), conv),
                 lambda bn, c: is_gathering(bn) and conv(c) and bn.num_features == c.in_channels)


def _conv_bn(model: nn.Module, conv: Predicate) -> list[tuple[str, str]]:
    """(conv, bn) names where a conv ``conv`` takes feeds a plain BN directly (no element-wise op
    between: the BN must see the conv's raw output) and nothing else reads it."""
    plain_bn = lambda m: isinstance(m, nn.BatchNorm2d) and not is_gathering(m)   # noqa: E731
    found = []
    for prefix, module in model.named_modules():
        join = (prefix + ".") if prefix else ""
        entries = registered(CONV_BN_PAIRS, type(module))
        if entries is None and isinstance(module, nn.Sequential):
            names = list(module._modules)
            entries = list(zip(names, names[1:]))           # adjacent modules only
        for a, b in entries or ():
            c, bn = getattr(module, a, None), getattr(module, b, None)
            if conv(c) and plain_bn(bn) and bn.num_features == c.out_channels:
                found.append((join + a, join + b))
    return found


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names of a deployed model where a deployed conv feeds a plain BN directly."""
    return _conv_bn(model, lambda m: isinstance(m, DiverseGroupConv2d))


def dense_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names where a plain dense nn.Conv2d (a stem, a shortcut) feeds a plain BN
    directly: the BN may be folded into its weights."""
    return _conv_bn(model, lambda m: type(m) is nn.Conv2d and m.padding_mode == "zeros")


def stem_pools(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, max-pool) names of stems: conv -> BN -> element-wise ops -> max-pool, where nothing
    else reads the conv's or BN's output (registered by class, found in nn.Sequential runs)."""
    found = []
    for prefix, module in model.named_modules():
        join = (prefix + ".") if prefix else ""
        entries = registered(STEM_POOLS, type(module))
        if entries is None and isinstance(module, nn.Sequential):
            entries = [(c, p) for c, _, p in match_sequential(
                module, lambda m: isinstance(m, nn.Conv2d), lambda m: isinstance(m, nn.BatchNorm2d),
                lambda m: isinstance(m, nn.MaxPool2d))]
        found += [(join + c, join + p) for c, p in entries or ()]
    return found

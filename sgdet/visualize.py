"""Pictures of the learned group structure (Fig. 2 c-d of the paper): per layer, the connection
matrix with filters sorted by group (the diverse sparse pattern), and the deployed block-diagonal
matrix over the gathered input channels. matplotlib is imported only when a plot is drawn."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import is_sg_layer
from .files import atomic_open


def group_structure_matrices(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(sorted, blocks, sizes): |w| summed over the kernel with filters sorted by group
    [C_out, C_in], the block-diagonal deployed matrix [C_out, sum of kept inputs], group sizes."""
    strength = layer.masked_weight().detach().abs().float().cpu()
    strength = strength.flatten(2).sum(2) if strength.dim() > 2 else strength
    order = torch.argsort(layer.group.cpu(), stable=True)
    keep = layer.group_keep().cpu()
    sizes = layer.group_sizes().cpu().tolist()
    width = int(keep.sum())
    blocks = torch.full((strength.shape[0], width), float("nan"))
    row = col = 0
    for g, size in enumerate(sizes):
        channels = torch.nonzero(keep[g]).flatten()
        filters = order[row:row + size]
        blocks[row:row + size, col:col + channels.numel()] = strength[filters][:, channels]
        row += size
        col += channels.numel()
    return strength[order], blocks, sizes


def plot_group_structure(model: nn.Module, path: str, layers: Sequence[str] | None = None,
                         title: str = "") -> str:
    """Draw the group structure of ``layers`` (default: up to three SG layers) to a PNG."""
    return save_figure(group_structure_figure(model, layers, title), path)


def group_structure_figure(model: nn.Module, layers: Sequence[str] | None = None, title: str = ""):
    """The matplotlib figure of :func:`plot_group_structure`: per layer, the filters sorted by
    group and the deployed blocks, one colour scale with its colorbar, fully pruned groups named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = {n: m for n, m in model.named_modules() if is_sg_layer(m)}
    chosen = list(layers) if layers else list(named)[:3]
    missing = [n for n in chosen if n not in named]
    if missing or not chosen:
        raise ValueError(f"no SG layer named {missing or chosen}; SG layers: {list(named)}")
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(chosen), 2, figsize=(12, 3.4 * len(chosen)), squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    for (left, right), name in zip(axes, chosen):
        layer = named[name]
        ordered, blocks, sizes = group_structure_matrices(layer)
        shown = ordered.masked_fill(ordered == 0, float("nan"))
        finite = ordered[ordered > 0]
        vmax = float(finite.max()) if finite.numel() else 1.0
        left.imshow(shown.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=vmax)
        image = right.imshow(blocks.numpy(), aspect="auto", interpolation="nearest", cmap=cmap,
                             vmin=0, vmax=vmax)
        fig.colorbar(image, ax=right, label="|w| summed over the kernel", fraction=0.04, pad=0.02)
        starts = [0] + torch.tensor(sizes).cumsum(0).tolist()
        for boundary in starts[1:-1]:
            for ax in (left, right):
                ax.axhline(boundary - 0.5, color="red", linewidth=0.6)
        # a group left with no inputs draws as blank rows: say so instead of leaving a gap
        kept = layer.group_keep().cpu().sum(1).tolist()
        for g, size in enumerate(sizes):
            if size and not kept[g]:
                for ax in (left, right):
                    ax.text(0.5, (starts[g] + starts[g + 1] - 1) / 2, f"group {g}: fully pruned",
                            transform=ax.get_yaxis_transform(), ha="center", va="center",
                            fontsize=7, color="dimgray")
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        pruned = 100 * layer.pruned_fraction()
        left.set_title(f"{name}: filters sorted by group ({len(sizes)} groups, {pruned:.0f}% pruned)",
                       fontsize=9)
        right.set_title(f"{name}: deployed diverse group conv (gathered inputs)", fontsize=9)
        left.set_xlabel("input channel")
        right.set_xlabel("gathered input (reused channels repeated)")
        left.set_ylabel("filter (grouped)")
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Write a matplotlib figure as PNG atomically (temporary file, then rename) and close it;
    every plot of the suite goes through here."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path

"""Sweep reporting: the table of one compression run per swept value and the accuracy-vs-
compression curves of the paper's ablation figures (Figs. 4-6), drawn with matplotlib (Agg)."""
from __future__ import annotations

from sgdet.counting import format_count
from sgdet.visualize import save_figure


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def sweep_table(key: str, runs: list[dict]) -> str:
    """Markdown: one row per swept value, in the paper's format plus the achieved ratio."""
    lines = [f"| {key} | Model | Params | FLOPs | Top-1 (%) | Top-5 (%) | Network pruned (%) | Epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        row = run.get("row") or {}
        pruned = row.get("network_pruned")
        lines.append(f"| {run['value']} | {row.get('model', '-')} | "
                     f"{format_count(row['params']) if 'params' in row else '-'} | "
                     f"{format_count(row['flops']) if 'flops' in row else '-'} | "
                     f"{_fmt(row.get('top1'))} | {_fmt(row.get('top5'))} | "
                     f"{_fmt(None if pruned is None else 100 * pruned, 1)} | {row.get('epochs', '-')} |")
    return "\n".join(lines) + "\n"


def curve_points(run: dict) -> tuple[list[float], list[float]]:
    """(compression ratio %, top-1 %) after each pruning step, from 0 % (the dense network) on;
    steps that were not evaluated are left out."""
    xs, ys = [], []
    base = run.get("base") or {}
    if base.get("top1") is not None:
        xs.append(0.0)
        ys.append(float(base["top1"]))
    for step in run.get("steps") or []:
        if step.get("top1") is not None:
            xs.append(100.0 * float(step["network_pruned"]))
            ys.append(float(step["top1"]))
    return xs, ys


def plot_sweep(key: str, runs: list[dict], path: str, title: str | None = None) -> str:
    """One line per swept value: top-1 accuracy after each pruning step against the network's
    compression ratio (Eq. 14); a star marks the final accuracy (after global fine-tuning)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        label = f"{key} = {run['value']}"
        xs, ys = curve_points(run)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=label)
            label = None
        row = run.get("row") or {}
        if row.get("top1") is not None and row.get("network_pruned") is not None:
            ax.plot([100.0 * row["network_pruned"]], [row["top1"]], marker="*", markersize=11,
                    color=colour, linestyle="none", label=label)
    ax.set_xlabel("compression ratio (% of connections pruned)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=8, title="* final (after global fine-tuning)" if any(
            (r.get("row") or {}).get("epochs", "").count("+") >= 2 for r in runs) else None,
            title_fontsize=7)
    ax.set_title(title or f"accuracy vs compression ({key})", fontsize=9)
    return save_figure(fig, path, dpi=120)

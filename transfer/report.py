"""Stage 3 of the transfer pipeline: Table 5 (Model, Params, FLOPs, Top-1, Top-5) as Markdown and
JSON, and a bar chart of top-1 against Params, each written atomically (temporary file, then
rename) so a killed run never leaves half a table."""
from __future__ import annotations

import json
import os

from sgdet.counting import format_count
from sgdet.visualize import save_figure
from sgdet.files import write_text

HEADER = "| Model | Params | FLOPs | Top-1 (%) | Top-5 (%) |\n|---|---|---|---|---|\n"


def _unit(rows: list[dict]) -> str | None:
    """K for small models (LeNet: 431K, 2293K MACs), otherwise the paper's M/G per value."""
    return "K" if rows and max(r["params"] for r in rows) < 1e6 else None


def table_markdown(rows: list[dict]) -> str:
    unit = _unit(rows)
    lines = [f"| {r['model']} | {format_count(r['params'], unit)} | {format_count(r['flops'], unit)} | "
             f"{r['top1']:.2f} | {r['top5']:.2f} |" for r in rows]
    return HEADER + "\n".join(lines) + "\n"


def plot_table(rows: list[dict], path: str, title: str) -> str:
    """One bar per model: top-1 (%), labelled with its Params, as a PNG."""
    return save_figure(table_figure(rows, title), path, dpi=120)


def table_figure(rows: list[dict], title: str):
    """The bar chart of :func:`plot_table` (axis from 0 %)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = _unit(rows)
    fig, ax = plt.subplots(figsize=(max(4.8, 1.3 * len(rows) + 2), 4.4), dpi=120)
    xs = range(len(rows))
    bars = ax.bar(xs, [r["top1"] for r in rows], color=[f"C{i % 10}" for i in xs])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['top1']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['model']}\n{format_count(r['params'], unit)} params" for r in rows],
                       fontsize=7, rotation=20 if len(rows) > 4 else 0, ha="center")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)            # from 0: bar heights compare honestly
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    return fig


def write_table(rows: list[dict], out: str, title: str, extra: dict | None = None) -> dict[str, str]:
    """table.md, table.json and table.png in ``out``; returns their paths."""
    paths = {"md": os.path.join(out, "table.md"), "json": os.path.join(out, "table.json"),
             "png": os.path.join(out, "table.png")}
    write_text(paths["md"], table_markdown(rows))
    write_text(paths["json"], json.dumps({**(extra or {}), "rows": rows}, indent=2, default=str) + "\n")
    plot_table(rows, paths["png"], title)
    return paths

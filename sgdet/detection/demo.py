"""``make detection-demo``: the detection pipeline end to end on the CPU, on data made here.

1. writes a COCO-format shapes dataset (192 training and 48 validation images, 96 px);
2. compresses a ResNet50 with self-grouping (Conv-60/FC-60, g=16, one shot; no ImageNet weights
   can be had here, so the grouping runs on its random initialisation) and saves it;
3. trains Faster R-CNN over that SG-ResNet50 (C4 layout) with tools/train_net.py's code path and
   configs/detection/faster_rcnn_sg_r50_shapes_demo.yaml, evaluating COCO AP after every epoch;
4. checks that no pruned connection came back, and plots AP / AP50 per epoch (ap_curve.png).

    python -m sgdet.detection.demo --out out/detection_demo [--epochs 8] [--threads N]
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
CONFIG = os.path.join(ROOT, "configs", "detection", "faster_rcnn_sg_r50_shapes_demo.yaml")


def prepare(out: str, n_train: int = 192, n_val: int = 48) -> str:
    """The dataset and the compressed backbone checkpoint under ``out``; returns the checkpoint."""
    import torch

    import sgdet
    from sgdet.detection.shapes import make_shapes_dataset
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "train", "instances.json")):
        make_shapes_dataset(os.path.join(data, "train"), n_train, 96, min_side=12, max_side=40, seed=0)
    if not os.path.isfile(os.path.join(data, "val", "instances.json")):
        make_shapes_dataset(os.path.join(data, "val"), n_val, 96, min_side=12, max_side=40, seed=1)
    weights = os.path.join(out, "resnet50_conv60_fc60.sg.pt")
    if not os.path.isfile(weights):
        torch.manual_seed(0)
        model = sgdet.build("resnet50")
        records = sgdet.compress(model, conv_ratio=0.6, fc_ratio=0.6, groups=16, step=None, seed=0)
        sgdet.save(model, weights, meta={"label": "SG-ResNet50 (Conv-60/FC-60)",
                                         "records": [r.to_dict() for r in records]})
    return weights


def pruned_connections_stay_zero(weights: str, final: str) -> int:
    """Check every SG layer of the trained detector against the compressed checkpoint: same
    masks and groups, pruned weights exactly zero. Returns how many layers were checked."""
    import sgdet
    from sgdet.layers import is_sg_layer
    source = {name: m for name, m in sgdet.load(weights).named_modules() if is_sg_layer(m)}
    trained = [m for m in sgdet.load(final).modules() if is_sg_layer(m)]
    by_shape = {}
    for name, m in source.items():
        by_shape.setdefault((tuple(m.weight.shape), int(m.mask.sum())), []).append(m)
    for layer in trained:
        if bool((layer.weight[~layer.mask] != 0).any()):
            raise AssertionError("a pruned connection became non-zero during detection training")
        candidates = by_shape.get((tuple(layer.weight.shape), int(layer.mask.sum())), [])
        if not any(bool((c.mask == layer.mask).all()) and bool((c.group == layer.group).all())
                   for c in candidates):
            raise AssertionError("a layer's mask or groups changed during detection training")
    return len(trained)


def plot(metrics_file: str, png: str) -> list[dict]:
    """AP and AP50 (first test size and the largest) per epoch from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgdet.visualize import save_figure
    rows = []
    with open(metrics_file) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("event") == "epoch" and record.get("eval"):
                per_size = next(iter(record["eval"].values()))
                rows.append({"epoch": record["epoch"], "loss": record["loss"], "eval": per_size})
    if not rows:
        return rows
    fig, ax = plt.subplots(figsize=(6, 4))
    for size in rows[0]["eval"]:
        for metric, style in (("AP50", "-o"), ("AP", "--s")):
            ax.plot([r["epoch"] for r in rows], [r["eval"][size][metric] for r in rows], style,
                    label=f"{metric} @{size} px")
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO box AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Faster R-CNN, SG-ResNet50 (Conv-60/FC-60), shapes, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png)
    return rows


def run(args) -> dict:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from sgdet.detection import commands
    from sgdet.engine.launch import default_argument_parser
    from sgdet.files import write_json
    out = os.path.abspath(args.out)
    started = time.time()
    weights = prepare(out)
    run_dir = os.path.join(out, "run")
    argv = ["--config-file", CONFIG, "DATASETS.ROOT", os.path.join(out, "data"), "MODEL.WEIGHTS", weights,
            "OUTPUT_DIR", run_dir, "SOLVER.EPOCHS", str(args.epochs)]
    if args.resume:
        argv.insert(2, "--resume")
    row = commands.main(default_argument_parser().parse_args(argv))
    layers = pruned_connections_stay_zero(weights, os.path.join(run_dir, "model_final.pth"))
    curve = plot(os.path.join(run_dir, "metrics.jsonl"), os.path.join(out, "ap_curve.png"))
    summary = {"row": row, "sg_layers_checked": layers, "seconds": round(time.time() - started, 1),
               "threads": torch.get_num_threads(),
               "per_epoch": [{"epoch": r["epoch"], "loss": r["loss"],
                              **{f"AP50@{s}": m["AP50"] for s, m in r["eval"].items()},
                              **{f"AP@{s}": m["AP"] for s, m in r["eval"].items()}} for r in curve]}
    write_json(os.path.join(out, "summary.json"), summary)
    print(f"\n{len(curve)} epochs in {summary['seconds']:.0f} s; AP50 per epoch at the largest size: "
          + ", ".join(f"{max(r['eval'].items(), key=lambda kv: int(kv[0]))[1]['AP50']:.1f}" for r in curve))
    print(f"{layers} SG layers kept their masks and groups; pruned weights are still zero")
    print(f"outputs: {out}/ap_curve.png, {out}/summary.json, {run_dir}/ (log.txt, metrics.jsonl, "
          "results.md, model_final.pth, inference/)")
    return summary


def main(argv=None) -> int:
    from sgdet.errors import ArgumentParser
    parser = ArgumentParser(prog="python -m sgdet.detection.demo", voice="sgdet.detection.demo",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/detection_demo", help="output folder")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (24 iterations each)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from sgdet.errors import ConfigError, run_entry_point

    def action():
        if args.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
        return run(args)
    return run_entry_point("sgdet.detection.demo", action)


if __name__ == "__main__":
    sys.exit(main())

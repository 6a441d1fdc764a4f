"""The ``sgdet`` command line: compress a registered architecture, deploy a masked checkpoint,
export a deployed one (TorchScript, ONNX), and show what a checkpoint holds. Thin: every verb
calls the public API. Errors print one line and
exit with status 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .checkpoint import read
from .counting import CONVENTIONS, check_convention, count, format_count
from .errors import ArgumentParser, ConfigError, run_entry_point
from .files import check_writable


def _model_row(label: str, counts: dict, base: dict | None = None) -> dict:
    row = {"model": label, "params": counts["params"], "flops": counts["flops"]}
    if base is not None:
        row["params_ratio"] = 1 - counts["params"] / base["params"]
        row["flops_ratio"] = 1 - counts["flops"] / base["flops"]
    return row


def _print_rows(rows: list[dict], convention: str = "sgdet") -> None:
    if convention != "sgdet":
        print(f"(params and FLOPs counted by the {convention} convention)")
    print("| Model | Params | FLOPs | Params pruned | FLOPs pruned |")
    print("|---|---|---|---|---|")
    for r in rows:
        pr = f"{100 * r['params_ratio']:.2f}%" if "params_ratio" in r else "-"
        fr = f"{100 * r['flops_ratio']:.2f}%" if "flops_ratio" in r else "-"
        print(f"| {r['model']} | {format_count(r['params'])} | {format_count(r['flops'])} | {pr} | {fr} |")


def cmd_compress(args: argparse.Namespace) -> None:
    import torch

    from . import compress, models, save
    from .compress import validate_arguments
    validate_arguments(args.conv_ratio, args.fc_ratio, args.groups, args.step, args.seed, args.n_init)
    check_convention(args.convention)
    if args.num_classes is not None and args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.arch in models.LAZY_ARCHITECTURES:
        raise ConfigError(f"--arch {args.arch} is a detector, which sgdet compress cannot build: compress "
                          "its backbone (e.g. --arch resnet50) and train the detector with tools/train_net.py")
    check_writable(args.out, "--out")  # before the compression, not after it
    torch.manual_seed(args.seed)
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = models.build(args.arch, **kwargs)
    if args.weights:
        models.load_dense_weights(model, args.weights)
    model.eval()
    size = models.input_size_of(args.arch)
    base = count(model, size, args.convention)
    records = compress(model, conv_ratio=args.conv_ratio, fc_ratio=args.fc_ratio,
                       groups=args.groups, step=args.step, seed=args.seed,
                       include=args.include or (), exclude=args.exclude, n_init=args.n_init,
                       progress=not args.json and sys.stderr.isatty())
    after = count(model, size, args.convention)
    label = f"{args.arch} (Conv-{round(100 * args.conv_ratio)}/FC-{round(100 * args.fc_ratio)})"
    rows = [_model_row(f"{args.arch} (baseline)", base), _model_row(label, after, base)]
    meta = {"conv_ratio": args.conv_ratio, "fc_ratio": args.fc_ratio, "groups": args.groups,
            "step": args.step, "seed": args.seed, "weights": args.weights,
            "records": [r.to_dict() for r in records], "counts": {"baseline": base, "compressed": after, "convention": args.convention}}
    save(model, args.out, meta=meta)
    if args.json:
        print(json.dumps({"rows": rows, "out": args.out, "convention": args.convention,
                          "steps": [{k: v for k, v in r.to_dict().items() if k != "layers"} for r in records]}))
    else:
        _print_rows(rows, args.convention)
        print(f"saved {args.out}")


def cmd_deploy(args: argparse.Namespace) -> None:
    from . import deploy, load, models, save
    check_convention(args.convention)
    check_writable(args.out, "--out")
    model = load(args.file)
    arch = getattr(model, "sgdet_arch", None)  # its name and kwargs (in_channels) give the input size
    deployed = deploy(model)
    save(deployed, args.out, meta=getattr(model, "sgdet_meta", None))
    # the deployed model's counts (the masked model's under the paper convention)
    counts = count(deployed, models.input_size_of(arch), args.convention) if arch else None
    if args.json:
        print(json.dumps({"out": args.out, "counts": counts, "convention": args.convention}))
        return
    print(f"saved deployed model {args.out}")
    if counts:
        print(_totals_line(counts, args.convention))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from . import deploy, load, models
    from .checkpoint import form_of
    from .counting import count_params
    from .deploy.export import FORMATS, export
    if args.format not in FORMATS:     # argparse choices would print a usage block, not one line
        raise ConfigError(f"unknown --format {args.format!r}; choose from: {', '.join(FORMATS)}")
    check_writable(args.out, "--out")
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    check_convention(args.convention)
    if args.format == "onnx":
        from .deploy.export import _require_onnx
        _require_onnx()                # say so before spending time on loading and deploying
    model = load(args.file)
    arch = getattr(model, "sgdet_arch", None)  # its name and kwargs (in_channels) give the input size
    if form_of(model) == "masked":
        model = deploy(model)          # a masked checkpoint is deployed first
    model.eval()
    size = tuple(args.input_size) if args.input_size else models.input_size_of(arch) if arch else None
    if size is None:
        raise ConfigError(f"{args.file} names no architecture; give --input-size C H W")
    torch.manual_seed(0)
    example = torch.randn(args.batch, *size)
    if args.optimize:
        from .deploy.optimize import optimize
        optimize(model, example if args.calibrate else None, backend=args.backend)
    info = export(model, args.out, args.format, example, opset=args.opset)
    info["deployed_params"] = count_params(model, args.convention)
    if args.json:
        print(json.dumps(info))
        return
    weights = f", {format_count(info['weights'])} weights in the graph" if info["weights"] else ""
    print(f"saved {args.format} model {args.out} ({format_count(info['deployed_params'])} params{weights}; "
          f"max |diff| vs PyTorch {info['max_abs_diff']:.2g})")


def cmd_info(args: argparse.Namespace) -> None:
    from . import load, models
    check_convention(args.convention)
    payload = read(args.file)
    layers = payload["modules"]
    arch = payload.get("arch") or {}
    totals = None
    if arch and not args.no_count:
        model = load(args.file)
        totals = count(model, models.input_size_of(arch), args.convention)
    if args.json:
        print(json.dumps({"arch": arch, "form": payload.get("form"), "counts": totals,
                          "convention": args.convention,
                          "layers": {n: {"type": e["type"], **e.get("summary", {})} for n, e in layers.items()},
                          "meta": {k: v for k, v in (payload.get("meta") or {}).items() if k != "records"}}))
        return
    print(f"architecture: {arch.get('name', 'unknown')}   form: {payload.get('form')}")
    if totals:
        print(_totals_line(totals, args.convention))
    print("| Layer | Type | Groups | Group sizes | Kept inputs per group | In | Pruned |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in layers.items():
        s = entry.get("summary") or {}
        if not s:
            continue
        print(f"| {name} | {entry['type']} | {s['groups']} | {_short(s['group_sizes'])} | "
              f"{_short(s['kept_inputs'])} | {s['in_features']} | {100 * s['pruned']:.1f}% |")


def _totals_line(totals: dict, convention: str) -> str:
    note = "" if convention == "sgdet" else f"   ({convention} convention)"
    return (f"params: {format_count(totals['params'])} ({totals['params']})   "
            f"FLOPs: {format_count(totals['flops'])} ({totals['flops']} MACs){note}")


def _add_convention(p: argparse.ArgumentParser) -> None:
    # checked by check_convention (one line), not argparse choices (a usage block)
    p.add_argument("--convention", default="sgdet", metavar="{" + ",".join(CONVENTIONS) + "}",
                   help="how params and FLOPs are counted: sgdet (default: every parameter, "
                   "BatchNorm included) or paper (the authors' counter, sgdet.count's convention)")


def _short(values: list, limit: int = 16) -> str:
    text = ",".join(str(v) for v in values[:limit])
    return text + (",..." if len(values) > limit else "")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value


def compressible_archs() -> list[str]:
    """The registered architectures ``sgdet compress`` builds (detectors are not among them)."""
    from .models import ARCHITECTURES, LAZY_ARCHITECTURES
    return sorted(name for name in ARCHITECTURES if name not in LAZY_ARCHITECTURES)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="sgdet", description="Self-grouping CNN compression.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer decisions")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a registered architecture (Algorithm 1)")
    p.add_argument("--arch", required=True, help="registered classification architecture: "
                   + ", ".join(compressible_archs()))
    p.add_argument("--weights", help="local dense weights (.pth state dict) to start from")
    p.add_argument("--num-classes", type=int, help="classifier width (default: the builder's)")
    p.add_argument("--conv-ratio", type=_ratio, required=True, help="pruned fraction of conv connections, [0, 1)")
    p.add_argument("--fc-ratio", type=_ratio, required=True, help="pruned fraction of FC connections, [0, 1)")
    p.add_argument("--groups", type=int, default=16, help="groups per layer (default 16)")
    p.add_argument("--step", type=_ratio, default=None, help="pruning step s (default: one shot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts (default 1)")
    p.add_argument("--include", action="append", help="fnmatch pattern of layers to compress anyway")
    p.add_argument("--exclude", action="append", help="fnmatch pattern of layers to leave dense "
                   "(replaces the default '*downsample*')")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_convention(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("deploy", help="convert a masked checkpoint into diverse group convolutions")
    p.add_argument("file")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    _add_convention(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("export", help="write a deployed (or masked: deployed first) checkpoint as "
                       "TorchScript or ONNX, checked against PyTorch")
    p.add_argument("file")
    p.add_argument("--format", required=True, help="torchscript or onnx")
    p.add_argument("--out", required=True)
    p.add_argument("--optimize", action="store_true", help="fold permutations, drop dead channels "
                   "and give each layer its fastest exact plan (sgdet.deploy.optimize) before exporting")
    p.add_argument("--backend", choices=["auto", "native", "torch"], default="auto",
                   help="with --optimize: may layers run on the native kernels (TorchScript keeps "
                   "them as one op each; ONNX gets standard ops)? default auto: where built")
    p.add_argument("--calibrate", action="store_true", help="with --optimize: time the candidate "
                   "plans on this machine's CPU instead of using the cost model")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="example input size (default: the architecture's)")
    p.add_argument("--batch", type=int, default=1, help="example batch (the exported batch is dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or later")
    p.add_argument("--json", action="store_true")
    _add_convention(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="per-layer groups and kept channels of a checkpoint")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-count", action="store_true", help="skip building the model to count it")
    _add_convention(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    return run_entry_point("sgdet", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Deployment, export stage: a deployed model (exact or optimised by sgdet.deploy.optimize) written as a
TorchScript module or an ONNX graph (opset 17 or later), checked against the PyTorch model on an
example input before the file is put in place.

The exported graph holds exactly the module's tensors: for the exact deployed form those are the
kept per-group weights (the deployed parameter count, never the dense one), for an optimised form
the zero-filled weights of the plans it runs. Layers on the native kernel stay one custom op
(``sgdet::diverse_conv2d``) in TorchScript: load such a file after ``import sgdet.deploy.native``.
ONNX has no such op: those layers are exported in their standard-op per-group form (folded
BatchNorms then run as BNs again). Writes are atomic (temporary file, then rename)."""
from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

from ..errors import ConfigError, DependencyError, SGError
from ..files import atomic_path
from .modules import DiverseGroupConv2d, DiverseGroupLinear
from .plans import is_native

FORMATS = ("torchscript", "onnx")
MIN_OPSET = 17


class ExportMismatch(SGError):
    """The exported model does not reproduce the PyTorch model's output."""


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise DependencyError(f"ONNX export needs the packages onnx and onnxruntime ({exc.name} is "
                              "missing); install them with: pip install 'sgdet[export]'") from None
    return onnx, onnxruntime


def _check(reference: torch.Tensor, output, what: str, rel: float = 1e-4) -> float:
    output = torch.as_tensor(output)
    if tuple(output.shape) != tuple(reference.shape):
        raise ExportMismatch(f"{what} gives shape {tuple(output.shape)}, the model {tuple(reference.shape)}")
    diff = float((output.float() - reference.float()).abs().max())
    allowed = rel * max(1.0, float(reference.abs().max()))
    if not diff <= allowed:
        raise ExportMismatch(f"{what} differs from the model by {diff:.3g} (allowed {allowed:.3g})")
    return diff


def _native_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear)) and is_native(m.plan)]


def standard_ops(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose natively run layers use their per-group standard-op form."""
    if not _native_layers(model):
        return model
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, (DiverseGroupConv2d, DiverseGroupLinear)) and is_native(layer.plan):
            layer.set_plan(None)
    return model


def onnx_weight_count(path: str) -> int:
    """Floating-point numbers stored in an ONNX file's initializers and constants."""
    onnx, _ = _require_onnx()
    import numpy as np
    model = onnx.load(path)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in floats:
                    total += int(np.prod(attr.t.dims))
    return total


@torch.no_grad()
def export(model: nn.Module, path: str | os.PathLike, fmt: str, example_input: torch.Tensor,
           opset: int = MIN_OPSET, verify: bool = True) -> dict:
    """Write ``model`` (eval mode) as ``fmt`` ("torchscript" or "onnx") to ``path``; the batch
    dimension stays dynamic. With ``verify`` the written file is loaded (onnxruntime for ONNX)
    and must reproduce the model's output on ``example_input`` and on a batch one larger.
    Returns {"path", "format", "max_abs_diff", "weights" (ONNX: stored floats)}."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose from: {', '.join(FORMATS)}")
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset must be {MIN_OPSET} or later, got {opset}")
    if fmt == "onnx":
        _require_onnx()
        model = standard_ops(model)
    elif _native_layers(model):
        # the native op has no autograd: a traced file must run in grad mode as well, so its
        # parameters are frozen (an inference export, as torch.jit.freeze would make it)
        model = copy.deepcopy(model).requires_grad_(False)
    model = model.eval()
    checks = [example_input, torch.cat([example_input, example_input[:1] * 0.5])]
    references = [model(x) for x in checks]
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ConfigError(f"--out {path} is a directory; give a file name")
    with atomic_path(path, ".pt" if fmt == "torchscript" else ".onnx") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # tracer and legacy-exporter deprecation notes
            if fmt == "torchscript":
                traced = torch.jit.trace(model, (example_input,), check_trace=False)
                traced.save(tmp)
            else:
                # the TorchScript-based exporter: it follows the traced Python loops of the
                # deployed layers exactly and keeps their tensors as they are
                torch.onnx.export(model, (example_input,), tmp, opset_version=opset, dynamo=False,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        diff = 0.0
        if verify:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runner = _runner(tmp, fmt)
            for x, ref in zip(checks, references):
                diff = max(diff, _check(ref, runner(x), f"the exported {fmt} model"))
        info = {"format": fmt, "max_abs_diff": diff,
                "weights": onnx_weight_count(tmp) if fmt == "onnx" else None}
    return {"path": path, **info}


def _runner(path: str, fmt: str):
    """A callable tensor -> output tensor for an exported file."""
    if fmt == "torchscript":
        loaded = torch.jit.load(path, map_location="cpu")
        return lambda x: loaded(x.cpu())
    _, ort = _require_onnx()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def load_runner(path: str, fmt: str, threads: int | None = None):
    """Like _runner, for benchmarks: an onnxruntime session with ``threads`` intra-op threads."""
    if fmt != "onnx" or threads is None:
        return _runner(path, fmt)
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # idle sessions must not spin: benchmarks hold several at once and time them in turn
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]

"""Tests deployment on the native kernels (sgdet.deploy with backend "native"/"auto"): whole
ResNet and DenseNet models equal their masked form on every ISA path, BatchNorms folded into the
kernels stay exact in eval mode and normalise again in training, checkpoints round-trip through a
fresh process, torch.compile / torch.export / TorchScript / ONNX see the right ops, and without the
extension deploy falls back to the torch plans (saying so) while "native" is refused."""
from __future__ import annotations

import copy
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

import sgdet
from sgdet.deploy import FoldedBatchNorm2d, native
from sgdet.deploy.modules import DiverseGroupConv2d, DiverseGroupLinear
from sgdet.deploy.plans import is_native

from conftest import assert_same_output, make_bottleneck_resnet, make_densenet, make_resnet18, randomize_bn

pytestmark = pytest.mark.skipif(not native.available(), reason=f"{native.unavailable_reason()}")



@pytest.fixture(scope="module")
def compressed():
    models = {}
    for name, build in (("bottleneck", make_bottleneck_resnet), ("basic", make_resnet18),
                        ("densenet", make_densenet)):
        model = randomize_bn(build())
        sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.6, groups=8, step=None)
        models[name] = model.eval()
    return models


def _native_layers(model):
    return [m for m in model.modules() if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))
            and is_native(m.plan)]


@pytest.fixture
def each_isa(request):
    yield
    native.set_isa(None)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize("name", ["bottleneck", "basic", "densenet"])
def test_whole_model_native_equals_masked(name, isa, compressed, each_isa):
    if isa not in native.isas():
        pytest.skip(f"this CPU lacks {isa}")
    native.set_isa(isa)
    model = compressed[name]
    x = torch.randn(2, 3, 32, 32)
    fast = sgdet.deploy(model, optimize=True, backend="native", example_input=x, repeats=1).eval()
    deployed = [m for m in fast.modules() if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))]
    assert deployed and all(is_native(m.plan) for m in deployed)
    folded = [m for m in fast.modules() if isinstance(m, FoldedBatchNorm2d)]
    report = fast.sgdet_fast_report                     # into native convs, and into dense ones
    assert report["folded_norms"] > 0
    assert report["folded_norms"] + len(report["folded_dense_convs"]) == len(folded)
    fused = [m for m in fast.modules() if "forward" in m.__dict__]
    assert fast.sgdet_fast_report["fused_blocks"] == len(fused) > 0    # ReLU/residual at the store
    with torch.no_grad():
        assert_same_output(model(x), fast(x))
        assert_same_output(model(x[:1]), fast(x[:1]))          # another batch size


def test_folded_norms_normalise_again_in_training(compressed):
    model = compressed["bottleneck"]
    fast = sgdet.deploy(model, optimize=True, backend="native").eval()
    assert any(isinstance(m, FoldedBatchNorm2d) for m in fast.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_same_output(model(x), fast(x))
    reference = sgdet.deploy(model)                      # the exact per-group form, not folded
    reference.train()
    fast.train()
    with torch.enable_grad():                            # training runs the per-group form + BNs
        assert_same_output(reference(x), fast(x))
    fast.eval()
    reference.eval()
    with torch.no_grad():                                # running stats moved alike: still equal
        assert_same_output(reference(x), fast(x))


def test_auto_backend_is_exact_and_reports(compressed):
    model = compressed["basic"]
    x = torch.randn(2, 3, 32, 32)
    fast = sgdet.deploy(model, optimize=True, example_input=x, repeats=1).eval()
    labels = {entry["plan"] for entry in fast.sgdet_fast_report["layers"].values()}
    candidates = next(iter(fast.sgdet_fast_report["layers"].values()))["candidates"]
    assert any(label.startswith("native") for label in candidates) and labels
    with torch.no_grad():
        assert_same_output(model(x), fast(x))


def test_backend_is_checked(compressed):
    with pytest.raises(sgdet.ConfigError, match="backend"):
        sgdet.deploy(compressed["basic"], optimize=True, backend="cuda")


ROUND_TRIP = r"""
import sys, torch
import sgdet
from sgdet.deploy import FoldedBatchNorm2d
from sgdet.deploy.plans import is_native
model = sgdet.load(sys.argv[1]).eval()
x = torch.load(sys.argv[2], weights_only=True)
natives = [m for m in model.modules() if is_native(getattr(m, "plan", None))]
folded = [m for m in model.modules() if isinstance(m, FoldedBatchNorm2d)]
assert natives and folded and all(bn._conv is not None for bn in folded)
assert any("forward" in m.__dict__ for m in model.modules())          # fused blocks restored
with torch.no_grad():
    torch.save(model(x), sys.argv[3])
"""


def test_checkpoint_round_trip_in_a_fresh_process(compressed, tmp_path):
    model = compressed["basic"]
    fast = sgdet.deploy(model, optimize=True, backend="native").eval()
    x = torch.randn(2, 3, 32, 32)
    sgdet.save(fast, tmp_path / "m.sg.pt")
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path / "m.sg.pt"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    with torch.no_grad():
        assert_same_output(model(x), torch.load(tmp_path / "y.pt", weights_only=True))
    state = torch.load(tmp_path / "m.sg.pt", weights_only=True)["state_dict"]
    assert not any("_xn" in k or "packed" in k for k in state)        # packing is rebuilt, not stored


def test_without_the_extension_deploy_falls_back(compressed, monkeypatch, caplog, tmp_path):
    model = compressed["basic"]
    fast = sgdet.deploy(model, optimize=True, backend="native").eval()
    sgdet.save(fast, tmp_path / "native.sg.pt")
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "the native extension was not built (test)")
    monkeypatch.setattr(importlib.import_module("sgdet.deploy.optimize"), "_warned", [])
    x = torch.randn(2, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="sgdet"):
        auto = sgdet.deploy(model, optimize=True, example_input=x, repeats=1).eval()
    warnings = [r.getMessage() for r in caplog.records if "native kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "(test)" in warnings[0]
    assert not _native_layers(auto)
    with pytest.raises(sgdet.ConfigError, match="not built"):
        sgdet.deploy(model, optimize=True, backend="native")
    again = sgdet.load(tmp_path / "native.sg.pt").eval()     # a native plan, no kernel: per-group form
    with torch.no_grad():
        assert_same_output(model(x), auto(x))
        assert_same_output(model(x), again(x))


def test_compile_and_export_see_the_op(compressed):
    model = compressed["basic"]
    fast = sgdet.deploy(model, optimize=True, backend="native").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
        assert_same_output(ref, compiled(x))
        exported = torch.export.export(fast, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("sgdet.diverse_conv2d" in op for op in ops), ops
    with torch.no_grad():
        assert_same_output(ref, exported.module()(x))


def test_torchscript_carries_the_op_and_onnx_uses_standard_ops(compressed, tmp_path):
    pytest.importorskip("onnxruntime")
    from sgdet.deploy.export import export
    model = compressed["basic"]
    fast = sgdet.deploy(model, optimize=True, backend="native").eval()
    x = torch.randn(2, 3, 32, 32)
    info = export(fast, tmp_path / "m.pt", "torchscript", x)
    assert info["max_abs_diff"] < 1e-3
    graph = str(torch.jit.load(str(tmp_path / "m.pt")).inlined_graph)
    assert "sgdet::diverse_conv2d" in graph
    info = export(fast, tmp_path / "m.onnx", "onnx", x)       # checked against the model by onnxruntime
    import onnx
    kinds = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in kinds and not any("diverse" in k for k in kinds)
    assert _native_layers(fast)                                # the model itself is untouched


def test_dense_convs_run_natively_as_one_group(compressed):
    """The stem and shortcut convs may run on the kernel as one group (optimize keeps whichever
    of that and oneDNN is faster); with their BNs folded the model is still exact."""
    from sgdet.deploy.optimize import fold_batchnorms, one_group_conv
    from sgdet.deploy.plans import native_plan
    model = compressed["bottleneck"]
    fast = sgdet.deploy(model)        # not optimized: the dense convs keep their plain BNs
    for name in ("conv1", "layer2.0.downsample.0"):
        layer = one_group_conv(fast.get_submodule(name))
        layer.set_plan(native_plan(layer))
        fast.set_submodule(name, layer)
    assert fold_batchnorms(fast) == 2                   # bn1 of the stem, downsample.1
    fast.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_output(model(x), fast(x))


@pytest.mark.parametrize("ungather", [False, True])
def test_dense_layers_run_their_prologue_in_one_op(compressed, monkeypatch, ungather):
    """A fused DenseNet layer does cat + norm1 + relu1 in one native op, with norm1 gathered or
    plain, and equals the masked model; in training it runs the layer's own forward again;
    torch.export and TorchScript carry the op."""
    from sgdet.deploy.optimize import optimize
    model = compressed["densenet"]
    x = torch.randn(2, 3, 32, 32)
    fast = sgdet.deploy(model, backend="native")
    optimize(fast, backend="native", ungather=ungather)
    fast.eval()
    gathers = [getattr(m.norm1, "gathers", False) for m in fast.modules() if type(m).__name__ == "_DenseLayer"]
    assert any(gathers) != ungather
    calls = []
    run = native.norm_relu_gather
    monkeypatch.setattr(native, "norm_relu_gather", lambda *a, **k: calls.append(1) or run(*a, **k))
    with torch.no_grad():
        assert_same_output(model(x), fast(x))
        layers = sum(1 for m in fast.modules() if type(m).__name__ == "_DenseLayer" and "forward" in m.__dict__)
        assert len(calls) == layers > 0            # every fused layer (conv1 folds norm2)
        calls.clear()
        copy.deepcopy(fast).train()(x)     # batch statistics: the layers' own forward
        assert not calls
        exported = torch.export.export(fast, (x,))
        traced = torch.jit.trace(fast, (x,), check_trace=False)
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count("sgdet.norm_relu_gather.default") == layers, ops
    assert "sgdet::norm_relu_gather" in str(traced.inlined_graph)
    with torch.no_grad():
        assert_same_output(model(x), exported.module()(x))
        assert_same_output(model(x), traced(x))

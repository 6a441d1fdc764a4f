"""Tests the export stage: `sgdet export` / sgdet.deploy.export.export to TorchScript and ONNX (run in
onnxruntime), the exported parameter count, and the one-line errors of the export verb."""
from __future__ import annotations

import builtins
import json

import pytest
import torch

import sgdet
from sgdet.cli import main
from sgdet.deploy.export import export, onnx_weight_count

from conftest import assert_same_output, make_resnet18, randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def models():
    dense = randomize_bn(make_resnet18()).eval()
    masked = randomize_bn(make_resnet18()).eval()
    sgdet.compress(masked, conv_ratio=0.7, fc_ratio=0.6, groups=8, step=None)
    deployed = sgdet.deploy(masked).eval()
    fast = sgdet.deploy(masked, optimize=True).eval()
    return dense, masked, deployed, fast


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("variant", ["deployed", "fast"])
def test_onnx_runs_in_onnxruntime_with_the_same_outputs(models, variant, tmp_path):
    dense, masked, deployed, fast = models
    model = deployed if variant == "deployed" else fast
    path = tmp_path / "m.onnx"
    info = export(model, path, "onnx", torch.randn(1, *SIZE))
    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 17
    x = torch.randn(3, *SIZE)                      # another batch size than the example's
    with torch.no_grad():
        assert_same_output(masked(x), _ort(path, x), rel=1e-4)
    weights = onnx_weight_count(str(path))
    assert weights == info["weights"]
    dense_params = sum(p.numel() for p in dense.parameters())
    if variant == "deployed":
        # the kept per-group weights, not the dense ones (BN of the dense stem/shortcuts is
        # folded into their convs by the exporter, hence "about")
        assert abs(weights - sgdet.count_params(deployed)) < 0.01 * sgdet.count_params(deployed)
        assert weights < 0.6 * dense_params


def test_torchscript_round_trip(models, tmp_path):
    _, masked, _, fast = models
    path = tmp_path / "m.pt"
    info = export(fast, path, "torchscript", torch.randn(2, *SIZE))
    assert info["max_abs_diff"] < 1e-4
    loaded = torch.jit.load(str(path))
    x = torch.randn(5, *SIZE)
    with torch.no_grad():
        assert_same_output(masked(x), loaded(x))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("export")
    _, masked, deployed, _ = models
    masked.sgdet_arch = deployed.sgdet_arch = {"name": "resnet18", "kwargs": {"num_classes": 10}}
    sgdet.save(masked, folder / "masked.sg.pt")
    sgdet.save(deployed, folder / "deployed.sg.pt")
    return folder


def test_cli_export_masked_checkpoint_deploys_first(checkpoints, capsys, models):
    out = checkpoints / "m.onnx"
    assert main(["export", str(checkpoints / "masked.sg.pt"), "--format", "onnx", "--out", str(out),
                 "--input-size", *map(str, SIZE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    _, masked, deployed, _ = models
    assert report["deployed_params"] == sgdet.count_params(deployed)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert_same_output(masked(x), _ort(out, x), rel=1e-4)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]


def test_cli_export_torchscript_optimized(checkpoints, capsys):
    out = checkpoints / "m.ts"
    assert main(["export", str(checkpoints / "deployed.sg.pt"), "--format", "torchscript",
                 "--out", str(out), "--optimize", "--input-size", *map(str, SIZE)]) == 0
    assert capsys.readouterr().out.startswith(f"saved torchscript model {out}")
    assert torch.jit.load(str(out))(torch.randn(1, *SIZE)).shape == (1, 10)


@pytest.mark.parametrize("case", ["format", "missing", "directory", "opset"])
def test_cli_export_errors_are_one_line(checkpoints, capsys, case):
    src, out, extra = checkpoints / "deployed.sg.pt", checkpoints / "x.onnx", []
    fmt = "onnx"
    if case == "format":
        fmt = "tflite"
    elif case == "missing":
        src = checkpoints / "absent.sg.pt"
    elif case == "directory":
        out = checkpoints
    else:
        extra = ["--opset", "11"]
    assert main(["export", str(src), "--format", fmt, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdet: error:") and err.count("\n") == 1, err
    assert {"format": "tflite", "missing": "not found", "directory": "directory",
            "opset": "17"}[case] in err
    assert not out.is_file() or case == "directory"


def test_cli_export_without_onnx_says_so(checkpoints, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    out = checkpoints / "none.onnx"
    assert main(["export", str(checkpoints / "deployed.sg.pt"), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnx" in err and "pip install" in err
    assert not out.exists()

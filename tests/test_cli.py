"""Tests the sgdet command line (compress, deploy, info) and its one-line error handling."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

import sgdet
from sgdet.checkpoint import layer_summary
from sgdet.cli import main

from conftest import PYTHON, REPO

CONSOLE_SCRIPT = os.path.join(os.path.dirname(PYTHON), "sgdet")


def _run_module(*args, timeout=180):
    return subprocess.run([PYTHON, "-m", "sgdet.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory):
    """One real `python -m sgdet.cli compress ... --json` run, shared by the tests below."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "lenet.sg.pt"
    result = _run_module("compress", "--arch", "lenet5", "--conv-ratio", "0.9", "--fc-ratio", "0.9",
                         "--groups", "4", "--step", "0.3", "--out", str(out), "--json")
    return out, result


def test_compress_subprocess_json(compressed_file):
    out, result = compressed_file
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert out.is_file() and report["out"] == str(out)
    base, comp = report["rows"]
    assert base["model"] == "lenet5 (baseline)" and base["params"] == 431_080
    assert base["flops"] == 2_293_000
    assert comp["model"] == "lenet5 (Conv-90/FC-90)"
    assert comp["params_ratio"] == pytest.approx(1 - comp["params"] / base["params"])
    assert comp["flops_ratio"] == pytest.approx(1 - comp["flops"] / base["flops"])
    assert 0.8 < comp["params_ratio"] < 0.92
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]
    assert [s["conv_target"] for s in report["steps"]] == pytest.approx([0.3, 0.6, 0.9])
    assert abs(report["steps"][-1]["fc_pruned"] - 0.9) < 0.01
    # the saved model is what the report describes
    model = sgdet.load(out)
    assert sgdet.count(model, (1, 28, 28)) == {"params": comp["params"], "flops": comp["flops"]}
    assert model.sgdet_meta["groups"] == 4 and len(model.sgdet_meta["records"]) == 3


def _info(path, capsys):
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json_lists_layers(compressed_file, capsys):
    out, _ = compressed_file
    info = _info(out, capsys)
    assert info["form"] == "masked"
    assert info["arch"]["name"] == "lenet5"
    model = sgdet.load(out)
    assert info["counts"] == sgdet.count(model, (1, 28, 28))
    assert set(info["layers"]) == {"features.3", "classifier.1", "classifier.3"}
    for name, entry in info["layers"].items():
        layer = model.get_submodule(name)
        expected = layer_summary(layer)
        assert entry["type"] == type(layer).__name__
        assert entry["groups"] == layer.num_groups <= 4
        assert entry["group_sizes"] == layer.group_sizes().tolist() == expected["group_sizes"]
        assert entry["kept_inputs"] == layer.group_keep().sum(1).tolist()
        assert sum(entry["group_sizes"]) == layer.mask.shape[0]
        assert entry["pruned"] == pytest.approx(layer.pruned_fraction())
    assert info["meta"]["conv_ratio"] == 0.9 and "records" not in info["meta"]


def test_info_text_table(compressed_file, capsys):
    out, _ = compressed_file
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "architecture: lenet5" in text and "form: masked" in text
    rows = [line for line in text.splitlines() if line.startswith("| features.3 ")]
    assert len(rows) == 1 and "SGConv2d" in rows[0]


def test_deploy_then_info(compressed_file, tmp_path, capsys):
    out, _ = compressed_file
    target = tmp_path / "deployed.sg.pt"
    assert main(["deploy", str(out), "--out", str(target)]) == 0
    assert "saved deployed model" in capsys.readouterr().out
    masked, deployed = _info(out, capsys), _info(target, capsys)
    assert deployed["form"] == "deployed"
    assert deployed["counts"] == masked["counts"]
    for name, entry in deployed["layers"].items():
        assert entry["type"].startswith("DiverseGroup")
        assert entry["group_sizes"] == masked["layers"][name]["group_sizes"]
        assert entry["kept_inputs"] == masked["layers"][name]["kept_inputs"]
    x = torch.randn(2, 1, 28, 28)
    a, b = sgdet.load(out).eval(), sgdet.load(target).eval()
    assert torch.allclose(a(x), b(x), atol=1e-5)
    assert main(["deploy", str(out), "--out", str(tmp_path / "j.sg.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(tmp_path / "j.sg.pt") and report["convention"] == "sgdet"
    assert report["counts"] == masked["counts"]      # the LeNet deploy drops no BN channel


def test_compress_text_output_and_weights(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "dense.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sgdet.build("lenet5").state_dict().items()}},
               weights)
    out = tmp_path / "w.sg.pt"
    rc = main(["compress", "--arch", "lenet5", "--weights", str(weights), "--conv-ratio", "0.5",
               "--fc-ratio", "0.5", "--groups", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "| lenet5 (baseline) | 431K |" in text and f"saved {out}" in text
    model = sgdet.load(out)
    assert model.sgdet_meta["weights"] == str(weights)
    # the dense stem kept the given weights
    given = torch.load(weights, weights_only=True)["state_dict"]["module.features.0.weight"]
    assert torch.equal(model.features[0].weight, given)


# ---------------------------------------------------------------------------- errors

def _assert_one_line_error(rc, err, *phrases):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sgdet: error:")
    for phrase in phrases:
        assert phrase in lines[0]


def _compress_args(out, *extra, arch="lenet5", conv="0.5", fc="0.5", groups="4"):
    return ["compress", "--arch", arch, "--conv-ratio", conv, "--fc-ratio", fc, "--groups", groups,
            "--out", str(out), *extra]


def test_unknown_arch_subprocess(tmp_path):
    out = tmp_path / "x.sg.pt"
    cmd = [CONSOLE_SCRIPT] if os.access(CONSOLE_SCRIPT, os.X_OK) else [PYTHON, "-m", "sgdet.cli"]
    result = subprocess.run(cmd + _compress_args(out, arch="nosuchnet"), capture_output=True,
                            text=True, cwd=REPO, timeout=180)
    _assert_one_line_error(result.returncode, result.stderr, "nosuchnet", "lenet5", "resnet50")
    assert result.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("case", ["arch", "conv_ratio", "fc_ratio", "groups", "step", "weights",
                                  "bad_weights"])
def test_compress_bad_input_exits_2(tmp_path, capsys, case):
    out = tmp_path / "x.sg.pt"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 100)
    args, phrases = {
        "arch": (_compress_args(out, arch="nosuchnet"), ["nosuchnet", "lenet5", "resnet18"]),
        "conv_ratio": (_compress_args(out, conv="1.5"), ["conv_ratio", "1.5"]),
        "fc_ratio": (_compress_args(out, fc="-0.2"), ["fc_ratio"]),
        "groups": (_compress_args(out, groups="0"), ["groups"]),
        "step": (_compress_args(out, "--step", "0"), ["step"]),
        "weights": (_compress_args(out, "--weights", str(tmp_path / "none.pth")), ["none.pth"]),
        "bad_weights": (_compress_args(out, "--weights", str(junk)), ["junk.pth"]),
    }[case]
    rc = main(args)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, *phrases)
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.parametrize("verb", ["info", "deploy"])
@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign"])
def test_bad_checkpoint_exits_2(tmp_path, capsys, compressed_file, verb, kind):
    path = tmp_path / "bad.sg.pt"
    if kind == "truncated":
        data = compressed_file[0].read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "foreign":
        torch.save({"weight": torch.zeros(2)}, path)
    target = tmp_path / "out.sg.pt"
    args = ["info", str(path)] if verb == "info" else ["deploy", str(path), "--out", str(target)]
    rc = main(args)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err, str(path))
    assert captured.out == ""
    assert not target.exists()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["compress", "--arch", "lenet5", "--conv-ratio", "abc", "--fc-ratio", "0.5",
              "--out", "x.sg.pt"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not a number: 'abc'" in err.strip().splitlines()[-1]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("extra", [["--n-init", "0"], ["--seed", "-1"], ["--num-classes", "-1"],
                                   ["--num-classes", "0"], ["--out-dir"]],
                         ids=["n-init-0", "seed-neg", "num-classes-neg", "num-classes-0", "out-is-dir"])
def test_unvalidated_options_exit_2(tmp_path, capsys, extra):
    out = tmp_path / "x.sg.pt"
    if extra == ["--out-dir"]:
        out.mkdir()
        extra = []
    try:
        rc = main(_compress_args(out, *extra))
    finally:
        captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err)

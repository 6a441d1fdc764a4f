"""Tests the benchmark scripts end to end on small settings, so the recorded results stay
reproducible with the current code (the numbers themselves are not checked: they are timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], check=True,
                   cwd=ROOT, env=env, capture_output=True, timeout=600)


def test_deploy_speed_records_every_variant(tmp_path):
    pytest.importorskip("onnxruntime")
    out = str(tmp_path / "speed")
    _run("deploy_speed.py", "--archs", "resnet18", "--ratios", "0.6", "--batches", "1", "--repeats", "1",
         "--warmup", "0", "--calib-repeats", "1", "--threads", "1", "--out", out)
    result = json.load(open(out + ".json"))["results"][0]
    timing = result["batches"]["1"]
    assert {"dense_ms", "dense_cl_ms", "masked_ms", "deployed_ms", "fast_ms"} <= set(timing)
    assert timing["best_dense"] in ("dense", "dense_cl")
    assert result["max_abs_diff_fast"] <= 1e-4 * max(1.0, result["output_scale"])
    assert result["layers"] and set(result["onnxruntime"]) == {"dense", "deployed", "fast"}
    assert result["onnxruntime"]["deployed"]["weights"] < result["onnxruntime"]["dense"]["weights"]
    assert "| resnet18 Conv-60/FC-60 | cpu | channels_last | 1 |" in open(out + ".md").read()

    # --resume keeps the finished setting instead of timing it again ...
    common = ["--archs", "resnet18", "--ratios", "0.6", "--batches", "1", "--warmup", "0", "--threads", "1",
              "--out", out, "--resume", "--no-onnx", "--no-layers"]
    before = open(out + ".json").read()
    _run("deploy_speed.py", "--repeats", "1", *common)
    assert open(out + ".json").read() == before         # nothing left to run: nothing rewritten
    # ... and refuses to mix results of another protocol
    with pytest.raises(subprocess.CalledProcessError) as failure:
        _run("deploy_speed.py", "--repeats", "2", *common)
    assert b"error: --resume" in failure.value.stderr and b"Traceback" not in failure.value.stderr


def test_gather_cost_covers_every_shape(tmp_path):
    out = str(tmp_path / "gather")
    _run("gather_cost.py", "--batch", "1", "--repeats", "1", "--threads", "1", "--out", out)
    rows = json.load(open(out + ".json"))["rows"]
    assert len(rows) == 10 and all(r["gathered_channels"] == 16 * round(0.4 * r["c_in"]) for r in rows)
    assert open(out + ".md").read().count("| layer") == 10


def test_native_speed_records_whole_network_and_layers(tmp_path):
    import torch

    import sgdet
    from sgdet.deploy import native
    if not native.available():
        pytest.skip(native.unavailable_reason())
    torch.manual_seed(0)
    trained = sgdet.build("lenet5")
    sgdet.compress(trained, conv_ratio=0.8, fc_ratio=0.8, groups=4, step=None, seed=0)
    sgdet.save(trained, tmp_path / "lenet.sg.pt")
    out = str(tmp_path / "native")
    _run("native_speed.py", "--archs", "lenet5", "--size", "28", "--ratios", "0.6", "--batches", "2",
         "--repeats", "1", "--calib-repeats", "1", "--threads", "1", "--trained", str(tmp_path / "lenet.sg.pt"),
         "--out", out)
    rows = json.load(open(out + ".json"))["rows"]
    assert [r["setting"].split()[0] for r in rows] == ["lenet5", "trained"]
    for row in rows:
        assert {"dense_nchw", "dense_cl", "dense_jit", "sg"} <= set(row["median_ms"])
        assert row["best_dense"] in ("dense_nchw", "dense_cl", "dense_jit") and row["speedup"] > 0
        assert row["max_abs_diff"] < 1e-3 and row["layers"]
    assert "| lenet5 Conv-60/FC-60 g=16 | 2 |" in open(out + ".md").read()


def test_native_kernel_shapes_times_random_and_contiguous_lists(tmp_path):
    from sgdet.deploy import native
    if not native.available():
        pytest.skip(native.unavailable_reason())
    out = str(tmp_path / "shapes")
    _run("native_kernel_shapes.py", "--batch", "1", "--shapes", "2", "--keep", "0.4", "--repeats", "1",
         "--threads", "1", "--out", out)
    payload = json.load(open(out + ".json"))
    assert payload["isa"] == native.isa() and len(payload["rows"]) == 2
    for row in payload["rows"]:
        assert {f"{lists}-{v}" for lists in ("random", "contiguous") for v in range(len(payload["variants"]))} \
            == set(row["gflops"])
        assert row["dense_gflops"] > 0 and all(g > 0 for g in row["gflops"].values())
    assert open(out + ".md").read().count("| layer") == 2

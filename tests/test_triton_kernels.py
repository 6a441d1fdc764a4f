"""Tests the GPU stage of the native kernels (sgdet.deploy.native.triton_kernels and cuda.py)
without a GPU: the Triton kernel runs in Triton's interpreter on CPU tensors and must equal
F.conv2d / F.linear on the dense masked weight (kernel sizes 1 and 3, stride 1 and 2, padding,
dilation, odd maps, channel counts off multiples of 16, one-filter groups, groups reading
nothing, a group wider than a packed tile and than every filter tile, folded BN, residual and
ReLU, NCHW and channels_last, float32 / float16 / bfloat16, every tile variant, linear layers).
The interpreter runs in a child process started with TRITON_INTERPRET=1, since the flag must be
set before the kernel is defined and this process may hold it compiled.

With SGDET_TEST_DEVICE=cuda (benchmarks/gpu_check.sh) the same cases run compiled on the GPU
through the torch op, and a deployed model is checked end to end. In this process, without a
GPU: argument checks, the op's CUDA registration and fake kernel, the plan logic that sends CUDA
layers to the Triton kernel and CPU layers to the C++ one, and a compile of the kernel for sm_90
(H100 / H200) down to its cubin, which catches what the interpreter lets through."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sgdet.deploy import native
from sgdet.deploy.native import cuda

if not cuda.available():
    pytest.skip(f"Triton kernel unavailable: {cuda.unavailable_reason()}", allow_module_level=True)

DEVICE = os.environ.get("SGDET_TEST_DEVICE", "cpu")
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}    # of the output's largest value
# name: cin, cout, kernel, stride, padding, dilation, (H, W), images, dtype, variants, extras
CASES = {
    "k3_s1_p1_bn": dict(cin=10, cout=13, k=3, stride=1, padding=1, hw=(7, 7), n=2, bn=True),
    "k1_wide_group_every_variant": dict(cin=19, cout=37, k=1, hw=(5, 6), n=3, wide=True, variants=(0, 1, 2, 3)),
    "k3_s2_relu_residual": dict(cin=9, cout=11, k=3, stride=2, padding=1, hw=(9, 9), n=2, relu=True,
                                residual=True, bn=True),
    "k3_s2_valid_dilation2": dict(cin=6, cout=7, k=3, stride=2, padding=0, dilation=2, hw=(11, 10), n=1),
    "k3_channels_last_relu_residual": dict(cin=12, cout=10, k=3, stride=1, padding=1, hw=(6, 5), n=2,
                                           channels_last=True, relu=True, residual=True, variants=(0, 3)),
    "fp16_k3_relu_residual": dict(cin=10, cout=12, k=3, stride=1, padding=1, hw=(6, 6), n=2, dtype="float16",
                                  relu=True, residual=True, bn=True),
    "fp16_channels_last_k1_s2": dict(cin=17, cout=9, k=1, stride=2, hw=(7, 7), n=2, dtype="float16",
                                     channels_last=True),
    "bf16_k3_s2": dict(cin=8, cout=9, k=3, stride=2, padding=1, hw=(7, 7), n=2, dtype="bfloat16", relu=True),
    "unwritten_channels": dict(cin=7, cout=8, k=3, stride=1, padding=1, hw=(5, 5), n=1, extra_out=3,
                               relu=True, residual=True),
    "no_group_reads_anything": dict(cin=5, cout=6, k=3, stride=1, padding=1, hw=(4, 4), n=1, all_empty=True),
    "linear_relu": dict(linear=True, cin=19, cout=30, n=5, wide=True, relu=True, bn=True, variants=(0, 3)),
    "linear_fp16": dict(linear=True, cin=21, cout=10, n=3, dtype="float16"),
}


def random_layer(rng: random.Random, spec: dict):
    """Groups of unequal sizes reading random overlapping channel subsets: one of a single
    filter, one reading nothing, one of 27 filters (two packed tiles) where ``wide``."""
    cin, cout, k = spec["cin"], spec["cout"], spec.get("k", 1)
    sizes, left = [1], cout - 1
    if spec.get("wide"):
        sizes.append(27)
        left -= 27
    while left > 0:
        sizes.append(min(left, rng.randint(1, 9)))
        left -= sizes[-1]
    rng.shuffle(sizes)
    weights, index = [], []
    for g, o in enumerate(sizes):
        kg = 0 if spec.get("all_empty") or g == 1 else rng.randint(1, cin)
        chans = rng.sample(range(cin), kg)
        if kg > 2:
            chans[-1] = chans[0]              # a channel read twice by one group
        index.append(torch.tensor(chans, dtype=torch.long))
        shape = (o, kg) if spec.get("linear") else (o, kg, k, k)
        weights.append(torch.randn(shape))
    width = cout + spec.get("extra_out", 0)
    out_channel = torch.tensor(rng.sample(range(width), cout))
    return weights, index, out_channel, width


def reference(spec, x, weights, index, out_channel, width, bias, scale, shift, residual, dtype):
    """F.conv2d / F.linear on the dense masked weight (BN scale folded in and rounded to the
    activations' dtype, as the packed weight is), in float32."""
    cin = spec["cin"]
    tail = weights[0].shape[2:]
    dense = torch.zeros(width, cin, *tail)
    start = 0
    for w, idx in zip(weights, index):
        rows = torch.zeros(w.shape[0], cin, *tail)
        rows.index_add_(1, idx, w)
        dense[out_channel[start:start + w.shape[0]]] = rows * scale[start:start + w.shape[0]].view(-1, *[1] * (rows.dim() - 1))
        start += w.shape[0]
    channel_bias = torch.zeros(width)
    channel_bias[out_channel] = bias * scale + shift
    dense = dense.to(dtype).float()
    if spec.get("linear"):
        y = F.linear(x.float(), dense, channel_bias)
    else:
        y = F.conv2d(x.float(), dense, channel_bias, spec.get("stride", 1), spec.get("padding", 0),
                     spec.get("dilation", 1))
    if residual is not None:
        y = y + residual.float()
    return y.relu() if spec.get("relu") else y


def check_case(spec: dict, device: str) -> float:
    """Largest error of the kernel on this case over its variants, relative to the output scale."""
    rng = random.Random(len(json.dumps(spec, sort_keys=True)))
    torch.manual_seed(rng.randint(0, 1000))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    weights, index, out_channel, width = random_layer(rng, spec)
    filters = out_channel.numel()
    bias = torch.randn(filters)
    scale = torch.rand(filters) + 0.5 if spec.get("bn") else torch.ones(filters)
    shift = torch.randn(filters) if spec.get("bn") else torch.zeros(filters)
    packed = native.pack_conv(weights, index, out_channel, bias, scale=scale, shift=shift)
    packed = cuda.to_device(packed, torch.device(device), dtype)
    if spec.get("linear"):
        x = torch.randn(spec["n"], spec["cin"])
    else:
        x = torch.randn(spec["n"], spec["cin"], *spec["hw"])
    x = x.to(dtype)
    residual = None
    if spec.get("residual"):
        ref_shape = reference(spec, x, weights, index, out_channel, width, bias, scale, shift, None, dtype).shape
        residual = torch.randn(ref_shape).to(dtype)
    expected = reference(spec, x, weights, index, out_channel, width, bias, scale, shift, residual, dtype)
    layout = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    x = x.to(device).contiguous(memory_format=layout) if x.dim() == 4 else x.to(device)
    if residual is not None:
        residual = residual.to(device).contiguous(memory_format=layout)
    worst = 0.0
    for variant in spec.get("variants", (0,)):
        with torch.no_grad():
            y = run(spec, x, packed, width, residual, variant, device)
        assert y.dtype == dtype and y.shape == expected.shape, (y.dtype, y.shape)
        if layout == torch.channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last), "output left channels_last"
        err = (y.float().cpu() - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        worst = max(worst, err)
    return worst


def run(spec, x, packed, width, residual, variant, device):
    relu = bool(spec.get("relu"))
    if device != "cpu":          # compiled, through the torch op's CUDA kernel
        if spec.get("linear"):
            return native.linear(x, packed, relu=relu, variant=variant)
        return native.conv2d(x, packed, spec.get("stride", 1), spec.get("padding", 0), spec.get("dilation", 1),
                             out_channels=width, relu=relu, residual=residual, variant=variant)
    from sgdet.deploy.native import triton_kernels   # the interpreter: CPU tensors, direct call
    tables = [packed[k] for k in ("weight", "bias", "in_index", "groups", "out_channel")]
    if spec.get("linear"):
        return triton_kernels.linear(x, *tables, width, relu, variant)
    pair = lambda v: [v, v]                                              # noqa: E731
    return triton_kernels.conv2d(x, *tables, pair(spec.get("stride", 1)), pair(spec.get("padding", 0)),
                                 pair(spec.get("dilation", 1)), width, relu, residual, variant)


def run_cases(device: str) -> dict:
    torch.backends.cudnn.allow_tf32 = False       # exact float32 against the CPU reference
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for name, spec in CASES.items():
        try:
            results[name] = {"err": check_case(spec, device)}
        except Exception as exc:  # noqa: BLE001 - reported per case by the parent
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def case_results():
    env = {**os.environ, "TRITON_INTERPRET": "0" if DEVICE != "cpu" else "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), DEVICE], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_dense_conv(name, case_results):
    result = case_results[name]
    assert "error" not in result, result.get("error")
    tolerance = TOLERANCE[CASES[name].get("dtype", "float32")]
    assert result["err"] <= tolerance, f"{name}: error {result['err']:.2e} over {tolerance:.0e}"


def test_argument_checks():
    """Refusals come before any launch (no GPU needed), one line naming the problem."""
    from sgdet.deploy.native import triton_kernels as tk
    packed = native.pack_conv([torch.randn(3, 2, 3, 3)], [torch.tensor([0, 1])], torch.arange(3))
    tables = [packed[k] for k in ("weight", "bias", "in_index", "groups", "out_channel")]
    geometry = ([1, 1], [1, 1], [1, 1], 3, False, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        tk.conv2d(torch.randn(1, 2, 4, 4, requires_grad=True), *tables, *geometry, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        tk.conv2d(torch.zeros(1, 2, 4, 4, dtype=torch.int32), *tables, *geometry, 0)
    with pytest.raises(RuntimeError, match="variant must be in 0..3"):
        tk.conv2d(torch.randn(1, 2, 4, 4), *tables, *geometry, 7)
    with pytest.raises(RuntimeError, match="packed weight is on meta"):
        tk.conv2d(torch.randn(1, 2, 4, 4), tables[0].to("meta"), *tables[1:], *geometry, 0)
    with pytest.raises(RuntimeError, match="do not fit 2 output channels"):
        tk.conv2d(torch.randn(1, 2, 4, 4), *tables, [1, 1], [1, 1], [1, 1], 2, False, None, 0)
    with pytest.raises(RuntimeError, match="residual must be"):
        tk.conv2d(torch.randn(1, 2, 4, 4), *tables, [1, 1], [1, 1], [1, 1], 3, False, torch.randn(1, 3, 5, 5), 0)


def test_cuda_kernel_registered_on_the_same_op():
    cuda.register()
    for op in ("sgdet::diverse_conv2d", "sgdet::diverse_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    if native.available():           # the C++ op keeps its CPU kernel and the schema is one
        from sgdet.deploy.native import triton_kernels as tk
        assert str(torch.ops.sgdet.diverse_conv2d.default._schema) == "sgdet::" + tk.CONV_SCHEMA
        assert str(torch.ops.sgdet.diverse_linear.default._schema) == "sgdet::" + tk.LINEAR_SCHEMA
        w = torch.randn(4, 3, 3, 3)
        packed = native.pack_conv([w], [torch.arange(3)], torch.arange(4))
        x = torch.randn(1, 3, 6, 6)
        with torch.no_grad():
            assert torch.allclose(native.conv2d(x, packed, padding=1), F.conv2d(x, w, padding=1), atol=1e-4)


def test_fake_kernel_keeps_the_cuda_layout():
    """torch.compile must see the strides the kernel returns: channels_last in, channels_last
    out on CUDA; NCHW on the CPU (the C++ kernel's only layout). Fake CUDA tensors need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    cuda.register()
    packed = native.pack_conv([torch.randn(3, 2, 3, 3)], [torch.tensor([0, 1])], torch.arange(3))
    for device, layout, expect in (("cuda", torch.channels_last, torch.channels_last),
                                   ("cuda", torch.contiguous_format, torch.contiguous_format),
                                   ("cpu", torch.channels_last, torch.contiguous_format)):
        with FakeTensorMode():
            x = torch.empty(2, 4, 8, 8, device=device).contiguous(memory_format=layout)
            p = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in packed.items()}
            y = torch.ops.sgdet.diverse_conv2d(x, p["weight"], p["bias"], p["in_index"], p["groups"],
                                               p["out_channel"], [2, 2], [1, 1], [1, 1], 5, False, None, 0)
            assert y.shape == (2, 5, 4, 4) and y.device.type == device
            assert y.is_contiguous(memory_format=expect), (device, layout, y.stride())


def test_plan_logic_sends_cuda_layers_to_triton():
    """Which kernel runs which tensors, decided without CUDA: the Triton kernel every float
    dtype on CUDA, the C++ kernel float32 on the CPU, nothing elsewhere."""
    from sgdet.deploy.optimize import check_backend
    from sgdet.deploy.plans import native_kind, native_variant_count
    gpu = torch.device("cuda", 0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert native_kind(gpu, dtype) == "cuda"
    assert native_kind(gpu, torch.float64) is None and native_kind("meta", torch.float32) is None
    assert native_kind("cpu", torch.float16) is None
    assert native_kind("cpu", torch.float32) == ("cpu" if native.available() else None)
    assert native_variant_count(gpu) == len(cuda.variants()) == 4
    check_backend("native", gpu)              # accepted: the Triton kernel serves CUDA models
    packed = cuda.to_device(native.pack_conv([torch.randn(2, 3)], [torch.arange(3)], torch.arange(2)),
                            torch.device("cpu"), torch.bfloat16)
    assert packed["weight"].dtype == torch.bfloat16 and packed["bias"].dtype == torch.float32
    assert packed["in_index"].dtype == torch.int32 and packed["groups"].dtype == torch.int64


def test_importing_sgdet_does_not_load_the_triton_kernel():
    code = ("import sys, torch, sgdet, sgdet.deploy\n"
            "from sgdet.deploy.plans import native_kind\n"
            "assert native_kind(torch.device('cuda'), torch.float16) == 'cuda'\n"
            "print('sgdet.deploy.native.triton_kernels' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_kernel_compiles_for_sm90():
    """The real compiler (not the interpreter) takes the kernel to a cubin for an H100 / H200,
    with the matrix units (wgmma) in float16 channels_last and float32 NCHW."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sgdet.deploy.native import triton_kernels as tk
    kernel = tk._diverse_group_kernel
    for dtype, pix_last, dot_f32, variant in (("fp16", False, False, 0), ("fp32", True, True, 3)):
        block_m, block_f, block_k, warps, stages = cuda.VARIANTS[variant]
        constants = dict(KH=3, KW=3, PACK=native.pack_tile(), HAS_RES=True, RELU=True, PIX_LAST=pix_last,
                         DOT_F32=dot_f32, PRECISION="ieee", BLOCK_M=block_m, BLOCK_F=block_f,
                         BLOCK_K=block_k, BLOCK_G=16)
        pointers = {"x_ptr": dtype, "w_ptr": dtype, "b_ptr": "fp32", "idx_ptr": "i32", "grp_ptr": "i64",
                    "oc_ptr": "i32", "res_ptr": dtype, "out_ptr": dtype}
        signature = {name: ("*" + pointers[name] if name in pointers else
                            "constexpr" if name in constants else "i32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        assert compiled.asm["cubin"], dtype
        if not dot_f32:          # float32 "ieee" runs on the FMA units, by design
            assert "wgmma" in compiled.asm["ptx"], dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deployed_model_on_cuda(dtype):
    """End to end on a GPU: every deployed layer on the Triton kernel (BNs folded, blocks fused)
    equals the masked model, eager and under torch.compile, channels_last."""
    import sgdet
    from conftest import make_bottleneck_resnet, randomize_bn
    from sgdet.deploy import DiverseGroupConv2d, DiverseGroupLinear
    from sgdet.deploy.plans import is_native
    torch.backends.cudnn.allow_tf32 = False
    model = randomize_bn(make_bottleneck_resnet())
    sgdet.compress(model, conv_ratio=0.7, fc_ratio=0.6, groups=8, step=None)
    model = model.eval().to("cuda", dtype).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    fast = sgdet.deploy(model, optimize=True, backend="native", example_input=x, repeats=1).eval()
    layers = [m for m in fast.modules() if isinstance(m, (DiverseGroupConv2d, DiverseGroupLinear))]
    assert layers and all(is_native(m.plan) for m in layers)
    assert fast.sgdet_fast_report["fused_blocks"] > 0
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        expected = model(x).float()
        scale = max(1.0, expected.abs().max().item())
        assert (fast(x).float() - expected).abs().max().item() <= tolerance * scale
        compiled = torch.compile(fast)
        assert (compiled(x).float() - expected).abs().max().item() <= tolerance * scale


if __name__ == "__main__":      # the child: python tests/test_triton_kernels.py cpu|cuda
    print(json.dumps(run_cases(sys.argv[1])))

"""Tests the native kernel stage (sgdet.deploy.native) on its own: conv2d / linear equal
F.conv2d / F.linear on the dense masked weight for every ISA this CPU runs and every tile
variant (kernel sizes 1-7, stride 1-2, padding, dilation, odd maps, one-filter and input-less
groups, overlapping index lists, permuted outputs, folded BN, residual, ReLU), also in forced
small channel passes, with each prefetch path and work split forced; ISA forcing and
refusal; torch.compile, torch.export and torch.jit.trace see the op; the DenseNet prologue op
(norm_relu_gather) equals cat + BN + ReLU."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgdet.deploy import native

if not native.available():
    pytest.skip(f"native kernel unavailable: {native.unavailable_reason()}", allow_module_level=True)

VARIANTS = range(4)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=native.isas())
def isa(request):
    native.set_isa(request.param)
    yield request.param
    native.set_isa(None)


def random_layer(rng: random.Random, cin: int, cout: int, k: int, *, empty_group: bool = True):
    """Groups of unequal sizes reading random overlapping channel subsets: one group of a single
    filter, one (optionally) reading nothing, one wider than a packed tile when cout allows."""
    sizes = [1]
    left = cout - 1
    if left > 30 and rng.random() < 0.5:
        sizes.append(27)   # two packed tiles: 24 + 3
        left -= 27
    while left > 0:
        o = min(left, rng.randint(1, 9))
        sizes.append(o)
        left -= o
    rng.shuffle(sizes)
    ws, idx = [], []
    for g, o in enumerate(sizes):
        kg = 0 if empty_group and g == 1 else rng.randint(1, cin)
        chans = rng.sample(range(cin), kg)
        if kg > 2 and rng.random() < 0.2:
            chans[-1] = chans[0]   # a channel read twice by one group
        idx.append(torch.tensor(chans, dtype=torch.long))
        ws.append(torch.randn(o, kg, k, k))
    perm = list(range(cout))
    rng.shuffle(perm)
    return ws, idx, torch.tensor(perm)


def dense_weight(ws, idx, oc, cin, cout):
    """The masked dense weight: zeros except each filter's own channels, rows at out_channel."""
    rows = []
    for w, i in zip(ws, idx):
        d = torch.zeros(w.shape[0], cin, *w.shape[2:])
        d.index_add_(1, i, w)
        rows.append(d)
    dense = torch.zeros(cout, cin, *ws[0].shape[2:])
    dense[oc] = torch.cat(rows)
    return dense


def scatter(values, oc, cout):
    out = torch.zeros(cout)
    out[oc] = values
    return out


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())))


def conv_cases():
    """Kernel size x stride x dilation, each with a seeded random padding, map, batch, width."""
    rng = random.Random(1234)
    maps = [(7, 9), (13, 13), (1, 1), (5, 3), (9, 7), (16, 17), (3, 11)]
    for k in (1, 3, 5, 7):
        for stride in (1, 2):
            for dil in (1, 2):
                pad = rng.randint(0, k // 2)
                h, w = rng.choice(maps)
                # grow the map until the kernel fits (1x1 maps stay for the small kernels)
                while h + 2 * pad < dil * (k - 1) + 1 or w + 2 * pad < dil * (k - 1) + 1:
                    h, w = h + 2, w + 2
                yield dict(k=k, stride=stride, dil=dil, pad=pad, h=h, w=w, n=rng.randint(1, 3),
                           cin=rng.choice([3, 19, 37]), cout=rng.choice([5, 29, 50]),
                           seed=rng.randrange(1 << 30))


CASES = list(conv_cases())


def test_cases_cover_the_grid():
    assert {(c["k"], c["stride"], c["dil"]) for c in CASES} == {
        (k, s, d) for k in (1, 3, 5, 7) for s in (1, 2) for d in (1, 2)}
    assert any(c["h"] == 1 and c["w"] == 1 for c in CASES)


def assert_cases_equal_dense(isa, cases):
    """Every tile variant on each case's random layer (random bias and folded BN) equals the
    masked dense conv, plain and through residual + ReLU."""
    for case in cases:
        rng = random.Random(case["seed"])
        torch.manual_seed(case["seed"])
        cin, cout, k = case["cin"], case["cout"], case["k"]
        ws, idx, oc = random_layer(rng, cin, cout, k)
        bias = torch.randn(cout) if rng.random() < 0.7 else None
        bn = rng.random() < 0.5
        scale, shift = (torch.rand(cout) + 0.5, torch.randn(cout)) if bn else (None, None)
        packed = native.pack_conv(ws, idx, oc, bias, scale=scale, shift=shift)
        x = torch.randn(case["n"], cin, case["h"], case["w"])
        geometry = dict(stride=case["stride"], padding=case["pad"], dilation=case["dil"])
        ref = F.conv2d(x, dense_weight(ws, idx, oc, cin, cout),
                       None if bias is None else scatter(bias, oc, cout), **geometry)
        if bn:
            ref = ref * scatter(scale, oc, cout).view(1, -1, 1, 1) + scatter(shift, oc, cout).view(1, -1, 1, 1)
        residual = torch.randn_like(ref)
        for variant in VARIANTS:
            where = f"{isa} variant {variant} case {case}"
            y = native.conv2d(x, packed, variant=variant, **geometry)
            assert y.shape == ref.shape and y.is_contiguous(), where
            assert close(y, ref), f"{where}: max error {(y - ref).abs().max():.3g}"
            y = native.conv2d(x, packed, relu=True, residual=residual, variant=variant, **geometry)
            assert close(y, (ref + residual).relu()), f"{where} (residual + relu)"


@torch.no_grad()
def test_conv2d_equals_dense(isa):
    assert_cases_equal_dense(isa, CASES)


@torch.no_grad()
@pytest.mark.parametrize("per_pass", [1, 3, 16])
def test_channel_passes_equal_dense(isa, per_pass):
    """Forced small passes: sums carried between passes in the partial buffer (first pass from
    the bias, last one through residual + ReLU), groups of 0..cin channels, packed tiles of 24+3."""
    native.set_pass_channels(per_pass)
    try:
        assert_cases_equal_dense(isa, CASES[::3])
    finally:
        native.set_pass_channels(None)
    with pytest.raises(ValueError, match="channels per pass"):
        native.set_pass_channels(-1)


@torch.no_grad()
@pytest.mark.parametrize("limit", [0, 1 << 30])
def test_next_block_prefetch_equals_dense(isa, limit):
    """The channel loop that prefetches the next block (1x1 convs, short lists) forced on for
    every list on every ISA, and off: both paths compute the same sums."""
    native.set_prefetch_next(limit)
    try:
        assert_cases_equal_dense(isa, [c for c in CASES if c["k"] == 1])
    finally:
        native.set_prefetch_next(None)
    with pytest.raises(ValueError, match="next-block prefetch"):
        native.set_prefetch_next(-2)


@torch.no_grad()
@pytest.mark.parametrize("blocks", [0, 3])
def test_store_prefetch_equals_dense(isa, blocks):
    """The store's prefetch of a later block's output and residual pixels (on by default on
    AVX2 only) forced off and on, 3 blocks ahead, on every ISA: the same sums, residual and ReLU
    included, and the same bits as the ISA's default."""
    cases = CASES[::2]
    native.set_store_prefetch(blocks)
    try:
        assert_cases_equal_dense(isa, cases)
        ws, idx, oc = random_layer(random.Random(5), 40, 50, 3)
        packed = native.pack_conv(ws, idx, oc, torch.randn(50))
        x, res = torch.randn(2, 40, 23, 23), torch.randn(2, 50, 23, 23)
        forced = native.conv2d(x, packed, padding=(1, 1), relu=True, residual=res)
        native.set_store_prefetch(None)
        assert torch.equal(forced, native.conv2d(x, packed, padding=(1, 1), relu=True, residual=res))
    finally:
        native.set_store_prefetch(None)
    with pytest.raises(ValueError, match="blocks ahead the store prefetches"):
        native.set_store_prefetch(-2)


@torch.no_grad()
def test_work_schedules_agree_bitwise(isa):
    """The guided work split (threads take shrinking runs of items; the default for group-major
    layers) and static ranges, each forced, with 3 threads, on layers that run group-major
    (weights over 512 KiB, groups up to 100x apart in size, as k-means leaves them) and on the
    small cases: both equal the dense conv, and they agree bit for bit (every output value is
    computed by one work item)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    rng = random.Random(7)
    try:
        for cin, cout, k, size in ((512, 64, 3, 7), (2048, 160, 1, 9)):
            sizes = [40, 1, 2, 5, 16] if cout == 64 else [100, 3, 1, 40, 16]
            idx = [torch.tensor(rng.sample(range(cin), rng.randint(cin // 2, cin))) for _ in sizes]
            ws = [torch.randn(o, len(i), k, k) for o, i in zip(sizes, idx)]
            assert sum(w.numel() for w in ws) * 4 > 512 << 10      # the group-major path
            oc = torch.randperm(cout)
            bias = torch.randn(cout)
            packed = native.pack_conv(ws, idx, oc, bias)
            x = torch.randn(2, cin, size, size)
            ref = F.conv2d(x, dense_weight(ws, idx, oc, cin, cout), scatter(bias, oc, cout), padding=k // 2)
            outs = {}
            for schedule in ("static", "guided"):
                native.set_schedule(schedule)
                outs[schedule] = native.conv2d(x, packed, padding=(k // 2, k // 2))
                assert close(outs[schedule], ref), (isa, schedule, cin, cout, k)
            assert torch.equal(outs["static"], outs["guided"]), (isa, cin, cout, k)
        for schedule in ("static", "guided"):
            native.set_schedule(schedule)
            assert_cases_equal_dense(isa, CASES[::4])
    finally:
        native.set_schedule(None)
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="unknown schedule"):
        native.set_schedule("dynamic")
    with pytest.raises(ValueError, match="unknown knob 'nonsense'; knobs: pass_channels"):
        torch.ops.sgdet.native_tune("nonsense", 1)


def phase_cases():
    """Stride-2 geometries whose output rows are as wide as the phase planes ((W+1)/2): k x k
    with padding k//2 (dilation 1) or k-1 (dilation 2), even and odd maps, odd channel counts."""
    rng = random.Random(99)
    for k in (1, 3, 5, 7):
        for dil in (1, 2):
            for h, w in ((14, 14), (9, 11), (7, 8)):
                pad = k // 2 if dil == 1 else k - 1
                yield dict(k=k, stride=2, dil=dil, pad=pad, h=h, w=w, n=rng.randint(1, 3),
                           cin=rng.choice([3, 19, 37]), cout=rng.choice([5, 29, 50]),
                           seed=rng.randrange(1 << 30))


@torch.no_grad()
@pytest.mark.parametrize("layout", ["phases", "rows"])
def test_stride2_layouts_equal_dense(isa, layout):
    """Stride-2 convs on phase planes (split first, then read like stride 1) and on strided
    rows, each forced, on geometries where both apply; channel passes forced small too, so a
    pass's taps read from several planes."""
    native.set_stride2_layout(layout)
    try:
        assert_cases_equal_dense(isa, list(phase_cases()))
        native.set_pass_channels(3)
        assert_cases_equal_dense(isa, list(phase_cases())[::4])
    finally:
        native.set_stride2_layout(None)
        native.set_pass_channels(None)
    with pytest.raises(ValueError, match="stride-2 layout"):
        native.set_stride2_layout("diagonal")


@torch.no_grad()
def test_asymmetric_geometry_and_strided_input(isa):
    rng = random.Random(7)
    ws, idx, oc = random_layer(rng, 21, 30, 3)
    packed = native.pack_conv(ws, idx, oc)
    big = torch.randn(2, 30, 11, 8)
    x = big[:, 4:25]                  # channel slice: planes contiguous, image stride larger
    dense = dense_weight(ws, idx, oc, 21, 30)
    for geometry in (dict(stride=(1, 2), padding=(0, 1), dilation=(2, 1)),
                     dict(stride=(2, 1), padding=(1, 0), dilation=(1, 1)),
                     dict(stride=3, padding=1, dilation=1)):
        ref = F.conv2d(x, dense, **geometry)
        for variant in VARIANTS:
            assert close(native.conv2d(x, packed, variant=variant, **geometry), ref), (isa, geometry)
    # wide maps: several vectors per output row (the row layout's segments)
    wide = torch.randn(1, 21, 6, 75)
    for geometry in (dict(stride=2, padding=1), dict(stride=1, padding=0), dict(stride=(1, 2))):
        ref = F.conv2d(wide, dense, **geometry)
        for variant in VARIANTS:
            assert close(native.conv2d(wide, packed, variant=variant, **geometry), ref), (isa, geometry)
    cl = x.contiguous(memory_format=torch.channels_last)   # rows not contiguous: copied
    assert close(native.conv2d(cl, packed, padding=1), F.conv2d(x, dense, padding=1))


@torch.no_grad()
def test_linear_equals_dense(isa):
    rng = random.Random(3)
    for n, cin, cout in ((1, 9, 5), (5, 40, 33), (37, 19, 50)):
        ws, idx, oc = random_layer(rng, cin, cout, 1)
        bias = torch.randn(cout)
        packed = native.pack_conv([w[:, :, 0, 0] for w in ws], idx, oc, bias)
        x = torch.randn(n, cin)
        ref = F.linear(x, dense_weight(ws, idx, oc, cin, cout)[:, :, 0, 0], scatter(bias, oc, cout))
        for variant in VARIANTS:
            assert close(native.linear(x, packed, variant=variant), ref), (isa, n, variant)
            assert close(native.linear(x, packed, relu=True, variant=variant), ref.relu())
    assert native.linear(torch.randn(2, 3, cin), packed).shape == (2, 3, cout)


@torch.no_grad()
def test_unwritten_channels_are_zero_or_residual():
    ws, idx = [torch.randn(2, 3, 3, 3)], [torch.tensor([0, 2, 1])]
    packed = native.pack_conv(ws, idx, torch.tensor([4, 1]))     # channels 0, 2, 3 unwritten
    x = torch.randn(1, 3, 5, 5)
    y = native.conv2d(x, packed, padding=1, out_channels=7)
    assert y.shape == (1, 7, 5, 5)
    assert y[:, [0, 2, 3, 5, 6]].abs().max() == 0
    res = torch.randn_like(y)
    y = native.conv2d(x, packed, padding=1, out_channels=7, residual=res, relu=True)
    assert torch.equal(y[:, [0, 2, 3, 5, 6]], res[:, [0, 2, 3, 5, 6]].relu())
    assert native.conv2d(x, packed, padding=1).shape == (1, 5, 5, 5)   # max(out_channel) + 1


def test_packing_is_deterministic_and_plain():
    rng = random.Random(0)
    ws, idx, oc = random_layer(rng, 30, 40, 3)
    a = native.pack_conv(ws, idx, oc, torch.ones(40))
    b = native.pack_conv(ws, idx, oc, torch.ones(40))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert all(type(v) is torch.Tensor for v in a.values())
    assert a["weight"].shape == (3, 3, sum(w.shape[0] * w.shape[1] for w in ws))
    with pytest.raises(ValueError, match="distinct"):
        native.pack_conv(ws, idx, torch.zeros(40, dtype=torch.long))
    with pytest.raises(ValueError, match="channels"):
        native.pack_conv(ws, [i[:-1] if len(i) else i for i in idx], oc)


def test_errors_are_clear():
    packed = native.pack_conv([torch.randn(2, 2, 1, 1)], [torch.tensor([0, 1])], torch.tensor([0, 1]))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        native.conv2d(x, packed)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="out of range"):
            native.conv2d(torch.randn(1, 1, 4, 4), packed)      # channel 1 missing
        with pytest.raises(ValueError, match="variant"):
            native.conv2d(x, packed, variant=4)
        assert native.conv2d(x, packed).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="unknown ISA"):
        native.set_isa("sse9")
    assert native.isa() == native.isas()[0]
    assert all(len(native.variants(name)) == 4 for name in native.isas())


def test_lacking_isa_is_refused():
    """SGDET_NATIVE_HIDE makes a process see a CPU without AVX-512 / AVX2."""
    code = ("from sgdet.deploy import native as n\n"
            "print(n.isas(), n.isa())\n"
            "try:\n    n.set_isa('avx512')\nexcept ValueError as e:\n    print('refused:', e)\n")
    env = dict(os.environ, SGDET_NATIVE_HIDE="avx512,avx2", SGDET_NATIVE_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['portable'] portable" in out.stdout
    assert "refused: this CPU lacks the avx512" in out.stdout
    assert "SGDET_NATIVE_ISA ignored" in out.stderr


class _Tiny(nn.Module):
    """Two native layers (a strided 3x3 with relu, a 1x1 with a residual) as module buffers."""

    def __init__(self):
        super().__init__()
        rng = random.Random(5)
        for name, (cin, cout, k) in (("a", (6, 10, 3)), ("b", (10, 10, 1))):
            ws, idx, oc = random_layer(rng, cin, cout, k)
            for key, value in native.pack_conv(ws, idx, oc, torch.randn(cout)).items():
                self.register_buffer(f"{name}_{key}", value)

    def packed(self, name):
        return {key[2:]: value for key, value in self.named_buffers() if key.startswith(name + "_")}

    def forward(self, x):
        a = self.packed("a")
        y = torch.ops.sgdet.diverse_conv2d(x, a["weight"], a["bias"], a["in_index"], a["groups"],
                                           a["out_channel"], [2, 2], [1, 1], [1, 1], 10, True,
                                           None, 0)
        return native.conv2d(y, self.packed("b"), relu=True, residual=y)


@pytest.mark.filterwarnings("ignore::FutureWarning")   # torch.jit's deprecation notices
@torch.no_grad()
def test_compile_export_and_trace(tmp_path):
    model, x = _Tiny().eval(), torch.randn(2, 6, 9, 9)
    ref = model(x)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        assert torch.allclose(out, ref, atol=1e-5), backend
    exported = torch.export.export(model, (x,))
    ops = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert ops.count("sgdet.diverse_conv2d.default") == 2, ops
    assert torch.allclose(exported.module()(x), ref, atol=1e-5)
    traced = torch.jit.trace(model, (x,))
    assert "sgdet::diverse_conv2d" in str(traced.graph)
    path = str(tmp_path / "tiny.pt")
    traced.save(path)
    assert torch.allclose(torch.jit.load(path)(x), ref, atol=1e-5)


def test_norm_relu_gather_equals_cat_norm_relu():
    """DenseNet's prologue op: reads channels straight from the list of maps (a strided slice and
    a channels_last map among them), any index order with repeats, with and without the ReLU."""
    torch.manual_seed(0)
    maps = [torch.randn(3, 5, 7, 9), torch.randn(3, 8, 7, 9)[:, 2:6],
            torch.randn(3, 2, 7, 9).contiguous(memory_format=torch.channels_last)]
    index = torch.tensor([10, 0, 4, 4, 9, 5, 1])
    scale, shift = torch.randn(7), torch.randn(7)
    full = torch.cat(maps, 1)[:, index] * scale[:, None, None] + shift[:, None, None]
    with torch.no_grad():
        assert torch.equal(native.norm_relu_gather(maps, index, scale, shift), full.relu())
        assert torch.equal(native.norm_relu_gather(maps, index, scale, shift, relu=False), full)
        torch.library.opcheck(torch.ops.sgdet.norm_relu_gather.default,
                              ([m.contiguous() for m in maps], index, scale, shift, True),
                              test_utils=("test_schema", "test_faketensor"))
        with pytest.raises(RuntimeError, match="channel 11 out of range for 11"):
            native.norm_relu_gather(maps, torch.tensor([11]), scale[:1], shift[:1])
        with pytest.raises(RuntimeError, match="one batch and size"):
            native.norm_relu_gather([maps[0], torch.randn(2, 1, 7, 9)], index, scale, shift)
        with pytest.raises(RuntimeError, match="index's length"):
            native.norm_relu_gather(maps, index, scale[:3], shift)
    with pytest.raises(RuntimeError, match="inference-only"):
        native.norm_relu_gather([maps[0].requires_grad_()], index[:1], scale[:1], shift[:1])

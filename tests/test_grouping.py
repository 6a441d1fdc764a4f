"""Tests stages 1-3 of self-grouping: importance vectors, k-means grouping, centroid pruning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import sgdet
from sgdet.grouping import centroid_prune, group_filters, importance_vectors, pruned_fraction

from conftest import assert_same_output, exact_pruned


# ---------------------------------------------------------------------------- importance vectors

def test_importance_vectors_conv_is_per_channel_l1():
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, 3)
    v = importance_vectors(w)
    assert v.dtype == torch.float64 and v.device.type == "cpu" and tuple(v.shape) == (5, 4)
    for i in range(5):
        for j in range(4):
            expected = sum(abs(float(w[i, j, a, b])) for a in range(3) for b in range(3))
            assert float(v[i, j]) == pytest.approx(expected, rel=1e-6)


def test_importance_vectors_respects_mask():
    torch.manual_seed(1)
    w = torch.randn(6, 5, 3, 3)
    mask = torch.rand(6, 5) > 0.4
    v = importance_vectors(w, mask)
    expected = torch.einsum("ijab,ij->ij", w.abs().double(), mask.double())
    assert torch.allclose(v, expected, rtol=1e-6, atol=0)
    assert bool((v[~mask] == 0).all())
    assert bool((v[mask] > 0).all())
    assert torch.allclose(importance_vectors(w), w.abs().sum((2, 3)).double())  # mask=None: all kept


def test_importance_vectors_linear_is_abs():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.0, 4.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    v = importance_vectors(w, mask)
    assert v.tolist() == [[1.0, 0.0, 0.5], [3.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------- grouping

def _first_appearance_ok(labels: torch.Tensor) -> bool:
    seen = []
    for lab in labels.tolist():
        if lab not in seen:
            seen.append(lab)
    return seen == list(range(len(seen)))


def test_group_filters_deterministic_and_renumbered():
    gen = torch.Generator().manual_seed(3)
    # three well separated clusters, listed out of order
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    which = torch.tensor([2, 2, 0, 1, 0, 2, 1, 1, 0, 2])
    vectors = centres[which] + 0.05 * torch.rand(10, 3, generator=gen, dtype=torch.float64)
    a = group_filters(vectors, 3, seed=7)
    b = group_filters(vectors.clone(), 3, seed=7)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centroids, b.centroids)
    assert a.labels.dtype == torch.long
    # renumbered by first appearance: filter 0's group is 0, the next new one 1, ...
    assert a.labels.tolist() == [0, 0, 1, 2, 1, 0, 2, 2, 1, 0]
    assert _first_appearance_ok(a.labels)
    for g in range(3):
        members = vectors[a.labels == g]
        assert torch.allclose(a.centroids[g], members.mean(0))
    assert a.sizes.tolist() == [4, 3, 3]


def test_group_filters_random_data_invariants():
    gen = torch.Generator().manual_seed(0)
    vectors = torch.rand(40, 12, generator=gen, dtype=torch.float64)
    for seed in (0, 1):
        g = group_filters(vectors, 6, seed=seed)
        assert _first_appearance_ok(g.labels)
        assert int(g.labels.max()) + 1 == g.centroids.shape[0] <= 6
        assert int(g.sizes.sum()) == 40 and bool((g.sizes > 0).all())
        assert torch.equal(g.labels, group_filters(vectors, 6, seed=seed).labels)


def test_fewer_filters_than_groups():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
    g = group_filters(vectors, 8, seed=0)
    assert g.labels.tolist() == [0, 1, 2]
    assert torch.equal(g.centroids, vectors)


def test_single_group():
    vectors = torch.rand(5, 3, dtype=torch.float64)
    g = group_filters(vectors, 1)
    assert g.labels.tolist() == [0] * 5
    assert torch.allclose(g.centroids[0], vectors.mean(0))


def test_identical_vectors_give_fewer_groups():
    a = [1.0, 2.0, 0.0]
    b = [0.0, 0.0, 7.0]
    vectors = torch.tensor([a, b, a, a, b, b, a], dtype=torch.float64)
    g = group_filters(vectors, 5, seed=0)
    assert g.centroids.shape[0] == 2
    assert g.labels.tolist() == [0, 1, 0, 0, 1, 1, 0]
    assert torch.equal(g.centroids, torch.tensor([a, b], dtype=torch.float64))
    zeros = group_filters(torch.zeros(6, 4, dtype=torch.float64), 3)
    assert zeros.centroids.shape[0] == 1 and zeros.labels.tolist() == [0] * 6


# ---------------------------------------------------------------------------- centroid pruning

def _prefix_fractions(centroids, sizes):
    """Pruned fraction after removing the n smallest centroid entries, n = 0..g*C_in, computed with
    plain Python sorting."""
    g, c_in = centroids.shape
    entries = sorted(((float(centroids[i, j]), i * c_in + j, int(sizes[i]))
                      for i in range(g) for j in range(c_in)))
    total = int(sizes.sum()) * c_in
    out, acc = [0.0], 0
    for _, _, s in entries:
        acc += s
        out.append(acc / total)
    return out


def _check_prune(centroids, sizes, fraction):
    keep = centroid_prune(centroids, sizes, fraction)
    g, c_in = centroids.shape
    assert keep.dtype == torch.bool and tuple(keep.shape) == (g, c_in)
    achieved = pruned_fraction(keep, sizes)
    # Eq. 13 recomputed by hand
    manual = sum(int((~keep[i]).sum()) * int(sizes[i]) for i in range(g)) / (int(sizes.sum()) * c_in)
    assert achieved == pytest.approx(manual, abs=1e-12)
    # closest achievable by a prefix of the sorted entries
    best = min(abs(f - fraction) for f in _prefix_fractions(centroids, sizes))
    assert abs(achieved - fraction) <= best + 1e-12
    # granularity bound: half of the largest step
    bound = int(sizes.max()) / (2 * int(sizes.sum()) * c_in)
    assert abs(achieved - fraction) <= bound + 1e-12
    # the pruned entries are the smallest ones
    pruned_vals, kept_vals = centroids[~keep], centroids[keep]
    if pruned_vals.numel() and kept_vals.numel():
        assert float(pruned_vals.max()) <= float(kept_vals.min())
    return keep, achieved


def test_centroid_prune_example():
    centroids = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], dtype=torch.float64)
    sizes = torch.tensor([1, 3])
    # entries ascending: 0.1 (g0, 1 conn), 0.2 (g1, 3), 0.3 (g1, 3), 0.5 (g0, 1), ... total 12
    keep, achieved = _check_prune(centroids, sizes, 0.3)   # prefixes 0, 1/12, 4/12, 7/12 -> 4/12
    assert keep.tolist() == [[False, True, True], [True, False, True]]
    assert achieved == pytest.approx(4 / 12)
    keep, achieved = _check_prune(centroids, sizes, 0.0)
    assert bool(keep.all()) and achieved == 0.0
    keep, achieved = _check_prune(centroids, sizes, 0.62)  # 7/12 = .583, 8/12 = .667 -> 7/12
    assert achieved == pytest.approx(7 / 12)
    assert keep.tolist() == [[False, True, True], [False, False, True]]


@settings(max_examples=150, deadline=None)
@given(g=st.integers(1, 6), c_in=st.integers(1, 12), data=st.data(),
       fraction=st.floats(0.0, 0.999, allow_nan=False))
def test_centroid_prune_property(g, c_in, data, fraction):
    sizes = torch.tensor(data.draw(st.lists(st.integers(1, 9), min_size=g, max_size=g)))
    values = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=g * c_in,
                                max_size=g * c_in))
    centroids = torch.tensor(values, dtype=torch.float64).view(g, c_in)
    _check_prune(centroids, sizes, fraction)


# ---------------------------------------------------------------------------- whole layer

class _OneConv(nn.Module):
    def __init__(self, c_in, c_out, k):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)

    def forward(self, x):
        return self.conv(x)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["conv", "linear"]), c_out=st.integers(1, 24), c_in=st.integers(1, 10),
       k=st.sampled_from([1, 3]), groups=st.integers(1, 8), ratio=st.floats(0.0, 0.95),
       seed=st.integers(0, 3), steps=st.sampled_from([None, 0.3]))
@example(kind="conv", c_out=1, c_in=3, k=1, groups=1, ratio=0.5, seed=0, steps=None)  # a tie
def test_layer_property_after_compress(kind, c_out, c_in, k, groups, ratio, seed, steps):
    torch.manual_seed(seed)
    if kind == "conv":
        model, x = _OneConv(c_in, c_out, k), torch.randn(2, c_in, 5, 5)
        conv_ratio, fc_ratio, name = ratio, 0.0, "conv"
    else:
        model, x = nn.Sequential(nn.Linear(c_in, c_out)), torch.randn(3, c_in)
        conv_ratio, fc_ratio, name = 0.0, ratio, "0"
    model.eval()
    sgdet.compress(model, conv_ratio=conv_ratio, fc_ratio=fc_ratio, groups=groups, step=steps,
                   seed=seed, include=[name])
    layer = model.get_submodule(name)
    assert isinstance(layer, sgdet.SGConv2d if kind == "conv" else sgdet.SGLinear)
    assert layer.check_invariant()
    assert layer.num_groups <= min(groups, c_out)
    sizes = layer.group_sizes()
    assert bool((sizes > 0).all())
    bound = int(sizes.max()) / (2 * c_out * c_in)
    assert abs(exact_pruned(layer) - ratio) <= bound + 1e-9
    assert layer.pruned_fraction() == pytest.approx(exact_pruned(layer), abs=1e-6)
    # pruned weights really are zero
    assert bool((layer.weight[~layer.mask] == 0).all())
    # deploy is exact
    ref = model(x)
    deployed = sgdet.deploy(model)
    new = deployed.get_submodule(name)
    assert isinstance(new, sgdet.DiverseGroupConv2d if kind == "conv" else sgdet.DiverseGroupLinear)
    assert_same_output(ref, deployed(x))
    assert sum(p.numel() for p in new.weights) == layer.kept_connections()


def test_pruned_fraction_helper_matches_eq13():
    keep = torch.tensor([[True, False, False], [False, True, True]])
    sizes = torch.tensor([2, 5])
    # group 0 prunes 2 entries * 2 filters, group 1 prunes 1 entry * 5 filters; total 7*3
    assert pruned_fraction(keep, sizes) == pytest.approx(9 / 21)
    assert math.isclose(pruned_fraction(torch.ones(2, 3, dtype=torch.bool), sizes), 0.0)
    assert np.isclose(pruned_fraction(torch.zeros(2, 3, dtype=torch.bool), sizes), 1.0)

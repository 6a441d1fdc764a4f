"""Stage 1-3 of self-grouping for one layer: importance vectors (Eqs. 5-6), k-means grouping of
filters (Eqs. 7-8, scikit-learn) and centroid-based pruning (Eqs. 9-13). All vectorised.
``GROUPINGS``: how filters are grouped, ``"kmeans"`` (the paper) or ``"fixed"`` (CondenseNet's
fixed equal split by filter index, no clustering: the ablation of self-grouping itself)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning


def importance_vectors(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """v_ij = ||w_ij||_1 over the kernel of input channel j (for FC layers |w_ij|), on the masked
    weight. Returns float64 [C_out, C_in] on the CPU."""
    w = weight.detach()
    if mask is not None:
        w = w * mask.view(mask.shape + (1,) * (w.dim() - 2)).to(w.dtype)
    v = w.abs().flatten(2).sum(2) if w.dim() > 2 else w.abs()
    return v.to(device="cpu", dtype=torch.float64)


@dataclass
class Grouping:
    labels: torch.Tensor      # [C_out] long, groups numbered by first appearance
    centroids: torch.Tensor   # [g, C_in] float64, mean importance vector of each group

    @property
    def sizes(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.centroids.shape[0])


def group_filters(vectors: torch.Tensor, groups: int, seed: int = 0, n_init: int = 1) -> Grouping:
    """k-means (Eq. 7) of the importance vectors into at most ``groups`` clusters.

    Groups are renumbered in order of their first filter, so the same seed and weights always
    give the same labels. Fewer distinct vectors than groups give fewer (non-empty) groups."""
    c_out = vectors.shape[0]
    k = min(groups, c_out)
    data = vectors.numpy()
    if k == 1:
        raw = np.zeros(c_out, dtype=np.int64)
    else:
        with warnings.catch_warnings():
            # identical vectors (e.g. all-zero filters) legitimately give fewer distinct clusters
            warnings.simplefilter("ignore", ConvergenceWarning)
            raw = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(data)
    # renumber by first appearance; drops clusters k-means left empty
    _, first_index, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.empty_like(first_index)
    rank[np.argsort(first_index, kind="stable")] = np.arange(len(first_index))
    labels = torch.from_numpy(rank[inverse].astype(np.int64))
    g = len(first_index)
    membership = torch.nn.functional.one_hot(labels, g).T.to(torch.float64)   # [g, C_out]
    centroids = (membership @ vectors) / membership.sum(1, keepdim=True)
    return Grouping(labels=labels, centroids=centroids)


def fixed_groups(vectors: torch.Tensor, groups: int) -> Grouping:
    """CondenseNet-style grouping: the filters split by index into ``min(groups, C_out)`` groups
    of equal size (contiguous blocks; sizes differ by at most one), whatever their weights. The
    centroids are the groups' mean importance vectors, as for k-means."""
    c_out = vectors.shape[0]
    k = max(1, min(groups, c_out))
    labels = torch.arange(c_out, dtype=torch.long) * k // c_out
    membership = torch.nn.functional.one_hot(labels, k).T.to(torch.float64)    # [k, C_out]
    centroids = (membership @ vectors) / membership.sum(1, keepdim=True)
    return Grouping(labels=labels, centroids=centroids)


GROUPINGS = ("kmeans", "fixed")


def make_grouping(vectors: torch.Tensor, groups: int, method: str = "kmeans", seed: int = 0,
                  n_init: int = 1) -> Grouping:
    """The grouping ``method`` (one of GROUPINGS) of one layer's importance vectors."""
    if method == "kmeans":
        return group_filters(vectors, groups, seed, n_init)
    if method == "fixed":
        return fixed_groups(vectors, groups)
    raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {method!r}")


def centroid_prune(centroids: torch.Tensor, sizes: torch.Tensor, fraction: float) -> torch.Tensor:
    """Centroid-based pruning (Eqs. 9-13): sort the g*C_in centroid entries ascending and prune the
    smallest ones, each removing |g_i| connections, until the layer's pruned fraction r(G, n) is
    as close to ``fraction`` as the group sizes allow. Returns keep [g, C_in] bool."""
    g, c_in = centroids.shape
    flat = centroids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    entry_weight = sizes.to(torch.float64).repeat_interleave(c_in)[order]
    total = float(sizes.sum().item()) * c_in
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(entry_weight, 0)])
    n = int(torch.argmin((cumulative - fraction * total).abs()).item())  # first closest prefix
    keep = torch.ones(g * c_in, dtype=torch.bool)
    keep[order[:n]] = False
    return keep.view(g, c_in)


def pruned_fraction(keep: torch.Tensor, sizes: torch.Tensor) -> float:
    """r(G, n) of Eq. 13 for a keep matrix [g, C_in] and group sizes [g]."""
    pruned = ((~keep).sum(1).to(torch.float64) * sizes.to(torch.float64)).sum()
    return float(pruned / (sizes.sum() * keep.shape[1]))

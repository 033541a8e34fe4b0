"""Batched k-means over key vectors, on whatever device holds them.

    kmeans(x [..., n, d], k, iters, seed, metric) -> KMeans(centroids [..., k, d],
                                                            labels [..., n])

Every leading index (a layer, a KV head, a PQ subspace) is clustered on its own, all at
once. The start is the same k distinct point indices in every batch, drawn by a seeded
generator on the CPU: a seed gives the same clusters on any device, and a batch's
clusters do not depend on what it is batched with (k-means of a layer alone equals its
part of k-means over several layers). Each round assigns every point to its nearest
centroid, then moves each centroid to the mean of its points (summed by matmuls, in one
order: the same clusters every run); a centroid that loses all its points stays where it
was. The labels returned are the assignment to the final
centroids.

Metrics:
    l2      nearest by Euclidean distance (PQCache's codebooks)
    cosine  nearest by angle, the mean of the points kept unnormalised (ClusterKV's
            semantic clusters: q . centroid then estimates q . k of the members)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Metric = Literal["l2", "cosine"]
CHUNK = 8192  # points whose distances to every centroid are held at once


@dataclass(frozen=True)
class KMeans:
    centroids: torch.Tensor  # [..., k, d] float32
    labels: torch.Tensor  # [..., n] int64


def nearest(x: torch.Tensor, centroids: torch.Tensor, metric: Metric) -> torch.Tensor:
    """[..., n] int64: each point's nearest centroid (ties: the lowest index), CHUNK
    points at a time (a table of [..., CHUNK, k] at most)."""
    return torch.cat([_nearest(part, centroids, metric) for part in x.split(CHUNK, dim=-2)], -1)


def _nearest(x: torch.Tensor, centroids: torch.Tensor, metric: Metric) -> torch.Tensor:
    x, centroids = x.float(), centroids.float()
    if metric == "cosine":
        unit = F.normalize(centroids, dim=-1).transpose(-1, -2)
        return (F.normalize(x, dim=-1) @ unit).argmax(-1)
    # argmin |x - c|^2 = argmax 2 x.c - |c|^2
    norms = (centroids * centroids).sum(-1)[..., None, :]
    return (2 * (x @ centroids.transpose(-1, -2)) - norms).argmax(-1)


def kmeans(
    x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, metric: Metric = "l2"
) -> KMeans:
    """k-means of each batch of points x [..., n, d] (1 <= k <= n)."""
    *lead, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    points = x.float().reshape(-1, n, d)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n, generator=generator)[:k]  # one draw: every batch alike
    centroids = points[:, starts.to(x.device)]
    for _ in range(iters):
        sums, counts = _member_sums(points, centroids, metric)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    labels = nearest(points, centroids, metric)
    return KMeans(centroids.view(*lead, k, d), labels.view(*lead, n))


def _member_sums(
    points: torch.Tensor, centroids: torch.Tensor, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per centroid of centroids [b, k, d], the sum [b, k, d] and count [b, k, 1] of the
    points [b, n, d] nearest it: one-hot matmuls, CHUNK points at a time, so the sums
    run in one order on every device (atomic scatter adds would not)."""
    k = centroids.shape[1]
    sums = torch.zeros_like(centroids)
    counts = centroids.new_zeros(centroids.shape[0], k, 1)
    for part in points.split(CHUNK, dim=1):
        onehot = F.one_hot(_nearest(part, centroids, metric), k).float()  # [b, chunk, k]
        sums += onehot.transpose(1, 2) @ part
        counts += onehot.sum(1)[..., None]
    return sums, counts
